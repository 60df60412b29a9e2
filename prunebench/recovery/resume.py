"""Training checkpoints in the run dir, resuming from them, and stopping cleanly on a signal; one code
path for every recovery that runs `train.fit` (kd, lm_finetune, lora).

A checkpoint holds what the next optimiser step depends on: the trained weights (the whole student, or
only the trainable ones: LoRA's adapters), the optimiser, the LR scheduler, the fp16 GradScaler, the
RNG states (torch's CPU generator and, when CUDA is in use, every CUDA device's; under several
processes every rank's, so each gets its own dropout stream back), the data position
(optimiser steps done and windows consumed: the window order is a function of the seed, so the
position is the step) and the loss curve so far. It is written to `<run dir>/checkpoints/step-<N>.pt`
atomically (a temporary file, flushed to disk, renamed into place) every `recovery.checkpoint_every`
steps, keeping the newest `recovery.keep_checkpoints`, and once more when a signal stops training.

With `recovery.resume=auto` a rerun into the same run dir starts from the newest checkpoint; training
being deterministic given its contents, the resumed run ends with bit-identical weights in one CPU
process. A checkpoint written with other training knobs (tokens, lr, batch geometry, source, ...) is
refused in one line rather than silently continued, and so is one written for other starting weights:
the fingerprint holds the SHA-256 of the weights training starts from (engine.digest, computed only
when a run dir makes checkpoints possible), so a rerun into the same hydra.run.dir with another model,
pruner or calibration never continues another model's training.

Signals (`stop_signals`): while the loop runs, SIGTERM asks it to finish the current optimiser step,
save a checkpoint and stop with one line (`saved checkpoint step N on SIGTERM; rerun the same command
to resume`), exit 143. Under submitit (hydra/launcher=slurm, slurm_gpu) its preemption / time-limit
signal (SIGUSR2, `SUBMITIT_PREEMPT_SIGNAL`) does the same and then hands over to submitit's own
handler, which requeues the job through the launcher's `checkpoint` (the same sweep point, the same run
dir): the requeued job resumes from that checkpoint by itself. SIGTERM alone never requeues (scancel
sends it too).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.recovery.engine import digest, is_main, world

log = logging.getLogger(__name__)
RESUME = ("auto", "never")


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after its checkpoint was saved. `line` is the one line the CLI
    prints (empty: already printed), `signum` the signal (the exit code is 128 + signum)."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.line, self.signum = line, signum


def folder(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _checkpoints(out: Path) -> list[Path]:
    """`step-<N>.pt` files of folder `out`, oldest first; stray names (step-x.pt) are not ours: ignored."""
    return sorted((p for p in out.glob("step-*.pt") if p.stem[len("step-") :].isdigit()), key=_step_of)


def latest(run_dir) -> Path | None:
    """The newest complete checkpoint (temporary files are never picked)."""
    if run_dir is None or not folder(run_dir).is_dir():
        return None
    found = _checkpoints(folder(run_dir))
    return found[-1] if found else None


def _why(err: BaseException) -> str:
    """One line for a failed write: the OS's reason, and what to do about the common ones."""
    text = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    if "No space left" in str(err) or "enforce fail at inline_container" in str(err) or getattr(err, "errno", 0) == 28:
        return f"{text} (disk full?); free space or set recovery.keep_checkpoints lower / checkpoint_every higher"
    if isinstance(err, PermissionError):
        return f"{text}; make the run dir writable or choose another hydra.run.dir"
    return text


def set_aside(run_dir, record: bool = False) -> Path | None:
    """recovery.resume=never in a run dir that holds checkpoints: move them (and with `record`, Hydra's
    .hydra/ record of the command that wrote them) into `earlier-<k>/`, said in one line, so the new
    run's checkpoints never mix with the earlier run's and nothing is deleted. Returns the new folder."""
    run_dir = Path(run_dir)
    if not any(folder(run_dir).glob("step-*.pt")):
        return None
    k = 1
    while (run_dir / f"earlier-{k}").exists():
        k += 1
    dest = run_dir / f"earlier-{k}"
    dest.mkdir()
    os.replace(folder(run_dir), dest / "checkpoints")
    if record and (run_dir / ".hydra").is_dir():
        os.replace(run_dir / ".hydra", dest / ".hydra")
    print(f"recovery.resume=never: moved the earlier run's checkpoints to {dest}; starting over", flush=True)
    return dest


def rng_state() -> dict:
    """torch's CPU generator and, when CUDA has been used, every device's (dropout on a GPU draws there)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def rank_rng_states() -> dict | list[dict]:
    """This process's RNG states, or under several processes every rank's (a list by rank, gathered
    on every rank: a collective, so every rank calls it): each rank draws its own dropout masks, and a
    resume gives each rank back its own stream."""
    rank, world_size = world()
    if world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return rng_state()
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_rng_state(state) -> None:
    if isinstance(state, list):  # one state per rank (rank_rng_states): this rank's own
        state = state[world()[0]]
    if isinstance(state, torch.Tensor):  # a checkpoint of the first format: the CPU state alone
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            log.warning(
                "checkpoint holds the RNG of %d CUDA devices, this process sees %d: CUDA RNG not restored"
                " (dropout draws differ from an uninterrupted run)",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpointer:
    """Saves and restores one training run's state (see the module docstring).

    `model` is the bare (unwrapped) student; `trainable_only` saves only the parameters that require
    grad (LoRA: the adapters; the frozen base is rebuilt by the rerun). `extra`: further trained modules
    outside the model (KD's student→teacher projection). `fingerprint`: the knobs the training depends
    on; a checkpoint whose fingerprint differs is refused. `per_step`: windows one optimiser step
    consumes over all processes (the data position is step × per_step)."""

    run_dir: Any
    every: int | None
    keep: int
    mode: str
    model: nn.Module
    opt: Any
    sched: Any
    fingerprint: dict
    per_step: int
    scaler: Any = None
    extra: nn.Module | None = None
    trainable_only: bool = False
    resumed_from: int | None = field(default=None, init=False)
    start: str | None = field(default=None, init=False)  # digest of the starting weights (resume() sets it)

    @classmethod
    def of(cls, recovery, model: nn.Module, opt, sched, windows: int, per_step: int, engine=None, **kw):
        """The checkpointer of a training recovery (kd, lm_finetune, lora) from its knobs (run_dir,
        checkpoint_every, keep_checkpoints, resume) and its fingerprint plus the data's window
        count. Under a sharded engine (FSDP) it writes nothing: checkpoints are DDP/one-process only."""
        sharded = engine is not None and engine.world > 1 and engine.engine != "ddp"
        return cls(
            None if sharded else recovery.run_dir,
            recovery.checkpoint_every,
            recovery.keep_checkpoints,
            recovery.resume,
            model,
            opt,
            sched,
            fingerprint={**recovery.fingerprint(), "windows": windows},
            per_step=per_step,
            **kw,
        )

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    # -- state ---------------------------------------------------------------------------------
    def _weights(self) -> dict:
        if not self.trainable_only:
            return self.model.state_dict()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def state(self, step: int, curve: list, rng: dict | list | None = None) -> dict:
        return {
            "step": step,
            "data": {"position": step * self.per_step, "per_step": self.per_step},
            "model": self._weights(),
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng if rng is not None else rng_state(),
            "curve": curve,
            "fingerprint": {**self.fingerprint, "start_weights": self.start},
        }

    def save(self, step: int, curve: list) -> Path | None:
        """Write the checkpoint of `step` atomically (rank 0 only: every rank holds the same weights
        under DDP, but each its own RNG: gathered first, on every rank), then drop all but the newest
        `keep`. Returns its path (None on other ranks)."""
        if not self.enabled:
            return None
        rng = rank_rng_states()
        if not is_main():
            return None
        out = folder(self.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".step-*.pt.tmp"):  # left by a process killed mid-write: never resumed from
            stale.unlink(missing_ok=True)
        path, tmp = out / f"step-{step}.pt", out / f".step-{step}.pt.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(self.state(step, curve, rng), f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash never leaves a torn newest file
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # permissions, a full disk (torch reports it as RuntimeError)
            raise PrunebenchError(f"could not write checkpoint {path}: {_why(err)}") from None
        finally:
            tmp.unlink(missing_ok=True)
        for old in _checkpoints(out)[: -self.keep]:
            if old != path:  # never the checkpoint just written (and announced)
                old.unlink(missing_ok=True)
        return path

    def periodic(self, done: int, steps: int, curve: list) -> None:
        """After optimiser step `done`: save when it is a multiple of `every` (not after the last step:
        the run is about to finish)."""
        if self.every and done % self.every == 0 and done < steps:
            self.save(done, curve)

    def resume(self) -> tuple[int, list]:
        """(first step, loss curve so far): from the newest checkpoint with resume=auto, else (0, []).
        Called before the first step: with a run dir, records the digest of the starting weights
        (the model and `extra`), which every checkpoint carries and a resume must match."""
        if not self.enabled:
            return 0, []
        if is_main():  # an unwritable checkpoint folder stops now, not after the first `every` steps
            try:
                folder(self.run_dir).mkdir(parents=True, exist_ok=True)
                probe = folder(self.run_dir) / ".write-probe"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise PrunebenchError(f"cannot write checkpoints into {folder(self.run_dir)}: {_why(err)}") from None
        self.start = digest(
            nn.ModuleDict({"model": self.model, **({"extra": self.extra} if self.extra is not None else {})})
        )
        found = latest(self.run_dir)
        if found is not None and self.mode == "never" and is_main():  # starting over beside them would mix runs
            set_aside(self.run_dir)
            found = None
        if found is None:
            return 0, []
        try:
            state = torch.load(found, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  truncated or foreign: say which file, never a traceback
            raise PrunebenchError(
                f"{found} is unreadable ({type(err).__name__}); delete it to resume from an earlier checkpoint,"
                " or rerun with recovery.resume=never"
            ) from None
        saved = dict(state.get("fingerprint") or {})
        if saved.pop("start_weights", None) != self.start:
            raise PrunebenchError(
                f"checkpoint in {self.run_dir} was written for other starting weights (another model, pruner or"
                " calibration); use a new hydra.run.dir or recovery.resume=never"
            )
        if saved != self.fingerprint:
            diff = [k for k in sorted(set(saved) | set(self.fingerprint)) if saved.get(k) != self.fingerprint.get(k)]
            name = {k: k if k in ("windows", "world_size", "steps", "corpus") else f"recovery.{k}" for k in diff}
            shown = ", ".join(f"{name[k]}={saved.get(k)!r} (now {self.fingerprint.get(k)!r})" for k in diff[:3])
            raise PrunebenchError(
                f"{found} was written by a training with {shown}; rerun with the same knobs to resume,"
                " or with recovery.resume=never (or a new hydra.run.dir) to start over"
            )
        weights = state["model"]
        if self.trainable_only:
            expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if set(weights) != expected:
                raise PrunebenchError(
                    f"{found} holds other trainable weights than this run's ({len(weights)} vs {len(expected)});"
                    " rerun with recovery.resume=never to start over"
                )
        try:
            self.model.load_state_dict(weights, strict=not self.trainable_only)
            if self.extra is not None and state.get("extra") is not None:
                self.extra.load_state_dict(state["extra"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:  # shapes, names, optimizer groups
            raise PrunebenchError(
                f"checkpoint {found} does not fit this run ({type(err).__name__}: {str(err).splitlines()[0][:120]});"
                " use a new hydra.run.dir or recovery.resume=never"
            ) from None
        step = int(state["step"])
        if is_main():
            print(f"resuming recovery from {found} (step {step})", flush=True)
        self.resumed_from = step
        return step, [list(p) for p in state["curve"]]

    def stop(self, done: int, curve: list, request: StopRequest) -> None:
        """A signal asked training to stop: save the checkpoint of step `done`, then raise Stopped
        (under submitit, first hand the signal to submitit's handler: it requeues the job and exits)."""
        self.save(done, curve)
        name = signal.Signals(request.signum).name
        how = "rerun the same command to resume" if self.mode == "auto" else "rerun with recovery.resume=auto to resume"
        line = f"saved checkpoint step {done} on {name}; {how}"
        chained = request.chain.get(request.signum)
        if chained is not None:  # submitit's checkpoint_and_try_requeue: rank 0 requeues, then exits
            if is_main():
                print(line, file=sys.stderr, flush=True)
            line = f"{line} (the job is requeued)"
            chained(request.signum, None)
        raise Stopped(line if is_main() else "", request.signum)  # rank 0 alone says it


@dataclass
class StopRequest:
    """Set by the signal handler: the first signal received (None: keep training), and the handlers
    to hand a signal to after saving (submitit's)."""

    signum: int | None = None
    chain: dict[int, Callable] = field(default_factory=dict)


def _submitit_signal() -> tuple[int, Callable] | None:
    """(signal, handler) when this process is a submitit job whose preemption handler is installed."""
    if "submitit" not in sys.modules:  # a submitit job is started by submitit's own entry point
        return None
    from submitit.core.job_environment import JobEnvironment

    try:
        signum = JobEnvironment._usr_sig()
    except RuntimeError:  # an unknown SUBMITIT_PREEMPT_SIGNAL: submitit itself refuses it
        return None
    handler = signal.getsignal(signum)
    owner = getattr(handler, "__self__", None)
    return (signum, handler) if type(owner).__module__.startswith("submitit") else None


@contextmanager
def stop_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """While training: SIGTERM (and submitit's preemption signal in a submitit job) only set the
    returned request; the loop finishes its optimiser step, saves and stops (Checkpointer.stop).
    A second signal changes nothing. Outside the main thread, or not `enabled` (nowhere to save),
    signals keep their handlers. The previous handlers are restored on the way out."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    watched = [signal.SIGTERM]
    if (sub := _submitit_signal()) is not None:
        watched.append(sub[0])
        request.chain[sub[0]] = sub[1]

    def handler(signum, _frame):
        if request.signum is None:
            request.signum = signum

    old = {s: signal.signal(s, handler) for s in watched}
    try:
        yield request
    finally:
        for s, h in old.items():
            signal.signal(s, h)
