"""Compose every experiment and every config-group option and print the resolved configs, one
YAML document each, so that two checkouts can be compared mechanically (behaviour unchanged):

    python scripts/compose_all.py > before.yaml   # on one commit
    python scripts/compose_all.py > after.yaml    # on another
    diff before.yaml after.yaml

Also builds each composed pruner/recovery/evaluator (cheap: no model, no data) and prints its
knobs as the component holds them, and runs `config.validate` (no model loads: build=False), so a
changed default or a changed refusal shows in the diff too. `paths` and `hydra` are left out
(they name this machine's folders and the clock)."""

from __future__ import annotations

import re
import sys

from omegaconf import OmegaConf

from prunebench import PrunebenchError
from prunebench.config import GROUPS, compose, group_options, instantiate, selected_evals, validate


def _state(obj) -> dict:
    """A component's public attributes, as text (what it will run with); object addresses dropped."""
    if not hasattr(obj, "__dict__"):
        return {}
    return {k: re.sub(r" at 0x[0-9a-f]+", "", repr(v)) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}


def dump(label: str, overrides: list[str]) -> None:
    print(f"--- # {label}")
    try:
        cfg = compose(*overrides)
    except Exception as err:  # noqa: BLE001 - a refusal to compose is itself the behaviour compared
        print(f"compose_error: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        return
    shown = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("paths", "hydra")])
    print(OmegaConf.to_yaml(shown, resolve=False), end="")
    try:
        validate(cfg)
        print("validate: ok")
    except PrunebenchError as err:
        print(f"validate: {err}")
    built = {}
    for what, make in (
        ("pruner", lambda: instantiate(cfg.pruner)),
        ("recovery", lambda: instantiate(cfg.recovery)),
        *((f"eval.{n}", (lambda node=node: instantiate(node))) for n, node in selected_evals(cfg).items()),
    ):
        try:
            built[what] = _state(make())
        except Exception as err:  # noqa: BLE001
            built[what] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    print(OmegaConf.to_yaml({"built": built}), end="")


def main() -> None:
    runs = [("default", [])]
    runs += [(f"experiment={e}", [f"experiment={e}"]) for e in sorted(group_options("experiment"))]
    for group in GROUPS:
        if group == "experiment":
            continue
        for option in sorted(group_options(group)):
            value = f"[{option}]" if group == "eval" else option
            runs.append((f"{group}={option}", [f"{group}={value}"]))
    for label, overrides in runs:
        dump(label, overrides)
    print(f"# {len(runs)} configs", file=sys.stderr)


if __name__ == "__main__":
    main()
