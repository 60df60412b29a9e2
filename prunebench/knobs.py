"""Knob declarations: each knob is declared once, by the component that owns it, as a typed
constructor parameter with its range (pydantic's `Field` constraints inside `typing.Annotated`):

    alpha: Annotated[float, Field(ge=0, le=1e9, description="GBLM's gradient scale; the paper uses 100")] = 100.0

`config.validate` reads these declarations (`declared(cls)`) and checks a config's values before
anything is built or loaded, with one line per error: `pruner.alpha=-1 is outside [0, 1e+09]`; an
upper bound's `description` says why (`... (GBLM's gradient scale; the paper uses 100)`). Only
parameters annotated this way are checked here; the constructor checks the rest (nested mappings, rules
between knobs) itself. `int | None` inside the `Annotated` (or `Annotated[...] | None`) allows null.
A choice among words is a `Literal` (`resume: Literal["auto", "never"] = "auto"`: `recovery.resume='x'
must be auto or never`); a free word is `Annotated[str, Field(min_length=1)]`.
`CONTEXT` marks a knob that counts token positions: the validation also compares it with the model's
context (max_position_embeddings).

Besides its knobs, a component may declare (all optional; the validation layer calls them without
knowing which component it holds):
  - `needs_lm` / `needs_encoder` (class attributes, str: what needs it): refused on the other kind of model;
  - `check_knobs(knobs)` (classmethod): rules between its own knobs, before it is built;
  - `check(num_layers, dims)`: rules against the model's shape (its Hugging Face config dict), before loading.

The aliases below are the ranges several components share (seeds, batch sizes, learning rates, ...).
This module is the lowest layer: it imports nothing from prunebench but the error type.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any

import annotated_types as at
from pydantic import Field
from pydantic.fields import FieldInfo

from prunebench import PrunebenchError

SEED_MAX = 2**32 - 1


class _Context:
    """Marks a knob counting token positions, compared with the model's context before loading."""

    def __repr__(self) -> str:
        return "CONTEXT"


CONTEXT = _Context()

Flag = Annotated[bool, Field(description="true or false")]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="NumPy and torch seeds are 32-bit")]
Batch = Annotated[int, Field(ge=1, le=4096, description="one batch lives in memory at once")]
LR = Annotated[float, Field(gt=0.0, le=1.0, description="a learning rate above 1 diverges")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]  # warm-up fractions and the like
Windows = Annotated[int, Field(ge=1, le=10**7, description="ten million windows is beyond every dataset here")]
Positions = Annotated[int, Field(ge=1, le=131072), CONTEXT]  # a sequence length, within the model's context
# a training window: the next-token loss of a 1-token window has no targets (NaN on every step)
TrainPositions = Annotated[
    int, Field(ge=2, le=131072, description="a next-token loss needs 2 tokens a window or more"), CONTEXT
]
# held-out windows are each evaluated before and after training
HeldOut = Annotated[int, Field(ge=0, le=4096, description="held-out windows, each evaluated before and after training")]


@dataclass(frozen=True)
class Knob:
    """A knob's type and range, as read from its declaration: kind int | float | bool; [lo, hi]
    (lo_open: (lo, hi]; hi_open: [lo, hi)); null allowed or not; `why` explains an upper bound;
    `context`: a count of token positions."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    null: bool = False
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    context: bool = False
    choices: tuple = ()

    def check(self, knob: str, value: Any) -> None:
        if value is None:
            if not self.null:
                raise PrunebenchError(f"{knob}=null is not allowed; give {self._kind_name()}")
            return
        if self.choices:
            if value not in self.choices or isinstance(value, bool) != isinstance(self.choices[0], bool):
                words = [str(c) for c in self.choices]
                listed = " or ".join(words) if len(words) == 2 else "one of " + ", ".join(words)
                raise PrunebenchError(f"{knob}={value!r} must be {listed}")
            return
        if self.kind is str:
            if not isinstance(value, str) or len(value) < (self.lo or 0):
                raise PrunebenchError(f"{knob}={value!r} must be a non-empty word (quote a number: {knob}='5')")
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
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        return {int: "an integer", float: "a finite number", bool: "true or false", str: "a word"}[self.kind]

    def _null(self) -> str:
        return " or null" if self.null else ""

    def _interval(self) -> str:
        def show(v: float) -> str:
            return f"{v:g}" if self.kind is float else str(v)

        lo = "(-inf" if self.lo is None else ("(" if self.lo_open else "[") + show(self.lo)
        hi = "inf)" if self.hi is None else show(self.hi) + (")" if self.hi_open else "]")
        return f"{lo}, {hi}"


def _optional(hint: Any) -> tuple[Any, bool]:
    """(hint without None, whether None was allowed) for `X | None` / Optional[X]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


def knob_of(hint: Any) -> Knob | None:
    """The Knob an annotation declares, or None when it is neither an `Annotated[..., Field(...)]`
    nor a `Literal[...]` of choices."""
    hint, null = _optional(hint)
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return Knob(type(choices[0]), null=null, choices=choices)
    if typing.get_origin(hint) is not Annotated:
        return None
    base, *meta = typing.get_args(hint)
    base, inner_null = _optional(base)
    fields = [m for m in meta if isinstance(m, FieldInfo)]
    if not fields or base not in (int, float, bool, str):
        return None
    lo = hi = None
    lo_open = hi_open = False
    for c in (m for f in fields for m in f.metadata):
        if isinstance(c, at.MinLen):  # a word's least length
            lo = c.min_length
        elif isinstance(c, at.Ge):
            lo = c.ge
        elif isinstance(c, at.Gt):
            lo, lo_open = c.gt, True
        elif isinstance(c, at.Le):
            hi = c.le
        elif isinstance(c, at.Lt):
            hi, hi_open = c.lt, True
    why = "" if base is bool else next((f.description for f in fields if f.description), "")
    return Knob(base, lo, hi, null or inner_null, lo_open, hi_open, why, any(m is CONTEXT for m in meta))


@functools.cache
def declared(owner: type) -> dict[str, Knob]:
    """The knobs `owner` declares: a schema class's annotated attributes, or a component's annotated
    constructor parameters. A subclass parameter without a declaration of its own takes the nearest
    base class's (e.g. every mask pruner's `sparsity` is MaskPruner's)."""
    out: dict[str, Knob] = {}
    if "__init__" not in owner.__dict__ and not any("__init__" in b.__dict__ for b in owner.__mro__[1:-1]):
        for name, hint in typing.get_type_hints(owner, include_extras=True).items():
            if (k := knob_of(hint)) is not None:
                out[name] = k
        return out
    for cls in owner.__mro__[:-1]:
        if "__init__" not in cls.__dict__:
            continue
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        for name, hint in hints.items():
            if name not in out and (k := knob_of(hint)) is not None:
                out[name] = k
    return out


def check_args(owner: type, where: str, values: typing.Mapping[str, Any]) -> None:
    """Check a component's constructor arguments against its own declarations (the same rules and
    messages `config.validate` applies before loading), for components built in code, not from a config."""
    rules = declared(owner)
    for key, value in values.items():
        if (rule := rules.get(key)) is not None:
            rule.check(f"{where}.{key}", value)


def context_of(dims: typing.Mapping | None) -> int | None:
    """The model's context (positions) from its Hugging Face config; None when unknown."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if (dims or {}).get(key):
            # RoBERTa-style position ids start at padding_idx + 1: 514 positions hold 512 tokens
            offset = int(dims.get("pad_token_id") or 1) + 1 if dims.get("model_type") in OFFSET_POSITIONS else 0
            return int(dims[key]) - offset
    return None


OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text"})


def linear_widths(dims: typing.Mapping) -> dict[str, int]:
    """Input widths of a transformer block's linears (what an N:M pattern groups along)."""
    hidden = dims.get("hidden_size")
    heads = dims.get("num_attention_heads")
    head_dim = dims.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {"hidden_size": hidden, "intermediate_size": dims.get("intermediate_size")}
    if heads and head_dim:
        widths["num_attention_heads x head_dim"] = heads * head_dim
    return {k: int(v) for k, v in widths.items() if v}
