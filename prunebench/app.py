"""The one @hydra.main task. `prunebench run ARGS` hands ARGS to it unchanged, so every Hydra flag
(-m, --cfg job, hydra/launcher=..., hydra.run.dir=...) works."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prunebench import CONF_DIR, PrunebenchError, tracking
from prunebench.cache import RunDirBusy, run_dir_lock


def summary(result: dict, run_dir: Path) -> str:
    """Dense and pruned metrics side by side, with what was reduced for a quick run."""
    cfg, prune, metrics, base = result["config"], result["prune"], result["metrics"], result["baseline"]
    lines = [f"model {cfg['model']['name']}" + (f" ({result['model_note']})" if result.get("model_note") else "")]
    if "shape_after" in prune:  # width (and depth) trimming: Minitron
        before, after = prune["shape_before"], prune["shape_after"]
        changed = ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after if before.get(k) != after[k])
        lines.append(
            f"pruner {prune['method']}: {changed or 'nothing trimmed'}; parameters {prune['params_before']:,}"
            f" -> {prune['params_after']:,} ({prune['params_after'] / prune['params_before']:.1%} kept)"
        )
    elif "layers_kept" in prune:
        lines.append(
            f"pruner {prune['method']}: kept {len(prune['layers_kept'])} of {prune['layers_before']} layers"
            f" ({prune['layer_ratio']:.1%} removed); parameters {prune['params_before']:,} -> {prune['params_after']:,}"
        )
    elif "slicing_fraction" in prune or prune.get("params_after", 0) < prune.get("params_before", 0):
        # width removal (LLM-Pruner, SliceGPT): the share of the whole model, signed (slicing a tied
        # model's hidden size a little ADDS parameters: its head is untied, two shortcuts a layer)
        sliced = f" (slicing {prune['slicing_fraction']:.0%}: d {prune['d']} of {prune['D']})" if "d" in prune else ""
        lines.append(
            f"pruner {prune['method']}{sliced}: parameters {prune['params_before']:,} -> {prune['params_after']:,}"
            f" ({prune['params_removed_share']:+.1%} of the whole model removed)"
        )
    else:
        lines.append(
            f"pruner {prune['method']} {prune['pattern']}: target sparsity {prune['target_sparsity']:.3f},"
            f" achieved {prune['achieved_sparsity']:.4f} of the prunable block weights"
            + (f" ({len(prune['excluded_weights'])} excluded: routers etc.)" if prune.get("excluded_weights") else "")
            + ";"
            f" non-zero parameters {prune['nonzero_before']:,} -> {prune['nonzero_after']:,}"
        )
    if result.get("calibration"):
        c = result["calibration"]
        lines.append(f"calibration: {c['shape'][0]} windows x {c['shape'][1]} tokens of {c['source']} ({c['method']})")
    keys = [k for k in metrics if not k.endswith(("/windows", "/tokens", "/seqlen"))]
    if not any(isinstance(ev, dict) and "_target_" in ev for ev in (cfg.get("eval") or {}).values()):
        lines.append("nothing evaluated (eval=[]): no dense or pruned metrics; add eval=[wikitext2] to compare them")
    if keys:
        width = max(len(k) for k in keys)
        lines.append(f"{'metric':<{width}}  {'dense':>10}  {'pruned':>10}")
        for k in keys:
            dense = f"{base[k]:10.3f}" if k in base else f"{'-':>10}"
            lines.append(f"{k:<{width}}  {dense}  {metrics[k]:10.3f}")
    for name, ev in cfg.get("eval", {}).items():
        if f"{name}/windows" in metrics:
            lines.append(
                f"{name}: {metrics[f'{name}/windows']} windows x {metrics[f'{name}/seqlen']} tokens"
                + (" (max_windows cap: a quick run)" if ev.get("max_windows") else " (whole split)")
            )
    # The quick profile only shortens calibration and WikiText-2; say so only where they ran.
    if cfg.get("profile") == "quick" and (result.get("calibration") or any(k.endswith("/windows") for k in metrics)):
        lines.append(
            "quick profile: reduced calibration and evaluation; add experiment=full_protocol for the papers'"
            " protocol (128 calibration windows at the model's context, the whole test split)"
        )
    if result.get("profile_note"):
        lines.append(result["profile_note"])
    if dev := result.get("device"):
        peak = f", peak {dev['peak_allocated_mb']:.0f} MB allocated" if "peak_allocated_mb" in dev else ""
        lines.append(f"device {dev['device']} ({dev['name']}), {dev['dtype']}, placement={dev['placement']}{peak}")
    t = result["timings"]
    lines.append(
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + f"; peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    if result.get("non_finite"):  # kept, not dropped: an overflowed metric is a result
        lines.append(f"warning: {', '.join(result['non_finite'])} overflowed to inf (metrics.json non_finite)")
    lines.append(f"wrote {run_dir / 'metrics.json'}")
    return "\n".join(lines)


def busy_message(folder, knob: str = "hydra.run.dir") -> str:
    """The one line for a run directory another live run holds (cache.run_dir_lock)."""
    return (
        f"another prunebench run is writing into {folder} (it holds the folder's lock);"
        f" wait for it or choose a new {knob}"
    )


@contextmanager
def interrupts() -> Iterator[list[int]]:
    """SIGINT and SIGTERM both raise KeyboardInterrupt (SIGTERM would otherwise kill the process
    before any `finally` ran), so temporary cache files and locks are cleaned up on the way out; a
    second signal during that cleanup is ignored. Yields the list the signal number lands in."""
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield []
        return
    got: list[int] = []

    def handler(signum, _frame):
        got.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _rank() -> int:
    """This process's rank in a multi-process job (torchrun, accelerate launch, SLURM tasks); 0 alone."""
    from prunebench.recovery.engine import world

    return world()[0]


_FINISHED: list[Path] = []  # run directories of this process's jobs that wrote their metrics.json


def run_task() -> None:
    """`task()` (one run, or Hydra's sweep of jobs) with SIGINT/SIGTERM handled around it too: a
    signal outside any job (Hydra starting, or between two jobs of a sweep, where the job's own
    handler is not installed) also ends in one line and exit 128 + signal, never a silent 143 or a
    KeyboardInterrupt traceback. Finished jobs' results are kept."""
    done = len(_FINISHED)
    with interrupts() as got:
        try:
            task()
        except KeyboardInterrupt:
            signum = got[0] if got else signal.SIGINT
            n = len(_FINISHED) - done
            where = f"between jobs ({n} finished, their results kept)" if n else "before the first job started"
            print(f"interrupted by {signal.Signals(signum).name} {where}; no further job runs", file=sys.stderr)
            sys.exit(128 + signum)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float | None:
    stage = "startup"
    with interrupts() as got:
        try:
            from prunebench import pipeline  # heavy imports (torch, transformers) only when a job runs

            stage = "between stages"
            tracking.preflight(cfg)  # a remote tracker: one connection attempt now, one warning if unreachable
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            # Unresolved: iterating the ListConfig would resolve `key=${oc.env:TOKEN}` into the token.
            overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
            try:
                # Two runs into one folder: the second refuses at once. The ranks of one multi-process
                # job share the folder: rank 0 holds the lock for all of them.
                lock = run_dir_lock(run_dir) if _rank() == 0 else contextlib.nullcontext()
                with lock:
                    result = pipeline.run(cfg, run_dir, overrides, signals=got)
            except RunDirBusy:
                print(f"error: {busy_message(run_dir)}", file=sys.stderr)  # the folder is the other run's
                sys.exit(2)
        except PrunebenchError as err:
            tracking.log_failure(cfg, Path(HydraConfig.get().runtime.output_dir), err)  # never raises
            if _rank() == 0:  # every rank of a multi-process job refuses alike: one line, from rank 0
                print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as err:
            # One line, exit 128 + signal (130 SIGINT, 143 SIGTERM); no metrics.json was written. Training
            # stopped by a signal saved a checkpoint first and says so itself (recovery/resume.Stopped).
            signum = getattr(err, "signum", None) or (got[0] if got else signal.SIGINT)
            where = getattr(err, "stage", None) or stage
            line = getattr(err, "line", None)
            if line is None:
                line = f"interrupted by {signal.Signals(signum).name} during {where}; no result written"
            if line:
                print(line, file=sys.stderr)
            sys.exit(128 + signum)
        except Exception as err:  # a bug, an out-of-memory: the tracker shows the failed run, then the traceback
            tracking.log_failure(cfg, Path(HydraConfig.get().runtime.output_dir), err)
            from prunebench.launch import lost_peer

            if lost_peer(err):  # another rank ended first: its own output says why, this one only follows
                rank, world = _rank(), int(os.environ["WORLD_SIZE"])
                print(f"process {rank} of {world} stops: another process of the job ended", file=sys.stderr)
                sys.exit(1)
            raise
    _FINISHED.append(run_dir)
    if result.get("rank"):  # a non-zero rank of a multi-process job: rank 0 reports, logs and writes
        return None
    print(summary(result, run_dir))
    tracking.log_run(cfg, result, run_dir)  # logger=...: one warning if the tracker fails, never an error
    # The first metric is the sweep objective (Optuna and friends minimise or maximise it).
    return next(iter(result["metrics"].values()), None)
