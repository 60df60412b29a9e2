"""The results contract: one metrics.json per run, written atomically; plus the run's provenance."""

from __future__ import annotations

import json
import logging
import platform
import resource
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prunebench.config import CONF_DIR

log = logging.getLogger(__name__)


def write_json(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file,
    and an interrupt leaves either no file or the whole one."""
    from prunebench.cache import write_bytes

    write_bytes(Path(path), json.dumps(data, indent=2, sort_keys=False, default=str).encode())


_ENV = "\x00env\x00"  # stands in for every environment variable while the config resolves


def public_config(cfg: DictConfig) -> dict:
    """The resolved config for metrics.json, except values that come from environment variables
    (`${oc.env:...}`, directly or through other interpolations such as `${paths.cache_dir}`): those
    keep their unresolved interpolation, so a token or a home path never lands in a results file."""
    raw = OmegaConf.to_container(cfg, resolve=False)

    def mark(node):
        if isinstance(node, dict):
            return {k: mark(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mark(v) for v in node]
        return _ENV if isinstance(node, str) and "oc.env" in node else node

    def pick(raw_node, value):
        if isinstance(raw_node, dict):
            return {k: pick(v, value[k]) for k, v in raw_node.items()}
        if isinstance(raw_node, list):
            return [pick(a, b) for a, b in zip(raw_node, value, strict=True)]
        return raw_node if isinstance(value, str) and _ENV in value else value

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(mark(raw)), resolve=True)
    except Exception as err:  # noqa: BLE001 - a resolver that cannot take the stand-in: write nothing resolved
        log.warning("metrics.json keeps the config unresolved (%s)", type(err).__name__)
        return raw
    return pick(raw, resolved)


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
