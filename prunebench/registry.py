"""What a config may make Python call: the registry of instantiable components and Hydra's own hooks.

The config is the registry: a `_target_` is instantiable only when a shipped YAML under conf/ names it
and the object it resolves to is defined in a prunebench module. A prefix
test alone is not enough: Hydra resolves `prunebench.config.Path.touch` or `prunebench.models.os.system`
by attribute traversal to `pathlib.Path.touch` and `os.system`. The string is checked against the
registry before anything is imported, so a refused target is never resolved, let alone called.

Hydra calls code of its own from the config too; `check_hydra` allows there only:
- `hydra.callbacks`: none (CALLBACKS is empty; add a class path there to allow one);
- `hydra.launcher` / `hydra.sweeper` (and the Optuna sampler): the plugins in HYDRA_TARGETS;
- `hydra.sweeper.custom_search_space`: a registered prunebench function, or null;
- `hydra.job_logging` / `hydra.hydra_logging`: `logging.*` handler classes and colorlog's formatter
  (logging.config's `class` and `()` keys import and call whatever they name);
- `hydra.job.env_set`: no variable that makes a later subprocess or import run foreign code
  (LD_PRELOAD, PYTHONPATH, ...).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prunebench import CONF_DIR, PrunebenchError

CALLBACKS: frozenset[str] = frozenset()  # allowed hydra.callbacks targets: none by default

HYDRA_TARGETS = frozenset(
    {
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        *(
            f"optuna.samplers.{s}"
            for s in ("TPESampler", "RandomSampler", "CmaEsSampler", "NSGAIISampler", "MOTPESampler", "GridSampler")
        ),
    }
)
LOGGING_CLASSES = ("logging.", "colorlog.ColoredFormatter")  # prefixes of allowed logging `class` / `()` values
UNSAFE_ENV = ("LD_", "DYLD_", "PYTHON", "PATH", "BASH_ENV", "ENV", "GIT_", "PERL5", "RUBY", "NODE_OPTIONS")

PREFIX = "prunebench."


# `_target_: a.b.C` in block or flow style; a regex, not a YAML parse: conf/ holds hundreds of files.
_TARGET = re.compile(r"""(?:^|[\s{,])_target_:\s*["']?([\w.]+)""", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def registry() -> frozenset[str]:
    """Every `_target_` of the shipped conf/ YAML files (Hydra's own conf/hydra excepted): the
    components a run may instantiate."""
    found: set[str] = set()
    for path in CONF_DIR.rglob("*.yaml"):
        if path.relative_to(CONF_DIR).parts[0] != "hydra":
            found.update(_TARGET.findall(path.read_text()))
    return frozenset(t for t in found if t.startswith(PREFIX))


def check_target(target: Any, where: str) -> None:
    """Refuse a `_target_` that is not a registered prunebench component. The string is tested first
    (nothing is imported for a refused one); then the registered path is resolved and must be an
    object defined in a prunebench module."""
    target = str(target)
    if not target.startswith(PREFIX):
        raise PrunebenchError(
            f"refusing to instantiate '{target}' at {where}: only targets under '{PREFIX}' registered in conf/ are"
            " allowed"
        )
    if target not in registry():
        raise PrunebenchError(
            f"refusing to instantiate '{target}' at {where}: not a registered prunebench component (only the"
            " _target_s of the shipped conf/ files are; see prunebench ls)"
        )
    from hydra._internal.utils import _locate

    obj = _locate(target)
    if not str(getattr(obj, "__module__", "")).startswith(PREFIX) or not str(getattr(obj, "__qualname__", "")):
        raise PrunebenchError(f"refusing to instantiate '{target}' at {where}: it resolves outside prunebench")


def _walk(node: Any, path: str):
    """(path, key, value) of every leaf and child under node, unresolved (interpolations stay strings)."""
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            value = child._value() if not isinstance(child, DictConfig | ListConfig) else child
            sub = f"{path}.{key}" if path else str(key)
            yield sub, str(key), value
            yield from _walk(child, sub)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            value = child._value() if not isinstance(child, DictConfig | ListConfig) else child
            yield f"{path}[{i}]", str(i), value
            yield from _walk(child, f"{path}[{i}]")


def check_targets(cfg: DictConfig, root: str = "") -> None:
    """Every `_target_` anywhere under cfg (all groups, `+eval.x={...}` additions; not `hydra`)."""
    for path, key, value in _walk(cfg, root):
        if key == "_target_" and not path.startswith("hydra."):
            check_target(value, path.removesuffix("._target_"))


def check_hydra(hydra: DictConfig | None) -> None:
    """Hydra's own section of a composed config (compose(..., return_hydra_config=True)): callbacks,
    launcher, sweeper, logging and environment only from the allow-lists in the module docstring."""
    if hydra is None:
        return
    for name, cb in (hydra.get("callbacks") or {}).items():
        target = cb.get("_target_") if isinstance(cb, DictConfig) else cb
        if str(target) not in CALLBACKS:
            raise PrunebenchError(
                f"refusing hydra.callbacks.{name} ({target}): Hydra callbacks run arbitrary code and none is allowed"
            )
    for part in ("launcher", "sweeper"):
        for path, key, value in _walk(hydra.get(part) or OmegaConf.create({}), f"hydra.{part}"):
            if key == "_target_" and str(value) not in HYDRA_TARGETS:
                raise PrunebenchError(
                    f"refusing {path}={value}: launchers and sweepers come only from Hydra's basic, joblib,"
                    " submitit and optuna plugins"
                )
    search_space = OmegaConf.select(hydra, "sweeper.custom_search_space", default=None)
    if search_space is not None:
        check_target(search_space, "hydra.sweeper.custom_search_space")
    for part in ("job_logging", "hydra_logging"):
        for path, key, value in _walk(hydra.get(part) or OmegaConf.create({}), f"hydra.{part}"):
            if key in ("class", "()") and not str(value).startswith(LOGGING_CLASSES):
                raise PrunebenchError(
                    f"refusing {path}={value}: logging configs may name only logging.* handlers and formatters"
                )
    for name in OmegaConf.select(hydra, "job.env_set", default=None) or {}:
        if str(name).upper().startswith(UNSAFE_ENV):
            raise PrunebenchError(
                f"refusing hydra.job.env_set.{name}: it would change which code a later import or subprocess runs"
            )
