"""The only place where the stages meet: load -> baseline -> calibrate -> prune -> recover ->
evaluate -> write metrics.json. Read it top to bottom."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError, cache, memory, models, placement
from prunebench.cache import fingerprint
from prunebench.config import fit_quick_profile, instantiate, selected_evals, validate
from prunebench.data import calibration_windows, text, verify
from prunebench.models.loading import weights_digest
from prunebench.models.stream import streamed
from prunebench.placement import stage
from prunebench.progress import heartbeat
from prunebench.recovery import corpus, engine
from prunebench.results import (
    check_metrics,
    check_numbers,
    check_weights,
    git_commit,
    peak_rss_mb,
    public_config,
    versions,
    write_json,
)

log = logging.getLogger(__name__)


def evaluate(evaluators: dict, model, tokenizer) -> dict[str, float]:
    """Flat `<eval>/<metric>` keys from every selected evaluator."""
    return {f"{name}/{k}": v for name, ev in evaluators.items() for k, v in ev(model, tokenizer).items()}


def data_digests(evaluators: dict) -> dict[str, str]:
    """{resolved path: SHA-256} of the local data files the evaluators read, for the dense-baseline
    key: a baseline computed on other (or corrupted) data is never reused. An evaluator names its
    files with `data_files()`; one with a `dataset` attribute (perplexity) is resolved as
    prunebench.data does (which also verifies it against its SOURCE.md). Hashed once per file, then
    remembered by stat (data.verify's digest cache)."""
    from prunebench.data import text

    files = []
    for ev in evaluators.values():
        if hasattr(ev, "data_files"):
            files += [Path(f) for f in ev.data_files()]
        elif getattr(ev, "dataset", None) in text.LOCAL and (found := text.find(text.LOCAL[ev.dataset])):
            files.append(found)
    return {str(f.resolve()): verify.sha256(f) for f in sorted(set(files))}


def check_contamination(cfg: DictConfig, evaluators: dict) -> None:
    """A recovery's training text against every evaluation set of the run (beyond WikiText-2 test and the
    held-out set, which the recovery gates itself): lm-eval's local tasks, another perplexity set."""
    source = cfg.recovery.get("source")
    if not isinstance(source, str):
        return
    sets = {}
    for ev in evaluators.values():
        if text := getattr(ev, "evaluation_text", None):  # evaluators of text an LM could train on
            sets.update(text())
    allow = bool(cfg.recovery.get("allow_overlap", False))
    corpus.against_evaluations(source, sets, cfg.recovery.get("text_field") or "text", allow)


def verify_texts(cfg: DictConfig, pruner, recovery, evaluators: dict) -> None:
    """Check every local text file the run will read against its SOURCE.md digest before any model
    loads (reading verifies it again, from the digest cache): calibration, LaCo's D, training and
    held-out text, perplexity. A dataset that no data root holds is left to the Hub fallback."""
    from prunebench.data import text

    names = {cfg.calib.source} if getattr(pruner, "needs_calibration", False) else set()
    for part in (pruner, recovery, *evaluators.values()):
        names |= {getattr(part, a, None) for a in ("dataset", "calib_source", "source", "val_source")}
    for name in sorted(n for n in names if isinstance(n, str) and n in text.LOCAL):
        text.find(text.LOCAL[name])


def dense_baseline(cfg: DictConfig, model, tokenizer, evaluators: dict, dtype) -> tuple[dict, bool]:
    """Metrics of the unpruned model. Cacheable evaluators (quality metrics) are cached per (model
    config, weights digest, eval config, data file digests, seed, resolved dtype) so sweeps compute
    them once, as a verified entry (prunebench.cache: a truncated or corrupted file is recomputed
    with a warning); the others (latency) are measured every run, beside the pruned model."""
    cacheable = {n: e for n, e in evaluators.items() if getattr(e, "cacheable", True)}
    fresh = {n: e for n, e in evaluators.items() if n not in cacheable}
    metrics, reused = {}, False
    if cacheable:
        memo = Path(cfg.paths.cache_dir) / "digests"
        evals = OmegaConf.to_container(cfg.eval, resolve=True)
        evals = {n: evals[n] for n in cacheable}
        weights, data = weights_digest(model, memo), data_digests(cacheable)
        key = fingerprint(cfg.model, weights, evals, data, cfg.seed, str(dtype))
        path = Path(cfg.paths.cache_dir) / "baselines" / f"{cache.safe_name(cfg.model.name)}-{key}.json"

        def build(tmp: Path) -> dict:
            log.info("dense baseline: evaluating %s", ", ".join(cacheable))
            found = evaluate(cacheable, model, tokenizer)
            tmp.write_text(json.dumps({"model": cfg.model.name, "weights": weights, "data": data, "metrics": found}))
            return found

        def load(p: Path) -> dict:
            log.info("reusing the dense baseline from %s", p)
            return json.loads(p.read_text())["metrics"]

        metrics, reused = cache.entry(path, key, build, load, "dense baseline")
    return {**metrics, **evaluate(fresh, model, tokenizer)}, reused


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (app.py turns both into KeyboardInterrupt) during the named stage."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


@contextmanager
def step(name: str, timings: dict | None = None, device=None):
    """A pipeline stage: timed (placement.stage) when `timings` is given; an interrupt inside it
    becomes Interrupted(name), so the one line printed on SIGINT/SIGTERM names the stage."""
    try:
        if timings is None:
            yield
        else:
            log.info("%s: started", name)
            with heartbeat(name), stage(timings, name, device):
                yield
            log.info("%s: done in %.1f s", name, timings[name])
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        if getattr(err, "line", None) is not None:  # training stopped on a signal and saved (recovery/resume.py)
            raise
        raise Interrupted(name) from None


STREAMED = "model.partial"  # placement=stream: the pruned blocks as they are written; kept for a resume


def _finish_stream(stream, tokenizer, staged: Path, cfg: DictConfig) -> dict | None:
    """placement=stream: with save_model, the written blocks completed into the saved model's folder
    (staged, renamed into place with metrics.json); without, the blocks are deleted."""
    if not cfg.get("save_model"):
        shutil.rmtree(stream.out, ignore_errors=True)
        return None
    if cfg.get("save_format", "hf") != "hf":
        raise PrunebenchError("placement=stream writes save_format=hf; convert the saved folder afterwards")
    os.replace(stream.finish(tokenizer), staged)
    return {"format": "hf", "layout": None, "weight_bytes": sum(p.stat().st_size for p in staged.glob("*.safetensors"))}


@contextmanager
def _removed_on_failure(folder: Path):
    """A staged folder (the saved model before it is renamed into place) never outlives a failure."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, signals: list[int] | None = None) -> dict:
    """prune -> recover -> evaluate, top to bottom; metrics.json last. `signals` is the list app.py's
    handler appends to: a signal whose KeyboardInterrupt some library caught still ends the run as
    interrupted (checked before writing), never as a complete result."""
    with step("setup"):
        # Data files are verified (SHA-256) as they are read, and recorded for metrics.json.
        verify.configure(verify=OmegaConf.select(cfg, "data.verify", default=True), cache_dir=cfg.paths.cache_dir)
        cache.usable_dir(cfg.paths.cache_dir, "paths.cache_dir", "set PRUNEBENCH_CACHE or paths.cache_dir to a folder")
        if profile_note := fit_quick_profile(cfg, overrides):  # 512-token windows on a shorter context
            log.info(profile_note)
        validate(cfg)
        text.data_roots()  # a PRUNEBENCH_DATA that does not exist stops here, before anything loads
        out = run_dir / "metrics.json"
        if out.exists():
            raise PrunebenchError(f"{out} already exists; rerun without hydra.run.dir to get a new run directory")
        pruner = instantiate(cfg.pruner)
        recovery = instantiate(cfg.recovery)
        evaluators = {name: instantiate(ev) for name, ev in selected_evals(cfg).items()}
        verify_texts(cfg, pruner, recovery, evaluators)  # a corrupted data file stops here, not after loading
        check_contamination(cfg, evaluators)  # training text vs lm-eval's tasks and the other evaluated sets
        plan = memory.plan(cfg, pruner, evaluators, recovery, engine.world()[1])  # stops here if it cannot fit
    log.info(plan.line())
    device, timings = plan.device, {}

    placement.reset_peak(device)
    with step("load", timings, device):
        model, tokenizer = models.load(cfg.model, cfg.paths.cache_dir, seed=cfg.seed, plan=plan)
        check_weights(model, "load")
    params_before, nonzero_before = models.count_params(model)

    # Several processes (torchrun, accelerate launch, SLURM): every rank loads and prunes the same way
    # (deterministic), recovery trains data-parallel, and only rank 0 evaluates and writes.
    engine.init_distributed(device)
    rank, world_size = engine.world()
    baseline, reused = {}, False
    if cfg.baseline and rank == 0:
        with step("baseline", timings, device):
            baseline, reused = dense_baseline(cfg, model, tokenizer, evaluators, plan.dtype)
    flagged = [f"baseline/{k}" for k in check_metrics(baseline, "baseline")]  # NaN: error; inf: flagged

    teacher = copy.deepcopy(model) if getattr(recovery, "needs_teacher", False) else None
    calib = None
    if pruner.needs_calibration:
        with step("calibration_data", timings, device):
            c = cfg.calib
            calib = calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, cfg.seed, c.batch_size)
            calib.cache_dir = str(Path(cfg.paths.cache_dir) / "stats")

    for part in (pruner, recovery):  # stages that read their own text (LaCo's D, fine-tuning data)
        if hasattr(part, "tokenizer"):
            part.tokenizer = tokenizer
    if hasattr(recovery, "run_dir"):  # training checkpoints (recovery.checkpoint_every) live in the run dir
        recovery.run_dir = run_dir
    if (stream := streamed(model)) is not None:  # placement=stream: each pruned block goes to disk at once
        knobs = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["pruner", "calib", "seed"]), resolve=True)
        key = fingerprint(knobs, weights_digest(model, Path(cfg.paths.cache_dir) / "digests"), str(plan.dtype))
        done = stream.write_to(run_dir / STREAMED, key, writer=engine.world()[0] == 0)
        engine.barrier()  # several processes: all have read the finished blocks before rank 0 writes more
        if done:
            log.info("stream: resuming after block %d of %d (its shards verified by SHA-256 in %s)",
                     done - 1, stream.num_blocks, run_dir / STREAMED)  # fmt: skip
    with step("prune", timings, device):
        stats = pruner(model, calib)
        check_weights(model, "prune")
    train, start_digest = {}, None
    if cfg.recovery.get("name", "none") != "none":  # recovery=none: no stage, no time reported for it
        with step("recover", timings, device):
            start_digest = engine.check_same_weights(model)  # all ranks start from identical weights
            train = recovery(model, teacher, cfg)
            check_numbers(train, "recover", "recovery")  # losses, KL, curves: a diverged run is no result
            check_weights(model, "recover")
    if rank != 0:
        return {"rank": rank, "recovery": train}
    if getattr(recovery, "reprune", False):
        with step("reprune", timings, device):
            train["reprune"] = pruner(model, calib).to_dict()
    with step("eval", timings, device):
        metrics = evaluate(evaluators, model, tokenizer)
        flagged += check_metrics(metrics, "eval")
    metrics.update({f"recovery/{k}": v for k, v in (train or {}).get("metrics", {}).items()})  # e.g. dev scores
    metrics.update({f"prune/{k}": v for k, v in stats.info.get("metrics", {}).items()})  # e.g. MCC per bridge step
    for name, ev in evaluators.items():  # metrics relative to the dense model (LaCo's Per.)
        if baseline and hasattr(ev, "relative"):
            mine, dense = ({k.split("/", 1)[1]: v for k, v in d.items() if k.startswith(f"{name}/")}
                           for d in (metrics, baseline))  # fmt: skip
            metrics.update({f"{name}/{k}": v for k, v in ev.relative(mine, dense).items()})
    params_after, nonzero_after = models.count_params(model)
    saved, staged = None, run_dir / ".tmp-model"  # renamed to model/ with metrics.json: never half a checkpoint
    if stream is not None:  # the pruned blocks are written already: the rest of the folder, or nothing kept
        with step("save", timings, device):
            saved = _finish_stream(stream, tokenizer, staged, cfg)
    elif cfg.get("save_model"):
        with step("save", timings, device), _removed_on_failure(staged):
            saved = models.save_checkpoint(model, tokenizer, staged, cfg.model, cfg.get("save_format", "hf"))

    config = public_config(cfg)  # ${oc.env:...} values stay unresolved: no tokens or home paths
    result = {
        "name": config["name"],
        "status": "complete",
        "overrides": list(overrides or []),
        "config": config,
        "metrics": metrics,
        "baseline": baseline,
        "baseline_reused": reused,
        "non_finite": flagged,  # metrics that overflowed to ±inf (kept; `report` marks their rows)
        "prune": {
            "method": cfg.pruner.name,
            "pattern": cfg.pruner.get("pattern", "unstructured"),
            "target_sparsity": stats.target_sparsity,
            "achieved_sparsity": stats.achieved_sparsity,
            "params_before": params_before,
            "params_after": params_after,
            # real removal (layers, heads, channels, slicing): the share of the whole model's parameters,
            # shortcuts and bridges counted; masks remove none (see nonzero_* for them)
            "params_removed_share": round(1 - params_after / params_before, 6) if params_before else 0.0,
            "nonzero_before": nonzero_before,
            "nonzero_after": nonzero_after,
            "per_matrix": stats.per_matrix,
            "timings": stats.timings,
            **stats.info,
        },
        "calibration": None
        if calib is None
        else {
            "source": calib.source,
            "method": calib.method,
            "shape": list(calib.shape),
            "seed": calib.seed,
        },
        "data": verify.used(),
        "recovery": train,
        "world_size": world_size,
        "start_digest": start_digest,
        "model_note": models.weights_note(cfg.model),
        "profile_note": profile_note,
        "device": {
            "name": placement.device_name(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **plan.to_dict(),
            **placement.peak_memory(device),
        },
        "timings": timings,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "versions": versions(),
        "git_commit": git_commit(),
        "saved_model": saved,  # {format, layout, weight_bytes} or None
    }
    with step("write"), _removed_on_failure(staged):
        if signals:  # the handler ran, but its KeyboardInterrupt was swallowed on the way up
            raise Interrupted("a stage that caught the interrupt")
        if saved is not None:  # the model card holds the metrics: written once they are known
            models.write_model_card(staged, result)
            os.replace(staged, run_dir / "model")
        write_json(out, result)
    return result
