"""Minitron's shapes (Muralidharan et al., arXiv 2407.14679): selection (scores -> kept indices),
the plan (what one target shape keeps, from one importance pass; no model needed), its surgery
(`apply_plan`), and the exact parameter count of a shape (`Arch`, `param_count`), which the pruner
and the architecture search (search.py) both use.

Parameter count, exact from the shape (no model): with d = head_dim (fixed by trimming), V the
vocabulary, h hidden, H query heads, G KV heads, F MLP size, L layers,

    attn   = h·H·d + 2·h·G·d + H·d·h        (+ H·d + 2·G·d with q/k/v biases, + h with an o bias)
    mlp    = (3 if gated else 2)·h·F         (+ F per gate/up bias, + h with a down bias)
    layer  = attn + mlp + n_norms·h·(2 if the norms have a bias else 1) + layer_extra
    total  = L·layer + V·h·(1 if tied else 2) + final norm + extra

`Arch` holds what the count needs besides the shape; `Arch.of_model` reads it from the modules (the
run's check), `Arch.of_config` from a Hugging Face config (the check before loading). layer_extra /
extra are parameters no searched axis changes (e.g. Qwen3's per-head q/k norms), measured once.

Head merge (`head_merge: true`, off by default): the paper adds the residual of pruned heads into
the kept ones, head_i ← head_i + (head_i − head_{2K−i+1}) with heads ranked 1..2K by importance
and K kept (kept head i paired with pruned head 2K−i+1); with GQA only query heads are merged, so
it applies to q_proj rows (and bias), inside each KV group (an MHA model has nothing to merge).
Measured on SmolLM2-135M without retraining (heads 9 → 6, WikiText-2, 8 × 512 tokens) it hurts,
ppl 383 → 3565, so it stays off.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebench.models import count_params
from prunebench.models import trim as trim_ops
from prunebench.models.blocks import find_blocks
from prunebench.models.surgery import keep_layers
from prunebench.pruners.minitron.importance import Importance

log = logging.getLogger(__name__)

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
    experts: dict[int, list[int]] = field(default_factory=dict)  # applied by experts.trim_experts


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
    q = trim_ops.query_proj(trim_ops._attn(find_blocks(model)[layer]))  # fused qkv: the query rows come first
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
# Exact parameter count from a shape.


@dataclass(frozen=True)
class Arch:
    """What the parameter count needs besides the shape (layers, heads, KV heads, ffn, hidden)."""

    vocab: int
    head_dim: int
    tied: bool = False
    gated: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # biases on gate/up (one per neuron each)
    down_bias: bool = False
    norms_per_layer: int = 2
    final_norms: int = 1
    norm_bias: bool = False
    layer_extra: int = 0
    extra: int = 0
    heads_divide_hidden: bool = False  # the HF config refuses hidden % heads != 0 (Llama): such a model cannot save

    @classmethod
    def of_config(cls, config: Mapping) -> Arch:
        """From a Hugging Face config dict (config.json or a model YAML's hf_config); missing keys
        take the model class's defaults."""
        c = dict(config)
        strict = False
        with contextlib.suppress(Exception):  # an unknown model type: the dict as given
            import transformers

            hf = transformers.AutoConfig.for_model(**c)
            c = {**hf.to_dict(), **c}
            strict = heads_must_divide_hidden(hf)
        kind = c.get("model_type", "llama")
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
        bias = bool(c.get("attention_bias", False))
        mlp_bias = bool(c.get("mlp_bias", False))
        return cls(
            vocab=int(c["vocab_size"]),
            head_dim=head_dim,
            tied=bool(c.get("tie_word_embeddings", False)),
            gated=kind != "nemotron",
            qkv_bias=bias or kind == "qwen2",
            o_bias=bias and kind != "qwen2",
            mlp_bias=mlp_bias,
            down_bias=mlp_bias,
            norm_bias=kind == "nemotron",
            layer_extra=2 * head_dim if kind == "qwen3" else 0,
            heads_divide_hidden=strict,
        )

    @classmethod
    def of_model(cls, model: nn.Module) -> Arch:
        """From the modules themselves; layer_extra / extra are whatever the formula leaves out."""
        blocks = find_blocks(model)
        attn, mlp = trim_ops._attn(blocks[0]), trim_ops._mlp(blocks[0])
        norms = trim_ops.residual_norms(model)
        layer_norms = [m for k, m in norms.items() if k.startswith("0.")]
        final = [m for k, m in norms.items() if "." not in k]
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        probe = (layer_norms or final or [None])[0]
        arch = cls(
            vocab=embed.num_embeddings,
            head_dim=trim_ops.head_dim(model),
            tied=head is None or head.weight is embed.weight,
            gated=hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj"),
            qkv_bias=trim_ops.query_proj(attn).bias is not None,
            o_bias=attn.o_proj.bias is not None,
            mlp_bias=trim_ops.first_mlp_proj(mlp).bias is not None,
            down_bias=mlp.down_proj.bias is not None,
            norms_per_layer=len(layer_norms),
            final_norms=len(final),
            norm_bias=getattr(probe, "bias", None) is not None,
            heads_divide_hidden=heads_must_divide_hidden(model.config),
        )
        dims = Dims.of(model)
        block = sum(p.numel() for p in blocks[0].parameters())
        layer_extra = block - layer_params(dims.heads, dims.kv_heads, dims.ffn, dims.hidden, arch)
        arch = dataclasses.replace(arch, layer_extra=int(layer_extra))
        extra = count_params(model)[0] - param_count(dims, arch)
        return dataclasses.replace(arch, extra=int(extra))


def heads_must_divide_hidden(config) -> bool:
    """Whether the Hugging Face config class validates hidden_size % num_attention_heads == 0 (Llama
    in transformers 5 does, even with an explicit head_dim): a trimmed model breaking it runs, but
    neither saves nor loads again. Probed on a copy with an indivisible hidden size."""
    validate = getattr(config, "validate", None)
    heads = getattr(config, "num_attention_heads", None)
    if validate is None or not heads or heads < 2:
        return False
    probe = copy.deepcopy(config)
    probe.hidden_size = heads * 2 + 1
    try:
        probe.validate()
    except Exception:  # noqa: BLE001 - the class's own validation error, whatever its type
        return True
    return False


def layer_params(heads, kv, ffn, hidden, a: Arch):
    d = a.head_dim
    attn = hidden * heads * d * 2 + 2 * hidden * kv * d
    if a.qkv_bias:
        attn = attn + heads * d + 2 * kv * d
    if a.o_bias:
        attn = attn + hidden
    mlp = (3 if a.gated else 2) * hidden * ffn
    if a.mlp_bias:
        mlp = mlp + (2 if a.gated else 1) * ffn
    if a.down_bias:
        mlp = mlp + hidden
    norm = hidden * (2 if a.norm_bias else 1)
    return attn + mlp + a.norms_per_layer * norm + a.layer_extra


def count(layers, heads, kv, ffn, hidden, a: Arch):
    """The exact parameter count; works elementwise on numpy arrays too."""
    norm = hidden * (2 if a.norm_bias else 1)
    return (
        layers * layer_params(heads, kv, ffn, hidden, a)
        + a.vocab * hidden * (1 if a.tied else 2)
        + (a.final_norms * norm + a.extra)
    )


def param_count(shape, arch: Arch) -> int:
    """Parameters of a model of `shape` (Dims or a mapping with layers/heads/kv_heads/ffn/hidden)."""
    s = shape if isinstance(shape, Mapping) else vars(shape)
    return int(count(s["layers"], s["heads"], s["kv_heads"], s["ffn"], s["hidden"], arch))
