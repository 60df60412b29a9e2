"""The results contract: one metrics.json per run, written atomically; plus the run's provenance."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import tempfile
from pathlib import Path

from prunebench.config import CONF_DIR


def write_json(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def proc_status_mb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> None:
    """Make the peak (VmHWM) equal the current RSS, so a later peak belongs to one phase (Linux)."""
    import gc

    gc.collect()
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def versions() -> dict[str, str]:
    import hydra
    import torch
    import transformers

    import prunebench

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hydra": hydra.__version__,
        "prunebench": prunebench.__version__,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(CONF_DIR.parent), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
