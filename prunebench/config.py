"""Config helpers: the safe instantiate wrapper and the checks that run before any model loads.

`validate` is the one validation layer, and it knows no component by name: each knob's type and
range is declared once, where it is used (a component's constructor parameter, or the small schemas
below for the top-level, calib and data knobs; see prunebench/knobs.py), and read from there; rules
between knobs and against the model's shape (read from its config, no weights) are each component's
own `check_knobs` / `check` / `needs_lm` / `needs_encoder`, called here for whichever component the
config names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field

from prunebench import CONF_DIR, PrunebenchError, knobs
from prunebench.cache import safe_name
from prunebench.knobs import Batch, Flag, Positions, Seed
from prunebench.registry import check_targets

# `${safe_name:${name}}` in conf/config.yaml's run dir: a name (`model.name=../../x`) never becomes a path.
OmegaConf.register_new_resolver("safe_name", safe_name, replace=True)
GROUPS = ("model", "calib", "pruner", "recovery", "eval", "logger", "experiment")


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate restricted to registered prunebench components (prunebench.registry),
    so a YAML file or an override cannot call arbitrary Python (os.system, subprocess, ...)."""
    check_targets(node, "config")
    from hydra.errors import InstantiationException

    try:
        return _hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        # A constructor's own one-line PrunebenchError, not Hydra's wrapper around it.
        cause = err.__cause__
        if isinstance(cause, PrunebenchError):
            raise cause from None
        if isinstance(cause, TypeError) and (m := re.search(r"unexpected keyword argument '(\w+)'", str(cause))):
            # a knob added with +group.knob= that the component does not take
            root = node._get_root()
            where = next((g for g in GROUPS if node is OmegaConf.select(root, g)), "the component")
            name = node.get("name", "")
            raise PrunebenchError(
                f"{where}.{m.group(1)} is not a knob of {where}={name}; drop it"
                f" (its knobs: prunebench run {where}={name} --cfg job)"
            ) from None
        raise PrunebenchError(" ".join(str(err).split())) from None


# ---------------------------------------------------------------------------------------------
# Knobs: the declarations of the config's own nodes, and the checks that read every declaration


class RunKnobs:
    """The top-level knobs (conf/config.yaml holds their defaults)."""

    seed: Seed
    baseline: Flag
    save_model: Flag


class CalibKnobs:
    """calib.* (conf/calib/*.yaml): the calibration windows every calibrated pruner reads."""

    nsamples: Annotated[
        int, Field(ge=1, le=4096, description="every window is held in memory at once; the papers use 128")
    ]
    seqlen: Positions
    batch_size: Batch


class DataKnobs:
    """data.* (conf/config.yaml)."""

    verify: Flag


def _owner(node: Any) -> type | None:
    """The class a node's `_target_` names (registered: check_targets ran first), else None."""
    from hydra._internal.utils import _locate

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    owner = _locate(str(target)) if target else None
    return owner if isinstance(owner, type) else None


def _components(cfg: DictConfig) -> list[tuple[str, DictConfig, type]]:
    """(where, node, class) of the pruner, the recovery and every evaluator entry that has a `_target_`."""
    parts = [("pruner", cfg.get("pruner")), ("recovery", cfg.get("recovery"))]
    parts += [(f"eval.{name}", ev) for name, ev in (cfg.get("eval") or {}).items()]
    return [(where, node, owner) for where, node in parts if (owner := _owner(node)) is not None]


def _check_declared(where: str, node: Any, owner: type) -> None:
    """Every knob of `node` that `owner` declares: its type and range."""
    if not isinstance(node, DictConfig):
        return
    declared = knobs.declared(owner)
    for key in node:
        if (rule := declared.get(str(key))) is not None:
            rule.check(f"{where}.{key}" if where else str(key), node.get(key))


def _check_cross(cfg: DictConfig) -> None:
    """Knobs against each other (no model needed): each component's own rules, then the run's."""
    for _, node, owner in _components(cfg):
        if hasattr(owner, "check_knobs"):
            owner.check_knobs(OmegaConf.to_container(node, resolve=True))
    if cfg.get("save_model"):  # a misspelt format must not cost the whole run before the save stage
        from prunebench.models.export import check_format

        check_format(cfg.get("save_format", "hf"))
    m = cfg.model
    if m.get("path"):
        folder = Path(str(m.path)).expanduser()
        if not folder.exists():
            raise PrunebenchError(f"model.path={folder} does not exist; point it at a saved Hugging Face model folder")
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise PrunebenchError(
                f"model.path={folder} holds no config.json (an empty or partial folder); point it at a saved"
                " Hugging Face model folder"
            )
        try:
            if not isinstance(json.loads((folder / "config.json").read_text()), dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as err:  # truncated, binary or foreign
            raise PrunebenchError(
                f"{folder / 'config.json'} is unreadable ({type(err).__name__}); restore the model folder"
            ) from None
    if m.get("source") == "path" and not m.get("path"):
        raise PrunebenchError("model.source=path needs model.path=/path/to/model")
    hf = m.get("hf_config") or {}
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    if experts and (hf.get("num_experts_per_tok") or 1) > experts:
        raise PrunebenchError(
            f"model.hf_config.num_experts_per_tok={hf.num_experts_per_tok} routes each token to more experts than"
            f" the {experts} the model has; set it to at most {experts}"
        )
    if m.get("hf_config") is not None and m.get("source") != "random":
        # the architecture of loaded weights comes from their own config.json: hf_config would be
        # recorded in metrics.json without having changed anything
        where = f"model.source={m.get('source')}"
        raise PrunebenchError(
            f"model.hf_config is ignored by {where} (the weights' own config.json sets the architecture);"
            " drop it, or use a random model (model=tiny-llama ...) for a custom shape; to remove layers use a pruner"
        )


def selected_evals(cfg: DictConfig) -> dict:
    """The evaluators of `cfg.eval`. An entry without `_target_` holds knobs for an evaluator the
    run did not select (an experiment's `eval.wikitext2.seqlen` under `eval=[lm_eval]`): it is
    skipped with one warning, not called."""
    evals = cfg.get("eval") or {}
    if unused := [n for n, e in evals.items() if not (isinstance(e, DictConfig) and "_target_" in e)]:
        logging.getLogger(__name__).warning(
            "eval.%s has knobs but is not selected (eval=[...]); its knobs are ignored", ", eval.".join(unused)
        )
    return {n: e for n, e in evals.items() if n not in unused}


def _check_model_fit(cfg: DictConfig, pruner: Any, evaluators: dict, dims: dict | None) -> None:
    """Knobs against the model, from its config only (before any weight loads): the kind of model a
    component needs (its `needs_lm` / `needs_encoder`), and every knob declared as counting token
    positions against the model's context."""
    kind = cfg.model.get("kind")
    parts = [(w, n, o) for w, n, o in _components(cfg) if not w.startswith("eval.") or w[5:] in evaluators]
    for where, _, owner in parts:
        if (what := getattr(owner, "needs_lm", None)) and kind == "encoder":
            raise PrunebenchError(
                f"{where} ({what}) needs a causal language model; model={cfg.model.name} is an encoder"
                " (model.kind=encoder)"
            )
        if (what := getattr(owner, "needs_encoder", None)) and kind != "encoder":
            name = f"{where}.{cfg.pruner.name}" if where == "pruner" else where
            raise PrunebenchError(
                f"{name} ({what}) needs an encoder; model={cfg.model.name} is model.kind={kind}:"
                " use model=tiny-bert, mpnet-base, bert-base-uncased, ..."
            )
    if getattr(pruner, "needs_calibration", False):
        from prunebench.data.text import check_dataset

        check_dataset(cfg.calib.source, "calib.source")
    ctx = knobs.context_of(dims)
    if not ctx:
        return
    nodes = [part for part in parts if part[0].startswith("eval.")]
    if getattr(pruner, "needs_calibration", False):
        nodes.append(("calib", cfg.calib, CalibKnobs))
    nodes += [part for part in parts if part[0] == "recovery"] + [part for part in parts if part[0] == "pruner"]
    for where, node, owner in nodes:
        for key, rule in knobs.declared(owner).items():
            value = node.get(key) if rule.context else None
            if isinstance(value, int) and value > ctx:
                raise PrunebenchError(
                    f"{where}.{key}={value} is beyond model {cfg.model.name}'s context of {ctx} positions"
                    f" (max_position_embeddings); use at most {ctx}"
                )


QUICK_LENGTHS = ("calib.seqlen", "eval.wikitext2.seqlen")  # the quick profile's 512-token windows


def fit_quick_profile(cfg: DictConfig, overrides: list[str] | None) -> str | None:
    """The quick profile's 512-token windows on a model with a shorter context (tiny-llama's 256):
    where the user did not set the length (no override names it), use the model's context instead,
    and say so (the returned line). A length the user set beyond the context is still refused by
    `validate`. Nothing changes outside the quick profile or when the context is unknown."""
    if cfg.get("profile") != "quick":
        return None
    from prunebench import memory

    try:
        ctx = knobs.context_of(memory.hf_config(cfg.model, cfg.paths.get("cache_dir")))
    except (ValueError, OSError, OmegaConfBaseException):  # validate says what is wrong with it
        return None
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides or []}
    changed = []
    for key in QUICK_LENGTHS:
        value = OmegaConf.select(cfg, key, default=None)
        if ctx and key not in named and isinstance(value, int) and value > ctx:
            OmegaConf.update(cfg, key, ctx)
            changed.append(f"{key}={ctx}")
    if not changed:
        return None
    return (
        f"quick profile: {', '.join(changed)}, model {cfg.model.name}'s context (the profile's 512 is longer);"
        " set the length to choose another"
    )


@functools.lru_cache(maxsize=1)
def top_level_keys() -> frozenset[str]:
    """The keys a run's config may hold at its top: conf/config.yaml's, the groups', and hydra."""
    import yaml

    base = yaml.safe_load((CONF_DIR / "config.yaml").read_text(encoding="utf-8"))
    return frozenset(set(base) - {"defaults"} | set(GROUPS) | {"hydra"})


def validate(cfg: DictConfig, build: bool = False) -> None:
    """Reject bad knobs with one clear line before anything heavy happens: every `_target_` is a
    registered component, every declared knob has its type and range, and the cross-knob rules hold.
    build=True also constructs the pruner, recovery and evaluators (cheap: no model, no data), so
    their own checks run too, and checks the knobs against the model's shape from its config."""
    try:
        for where, node, schema in (("", cfg, RunKnobs), ("calib", cfg.get("calib"), CalibKnobs),
                                    ("data", cfg.get("data"), DataKnobs)):  # fmt: skip
            _check_declared(where, node, schema)  # plain values first: nothing is imported for a bad number
        check_targets(cfg)
        if unknown := sorted(str(k) for k in cfg if str(k) not in top_level_keys()):  # e.g. `+nosuchtop=1`
            raise PrunebenchError(
                f"unknown top-level key '{unknown[0]}': prunebench reads only {', '.join(sorted(top_level_keys()))}"
                " (a group's knob goes under its group, e.g. pruner.sparsity=0.6)"
            )
        for where, node, owner in _components(cfg):
            _check_declared(where, node, owner)
        _check_cross(cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, e.g. ${oc.env:MISSING}
        raise PrunebenchError(str(err).splitlines()[0]) from None
    from prunebench import memory, placement  # torch: only once a run is being checked

    device = placement.resolve_device(cfg.get("device", "auto"))
    placement.resolve_dtype(cfg.model.dtype, device)
    if cfg.get("placement", "auto") not in placement.PLACEMENTS:
        raise PrunebenchError(f"placement={cfg.placement!r} must be one of {', '.join(placement.PLACEMENTS)}")
    if build:
        pruner = instantiate(cfg.pruner)
        try:
            dims = memory.hf_config(cfg.model, cfg.paths.get("cache_dir"))  # None until first converted
        except (ValueError, OSError) as err:  # a truncated or binary config.json in the converted-model cache
            raise PrunebenchError(
                f"the cached config.json of model {cfg.model.name} is unreadable ({type(err).__name__});"
                f" delete {Path(cfg.paths.cache_dir) / 'models' / safe_name(cfg.model.name)} to rebuild it"
            ) from None
        if dims is None and cfg.model.get("model_type"):  # a GGUF model before its first conversion
            dims = {"model_type": cfg.model.model_type, "num_hidden_layers": cfg.model.get("num_layers")}
        recovery = instantiate(cfg.recovery)
        if "_target_" in (cfg.get("logger") or {}):  # logger knobs (wandb mode, ...) fail before any model loads
            instantiate(cfg.logger)
        evaluators = {name: instantiate(node) for name, node in selected_evals(cfg).items()}
        _check_model_fit(cfg, pruner, evaluators, dims)
        layers = cfg.model.get("num_layers") or (dims or {}).get("num_hidden_layers")
        if layers:  # each component's knobs against the model's shape (depth, widths, heads, context)
            for component in (pruner, recovery, *evaluators.values()):
                if hasattr(component, "check"):
                    component.check(int(layers), dims)
        from prunebench.models.loading import check_available

        check_available(cfg.model)
        memory.plan(cfg, pruner, evaluators, recovery)  # the memory plan: stops before loading


def group_options(group: str, roots: tuple[Path, ...] = ()) -> dict[str, str]:
    """Options of a config group with the one-line description from each file's first comment;
    `roots` are extra config folders (--config-dir) searched after conf/.

    Files whose name starts with `_` are not options: they are bases that options pull through their
    defaults list, e.g. conf/experiment/<paper>/<scale>/_table.yaml, the protocol shared by a table's
    cells. `ls` and `reproduce` do not list them and `prunebench run` rejects them as unknown choices."""
    options = {}
    for root in (CONF_DIR / group, *(Path(r) / group for r in roots)):
        for path in sorted(root.rglob("*.yaml")):
            if path.name.startswith("_"):
                continue
            desc = ""
            for line in path.read_text().splitlines():
                text = line.lstrip("# ").strip()
                if line.startswith("#") and not text.startswith("@package"):
                    desc = text
                    break
            options.setdefault(str(path.relative_to(root).with_suffix("")), desc)
    return options


@contextlib.contextmanager
def initialize(config_dirs: tuple[Path, ...] = ()):
    """Hydra's Compose API on conf/ with extra config folders searched first, as `--config-dir` adds
    them to a `@hydra.main` task (prepended before the structured-config schemas)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import setbase

    setbase("1.3")
    search_path = create_config_search_path(str(CONF_DIR))
    for folder in config_dirs:
        search_path.prepend("command-line", f"file://{Path(folder).resolve()}", SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="prunebench", config_search_path=search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def compose(*overrides: str) -> DictConfig:
    """The config a `prunebench run OVERRIDES` job would get (Compose API; for tests and scripts)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a running job (a KD teacher's config): reuse its Hydra
        return _compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose("config", overrides=list(overrides))
