"""Training checkpoints in the run dir, and resuming from them: every `recovery.checkpoint_every`
optimiser steps the student's weights, the optimiser, the LR scheduler, the RNG states, the data
position (the step: the window order is a function of the seed and the step) and the loss curve so
far are written to `<run dir>/checkpoints/step-<N>.pt` atomically (a temporary file renamed into
place), keeping the last `recovery.keep_checkpoints`. With `recovery.resume=auto` a rerun into the
same run dir starts from the newest one; training being deterministic given these, the resumed run
ends with bit-identical weights in one CPU process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from prunebench import PrunebenchError

log = logging.getLogger(__name__)
RESUME = ("auto", "never")


def check(checkpoint_every, keep_checkpoints, resume) -> None:
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise PrunebenchError(f"recovery.checkpoint_every={checkpoint_every} must be a positive step count or null")
    if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise PrunebenchError(f"recovery.keep_checkpoints={keep_checkpoints} must be a positive integer")
    if resume not in RESUME:
        raise PrunebenchError(f"recovery.resume={resume!r} must be auto or never")


def folder(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir) -> Path | None:
    """The newest complete checkpoint (temporary files are never picked)."""
    if run_dir is None or not folder(run_dir).is_dir():
        return None
    found = sorted(folder(run_dir).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def save(run_dir, step: int, model, opt, sched, curve: list, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, then drop all but the newest `keep`."""
    out = folder(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, tmp = out / f"step-{step}.pt", out / f".step-{step}.pt.tmp"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "curve": curve,
    }
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in sorted(out.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, model, opt, sched) -> tuple[int, list]:
    """Restore a checkpoint into the freshly built model / optimiser / scheduler; (step, curve so far)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    print(f"resuming recovery from {path} (step {state['step']})", flush=True)
    return int(state["step"]), [list(p) for p in state["curve"]]
