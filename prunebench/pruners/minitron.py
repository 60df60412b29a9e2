"""Minitron: "Compact Language Models via Pruning and Knowledge Distillation" (Muralidharan et al.,
arXiv 2407.14679). Activation-based importance from forward passes only (no gradients), computed
once on the dense model; then depth, then width trimmed for real (smaller matrices, not masks).

Importance (per layer; X the calibration batch, B windows × S tokens):
    heads    F_head(i)   = agg_B agg_S ‖Attn(X W_Q,i, X W_K,i, X W_V,i)‖₂     (o_proj input, per head)
    neurons  F_neuron(i) = agg_B agg_S |act(X W_gate,i) · X W_up,i|          (down_proj input; relu²(X W_up,i)
                                                                             for Nemotron's non-gated MLP)
             or, `neuron_score: pre_act`, agg_B agg_S |X W1,i|             (the activation's input: gate_proj
                                                                             output, up_proj when not gated)
    channels F_emb(i)    = Σ_norms agg_B agg_S |LN(X)_i|                     (every residual norm's output:
                                                                             input/post-attention norms of the
                                                                             kept layers + the final norm)
    depth    BI(l)       = mean_tokens [1 − cos(h_l,in, h_l,out)]           (Block Importance; one pass), or
             PPL(l)      = ppl(model without layer l) − ppl(model)          (one forward per layer)
agg_S ∈ {mean, l2, var} over tokens of a window, then agg_B ∈ {mean, l2, var} over windows, both of
magnitudes; the paper's best (its Table 13) is batch = l2, seq = mean, the default:
    F = sqrt(Σ_b (1/S Σ_s |a_bs|)²).
GQA: heads are ranked within their KV group and every kept group keeps the same number of heads;
`target.kv_heads` also removes whole KV groups, ranked by the sum of their heads' scores (an MHA
model, KV heads = heads, prunes KV heads with its query heads). `depth.contiguous` removes the
best contiguous run instead (its BI is 1 − cos(input of the first, output of the last layer)).

Neuron scores: the paper writes the pre-activation X·W1_i (minitron.md, settings); the reference
code (NVIDIA ModelOpt's Megatron pruning) hooks the input of the second linear, i.e. after the
activation, as the issue asks. Both are here; the default is `down_input` (the reference code),
which also sees the gate·up product a gated MLP actually passes on.

Head merge (`head_merge: true`, off by default): the paper adds the residual of pruned heads into
the kept ones, head_i ← head_i + (head_i − head_{2K−i+1}) with heads ranked 1..2K by importance
and K kept (kept head i paired with pruned head 2K−i+1); with GQA only query heads are merged, so
it applies to q_proj rows (and bias), inside each KV group (an MHA model has nothing to merge).
Measured on SmolLM2-135M without retraining (heads 9 → 6, WikiText-2, 8 × 512 tokens) it hurts,
ppl 383 → 3565, so it stays off.

`hidden_norm_rescale` (not in the paper, off): after trimming hidden channels, scale every norm's
gain by sqrt(d/d'), since RMS statistics over d' < d channels grow by d/d' when the removed
channels are weak (SmolLM2, hidden 576 → 512: ppl 92.3 → 76.4; dense 30.6).

Order: compute every importance on the dense model (once: `compute_importance` returns all
scores, and `plan` + `apply_plan` can trim many candidate shapes from one pass, as a search
needs), then remove layers, then trim heads, MLP neurons and hidden channels.

Architecture search (`target_params`, minitron_search.py): instead of a fixed `target`, a parameter
budget (a count, or a fraction in (0, 1) of the loaded model's); every shape over `axes` (depth, mlp,
att, emb; the other axes stay at `target.*`) within ±`search.tolerance` is pruned from one importance
pass, the `search.max_candidates` closest are each distilled from the dense model for `search.tokens`
and ranked by LM validation loss at `search.checkpoints`; the best is applied (from the dense
weights) and recorded with every candidate in PruneStats.info['search'].

Stages (`stages`, the paper's 15B -> 8B -> 4B in one run): each listed stage prunes (its `target` or
`target_params` and `axes`), then distils `tokens` from the dense model (`search.kd` knobs), and
importance is scored afresh on the result; the pruner's own target is the last stage, after which
the pipeline's recovery runs. The same chain as separate commands: a run with `save_model=true`,
then `model.path=<run>/model` (fractions are then of the loaded, already pruned model).

    pruner:
      _target_: prunebench.pruners.minitron.Minitron
      target: {layers: null, heads: 6, kv_heads: null, ffn: 1024, hidden: null}
      agg: {batch: l2, seq: mean}
      depth: {metric: bi, contiguous: false}
      head_merge: false
      hidden_norm_rescale: false
      target_params: null   # or e.g. 0.67: search the shape instead (target.* of searched axes unused)
      axes: [mlp, att, emb]
      search: {tolerance: 0.05, max_candidates: 8, tokens: 8192, checkpoints: null, kd: {seqlen: 256}}
      stages: null          # or [{target_params: 0.67, tokens: 16384}]
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models import count_params
from prunebench.models import trim as trim_ops
from prunebench.models.blocks import find_blocks
from prunebench.models.surgery import keep_layers, set_blocks, snapshot
from prunebench.pruners import minitron_search as msearch
from prunebench.pruners.base import PruneStats

AGGS = ("mean", "l2", "var")
NEURON_SCORES = ("down_input", "pre_act")  # reference code (after the activation) | paper (X·W1)
DEPTH_METRICS = ("bi", "ppl")
TARGET_KEYS = ("layers", "heads", "kv_heads", "ffn", "hidden")
WIDTH_AXES = ("heads", "ffn", "hidden")

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Aggregation (pure): over the tokens of a window, then over windows; always of magnitudes, in fp32.


def reduce_seq(x: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, S, C) activations -> (B, C): mean, l2 norm or (population) variance of |x| over S."""
    if how == "mean":
        return torch.linalg.vector_norm(x, ord=1, dim=1, dtype=torch.float32) / x.shape[1]
    if how == "l2":
        return torch.linalg.vector_norm(x, ord=2, dim=1, dtype=torch.float32)
    if how == "var":
        return x.float().abs().var(dim=1, correction=0)
    raise ValueError(f"unknown sequence aggregation {how!r}; one of {AGGS}")


def reduce_batch(v: torch.Tensor, how: str = "l2") -> torch.Tensor:
    """(B, C) per-window scores -> (C,): mean, l2 norm or (population) variance over windows."""
    v = v.float()
    if how == "mean":
        return v.mean(0)
    if how == "l2":
        return torch.linalg.vector_norm(v, ord=2, dim=0)
    if how == "var":
        return v.var(dim=0, correction=0)
    raise ValueError(f"unknown batch aggregation {how!r}; one of {AGGS}")


def aggregate(x: torch.Tensor, batch: str = "l2", seq: str = "mean") -> torch.Tensor:
    """(B, S, C) -> (C,): the importance of each channel over a whole calibration set."""
    return reduce_batch(reduce_seq(x, seq), batch)


def head_norms(o_in: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input (B, S, H·d) -> per-token L2 norm of each head's attention output (B, S, H)."""
    b, s, _ = o_in.shape
    return torch.linalg.vector_norm(o_in.reshape(b, s, -1, head_dim), ord=2, dim=-1, dtype=torch.float32)


class BatchAgg:
    """`reduce_batch` accumulated over batches of windows (exactly, in fp32; var by Chan's merge)."""

    def __init__(self, how: str = "l2"):
        if how not in AGGS:
            raise ValueError(f"unknown batch aggregation {how!r}; one of {AGGS}")
        self.how, self.n = how, 0
        self.acc: torch.Tensor | None = None  # Σv² (l2), Σv (mean), mean (var)
        self.m2: torch.Tensor | None = None

    def add(self, v: torch.Tensor) -> None:
        v = v.float()
        nb = v.shape[0]
        if self.acc is None:
            self.acc = torch.zeros_like(v[0])
            self.m2 = torch.zeros_like(v[0])
        if self.how == "l2":
            self.acc += (v * v).sum(0)
        elif self.how == "mean":
            self.acc += v.sum(0)
        else:
            mean_b = v.mean(0)
            m2_b = ((v - mean_b) ** 2).sum(0)
            total = self.n + nb
            delta = mean_b - self.acc
            self.acc += delta * (nb / total)
            self.m2 += m2_b + delta * delta * (self.n * nb / total)
        self.n += nb

    def value(self) -> torch.Tensor:
        if self.acc is None:
            raise ValueError("no activations were aggregated")
        if self.how == "l2":
            return self.acc.sqrt()
        if self.how == "mean":
            return self.acc / self.n
        return self.m2 / self.n


# --------------------------------------------------------------------------------------------------
# Selection (pure): scores -> kept indices.


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: the lower index wins)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def ranking(scores: torch.Tensor) -> list[int]:
    """Indices from most to least important."""
    return torch.sort(scores.float().cpu(), descending=True, stable=True).indices.tolist()


def select_heads(
    scores: torch.Tensor, kv_groups: int, heads: int, groups: int
) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Keep `groups` KV groups (highest sums of their heads' scores) and `heads` query heads, the
    top heads/groups within each kept group. Returns (kept heads, kept groups, each kept group's
    heads ranked best first)."""
    total = scores.numel()
    r = total // kv_groups
    if total % kv_groups or heads % groups or heads // groups > r or groups > kv_groups:
        raise ValueError(f"cannot keep {heads} heads in {groups} of {kv_groups} groups of {r} heads")
    per = scores.float().cpu().view(kv_groups, r)
    kept_groups = top_k(per.sum(1), groups)
    ranked = {g: [g * r + i for i in ranking(per[g])] for g in kept_groups}
    kept = sorted(h for g in kept_groups for h in ranked[g][: heads // groups])
    return kept, kept_groups, ranked


def merge_pairs(ranked: Sequence[int], keep: int) -> list[tuple[int, int]]:
    """The paper's head merge pairs: with heads ranked 1..n (best first) and K kept, kept head i
    takes the residual of pruned head 2K − i + 1 (when that head exists)."""
    return [(ranked[i - 1], ranked[2 * keep - i]) for i in range(1, keep + 1) if 2 * keep - i < len(ranked)]


def select_run(run_scores: Sequence[float], n: int, layers: int) -> list[int]:
    """Remove the contiguous run of n layers whose removal matters least; returns the kept layers."""
    start = min(range(len(run_scores)), key=lambda s: (run_scores[s], s))
    return [i for i in range(layers) if not start <= i < start + n]


# --------------------------------------------------------------------------------------------------
# Importance: one hooked forward pass over the calibration windows.


@dataclass
class Importance:
    """Every score of one importance pass on the dense model (fp32, on the CPU). Higher = keep."""

    num_layers: int
    kv_groups: int = 0
    heads: list[torch.Tensor] | None = None  # per layer (H,)
    neurons: list[torch.Tensor] | None = None  # per layer (F,)
    norms: dict[str, torch.Tensor] | None = None  # residual norm ('3.input_layernorm', 'norm') -> (hidden,)
    layers: list[float] | None = None  # per-layer depth importance (BI or Δppl)
    runs: dict[int, list[float]] = field(default_factory=dict)  # run length n -> importance of removing run s..s+n-1
    depth_metric: str | None = None
    agg: tuple[str, str] = ("l2", "mean")
    dense_ppl: float | None = None

    def groups(self, layer: int) -> torch.Tensor:
        """Each KV group's score: the sum of its heads' scores."""
        return self.heads[layer].view(self.kv_groups, -1).sum(1)

    def hidden(self, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Channel scores summed over the residual norms of `layers` (default all) and the final norm."""
        keep = None if layers is None else {int(i) for i in layers}
        parts = [
            s for name, s in self.norms.items() if keep is None or "." not in name or int(name.split(".")[0]) in keep
        ]
        return torch.stack(parts).sum(0)


def block_influence_fast(
    h_in: torch.Tensor, h_out: torch.Tensor, n_in: torch.Tensor | None = None, n_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1 − cos(h_in, h_out) (shortgpt.block_influence: NaN → 0.5) and |h_out| per token.
    Token norms can be passed in: a block's input norms are the previous block's output norms."""
    a, b = h_in.float(), h_out.float()
    n_in = torch.linalg.vector_norm(a, dim=-1) if n_in is None else n_in
    n_out = torch.linalg.vector_norm(b, dim=-1) if n_out is None else n_out
    bi = 1 - (a * b).sum(-1) / (n_in * n_out)
    return torch.nan_to_num(bi, nan=0.5), n_out


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _mean_nll(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in input_ids.split(batch_size):
        x = batch.to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(model(input_ids=x, labels=x, use_cache=False).loss.float()) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def removal_ppl(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, runs: Sequence[Sequence[int]]
) -> tuple[float, list[float]]:
    """Calibration perplexity of the model, and with each run of layers removed (by re-pointing the
    block list: no copies; the model is restored after each)."""
    blocks, types = snapshot(model)
    dense = math.exp(_mean_nll(model, input_ids, batch_size))
    out = []
    for run in runs:
        drop = set(run)
        keep = [i for i in range(len(blocks)) if i not in drop]
        try:
            set_blocks(model, [blocks[i] for i in keep], [types[i] for i in keep] if types else None)
            out.append(math.exp(_mean_nll(model, input_ids, batch_size)))
        finally:
            set_blocks(model, blocks, types)
    return dense, out


@torch.no_grad()
def compute_importance(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    *,
    batch: str = "l2",
    seq: str = "mean",
    axes: Sequence[str] = WIDTH_AXES,
    depth: str | None = "bi",
    run_lengths: Sequence[int] = (),
    neuron: str = "down_input",
) -> Importance:
    """All importance scores of the dense model over the calibration windows, from forward hooks
    (no gradients): per-head attention-output norms (o_proj input), per-neuron down_proj inputs,
    per-channel residual-norm outputs and per-layer Block Importance in one pass, which stops at
    the final norm (the LM head is not needed); depth='ppl' adds one forward per removed layer or
    run. `run_lengths` also scores contiguous runs of those lengths. `neuron`: down_input (the
    down_proj input, after the activation) or pre_act (the activation's input, X·W1)."""
    for how in (batch, seq):
        if how not in AGGS:
            raise ValueError(f"unknown aggregation {how!r}; one of {AGGS}")
    if neuron not in NEURON_SCORES:
        raise ValueError(f"unknown neuron score {neuron!r}; one of {NEURON_SCORES}")
    blocks = find_blocks(model)
    n_layers = len(blocks)
    imp = Importance(num_layers=n_layers, depth_metric=depth, agg=(batch, seq))
    handles = []
    head_acc: list[BatchAgg] = []
    neuron_acc: list[BatchAgg] = []
    norm_acc: dict[str, BatchAgg] = {}
    if "heads" in axes:
        d = trim_ops.head_dim(model)
        imp.kv_groups = trim_ops.layer_heads(model, 0)[1]
        for block in blocks:
            acc = BatchAgg(batch)
            head_acc.append(acc)
            o = trim_ops._attn(block).o_proj
            handles.append(
                o.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(reduce_seq(head_norms(a[0], d), seq)))
            )
    if "ffn" in axes:
        for block in blocks:
            acc = BatchAgg(batch)
            neuron_acc.append(acc)
            mlp = trim_ops._mlp(block)
            if neuron == "down_input":
                hook = lambda _m, a, acc=acc: acc.add(reduce_seq(a[0], seq))  # noqa: E731
                handles.append(mlp.down_proj.register_forward_pre_hook(hook))
            else:  # X·W1: the gate's output in a gated MLP, else the up projection's
                first = getattr(mlp, "gate_proj", None) or mlp.up_proj
                hook = lambda _m, _a, out, acc=acc: acc.add(reduce_seq(out, seq))  # noqa: E731
                handles.append(first.register_forward_hook(hook))
    norms = trim_ops.residual_norms(model)
    if "hidden" in axes:
        if not norms:
            raise ValueError(f"{type(model).__name__} has no residual norms to score hidden channels with")
        for name, norm in norms.items():
            acc = norm_acc[name] = BatchAgg(batch)
            handles.append(
                norm.register_forward_hook(lambda _m, _a, out, acc=acc: acc.add(reduce_seq(_first(out), seq)))
            )
    device = next(model.parameters()).device
    bi_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    run_sum = {
        n: torch.zeros(n_layers - n + 1, dtype=torch.float32, device=device) for n in run_lengths if 1 <= n <= n_layers
    }
    tokens = [0]
    stash: dict[int, torch.Tensor] = {}
    last: list = [None, None]  # the previous block's output and its per-token norms (= this block's input)
    if depth == "bi":
        longest = max(run_sum, default=1)

        def pre(index):
            def fn(_module, args, kwargs):
                if run_sum:
                    stash[index] = args[0] if args else kwargs["hidden_states"]

            return fn

        def post(index):
            def fn(_module, args, kwargs, out):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = _first(out)
                n_in = last[1] if last[0] is h_in else None
                bi, n_out = block_influence_fast(h_in, h_out, n_in)
                bi_sum[index] += bi.sum()
                last[0], last[1] = h_out, n_out
                for n, sums in run_sum.items():
                    if index - n + 1 >= 0:
                        sums[index - n + 1] += block_influence_fast(stash[index - n + 1], h_out, None, n_out)[0].sum()
                stash.pop(index - longest + 1, None)
                if index == 0:
                    tokens[0] += h_in.shape[0] * h_in.shape[1]

            return fn

        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post(i), with_kwargs=True))

    hooked = bool(handles)
    final = next((m for n, m in reversed(norms.items()) if "." not in n), None)
    if final is not None:  # everything is measured by the final norm: skip the LM head

        def stop(*_):
            raise _Stop

        handles.append(final.register_forward_hook(stop))
    try:
        if hooked:
            for chunk in input_ids.split(batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=chunk.to(device), use_cache=False)
                stash.clear()
                last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    if head_acc:
        imp.heads = [a.value().cpu() for a in head_acc]
    if neuron_acc:
        imp.neurons = [a.value().cpu() for a in neuron_acc]
    if norm_acc:
        imp.norms = {n: a.value().cpu() for n, a in norm_acc.items()}
    if depth == "bi":
        imp.layers = (bi_sum.double().cpu() / max(tokens[0], 1)).tolist()
        imp.runs = {n: (s.double().cpu() / max(tokens[0], 1)).tolist() for n, s in run_sum.items()}
    elif depth == "ppl":
        single = [[i] for i in range(n_layers)]
        runs = [list(range(s, s + n)) for n in run_lengths if 1 <= n <= n_layers for s in range(n_layers - n + 1)]
        imp.dense_ppl, ppls = removal_ppl(model, input_ids, batch_size, single + runs)
        imp.layers = [p - imp.dense_ppl for p in ppls[:n_layers]]
        rest = iter(ppls[n_layers:])
        imp.runs = {
            n: [next(rest) - imp.dense_ppl for _ in range(n_layers - n + 1)] for n in run_lengths if 1 <= n <= n_layers
        }
    elif depth is not None:
        raise ValueError(f"unknown depth metric {depth!r}; one of {DEPTH_METRICS}")
    return imp


# --------------------------------------------------------------------------------------------------
# Plan (pure) and apply (surgery).


@dataclass
class Dims:
    """The shape Minitron trims: layers, query heads, KV heads, MLP size, hidden size."""

    layers: int
    heads: int
    kv_heads: int
    ffn: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> Dims:
        c = model.config
        return cls(
            c.num_hidden_layers,
            c.num_attention_heads,
            getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            c.intermediate_size,
            c.hidden_size,
        )


@dataclass
class Plan:
    """What to keep, in the dense model's indices (layers of the dense model)."""

    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_groups: dict[int, list[int]] = field(default_factory=dict)
    merges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    channels: list[int] | None = None


def resolve_groups(dims: Dims, heads: int | None, kv_heads: int | None) -> tuple[int, int]:
    """(query heads, KV groups) to keep: KV groups stay unless `kv_heads` is set, except on an MHA
    model (KV heads = heads), where the KV heads follow the query heads."""
    h = dims.heads if heads is None else heads
    if kv_heads is not None:
        return h, kv_heads
    return h, (h if dims.kv_heads == dims.heads else dims.kv_heads)


def plan(
    imp: Importance, dims: Dims, target: Mapping[str, int | None], contiguous: bool = False, head_merge: bool = False
) -> Plan:
    """Kept indices for one target shape from one importance pass (no model needed)."""
    n_keep = target.get("layers") or dims.layers
    if n_keep < dims.layers:
        remove = dims.layers - n_keep
        if contiguous:
            if remove not in imp.runs:
                raise ValueError(f"no run scores of length {remove}; compute_importance(run_lengths=[{remove}])")
            layers = select_run(imp.runs[remove], remove, dims.layers)
        else:
            layers = top_k(torch.tensor(imp.layers), n_keep)
    else:
        layers = list(range(dims.layers))
    p = Plan(layers=layers)
    h, g = resolve_groups(dims, target.get("heads"), target.get("kv_heads"))
    if (h, g) != (dims.heads, dims.kv_heads):
        for i in layers:
            kept, groups, ranked = select_heads(imp.heads[i], dims.kv_heads, h, g)
            p.heads[i], p.kv_groups[i] = kept, groups
            if head_merge:
                p.merges[i] = [pair for grp in groups for pair in merge_pairs(ranked[grp], h // g)]
    if target.get("ffn") is not None and target["ffn"] < dims.ffn:
        p.neurons = {i: top_k(imp.neurons[i], target["ffn"]) for i in layers}
    if target.get("hidden") is not None and target["hidden"] < dims.hidden:
        p.channels = top_k(imp.hidden(layers), target["hidden"])
    return p


@torch.no_grad()
def merge_heads(model: nn.Module, layer: int, pairs: Sequence[tuple[int, int]]) -> None:
    """head_i ← head_i + (head_i − head_j) on the query projection (rows and bias) of one layer."""
    q = trim_ops._attn(find_blocks(model)[layer]).q_proj
    d = trim_ops.head_dim(model)
    for params in (q.weight, q.bias):
        if params is None:
            continue
        old = params.detach().clone()
        for i, j in pairs:
            params[i * d : (i + 1) * d] = 2 * old[i * d : (i + 1) * d] - old[j * d : (j + 1) * d]


def apply_plan(model: nn.Module, p: Plan, rescale_norms: bool = False) -> None:
    """Depth first, then heads (merged first if planned), MLP neurons, hidden channels
    (`rescale_norms`: see trim.trim_hidden)."""
    if len(p.layers) < len(find_blocks(model)):
        keep_layers(model, p.layers)
    for new, old in enumerate(p.layers):
        if old in p.merges:
            merge_heads(model, new, p.merges[old])
        if old in p.heads:
            trim_ops.trim_heads(model, new, p.heads[old], p.kv_groups[old])
        if old in p.neurons:
            trim_ops.trim_mlp(model, new, p.neurons[old])
    if p.channels is not None:
        trim_ops.trim_hidden(model, p.channels, rescale_norms)
    if p.heads or p.neurons or p.channels is not None:
        trim_ops.check_uniform(model)


# --------------------------------------------------------------------------------------------------
# The pruner.


def _summary(scores: Sequence[torch.Tensor] | torch.Tensor, rank: bool = True) -> dict:
    t = torch.stack(list(scores)) if isinstance(scores, (list, tuple)) else torch.as_tensor(scores)
    t = t.float()
    out = {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}
    if rank:
        out["ranking"] = [ranking(s) for s in scores] if isinstance(scores, (list, tuple)) else ranking(t)
    return out


def _positive_int(value, knob: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunebenchError(f"{knob}={value!r} must be a positive integer or null (keep)")
    return value


class Minitron:
    needs_calibration = True

    def __init__(
        self,
        name: str = "minitron",
        target: Mapping | None = None,
        agg: Mapping | None = None,
        depth: Mapping | None = None,
        head_merge: bool = False,
        hidden_norm_rescale: bool = False,
        neuron_score: str = "down_input",
        target_params: float | int | None = None,
        axes: Sequence[str] = ("mlp", "att", "emb"),
        search: Mapping | None = None,
        stages: Sequence[Mapping] | None = None,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        self.name = name
        target = dict(target or {})
        if unknown := sorted(set(target) - set(TARGET_KEYS)):
            raise PrunebenchError(f"pruner.target.{unknown[0]} is not a Minitron axis; use {', '.join(TARGET_KEYS)}")
        self.target = {k: _positive_int(target.get(k), f"pruner.target.{k}") for k in TARGET_KEYS}
        agg = dict(agg or {})
        if unknown := sorted(set(agg) - {"batch", "seq"}):
            raise PrunebenchError(f"pruner.agg.{unknown[0]} is unknown; set pruner.agg.batch and pruner.agg.seq")
        self.batch, self.seq = agg.get("batch", "l2"), agg.get("seq", "mean")
        for key, value in (("batch", self.batch), ("seq", self.seq)):
            if value not in AGGS:
                raise PrunebenchError(f"pruner.agg.{key}={value!r} must be one of {', '.join(AGGS)} (paper: l2, mean)")
        depth = dict(depth or {})
        if unknown := sorted(set(depth) - {"metric", "contiguous"}):
            raise PrunebenchError(f"pruner.depth.{unknown[0]} is unknown; set pruner.depth.metric / .contiguous")
        self.metric, self.contiguous = depth.get("metric", "bi"), depth.get("contiguous", False)
        if self.metric not in DEPTH_METRICS:
            raise PrunebenchError(f"pruner.depth.metric={self.metric!r} must be bi (Block Importance) or ppl")
        if not isinstance(self.contiguous, bool):
            raise PrunebenchError(f"pruner.depth.contiguous={self.contiguous!r} must be true or false")
        if not isinstance(head_merge, bool):
            raise PrunebenchError(f"pruner.head_merge={head_merge!r} must be true or false")
        self.head_merge = head_merge
        if not isinstance(hidden_norm_rescale, bool):
            raise PrunebenchError(f"pruner.hidden_norm_rescale={hidden_norm_rescale!r} must be true or false")
        self.hidden_norm_rescale = hidden_norm_rescale
        if neuron_score not in NEURON_SCORES:
            raise PrunebenchError(
                f"pruner.neuron_score={neuron_score!r} must be down_input (reference code, default) or pre_act (paper)"
            )
        self.neuron_score = neuron_score
        self.target_params = msearch.parse_target_params(target_params)
        self.axes = msearch.parse_axes(axes)
        self.search = msearch.SearchKnobs.parse(search)
        h, g = self._fixed()["heads"], self.target["kv_heads"]
        if h is not None and g is not None and h % g:
            raise PrunebenchError(
                f"pruner.target.heads={h} is not divisible by pruner.target.kv_heads={g}; heads must be k × kv_heads"
            )
        if sparsity:
            raise PrunebenchError("pruner.sparsity must be 0 for minitron: it trims shapes (set pruner.target.*)")
        if pattern != "unstructured":
            raise PrunebenchError(
                "pruner.pattern must be unstructured for minitron: it trims shapes (set pruner.target.*)"
            )
        shared = dict(name=name, agg=agg, depth=depth, head_merge=head_merge, hidden_norm_rescale=hidden_norm_rescale,
                      neuron_score=neuron_score)  # fmt: skip
        self.stages = self._parse_stages(stages, shared, search, self.axes)
        self.importance: Importance | None = None  # the last pass, for reuse (e.g. an architecture search)
        self.tokenizer = None  # set by the pipeline: the search and the stages distil on text

    def _fixed(self) -> dict:
        """pruner.target without the axes the search varies (those come from the search)."""
        if self.target_params is None:
            return dict(self.target)
        searched = {msearch.AXIS_KEY[a] for a in self.axes}
        return {k: (None if k in searched else v) for k, v in self.target.items()}

    @staticmethod
    def _parse_stages(stages, shared: dict, search, axes: Sequence[str]) -> list[tuple[Minitron, int]]:
        """pruner.stages: the intermediate prunes of a multi-stage run, each then distilled from the
        dense model for `tokens`; the pruner's own target / target_params is the last stage. A stage
        without `axes` searches the pruner's."""
        out = []
        for k, stage in enumerate(stages or []):
            stage = dict(stage or {})
            if unknown := sorted(set(stage) - {"target", "target_params", "axes", "tokens"}):
                raise PrunebenchError(
                    f"pruner.stages[{k}].{unknown[0]} is unknown; a stage takes target or target_params, axes, tokens"
                )
            tokens = stage.get("tokens", 0)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise PrunebenchError(f"pruner.stages[{k}].tokens={tokens} must be ≥ 0 (KD tokens after this stage)")
            if stage.get("target_params") is None and not any((stage.get("target") or {}).values()):
                raise PrunebenchError(f"pruner.stages[{k}] needs target_params or target.* (the stage's shape)")
            try:
                sub = Minitron(
                    **shared,
                    target=stage.get("target"),
                    target_params=stage.get("target_params"),
                    axes=stage.get("axes") or axes,
                    search=search,
                )
            except PrunebenchError as err:
                raise PrunebenchError(f"pruner.stages[{k}]: {err}") from None
            out.append((sub, tokens))
        return out

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """Validate the target against the model's shape known before loading: its layer count, and
        (if given, HF config names) hidden_size, num_attention_heads, num_key_value_heads,
        intermediate_size; with target_params, that some shape lies within the tolerance."""
        if dims and dims.get("num_hidden_layers"):
            num_layers = int(dims["num_hidden_layers"])  # a saved, already trimmed model.path
        t = self._fixed()
        if (n := t["layers"]) is not None and n > num_layers:
            raise PrunebenchError(f"pruner.target.layers={n} is more than the model's {num_layers} layers")
        if dims and all(dims.get(k) for k in ("hidden_size", "num_attention_heads", "intermediate_size")):
            heads = dims["num_attention_heads"]
            d = Dims(
                num_layers,
                heads,
                dims.get("num_key_value_heads") or heads,
                dims["intermediate_size"],
                dims["hidden_size"],
            )
            self._check_dims(d)
            if dims.get("vocab_size"):
                self._check_search(d, msearch.Arch.of_config(dims), enumerate_shapes=not self.stages)
                for k, (sub, _) in enumerate(self.stages):
                    try:
                        sub._check_dims(d)
                        sub._check_search(d, msearch.Arch.of_config(dims), enumerate_shapes=k == 0)
                    except PrunebenchError as err:
                        raise PrunebenchError(f"pruner.stages[{k}]: {err}") from None

    def _check_search(self, d: Dims, arch, enumerate_shapes: bool) -> None:
        if self.target_params is None:
            return
        dense = msearch.param_count(d, arch)
        target = msearch.resolve_target(self.target_params, dense)
        if enumerate_shapes:
            cands, _, closest = msearch.enumerate_candidates(d, arch, target, self.axes, self._fixed(), self.search)
            if not cands:
                message = msearch.no_candidate_message(target, self.axes, self.search, closest, dense, arch)
                raise PrunebenchError(message)

    def _check_dims(self, d: Dims) -> None:
        t = self._fixed()
        for key, have, what in (
            ("layers", d.layers, "layers"),
            ("heads", d.heads, "attention heads"),
            ("kv_heads", d.kv_heads, "KV heads"),
            ("ffn", d.ffn, "MLP channels (intermediate_size)"),
            ("hidden", d.hidden, "hidden channels"),
        ):
            if t[key] is not None and t[key] > have:
                raise PrunebenchError(f"pruner.target.{key}={t[key]} is more than the model's {have} {what}")
        if d.heads % d.kv_heads:
            raise PrunebenchError(f"the model's {d.heads} heads are not divisible by its {d.kv_heads} KV heads")
        h, g = resolve_groups(d, t["heads"], t["kv_heads"])
        if h % g:
            raise PrunebenchError(
                f"pruner.target.heads={h} is not a multiple of the {g} KV heads kept; set pruner.target.heads to a"
                f" multiple of {g} or pruner.target.kv_heads to a divisor of {h}"
            )
        if h // g > d.heads // d.kv_heads:
            raise PrunebenchError(
                f"pruner.target.heads={h} with {g} KV heads needs {h // g} heads per group but the model has"
                f" {d.heads // d.kv_heads}; keep more KV heads (pruner.target.kv_heads) or fewer heads"
            )

    def _check_model(self, model: nn.Module) -> Dims:
        blocks = find_blocks(model)
        t = self._fixed()
        wants = {k for k in ("heads", "kv_heads", "ffn", "hidden") if t[k] is not None}
        searching = self.target_params is not None
        if searching:  # the parameter count reads attention and MLP modules whatever the axes
            wants |= {"heads", "ffn"} | ({"hidden"} if "emb" in self.axes else set())
        needs = {"heads": trim_ops._attn, "kv_heads": trim_ops._attn, "ffn": trim_ops._mlp}
        for key in sorted(wants):
            knob = f"pruner.target.{key}" if t[key] is not None else "pruner.target_params"
            for check in [needs[key]] if key in needs else [trim_ops._attn, trim_ops._mlp]:
                try:
                    check(blocks[0])
                except ValueError as err:
                    raise PrunebenchError(
                        f"{knob}: {err}; minitron trims Llama-family and Nemotron decoders (set {knob}=null)"
                    ) from None
        if "hidden" in wants and model.get_output_embeddings() is None:
            knob = "pruner.target.hidden" if t["hidden"] is not None else "pruner.axes with emb"
            raise PrunebenchError(f"{knob} needs a causal LM (embedding and LM head); drop it")
        depth = t["layers"] is not None or (searching and "depth" in self.axes)
        if self.metric == "ppl" and depth and model.get_output_embeddings() is None:
            raise PrunebenchError("pruner.depth.metric=ppl needs a language-model head; use pruner.depth.metric=bi")
        if wants:
            d = Dims.of(model)
        else:
            c = model.config
            d = Dims(len(blocks), 1, 1, getattr(c, "intermediate_size", 1), c.hidden_size)
        self._check_dims(d)
        return d

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        if calib is None:
            raise PrunebenchError(f"{self.name} needs calibration data")
        params_before = count_params(model)[0]
        frozen = msearch.frozen_names(model)
        stages, timings, teacher = [], {}, None
        try:
            if self.stages:
                if self.tokenizer is None and any(tokens for _, tokens in self.stages):
                    raise PrunebenchError("pruner.stages distil between stages and need the tokenizer (the pipeline)")
                teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the dense model teaches every stage
                for k, (sub, tokens) in enumerate(self.stages):
                    sub.tokenizer = self.tokenizer
                    t0 = time.perf_counter()
                    info, _ = sub._prune(model, calib, params_before, teacher, frozen)
                    entry = {
                        "stage": k,
                        "target": info["target"],
                        "target_params": info.get("search", {}).get("target_params"),
                        "shape_before": info["shape_before"],
                        "shape": info["shape_after"],
                        "params": info["params_after"],
                        "param_ratio": round(info["params_after"] / params_before, 5),
                        "layers_kept": info["layers_kept"],
                    }
                    if "search" in info:
                        entry["search"] = info["search"]
                    if tokens:
                        entry["kd"] = msearch.distil(model, teacher, self.tokenizer, tokens, self.search.kd)
                        msearch.thaw(model, frozen)
                    stages.append(entry)
                    timings[f"stage_{k}"] = time.perf_counter() - t0
            info, final = self._prune(model, calib, params_before, teacher, frozen)
        finally:
            msearch.thaw(model, frozen)
            del teacher
        timings.update(final)
        if stages:
            info.update(
                shape_before=stages[0]["shape_before"],
                stages=stages,
                params_before=params_before,
                param_ratio=info["params_after"] / params_before,
            )
        return PruneStats(0.0, 0.0, {}, timings, info)

    def _prune(
        self, model: nn.Module, calib, dense_params: int, teacher: nn.Module | None, frozen: set[str]
    ) -> tuple[dict, dict]:
        """One prune of `model` in place: to `target`, or to the best shape a search finds."""
        t0 = time.perf_counter()
        dims = self._check_model(model)
        params_before = count_params(model)[0]
        search = None
        if self.target_params is not None:
            p, imp, search = msearch.run_search(self, model, calib, dims, dense_params, teacher, frozen)
            t = {k: search["best"]["shape"].get(k) for k in TARGET_KEYS}
            timings = {"importance": search["importance_seconds"]}
            timings["search"] = time.perf_counter() - t0 - timings["importance"]
        else:
            t = self.target
            axes = [
                a
                for a, keys in (("heads", ("heads", "kv_heads")), ("ffn", ("ffn",)), ("hidden", ("hidden",)))
                if any(t[k] is not None for k in keys)
            ]
            remove = dims.layers - t["layers"] if t["layers"] is not None else 0
            imp = compute_importance(
                model,
                calib.input_ids,
                calib.batch_size,
                batch=self.batch,
                seq=self.seq,
                axes=axes,
                depth=self.metric if remove else None,
                run_lengths=[remove] if remove and self.contiguous else (),
                neuron=self.neuron_score,
            )
            timings = {"importance": time.perf_counter() - t0}
            p = plan(imp, dims, t, self.contiguous, self.head_merge)
        self.importance = imp
        t1 = time.perf_counter()
        apply_plan(model, p, self.hidden_norm_rescale)
        timings["trim"] = time.perf_counter() - t1
        params_after = count_params(model)[0]
        c = model.config
        saveable = not (
            getattr(c, "num_attention_heads", 0)
            and c.hidden_size % c.num_attention_heads
            and msearch.heads_must_divide_hidden(c)
        )
        if not saveable:
            log.warning(
                "the trimmed shape (hidden %d, %d heads) runs but cannot be saved or reloaded: %s requires hidden_size"
                " to be a multiple of num_attention_heads; choose pruner.target.hidden as a multiple of the heads kept",
                c.hidden_size, c.num_attention_heads, type(c).__name__,
            )  # fmt: skip
        if search is not None and params_after != search["best"]["params"]:
            raise PrunebenchError(
                f"the pruned model has {params_after:,} parameters, the search counted {search['best']['params']:,}"
            )
        info = {
            "target": dict(t),
            "agg": {"batch": self.batch, "seq": self.seq},
            "depth": {"metric": self.metric, "contiguous": self.contiguous},
            "head_merge": self.head_merge,
            "hidden_norm_rescale": self.hidden_norm_rescale,
            "neuron_score": self.neuron_score,
            "shape_before": vars(dims),
            "shape_after": vars(Dims.of(model)),
            "layers_before": dims.layers,
            "layers_kept": p.layers,
            "layers_removed": [i for i in range(dims.layers) if i not in set(p.layers)],
            "layer_ratio": 1 - len(p.layers) / dims.layers,
            "heads_kept": {str(i): v for i, v in p.heads.items()},
            "kv_groups_kept": {str(i): v for i, v in p.kv_groups.items()},
            "heads_merged": {str(i): [list(x) for x in v] for i, v in p.merges.items()},
            "neurons_kept": {str(i): v for i, v in p.neurons.items()},
            "channels_kept": p.channels,
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": params_after / params_before,
            "scores": self._scores(imp, p.layers),
            "saveable": bool(saveable),
        }
        if search is not None:
            info["target_params"] = search["target_params"]
            info["search"] = search
        return info, timings

    @staticmethod
    def _scores(imp: Importance, kept: list[int]) -> dict:
        """min/mean/max of each axis and its ranking (best first); MLP neurons: per-layer min/mean/max only."""
        out = {}
        if imp.layers is not None:
            out["layers"] = {"metric": imp.depth_metric, "values": [round(v, 6) for v in imp.layers]}
            out["layers"].update(_summary(torch.tensor(imp.layers)))
            if imp.dense_ppl is not None:
                out["layers"]["dense_ppl"] = imp.dense_ppl
            if imp.runs:
                out["layers"]["runs"] = {str(n): [round(v, 6) for v in r] for n, r in imp.runs.items()}
        if imp.heads is not None:
            out["heads"] = _summary(imp.heads)
            out["kv_groups"] = _summary([imp.groups(i) for i in range(imp.num_layers)])
        if imp.neurons is not None:
            out["ffn"] = _summary(imp.neurons, rank=False)
            out["ffn"]["per_layer"] = [[float(s.min()), float(s.mean()), float(s.max())] for s in imp.neurons]
        if imp.norms is not None:
            out["hidden"] = _summary(imp.hidden(kept))
        return out
