"""prunebench: config-driven prune -> recover -> evaluate experiments for transformer LMs."""

from pathlib import Path

__version__ = "0.1.0"

# The shipped config groups (model, pruner, ...; also the registry of instantiable components).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class PrunebenchError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
