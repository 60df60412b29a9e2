"""The results contract: one metrics.json per run, written atomically; plus the run's provenance."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import resource
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prunebench import CONF_DIR, PrunebenchError

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


def nonfinite(node, path: str = "") -> list[tuple[str, float]]:
    """(where, value) of every NaN or ±inf number in a nested result (dicts, lists)."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in nonfinite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, (list, tuple)):
        return [hit for i, v in enumerate(node) for hit in nonfinite(v, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, float) and not math.isfinite(node) else []


def check_metrics(metrics: dict, stage: str) -> list[str]:
    """The rule for metrics: NaN is an error naming the stage (the number means nothing); ±inf is
    legitimate where a metric overflows (perplexity of a broken model: exp of a huge loss), so it is
    kept, warned about and returned, for metrics.json's `non_finite` flag and `report`'s mark."""
    hits = nonfinite(metrics)
    if nan := [k for k, v in hits if math.isnan(v)]:
        raise PrunebenchError(
            f"{stage}: {', '.join(nan)} is NaN; the model's outputs are not finite (overflow in the dtype,"
            " or NaN activations); no result written"
        )
    for k, v in hits:
        log.warning("%s: %s is %s (overflowed); kept, and flagged in metrics.json (non_finite)", stage, k, v)
    return [k for k, _ in hits]


def check_numbers(node, stage: str, prefix: str) -> None:
    """A training or statistics summary must be finite: NaN or inf there is an error naming the stage."""
    if hits := nonfinite(node, prefix):
        where = ", ".join(f"{k}={v}" for k, v in hits[:3]) + (f" (+{len(hits) - 3} more)" if len(hits) > 3 else "")
        raise PrunebenchError(f"{stage}: {where} is not finite (training diverged?); no result written")


def check_weights(model, stage: str) -> None:
    """Every parameter finite after `stage` (one isfinite pass, on the parameters' own devices); else
    one line naming the first bad tensor. NaN weights would otherwise run on to NaN metrics."""
    import torch

    for name, p in model.named_parameters():
        if p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise PrunebenchError(
                f"{stage}: {bad} of {p.numel()} values of {name} are NaN or inf"
                + (" (the checkpoint is damaged)" if stage == "load" else "")
                + "; no result written"
            )


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
    with contextlib.suppress(OSError):  # not Linux, or a sandbox that forbids it: the peak stays process-wide
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
    """The project's commit, `-dirty` when tracked files have changes. Read without ever taking
    .git/index.lock (which would make a concurrent `git commit` in the user's repository fail):
    `git describe --dirty` refreshes the index under that lock even with --no-optional-locks (git
    2.39, checked with strace), so the commit comes from `rev-parse` and the dirty flag from
    `status`, which honours --no-optional-locks (it skips writing the refreshed index back)."""

    def git(*args: str) -> str:
        cmd = ["git", "--no-optional-locks", "-C", str(CONF_DIR.parent), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + "-dirty" if dirty else commit) or None
