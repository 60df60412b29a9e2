"""prunebench: config-driven prune -> recover -> evaluate experiments for transformer LMs."""

__version__ = "0.1.0"


class PrunebenchError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
