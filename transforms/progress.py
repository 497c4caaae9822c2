"""Progress of a long run, logged at a steady pace without flooding the log.

The footers give the total row count before the run starts. Each worker
process logs the rows it has done at most every ``every_s`` seconds; on a
runner whose ``run()`` returns at once (Dataflow, Flink, the PortableRunner)
the launcher also logs the runner's own count of the ``rows_read`` metric.
"""

from __future__ import annotations

import logging
import time

_LOGGER = logging.getLogger(__name__)


def describe(step: str, done: int, total: int, elapsed_s: float) -> str:
    """``Fit: 1,000,000 of 8,000,000 rows (12.5%), 250,000 rows/s, 4 s``."""
    share = f" ({100.0 * done / total:.1f}%)" if total else ""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"{step}: {done:,} of {total:,} rows{share}, {rate:,.0f} rows/s, "
        f"{elapsed_s:.0f} s"
    )


class Progress:
    """Counts rows in one process and logs every ``every_s`` seconds at most.

    Args:
        step: what is being done ("Fit", "Transform").
        total_rows: rows of the whole input, from the footers.
        every_s: the least time between two log lines.
    """

    def __init__(self, step: str, total_rows: int, every_s: float = 10.0):
        self._step = step
        self._total = total_rows
        self._every_s = every_s
        self._done = 0
        self._started = time.monotonic()
        self._last = self._started

    def add(self, n_rows: int) -> None:
        self._done += n_rows
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            _LOGGER.info(
                "%s (this worker)",
                describe(self._step, self._done, self._total, now - self._started),
            )
