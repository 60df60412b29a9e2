"""Config helpers: the safe instantiate wrapper and the checks that run before any model loads.

`validate` is the one validation layer: the table KNOBS gives every numeric or boolean knob of
every group a type and a range (upper bounds say why), then cross-knob rules compare the knobs
with each other and with the model's shape read from its config (no weights): knobs a method
ignores, seqlen against the context, N:M against the linear widths, depth knobs against the layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prunebench import PrunebenchError
from prunebench.registry import check_targets

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "calib", "pruner", "recovery", "eval", "logger", "experiment")
SEED_MAX = 2**32 - 1


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


# ---------------------------------------------------------------------------------------------
# The knob table


@dataclass(frozen=True)
class Knob:
    """A knob's type and range: kind int | float | bool; [lo, hi] (lo_open: (lo, hi]; hi_open:
    [lo, hi)); null allowed or not; `why` explains an upper bound."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    null: bool = False
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def check(self, knob: str, value: Any) -> None:
        if value is None:
            if not self.null:
                raise PrunebenchError(f"{knob}=null is not allowed; give a {self._kind_name()}")
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise PrunebenchError(f"{knob}={value!r} must be true or false")
            return
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            raise PrunebenchError(f"{knob}={value!r} must be {self._kind_name()} in {self._interval()}{self._null()}")
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low or high:
            if self.kind is int and self.lo == 1 and not high:
                raise PrunebenchError(f"{knob}={value} must be a positive integer{self._null()}")
            why = f" ({self.why})" if high and self.why else ""
            raise PrunebenchError(f"{knob}={value} is outside {self._interval()}{why}")

    def _kind_name(self) -> str:
        return {int: "an integer", float: "a finite number", bool: "true or false"}[self.kind]

    def _null(self) -> str:
        return " or null" if self.null else ""

    def _interval(self) -> str:
        def show(v: float) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        lo = "(-inf" if self.lo is None else ("(" if self.lo_open else "[") + show(self.lo)
        hi = "inf)" if self.hi is None else show(self.hi) + (")" if self.hi_open else "]")
        return f"{lo}, {hi}"


def Int(lo: int | None = 0, hi: int | None = None, null: bool = False, why: str = "") -> Knob:  # noqa: N802
    return Knob(int, lo, hi, null=null, why=why)


def Real(lo: float | None = 0.0, hi: float | None = None, null: bool = False, **kw: Any) -> Knob:  # noqa: N802
    return Knob(float, lo, hi, null=null, **kw)


BOOL = Knob(bool)
SEED = Int(0, SEED_MAX, why="NumPy and torch seeds are 32-bit")
BATCH = Int(1, 4096, why="one batch lives in memory at once")
FRACTION = Real(0.0, 1.0)  # warm-up fractions and the like
LR = Real(0.0, 1.0, lo_open=True, why="a learning rate above 1 diverges")
WINDOWS = Int(1, 10**7, null=True, why="ten million windows is beyond every dataset here")

# (group, key) -> Knob; "" is the top level, "eval" applies to every selected evaluator. A knob a
# group's option does not have is simply absent; its constructor rejects unknown keys.
KNOBS: dict[tuple[str, str], Knob] = {
    ("", "seed"): SEED,
    ("", "baseline"): BOOL,
    ("", "save_model"): BOOL,
    ("calib", "nsamples"): Int(1, 4096, why="every window is held in memory at once; the papers use 128"),
    ("calib", "seqlen"): Int(1, 131072),
    ("calib", "batch_size"): BATCH,
    # pruners
    ("pruner", "sparsity"): Real(0.0, 1.0, hi_open=True),
    ("pruner", "alpha"): Real(0.0, 1e9, why="GBLM's gradient scale; the paper uses 100"),
    ("pruner", "percdamp"): Real(0.0, 1.0, lo_open=True),
    ("pruner", "blocksize"): Int(1, 65536),
    ("pruner", "sequential"): BOOL,
    ("pruner", "C"): Int(2),
    ("pruner", "L"): Int(0),
    ("pruner", "H"): Int(1, null=True),
    ("pruner", "I"): Int(1),
    ("pruner", "T"): Real(0.0, 1.0, lo_open=True),
    ("pruner", "rule_based"): BOOL,
    ("pruner", "calib_n"): Int(1, 1000, why="LaCo's few-shot sentences D run as one batch; the paper uses 5"),
    ("pruner", "calib_chars"): Int(1, 100000),
    ("pruner", "n"): Int(1),
    ("pruner", "layers"): Int(1, null=True),
    ("pruner", "rank"): Int(1),
    ("pruner", "fit_samples"): Int(1, 10**6),
    ("pruner", "epochs_teacher"): Int(0, 1000),
    ("pruner", "epochs_step"): Int(0, 1000),
    ("pruner", "epochs_one_shot"): Int(0, 1000, null=True),
    ("pruner", "temperature"): Real(0.0, 100.0, lo_open=True),
    ("pruner", "alpha_kd"): Real(0.0),
    ("pruner", "ce_weight"): Real(0.0),
    ("pruner", "hidden_loss"): Real(0.0),
    ("pruner", "lr"): LR,
    ("pruner", "warmup"): FRACTION,
    ("pruner", "weight_decay"): Real(0.0),
    ("pruner", "batch_size"): BATCH,
    ("pruner", "max_length"): Int(1, 131072),
    ("pruner", "train_limit"): Int(1, null=True),
    ("pruner", "dev_limit"): Int(1, null=True),
    ("pruner", "dropout"): Real(0.0, 1.0, hi_open=True),
    ("pruner", "seed"): SEED,
    # recovery
    ("recovery", "tokens"): Int(0, 10**12),
    ("recovery", "seqlen"): Int(1, 131072),
    ("recovery", "batch_size"): BATCH,
    ("recovery", "grad_accum"): Int(1, 65536),
    ("recovery", "lr"): LR,
    ("recovery", "min_lr"): Real(0.0, 1.0),
    ("recovery", "warmup"): FRACTION,
    ("recovery", "weight_decay"): Real(0.0),
    ("recovery", "clip"): Real(0.0, lo_open=True, null=True),
    ("recovery", "temperature"): Real(0.0, 100.0, lo_open=True),
    ("recovery", "topk"): Int(1, null=True),
    ("recovery", "clm_weight"): Real(0.0),
    ("recovery", "chunk"): Int(1, null=True),
    ("recovery", "val_windows"): Int(0, 100000),  # 0: no held-out losses (LoRA)
    ("recovery", "log_every"): Int(1),
    ("recovery", "eval_every"): Int(1, null=True),
    ("recovery", "keep_masks"): BOOL,
    ("recovery", "reprune"): BOOL,
    ("recovery", "max_length"): Int(1, 131072),
    ("recovery", "r"): Int(1, 65536),
    ("recovery", "dropout"): Real(0.0, 1.0, hi_open=True),
    ("recovery", "seed"): SEED,
    ("data", "verify"): BOOL,
    # evaluators (every one of eval.*)
    ("eval", "seqlen"): Int(1, 131072, null=True),
    ("eval", "max_seqlen"): Int(1, 131072),
    ("eval", "max_windows"): WINDOWS,
    ("eval", "batch_size"): Int(1, 4096, null=True, why="one batch lives in memory at once"),
    ("eval", "limit"): WINDOWS,
    ("eval", "train_limit"): WINDOWS,
    ("eval", "test_limit"): WINDOWS,
    ("eval", "epochs"): Real(0.0, 1000.0, lo_open=True),
    ("eval", "lr"): LR,
    ("eval", "warmup"): FRACTION,
    ("eval", "max_length"): Int(1, 131072),
    ("eval", "dropout"): Real(0.0, 1.0, hi_open=True),
    ("eval", "prompt_len"): Int(1, 131072),
    ("eval", "gen_len"): Int(1, 131072),
    ("eval", "repeats"): Int(1, 1000),
    ("eval", "freeze_word_embeddings"): BOOL,
    ("eval", "seed"): SEED,
}

# Evaluators and pruners that need a causal LM (an LM head): refused on an encoder before it loads.
NEEDS_LM = {
    "prunebench.evals.perplexity.Perplexity": "perplexity",
    "prunebench.evals.opencompass.OpenCompass": "lm-eval's log-likelihoods",
    "prunebench.evals.lm_eval.LMEval": "lm-eval's log-likelihoods",
    "prunebench.pruners.gblm.GBLM": "GBLM's language-model loss",
    "prunebench.pruners.minitron.Minitron": "Minitron trims Llama-family and Nemotron decoders",
}
NEEDS_ENCODER = {"prunebench.pruners.minibridge.MiniBridge": "minibridge compresses an encoder classifier"}


def _check_knobs(cfg: DictConfig) -> None:
    nodes = [("", "", cfg)] + [(g, g, cfg.get(g)) for g in ("calib", "pruner", "recovery", "data")]
    nodes += [("eval", f"eval.{name}", ev) for name, ev in (cfg.get("eval") or {}).items()]
    for group, prefix, node in nodes:
        if not isinstance(node, DictConfig):
            continue
        for key in node:
            rule = KNOBS.get((group, str(key)))
            if rule is not None:
                rule.check(f"{prefix}.{key}" if prefix else str(key), node.get(key))


def _pruner_class(cfg: DictConfig) -> type | None:
    from hydra._internal.utils import _locate

    target = cfg.pruner.get("_target_")
    return _locate(str(target)) if target else None  # registered (check_targets ran first)


def _check_cross(cfg: DictConfig) -> None:
    """Knobs against each other (no model needed)."""
    if cfg.get("save_model"):  # a misspelt format must not cost the whole run before the save stage
        from prunebench.models.export import check_format

        check_format(cfg.get("save_format", "hf"))
    p = cfg.pruner
    sparsity = p.get("sparsity", 0.0)
    nm = parse_pattern(p.get("pattern", "unstructured"))
    from prunebench.pruners.base import MaskPruner

    cls = _pruner_class(cfg)
    # A depth or structured pruner (and none) ignores these: an error, not a silent no-op.
    if cls is not None and not issubclass(cls, MaskPruner) and (float(sparsity) != 0.0 or nm is not None):
        knob = f"pruner.sparsity={sparsity}" if float(sparsity) != 0.0 else f"pruner.pattern={p.pattern}"
        raise PrunebenchError(
            f"{knob} is ignored by pruner={p.name} (it removes whole layers or channels, no weight masks);"
            " drop it, or choose a mask pruner (magnitude, wanda, sparsegpt, gblm)"
        )
    if nm is not None and abs(float(sparsity) - nm[0] / nm[1]) > 1e-9:
        raise PrunebenchError(
            f"pruner.pattern={p.pattern} removes {nm[0]}/{nm[1]} of the weights but"
            f" pruner.sparsity={sparsity}; set pruner.sparsity={nm[0] / nm[1]:g}"
        )
    if "group" in p and p.group not in ("row", "matrix"):
        raise PrunebenchError(f"pruner.group={p.group!r} must be 'row' or 'matrix'")
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


def context_of(dims: dict | None) -> int | None:
    """The model's context (positions) from its Hugging Face config; None when unknown."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if (dims or {}).get(key):
            return int(dims[key])
    return None


def linear_widths(dims: dict) -> dict[str, int]:
    """Input widths of a transformer block's linears (what an N:M pattern groups along)."""
    hidden = dims.get("hidden_size")
    heads = dims.get("num_attention_heads")
    head_dim = dims.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {"hidden_size": hidden, "intermediate_size": dims.get("intermediate_size")}
    if heads and head_dim:
        widths["num_attention_heads x head_dim"] = heads * head_dim
    return {k: int(v) for k, v in widths.items() if v}


def _check_model_fit(cfg: DictConfig, pruner: Any, evaluators: dict, recovery: Any, dims: dict | None) -> None:
    """Knobs against the model, from its config only (before any weight loads)."""
    kind = cfg.model.get("kind")
    evals = {n: e for n, e in cfg.eval.items() if n in evaluators}
    parts = [("pruner", cfg.pruner)] + [(f"eval.{n}", e) for n, e in evals.items()]
    for where, node in parts:
        what = NEEDS_LM.get(str(node.get("_target_")))
        if what and kind == "encoder":
            raise PrunebenchError(
                f"{where} ({what}) needs a causal language model; model={cfg.model.name} is an encoder"
                " (model.kind=encoder)"
            )
    what = NEEDS_ENCODER.get(str(cfg.pruner.get("_target_")))
    if what and kind != "encoder":
        raise PrunebenchError(
            f"pruner.{cfg.pruner.name} ({what}) needs an encoder; model={cfg.model.name} is model.kind={kind}:"
            " use model=tiny-bert, mpnet-base, bert-base-uncased, ..."
        )
    ctx = context_of(dims)
    if ctx:
        knobs = [(f"eval.{n}.{k}", e.get(k)) for n, e in evals.items() for k in ("seqlen", "max_length")]
        if getattr(pruner, "needs_calibration", False):
            knobs.append(("calib.seqlen", cfg.calib.seqlen))
        knobs += [(f"recovery.{k}", cfg.recovery.get(k)) for k in ("seqlen", "max_length")]
        knobs.append(("pruner.max_length", cfg.pruner.get("max_length")))
        for name, ev in evals.items():
            if ev.get("prompt_len") and ev.get("gen_len"):
                knobs.append((f"eval.{name}.prompt_len + gen_len", ev.prompt_len + ev.gen_len))
        for knob, value in knobs:
            if isinstance(value, int) and value > ctx:
                raise PrunebenchError(
                    f"{knob}={value} is beyond model {cfg.model.name}'s context of {ctx} positions"
                    f" (max_position_embeddings); use at most {ctx}"
                )
    nm = getattr(pruner, "nm", None)
    if nm and dims:
        bad = {k: w for k, w in linear_widths(dims).items() if w % nm[1]}
        if bad:
            shown = ", ".join(f"{k}={w}" for k, w in bad.items())
            raise PrunebenchError(
                f"pruner.pattern={cfg.pruner.pattern} groups every {nm[1]} inputs but model {cfg.model.name} has"
                f" {shown}, not a multiple of {nm[1]}; use pruner.pattern=unstructured or an M that divides it"
            )


def validate(cfg: DictConfig, build: bool = False) -> None:
    """Reject bad knobs with one clear line before anything heavy happens: every `_target_` is a
    registered component, every knob in KNOBS has its type and range, and the cross-knob rules hold.
    build=True also constructs the pruner, recovery and evaluators (cheap: no model, no data), so
    their own checks run too, and checks the knobs against the model's shape from its config."""
    try:
        _check_knobs(cfg)  # plain values first: nothing is imported for a bad number
        check_targets(cfg)
        _check_cross(cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, e.g. ${oc.env:MISSING}
        raise PrunebenchError(str(err).splitlines()[0]) from None
    from prunebench import placement  # torch: only once a run is being checked

    device = placement.resolve_device(cfg.get("device", "auto"))
    placement.resolve_dtype(cfg.model.dtype, device)
    if cfg.get("placement", "auto") not in placement.PLACEMENTS:
        raise PrunebenchError(f"placement={cfg.placement!r} must be one of {', '.join(placement.PLACEMENTS)}")
    if build:
        pruner = instantiate(cfg.pruner)
        try:
            dims = placement.hf_config(cfg.model, cfg.paths.get("cache_dir"))  # None until first converted
        except (ValueError, OSError) as err:  # a truncated or binary config.json in the converted-model cache
            raise PrunebenchError(
                f"the cached config.json of model {cfg.model.name} is unreadable ({type(err).__name__});"
                f" delete {Path(cfg.paths.cache_dir) / 'models' / str(cfg.model.name)} to rebuild it"
            ) from None
        recovery = instantiate(cfg.recovery)
        if "_target_" in (cfg.get("logger") or {}):  # logger knobs (wandb mode, ...) fail before any model loads
            instantiate(cfg.logger)
        evaluators = {name: instantiate(node) for name, node in selected_evals(cfg).items()}
        _check_model_fit(cfg, pruner, evaluators, recovery, dims)
        layers = cfg.model.get("num_layers") or (dims or {}).get("num_hidden_layers")
        if layers and hasattr(pruner, "check"):  # depth (and width) knobs against the model's shape
            if "dims" in inspect.signature(pruner.check).parameters:
                pruner.check(int(layers), dims=dims)
            else:
                pruner.check(int(layers))
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
