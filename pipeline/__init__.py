"""Entry point, configuration and graph of the per-group PCA feature stage."""

__version__ = "0.1.0"
