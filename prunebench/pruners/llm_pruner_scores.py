"""LLM-Pruner's importance (Ma, Fang, Wang; NeurIPS 2023; arXiv 2305.11627), the pure part: weights
and gradients -> one value per channel, per coupled group; how many channels a layer gives up; the
layer ranges; the calibration examples; and which weight slices form a group and their gradients.
`llm_pruner.py` (the pruner) reads these and does the trimming; its docstring states the protocol.

Per element, W a member's weight, g the mean gradient of the next-token loss, F the Fisher diagonal
(1/N)·Σⱼ gⱼ² from per-example gradients:

    param_first:  |W·g|      param_second: |W²·F|      param_mix: |W·g − ½·W²·F|
    vectorize:    |Σ W·g| over the row / column (sign kept inside the sum)

summed per owned row / column; query-side members folded onto their KV group; members reduced per
channel with `grouping`; a KV group sums its head_dim channels. Baselines: Σ|W|ᵖ (l1, l2).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models import trim as trim_ops
from prunebench.pruners.stats import sample_gradients

PrunerType = Literal["taylor", "l1", "l2", "random"]
Estimator = Literal["param_first", "param_second", "param_mix", "vectorize"]
Grouping = Literal["sum", "mean", "max", "prod"]
GROUPINGS = typing.get_args(Grouping)

# --------------------------------------------------------------------------------------------------
# Importance (pure): weights, gradients -> one value per channel, per group.


def taylor_salience(w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor | None, estimator: str) -> torch.Tensor:
    """Signed per-element salience: W·g (param_first, vectorize), W²·F (param_second),
    W·g − ½·W²·F (param_mix)."""
    if estimator in ("param_first", "vectorize"):
        return w * g
    if fisher is None:
        raise ValueError(f"{estimator} needs the Fisher diagonal")
    second = w * fisher * w
    return second if estimator == "param_second" else w * g - 0.5 * second


def taylor_channels(
    w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor | None, estimator: str, dim: int | None
) -> torch.Tensor:
    """One member's importance per channel: its salience summed over `dim` (1: per output row, 0: per
    input column; None: a 1-D norm weight, per element), absolute value after the sum for vectorize,
    before it otherwise."""
    s = taylor_salience(w, g, fisher, estimator)
    if dim is None:
        return s.abs()
    return s.sum(dim).abs() if estimator == "vectorize" else s.abs().sum(dim)


def magnitude_channels(w: torch.Tensor, p: int, dim: int | None) -> torch.Tensor:
    """Σ|W|ᵖ per row (dim 1) or column (dim 0); |w|ᵖ per element of a 1-D norm weight."""
    a = w.abs().pow(p)
    return a if dim is None else a.sum(dim)


def reduce_members(members: Sequence[torch.Tensor], grouping: str) -> torch.Tensor:
    """Per-channel reduction over a group's members (each a vector over the same channels)."""
    stack = torch.stack(list(members))
    if grouping == "sum":
        return stack.sum(0)
    if grouping == "mean":
        return stack.mean(0)
    if grouping == "max":
        return stack.max(0).values
    if grouping == "prod":
        return stack.prod(0)
    raise ValueError(f"grouping {grouping!r} must be one of {', '.join(GROUPINGS)}")


def fold_query(scores: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Query-side channels (heads·head_dim, head h = g·r + i) -> KV-side channels (groups·head_dim):
    the r query heads of each group summed channel by channel."""
    return scores.reshape(groups, -1, head_dim).sum(1).reshape(-1)


def unit_sums(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Channels -> units of `width` consecutive channels (a KV group's head_dim), summed."""
    return scores.reshape(-1, width).sum(1)


def removal_count(current: int, initial: int, ratio: float) -> int:
    """The authors' n = current − int(initial·(1 − ratio)), in channels (never negative)."""
    return max(current - int(initial * (1 - ratio)), 0)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores (ties: the lower index goes first), ascending."""
    order = torch.sort(scores.float().cpu(), stable=True).indices
    return sorted(order[:k].tolist())


def default_range(num_layers: int) -> tuple[int, int]:
    """The authors' LLaMA-7B proportions (4..30 of 32) for any depth: keep round(L/8) first and
    round(L/16) last layers (half rounds up)."""
    start = int(num_layers / 8 + 0.5)
    return start, max(start, num_layers - int(num_layers / 16 + 0.5))


def resolve_range(start: int | None, end: int | None, num_layers: int, knob: str) -> tuple[int, int]:
    """[start, end) in 0-based layers; null = default_range, negative = from the end."""
    d_start, d_end = default_range(num_layers)
    s = d_start if start is None else (start + num_layers if start < 0 else start)
    e = d_end if end is None else (end + num_layers if end < 0 else end)
    for name, given, value in (("start", start, s), ("end", end, e)):
        if not 0 <= value <= num_layers:
            raise PrunebenchError(
                f"pruner.{knob}_layer_{name}={given} is outside the model's {num_layers} layers (0-based, end"
                f" exclusive, negative counts from the end: -{num_layers}..{num_layers})"
            )
    if s > e:
        raise PrunebenchError(
            f"pruner.{knob}_layer_start={start} resolves to layer {s}, after pruner.{knob}_layer_end={end} (layer"
            f" {e}); start must not come after end (equal: prune no {knob} group)"
        )
    return s, e


def calibration_examples(windows: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Pieces of min(seqlen, window) tokens cut from the windows: piece j of every window before piece
    j + 1 of any (so the first examples come from different windows)."""
    n, t = windows.shape
    length = min(seqlen, t)
    per = t // length
    return windows[:, : per * length].reshape(n, per, length).transpose(0, 1).reshape(-1, length)


# --------------------------------------------------------------------------------------------------
# The members of a group (which weight slices, which axis), and the gradients.


@dataclass
class Member:
    """Rows `part` of `param`; `dim` the axis summed to get one value per channel (1: the member
    owns rows, 0: columns, None: a 1-D norm); `query`: on the query side (folded onto KV groups)."""

    name: str
    param: nn.Parameter
    part: slice
    dim: int | None
    query: bool = False


def attention_members(block: nn.Module, heads: int, groups: int, head_dim: int) -> list[Member]:
    attn = trim_ops._attn(block)
    q, kv = heads * head_dim, groups * head_dim
    every = slice(None)
    if hasattr(attn, "qkv_proj"):  # Phi-3: rows [Q | K | V]
        w = attn.qkv_proj.weight
        out = [Member("qkv_proj.q", w, slice(0, q), 1, True), Member("qkv_proj.k", w, slice(q, q + kv), 1),
               Member("qkv_proj.v", w, slice(q + kv, q + 2 * kv), 1)]  # fmt: skip
    else:
        out = [Member("q_proj", attn.q_proj.weight, every, 1, True), Member("k_proj", attn.k_proj.weight, every, 1),
               Member("v_proj", attn.v_proj.weight, every, 1)]  # fmt: skip
    out.append(Member("o_proj", attn.o_proj.weight, every, 0, True))
    for name, width, query in (("q_norm", q, True), ("k_norm", kv, False)):
        norm = getattr(attn, name, None)  # OLMo-2: over the whole projection (a per-head norm is shared)
        if norm is not None and trim_ops._is_norm(norm, width) and width != head_dim:
            out.append(Member(name, norm.weight, every, None, query))
    return out


def mlp_members(block: nn.Module) -> list[Member]:
    mlp = trim_ops._mlp(block)
    every = slice(None)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [gate | up]
        f = trim_ops.ffn_size(mlp)
        w = mlp.gate_up_proj.weight
        out = [Member("gate_up_proj.gate", w, slice(0, f), 1), Member("gate_up_proj.up", w, slice(f, 2 * f), 1)]
    else:
        out = [Member(n, getattr(mlp, n).weight, every, 1) for n in ("gate_proj", "up_proj") if hasattr(mlp, n)]
    return [*out, Member("down_proj", mlp.down_proj.weight, every, 0)]


def taylor_gradients(
    model: nn.Module, examples: torch.Tensor, params: Sequence[nn.Parameter], fisher: bool
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, list[float]]:
    """Mean gradient of the next-token loss over `examples` (one backward each, batch 1) for every
    parameter in `params`, and with `fisher` the mean of the squared per-example gradients; fp32
    accumulators keyed by id(param), each example's gradient folded in as it arrives and freed.
    Returns (gradient, Fisher diagonal or None, per-example losses)."""
    unique = {id(p): p for p in params}
    total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in unique.items()}
    squares = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in unique.items()} if fisher else None

    def fold(key: int, grad: torch.Tensor) -> None:
        g = grad.float()
        total[key] += g
        if squares is not None:
            squares[key] += g * g

    losses = sample_gradients(model, examples, unique, fold, who="llm_pruner")
    n = max(len(examples), 1)
    mean = {k: v.div_(n) for k, v in total.items()}
    return mean, ({k: v.div_(n) for k, v in squares.items()} if squares is not None else None), losses
