"""Entry point, configuration and graph of the per-group PCA feature stage."""

import logging

__version__ = "0.1.0"


def _is_not_gcp_notice(record: logging.LogRecord) -> bool:
    # Beam warns at import time that its Google Cloud client libraries are
    # missing; they are an extra this stage needs only for gs:// paths, and
    # the notice would stand before every one-line error.
    return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_is_not_gcp_notice)
