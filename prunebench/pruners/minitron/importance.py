"""Minitron's importance scores (Muralidharan et al., arXiv 2407.14679, §2): activation-based,
from forward passes only (no gradients), computed once on the dense model; `compute_importance`
returns every axis's scores from one hooked pass (pruner.py prunes with them, search.py
trims many candidate shapes from them).

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
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models import trim as trim_ops
from prunebench.models.blocks import find_blocks
from prunebench.models.forward import Stop, block_influence, forward_windows, hidden_of, token_norms, watch_blocks
from prunebench.models.surgery import set_blocks, snapshot

AGGS = ("mean", "l2", "var")
NEURON_SCORES = ("down_input", "pre_act")  # reference code (after the activation) | paper (X·W1)
DEPTH_METRICS = ("bi", "ppl")
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
                first, size = trim_ops.first_mlp_proj(mlp), trim_ops.ffn_size(mlp)  # fused gate_up: the gate half
                hook = lambda _m, _a, out, acc=acc, n=size: acc.add(reduce_seq(out[..., :n], seq))  # noqa: E731
                handles.append(first.register_forward_hook(hook))
    norms = trim_ops.residual_norms(model)
    if "hidden" in axes:
        if not norms:
            raise ValueError(f"{type(model).__name__} has no residual norms to score hidden channels with")
        for name, norm in norms.items():
            acc = norm_acc[name] = BatchAgg(batch)
            handles.append(
                norm.register_forward_hook(lambda _m, _a, out, acc=acc: acc.add(reduce_seq(hidden_of(out), seq)))
            )
    device = next(model.parameters()).device
    bi_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    run_sum = {
        n: torch.zeros(n_layers - n + 1, dtype=torch.float32, device=device) for n in run_lengths if 1 <= n <= n_layers
    }
    stash: dict[int, torch.Tensor] = {}
    last: list = [None, None]  # the previous block's output and its per-token norms (= this block's input)
    watch = contextlib.nullcontext()
    if depth == "bi":
        longest = max(run_sum, default=1)

        def influence(index: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
            if index == 0:
                stash.clear()  # a new batch: the previous batch's block inputs are not needed
            if run_sum:
                stash[index] = h_in
            n_out = token_norms(h_out)
            bi_sum[index] += block_influence(h_in, h_out, last[1] if last[0] is h_in else None, n_out).sum()
            last[0], last[1] = h_out, n_out
            for n, sums in run_sum.items():  # a run's BI: the input of its first block, the output of its last
                if index - n + 1 >= 0:
                    sums[index - n + 1] += block_influence(stash[index - n + 1], h_out, None, n_out).sum()
            stash.pop(index - longest + 1, None)

        watch = watch_blocks(blocks, influence)

    hooked = bool(handles) or depth == "bi"
    final = next((m for n, m in reversed(norms.items()) if "." not in n), None)
    if final is not None:  # everything is measured by the final norm: skip the LM head

        def stop(*_):
            raise Stop

        handles.append(final.register_forward_hook(stop))
    with watch:
        tokens = forward_windows(model, input_ids, batch_size, handles) if hooked else 0
    for h in handles:  # when nothing was hooked (forward_windows removes them otherwise)
        h.remove()
    stash.clear()
    last[0] = last[1] = None
    if head_acc:
        imp.heads = [a.value().cpu() for a in head_acc]
    if neuron_acc:
        imp.neurons = [a.value().cpu() for a in neuron_acc]
    if norm_acc:
        imp.norms = {n: a.value().cpu() for n, a in norm_acc.items()}
    if depth == "bi":
        imp.layers = (bi_sum.double().cpu() / max(tokens, 1)).tolist()
        imp.runs = {n: (s.double().cpu() / max(tokens, 1)).tolist() for n, s in run_sum.items()}
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
    check_finite(imp)
    return imp


def check_finite(imp: Importance) -> None:
    """Scores from NaN or inf activations would rank channels arbitrarily (NaN compares false both
    ways) and prune without a word: one line naming the score instead. A removal perplexity may be
    inf (a model without that layer overflows: it is then the most important one), never NaN."""
    width = [("head", imp.heads), ("neuron", imp.neurons), ("embedding-channel", list((imp.norms or {}).values()))]
    for what, scores in width:
        for i, s in enumerate(scores or []):
            if not bool(torch.isfinite(s).all()):
                raise PrunebenchError(
                    f"prune: minitron's {what} importance ({i}) is not finite: the dense model's activations hold"
                    " NaN or inf on the calibration windows (overflow in its dtype?); nothing was pruned"
                )
    if any(math.isnan(v) for v in imp.layers or []):
        raise PrunebenchError("prune: minitron's depth importance is NaN (non-finite activations); nothing was pruned")
