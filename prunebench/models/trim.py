"""Width surgery: cut attention heads, MLP neurons and hidden (embedding) channels for real.

Pure model surgery, no scoring: every function takes the indices to KEEP and slices the weight
matrices (and biases, norm weights, the embedding table, a tied LM head), updates the modules'
size attributes and the Hugging Face config, so that the smaller model runs, generates with a KV
cache and round-trips through `save_pretrained` / `AutoModelForCausalLM.from_pretrained`.

Supported: decoder blocks with `self_attn.{q,k,v,o}_proj` and `mlp.{gate?,up,down}_proj` (Llama,
Mistral, Qwen2/3, Gemma 2/3, OLMo-2, SmolLM2: gated; Nemotron: relu² with up/down only), or Phi-3's
fused `self_attn.qkv_proj` (rows [Q heads | K groups | V groups]) and `mlp.gate_up_proj` (rows
[gate | up]), each split into its parts before cutting; RMSNorm or LayerNorm (also Nemotron's
LayerNorm1P and Gemma's 1 + w gain). Per-head q/k norms (Qwen3, Gemma 3: width head_dim) stay;
OLMo-2's q/k norms over the whole projection are cut with the heads. Gemma's embedding scale
sqrt(hidden) follows a hidden trim, as the saved config implies. The HF config holds one head
count and one intermediate size for every layer, so all layers must end with the same counts:
`check_uniform(model)` says so if not.

Layout conventions (HF Llama family): q_proj rows are heads × head_dim, head h at rows
[h·d, (h+1)·d); KV group g serves query heads [g·r, (g+1)·r) with r = heads / kv_heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunebench.models.blocks import find_blocks

ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


def _as_index(keep: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError(f"{what}: keeping nothing is not allowed")
    if idx.unique().numel() != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"{what}: indices must be distinct and within 0..{size - 1}, got {idx.tolist()}")
    return idx.sort().values


def _cut_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output rows `rows` and input columns `cols` of a Linear (in place, same device/dtype)."""
    with torch.no_grad():
        w = layer.weight
        if rows is not None:
            w = w.index_select(0, rows.to(w.device))
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        layer.weight = nn.Parameter(w.contiguous(), requires_grad=layer.weight.requires_grad)
        if rows is not None and layer.bias is not None:
            b = layer.bias.index_select(0, rows.to(layer.bias.device))
            layer.bias = nn.Parameter(b.contiguous(), requires_grad=layer.bias.requires_grad)
    layer.out_features, layer.in_features = layer.weight.shape


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices (heads) -> row indices of `width` rows each."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _attn(block: nn.Module) -> nn.Module:
    attn = getattr(block, "self_attn", None)
    split = attn is not None and all(isinstance(getattr(attn, p, None), nn.Linear) for p in (*ATTN_IN, "o_proj"))
    fused = attn is not None and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("qkv_proj", "o_proj"))
    if not (split or fused):
        raise ValueError(f"{type(block).__name__} has no self_attn.{{q,k,v,o}}_proj or qkv_proj (encoder attention)")
    return attn


def _mlp(block: nn.Module) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    first = getattr(mlp, "up_proj", None) or getattr(mlp, "gate_up_proj", None)
    if not (isinstance(first, nn.Linear) and isinstance(getattr(mlp, "down_proj", None), nn.Linear)):
        raise ValueError(
            f"{type(block).__name__} has no mlp.up_proj (or gate_up_proj) / mlp.down_proj linears (experts?)"
        )
    return mlp


def ffn_size(mlp: nn.Module) -> int:
    """Intermediate channels of an MLP (half of a fused gate_up_proj's rows)."""
    return mlp.up_proj.out_features if hasattr(mlp, "up_proj") else mlp.gate_up_proj.out_features // 2


def query_proj(attn: nn.Module) -> nn.Linear:
    """The linear whose first heads·head_dim rows are the query heads (q_proj, or fused qkv_proj)."""
    return attn.q_proj if hasattr(attn, "q_proj") else attn.qkv_proj


def first_mlp_proj(mlp: nn.Module) -> nn.Linear:
    """The activation's input projection (gate_proj, gate_up_proj, or up_proj when not gated)."""
    return getattr(mlp, "gate_proj", None) or getattr(mlp, "gate_up_proj", None) or mlp.up_proj


def head_dim(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def layer_heads(model: nn.Module, layer_idx: int) -> tuple[int, int]:
    """(query heads, KV heads) of one layer, read from its weights."""
    attn = _attn(find_blocks(model)[layer_idx])
    d = head_dim(model)
    if hasattr(attn, "qkv_proj"):  # rows [Q | K | V]: Q = heads·d from o_proj's input
        heads = attn.o_proj.in_features // d
        return heads, (attn.qkv_proj.out_features // d - heads) // 2
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d


def trim_heads(
    model: nn.Module,
    layer_idx: int,
    keep_q_heads: Sequence[int],
    keep_kv_groups: Sequence[int] | None = None,
) -> None:
    """Keep query heads `keep_q_heads` and KV groups `keep_kv_groups` (default: all) of one layer.

    GQA consistency: every kept query head must belong to a kept group, and every kept group must
    keep the same number of query heads (the attention repeats each KV head heads/kv_heads times).
    q_proj rows and o_proj columns follow the kept heads, k_proj/v_proj rows the kept groups."""
    d = head_dim(model)
    attn = _attn(find_blocks(model)[layer_idx])
    heads, groups = layer_heads(model, layer_idx)
    r = heads // groups
    q = _as_index(keep_q_heads, heads, f"layer {layer_idx} query heads")
    g = _as_index(range(groups) if keep_kv_groups is None else keep_kv_groups, groups, f"layer {layer_idx} KV groups")
    per_group = torch.bincount(q // r, minlength=groups)
    if bool(per_group[[i for i in range(groups) if i not in set(g.tolist())]].any()):
        raise ValueError(f"layer {layer_idx}: kept query heads {q.tolist()} include heads of removed KV groups")
    counts = per_group[g]
    if counts.unique().numel() != 1:
        raise ValueError(
            f"layer {layer_idx}: GQA needs the same number of query heads in every kept KV group, got {counts.tolist()}"
        )
    rows, kv_rows = _expand(q, d), _expand(g, d)
    if hasattr(attn, "qkv_proj"):  # fused [Q | K | V]: the same cuts, offset into each part
        qn, kvn = heads * d, groups * d
        _cut_linear(attn.qkv_proj, rows=torch.cat([rows, qn + kv_rows, qn + kvn + kv_rows]))
    else:
        _cut_linear(attn.q_proj, rows=rows)
        _cut_linear(attn.k_proj, rows=kv_rows)
        _cut_linear(attn.v_proj, rows=kv_rows)
    _cut_linear(attn.o_proj, cols=rows)
    for name, idx, width in (("q_norm", rows, heads * d), ("k_norm", kv_rows, groups * d)):
        norm = getattr(attn, name, None)  # OLMo-2: one norm over the whole projection; Qwen3: per head
        if norm is not None and _is_norm(norm, width) and width != d:
            _cut_norm(norm, idx)
    new_heads, new_groups = q.numel(), g.numel()
    for name, value in (
        ("num_heads", new_heads),
        ("num_attention_heads", new_heads),
        ("num_key_value_heads", new_groups),
        ("num_key_value_groups", new_heads // new_groups),
    ):
        if hasattr(attn, name):
            setattr(attn, name, value)
    _sync_config(model)


def trim_mlp(model: nn.Module, layer_idx: int, keep_neurons: Sequence[int]) -> None:
    """Keep intermediate channels `keep_neurons` of one layer's MLP: rows of gate_proj (if any) and
    up_proj, columns of down_proj."""
    mlp = _mlp(find_blocks(model)[layer_idx])
    size = ffn_size(mlp)
    n = _as_index(keep_neurons, size, f"layer {layer_idx} MLP neurons")
    if hasattr(mlp, "gate_up_proj"):  # fused [gate | up] (Phi-3): the same neurons in both halves
        _cut_linear(mlp.gate_up_proj, rows=torch.cat([n, size + n]))
    for name in MLP_IN:
        if hasattr(mlp, name):
            _cut_linear(getattr(mlp, name), rows=n)
    _cut_linear(mlp.down_proj, cols=n)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = n.numel()
    _sync_config(model)


def _is_norm(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (width,)


def residual_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm on the residual stream: the blocks' own norms ('3.input_layernorm', ...) and the
    final norm ('norm'), in forward order."""
    width = model.config.hidden_size
    out = {}
    for i, block in enumerate(find_blocks(model)):
        out.update({f"{i}.{n}": m for n, m in block.named_children() if _is_norm(m, width)})
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    out.update({n: m for n, m in base.named_children() if _is_norm(m, width)})
    return out


def _cut_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(norm, name, None)
            if isinstance(p, torch.Tensor):
                setattr(norm, name, nn.Parameter(p.index_select(0, idx.to(p.device)).contiguous()))
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (idx.numel(),)
    for attr in ("hidden_size", "normalized_shape", "dim"):
        if attr in vars(norm) and isinstance(vars(norm)[attr], int):
            setattr(norm, attr, idx.numel())


def _rescale_norm(norm: nn.Module, factor: float) -> None:
    """Multiply a norm's effective gain by `factor` (LayerNorm1P stores gain − 1)."""
    with torch.no_grad():
        if type(norm).__name__.endswith("1P") or type(norm).__name__.startswith("Gemma"):  # gain 1 + w
            norm.weight.add_(1.0).mul_(factor).sub_(1.0)
        else:
            norm.weight.mul_(factor)


def trim_hidden(model: nn.Module, keep_channels: Sequence[int], rescale_norms: bool = False) -> None:
    """Keep hidden (residual-stream, embedding) channels `keep_channels` everywhere: embedding
    columns, every residual norm's weight and bias, input columns of q/k/v/gate/up, output rows of
    o_proj/down_proj (and their biases), the LM head's columns (re-tied if tied), `hidden_size`.

    Norm statistics (RMS, mean, variance) are then taken over the kept channels only: the paper's
    trimming. `rescale_norms=True` (not in the paper) multiplies every norm's gain by sqrt(d/d'),
    which makes RMSNorm exact when the removed channels carry no energy (with eps → 0): the mean
    square over d' channels is d/d' times the one over d."""
    config = model.config
    width = config.hidden_size
    c = _as_index(keep_channels, width, "hidden channels")
    head_d = head_dim(model)
    norms = residual_norms(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    for block in find_blocks(model):
        attn, mlp = _attn(block), _mlp(block)
        for name in (*ATTN_IN, "qkv_proj"):
            if hasattr(attn, name):
                _cut_linear(getattr(attn, name), cols=c)
        _cut_linear(attn.o_proj, rows=c)
        for name in (*MLP_IN, "gate_up_proj"):
            if hasattr(mlp, name):
                _cut_linear(getattr(mlp, name), cols=c)
        _cut_linear(mlp.down_proj, rows=c)
        for module in (attn, mlp):
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = c.numel()
    for norm in norms.values():
        _cut_norm(norm, c)
        if rescale_norms:
            _rescale_norm(norm, (width / c.numel()) ** 0.5)
    with torch.no_grad():
        w = embed.weight.index_select(1, c.to(embed.weight.device)).contiguous()
        embed.weight = nn.Parameter(w, requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = c.numel()
    if isinstance(getattr(embed, "embed_scale", None), torch.Tensor):  # Gemma: sqrt(hidden_size), as a reload sets it
        embed.scalar_embed_scale = c.numel() ** 0.5
        embed.embed_scale.fill_(embed.scalar_embed_scale)
    if head is not None:
        if tied:
            head.weight = embed.weight
            head.in_features = c.numel()
        else:
            _cut_linear(head, cols=c)
    config.head_dim = head_d  # explicit: no longer hidden_size // heads
    config.hidden_size = c.numel()


def _sync_config(model: nn.Module) -> None:
    """Write the layers' common head counts / intermediate size into the config (left unchanged
    while layers disagree: `check_uniform` reports that)."""
    config = model.config
    config.head_dim = head_dim(model)  # explicit before heads change hidden_size // heads
    blocks = find_blocks(model)
    heads = {layer_heads(model, i) for i in range(len(blocks))}
    if len(heads) == 1:
        config.num_attention_heads, config.num_key_value_heads = next(iter(heads))
    sizes = set(_dense_ffn_sizes(blocks))
    if len(sizes) == 1:
        config.intermediate_size = next(iter(sizes))


def _dense_ffn_sizes(blocks) -> list[int]:
    """Intermediate sizes of the blocks with a dense (linear) MLP; MoE blocks' experts are not one."""
    sizes = []
    for b in blocks:
        try:
            sizes.append(ffn_size(_mlp(b)))
        except ValueError:
            continue
    return sizes


def check_uniform(model: nn.Module) -> None:
    """Raise ValueError unless every layer has the same (heads, KV heads) and intermediate size
    and the config says so: HF Llama/Nemotron configs hold one value for all layers."""
    blocks = find_blocks(model)
    heads = [layer_heads(model, i) for i in range(len(blocks))]
    sizes = _dense_ffn_sizes(blocks)
    if len(set(heads)) > 1:
        raise ValueError(f"layers have different (heads, KV heads) {heads}; trim every layer to the same counts")
    if len(set(sizes)) > 1:
        raise ValueError(f"layers have different MLP sizes {sizes}; trim every layer to the same count")
    c = model.config
    if heads and heads[0] != (c.num_attention_heads, c.num_key_value_heads):
        raise ValueError(f"config heads {(c.num_attention_heads, c.num_key_value_heads)} != weights {heads[0]}")
    if sizes and sizes[0] != c.intermediate_size:
        raise ValueError(f"config intermediate_size {c.intermediate_size} != weights {sizes[0]}")
