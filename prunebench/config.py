"""Config helpers: the safe instantiate wrapper and the checks that run before any model loads."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "calib", "pruner", "recovery", "eval", "experiment")
ALLOWED_PREFIX = "prunebench."


def _targets(node: Any) -> list[str]:
    if isinstance(node, DictConfig):
        found = [str(node["_target_"])] if "_target_" in node else []
        for key in node:
            if key != "_target_":
                found += _targets(node._get_node(key))
        return found
    if OmegaConf.is_list(node):
        return [t for item in node for t in _targets(item)]
    return []


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate restricted to `prunebench.` targets, so a YAML file cannot call
    arbitrary Python (os.system, subprocess, ...)."""
    for target in _targets(node):
        if not target.startswith(ALLOWED_PREFIX):
            raise PrunebenchError(
                f"refusing to instantiate '{target}': only targets under '{ALLOWED_PREFIX}' are allowed"
            )
    from hydra.errors import InstantiationException

    try:
        return _hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        # A constructor's own one-line PrunebenchError, not Hydra's wrapper around it.
        cause = err.__cause__
        if isinstance(cause, PrunebenchError):
            raise cause from None
        raise PrunebenchError(" ".join(str(err).split())) from None


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): N zeros in every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise PrunebenchError(f"pruner.pattern={pattern!r} is not 'unstructured' or 'N:M' (e.g. 2:4, 4:8)") from None
    if not 0 < n < m:
        raise PrunebenchError(f"pruner.pattern={pattern}: N:M needs 0 < N < M (e.g. 2:4, 4:8)")
    return n, m


def validate(cfg: DictConfig, build: bool = False) -> None:
    """Reject bad knobs with one clear line before anything heavy happens. build=True also
    constructs the pruner, recovery and evaluators (cheap: no model, no data), so their own
    checks run too."""
    p = cfg.pruner
    sparsity = p.get("sparsity", 0.0)
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise PrunebenchError(f"pruner.sparsity={sparsity} is outside [0, 1); use e.g. pruner.sparsity=0.5")
    nm = parse_pattern(p.get("pattern", "unstructured"))
    if nm is not None and p.name != "none" and abs(float(sparsity) - nm[0] / nm[1]) > 1e-9:
        raise PrunebenchError(
            f"pruner.pattern={p.pattern} removes {nm[0]}/{nm[1]} of the weights but"
            f" pruner.sparsity={sparsity}; set pruner.sparsity={nm[0] / nm[1]:g}"
        )
    if "group" in p and p.group not in ("row", "matrix"):
        raise PrunebenchError(f"pruner.group={p.group!r} must be 'row' or 'matrix'")
    for key in ("nsamples", "seqlen", "batch_size"):
        value = cfg.calib.get(key)
        if not isinstance(value, int) or value <= 0:
            raise PrunebenchError(f"calib.{key}={value} must be a positive integer")
    for name, ev in (cfg.get("eval") or {}).items():
        for key in ("seqlen", "max_windows", "max_seqlen", "batch_size", "limit"):
            value = ev.get(key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PrunebenchError(f"eval.{name}.{key}={value} must be a positive integer or null")
    if cfg.model.source == "path" and not cfg.model.path:
        raise PrunebenchError("model.source=path needs model.path=/path/to/model")
    from prunebench import placement  # torch: only once a run is being checked

    device = placement.resolve_device(cfg.get("device", "auto"))
    placement.resolve_dtype(cfg.model.dtype, device)
    if cfg.get("placement", "auto") not in placement.PLACEMENTS:
        raise PrunebenchError(f"placement={cfg.placement!r} must be one of {', '.join(placement.PLACEMENTS)}")
    if build:
        pruner = instantiate(cfg.pruner)
        dims = placement.hf_config(cfg.model, cfg.paths.get("cache_dir"))  # None until first converted
        layers = cfg.model.get("num_layers") or (dims or {}).get("num_hidden_layers")
        if layers and hasattr(pruner, "check"):  # depth (and width) knobs against the model's shape
            if "dims" in inspect.signature(pruner.check).parameters:
                pruner.check(int(layers), dims=dims)
            else:
                pruner.check(int(layers))
        recovery = instantiate(cfg.recovery)
        evaluators = {name: instantiate(node) for name, node in cfg.eval.items()}
        from prunebench.models.loading import check_available

        check_available(cfg.model)
        placement.plan(cfg, pruner, evaluators, recovery)  # the memory plan: stops before loading


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config fragments, used as a cache key."""
    blob = json.dumps(
        [OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def group_options(group: str) -> dict[str, str]:
    """Options of a config group with the one-line description from each file's first comment.

    Files whose name starts with `_` are not options: they are bases that options pull through their
    defaults list, e.g. conf/experiment/<paper>/<scale>/_table.yaml, the protocol shared by a table's
    cells. `ls` and `reproduce` do not list them and `prunebench run` rejects them as unknown choices."""
    root = CONF_DIR / group
    options = {}
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        desc = ""
        for line in path.read_text().splitlines():
            text = line.lstrip("# ").strip()
            if line.startswith("#") and not text.startswith("@package"):
                desc = text
                break
        options[str(path.relative_to(root).with_suffix(""))] = desc
    return options


def compose(*overrides: str) -> DictConfig:
    """The config a `prunebench run OVERRIDES` job would get (Compose API; for tests and scripts)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a running job (a KD teacher's config): reuse its Hydra
        return _compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose("config", overrides=list(overrides))
