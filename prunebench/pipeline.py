"""The only place where the stages meet: load -> baseline -> calibrate -> prune -> recover ->
evaluate -> write metrics.json. Read it top to bottom."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError, models, placement
from prunebench.config import fingerprint, instantiate, validate
from prunebench.data import calibration_windows
from prunebench.placement import stage
from prunebench.results import git_commit, peak_rss_mb, read_json, versions, write_json

log = logging.getLogger(__name__)


def evaluate(evaluators: dict, model, tokenizer) -> dict[str, float]:
    """Flat `<eval>/<metric>` keys from every selected evaluator."""
    return {f"{name}/{k}": v for name, ev in evaluators.items() for k, v in ev(model, tokenizer).items()}


def dense_baseline(cfg: DictConfig, model, tokenizer, evaluators: dict, dtype) -> tuple[dict, bool]:
    """Metrics of the unpruned model. Cacheable evaluators (quality metrics) are cached per (model,
    eval config, seed, resolved dtype) so sweeps compute them once; the others (latency) are
    measured every run, in the same process as the pruned model."""
    cacheable = {n: e for n, e in evaluators.items() if getattr(e, "cacheable", True)}
    fresh = {n: e for n, e in evaluators.items() if n not in cacheable}
    metrics, reused = {}, False
    if cacheable:
        evals = OmegaConf.to_container(cfg.eval, resolve=True)
        key = fingerprint(cfg.model, {n: evals[n] for n in cacheable}, cfg.seed, str(dtype))
        path = Path(cfg.paths.cache_dir) / "baselines" / f"{cfg.model.name}-{key}.json"
        if path.exists():
            log.info("reusing the dense baseline from %s", path)
            metrics, reused = read_json(path)["metrics"], True
        else:
            metrics = evaluate(cacheable, model, tokenizer)
            write_json(path, {"model": cfg.model.name, "eval": OmegaConf.to_container(cfg.eval), "metrics": metrics})
    return {**metrics, **evaluate(fresh, model, tokenizer)}, reused


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    validate(cfg)
    out = run_dir / "metrics.json"
    if out.exists():
        raise PrunebenchError(f"{out} already exists; rerun without hydra.run.dir to get a new run directory")
    pruner = instantiate(cfg.pruner)
    recovery = instantiate(cfg.recovery)
    evaluators = {name: instantiate(ev) for name, ev in (cfg.eval or {}).items()}
    plan = placement.plan(cfg, pruner, evaluators, recovery)  # before loading: stops here if it cannot fit
    log.info(plan.line())
    device, timings = plan.device, {}

    placement.reset_peak(device)
    with stage(timings, "load", device):
        model, tokenizer = models.load(cfg.model, cfg.paths.cache_dir, seed=cfg.seed, plan=plan)
    params_before, nonzero_before = models.count_params(model)

    baseline, reused = {}, False
    if cfg.baseline:
        with stage(timings, "baseline", device):
            baseline, reused = dense_baseline(cfg, model, tokenizer, evaluators, plan.dtype)

    teacher = copy.deepcopy(model) if getattr(recovery, "needs_teacher", False) else None
    calib = None
    if pruner.needs_calibration:
        with stage(timings, "calibration_data", device):
            c = cfg.calib
            calib = calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, cfg.seed, c.batch_size)
            calib.cache_dir = str(Path(cfg.paths.cache_dir) / "stats")

    for part in (pruner, recovery):  # stages that read their own text (LaCo's D, fine-tuning data)
        if hasattr(part, "tokenizer"):
            part.tokenizer = tokenizer
    with stage(timings, "prune", device):
        stats = pruner(model, calib)
    with stage(timings, "recover", device):
        train = recovery(model, teacher, cfg)
    if getattr(recovery, "reprune", False):
        with stage(timings, "reprune", device):
            train["reprune"] = pruner(model, calib).to_dict()
    with stage(timings, "eval", device):
        metrics = evaluate(evaluators, model, tokenizer)
    metrics.update({f"recovery/{k}": v for k, v in (train or {}).get("metrics", {}).items()})  # e.g. dev scores
    metrics.update({f"prune/{k}": v for k, v in stats.info.get("metrics", {}).items()})  # e.g. MCC per bridge step
    for name, ev in evaluators.items():  # metrics relative to the dense model (LaCo's Per.)
        if baseline and hasattr(ev, "relative"):
            mine, dense = ({k.split("/", 1)[1]: v for k, v in d.items() if k.startswith(f"{name}/")}
                           for d in (metrics, baseline))  # fmt: skip
            metrics.update({f"{name}/{k}": v for k, v in ev.relative(mine, dense).items()})
    params_after, nonzero_after = models.count_params(model)
    if cfg.get("save_model"):
        with stage(timings, "save", device):
            models.save(model, tokenizer, run_dir / "model", cfg.model)

    result = {
        "name": cfg.name,
        "status": "complete",
        "overrides": list(overrides or []),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": metrics,
        "baseline": baseline,
        "baseline_reused": reused,
        "prune": {
            "method": cfg.pruner.name,
            "pattern": cfg.pruner.get("pattern", "unstructured"),
            "target_sparsity": stats.target_sparsity,
            "achieved_sparsity": stats.achieved_sparsity,
            "params_before": params_before,
            "params_after": params_after,
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
        "recovery": train,
        "model_note": cfg.model.get("note"),
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
    }
    write_json(out, result)
    return result
