"""SliceGPT's model structure (Ashkboos et al., arXiv 2401.15024): weightless norms, a rotated and
sliced residual stream with a shortcut matrix on each residual add, and the surgery that builds it
(saving / loading it: prunebench/models/sliced_format.py).

After norm fusion every residual norm is `RMSN`: x ↦ x · rsqrt(Σᵢ xᵢ² / D + ε), D the ORIGINAL hidden
size (a sliced stream of width d < D keeps dividing by D: dividing by d would rescale every normalised
vector by √(D/d)). RMSN(x·Q) = RMSN(x)·Q for an orthogonal Q, which is what lets the stream rotate.

A sliced decoder layer (`SlicedLayer`, the family's layer class with this forward) computes

    h   = x·S_attn + attn(RMSN(x))          S_attn = Q_inᵀ·Q_mid   cut to (d_in × d_mid)
    out = h·S_mlp  + mlp(RMSN(h))           S_mlp  = Q_midᵀ·Q_out  cut to (d_mid × d_out)

where the Q are the PCA bases of the stream at the layer's input, between attention and MLP, and at
its output; q/k/v (or qkv_proj) read d_in columns, o_proj writes d_mid rows, gate/up (gate_up_proj;
a MoE's router and every expert) read d_mid columns, down_proj (every expert's) writes d_out rows.
The layer keeps the family's class (a subclass is made per family: `sliced_class`), so the module
names, the KV cache, gradient checkpointing and PEFT's LoRA targets work as on the dense model.
Phi-3's residual dropouts stay where they were. A fused-experts MoE block returns as many columns as
it reads (transformers' experts write into `zeros_like(input)`), so a MoE layer has d_mid = d_out.

Surgery (`fuse`, `rotate_port`, `slice_port`), in float64 then cast back: untie a tied LM head;
optionally subtract each embedding row's mean; fold each norm's gain γ (Nemotron's LayerNorm1P: 1 + w)
into the input columns of the linears it feeds (W·diag(γ)) and its bias β into their bias (b + W·β,
created where absent); a LayerNorm family also has the mean removed from what writes the stream
(o_proj, down_proj: W − 1·mean_rows(W), b − mean(b)), so the stream stays mean-free and LayerNorm is
RMSN on it (the authors' `bake_mean_into_linear` for OPT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks, fused_experts

# Pre-norm decoders whose residual branches end in a linear: the rotation commutes with everything
# on the stream. Nemotron's LayerNorm1P is made RMSN by keeping the stream mean-free.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "nemotron")
LAYER_NORM_FAMILIES = ("nemotron",)
# A norm on the residual BRANCH (after attention / MLP, before the add) sees the unrotated output and
# normalises it per channel with its own gain: norm(y)·Q ≠ norm(y·Q) once its gain is not 1.
POST_NORM_FAMILIES = {
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3",
    "olmo2": "OLMo-2",
    "olmo3": "OLMo-3",
}


def family_problem(model_type: str | None) -> str | None:
    """Why SliceGPT cannot rotate this family, or None when it can (one line, for `check` and the
    pruner)."""
    if model_type in FAMILIES:
        return None
    if model_type in POST_NORM_FAMILIES:
        return (
            f"{POST_NORM_FAMILIES[model_type]} (model_type={model_type}) normalises the attention and MLP outputs"
            " before each residual add, and a norm on the residual branch does not commute with the rotation Q;"
            " prune it with another method (minitron, wanda, ...)"
        )
    return f"model_type={model_type} is not a family SliceGPT's surgery knows; supported: {', '.join(FAMILIES)}"


class RMSN(nn.Module):
    """Weightless RMS norm over the ORIGINAL width `dim`: x · rsqrt(Σ x² / dim + eps), computed in
    fp32 and cast back (the gain lives in the next linears)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.dim + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class SlicedLayer(nn.Module):
    """The forward of a pre-norm decoder layer with `residual @ shortcut` before each residual add.
    Never instantiated alone: `sliced_class(Family)` puts it in front of the family's layer class,
    whose submodules (input_layernorm, self_attn, post_attention_layernorm, mlp, Phi-3's residual
    dropouts) it calls. Keyword arguments go to the attention unchanged, as the family's layer does."""

    attn_shortcut: nn.Parameter
    mlp_shortcut: nn.Parameter

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:  # positional masks / positions: named as the family's own forward names them
            import inspect

            names = list(inspect.signature(super().forward).parameters)[1:]
            kwargs.update(zip(names, args, strict=False))
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(hidden_states=h, **kwargs)[0]
        if (drop := getattr(self, "resid_attn_dropout", None)) is not None:
            h = drop(h)
        hidden = torch.matmul(residual, self.attn_shortcut) + h
        h = self.mlp(self.post_attention_layernorm(hidden))
        if isinstance(h, tuple):  # a MoE block that also returns its router logits
            h = h[0]
        if (drop := getattr(self, "resid_mlp_dropout", None)) is not None:
            h = drop(h)
        return torch.matmul(hidden, self.mlp_shortcut) + h


_CLASSES: dict[type, type] = {}


def sliced_class(base: type) -> type:
    """`Sliced<Base>`: SlicedLayer's forward over the family's layer class (made once per class).
    transformers' GradientCheckpointingLayer wraps the subclass's forward as it wraps any subclass."""
    if issubclass(base, SlicedLayer):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedLayer, base), {"__module__": __name__})
    return _CLASSES[base]


def is_sliced(model: nn.Module) -> bool:
    return any(isinstance(m, SlicedLayer) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Where the stream is read and written: ports


@dataclass
class Port:
    """A tensor whose dimension `axis` is the residual stream: -1 for what reads it (a linear's
    input columns, a router's, every expert's gate_up), -2 for what writes it (a linear's output
    rows, every expert's down_proj (E, H, I)); a writer's bias is a vector (axis -1)."""

    module: nn.Module
    name: str
    axis: int

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def set(self, value: torch.Tensor) -> None:
        old = self.tensor
        setattr(self.module, self.name, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))
        _sync_sizes(self.module)


def _sync_sizes(module: nn.Module) -> None:
    """The size attributes transformers reads at run time, from the weights."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(getattr(module, "hidden_dim", None), int):
        module.hidden_dim = w.shape[1]  # a MoE router (reshape(-1, hidden_dim))
    gate_up = getattr(module, "gate_up_proj", None)
    fused = isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3
    if fused and isinstance(getattr(module, "hidden_dim", None), int):
        module.hidden_dim = gate_up.shape[-1]  # fused experts


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(module, name, None)
    return m if isinstance(m, nn.Linear) else None


def attention_readers(block: nn.Module) -> list[nn.Linear]:
    attn = block.self_attn
    found = [m for n in ("q_proj", "k_proj", "v_proj") if (m := _linear(attn, n)) is not None]
    if not found and (fused := _linear(attn, "qkv_proj")) is not None:  # Phi-3: rows [Q | K | V]
        found = [fused]
    if not found:
        raise PrunebenchError(f"{type(block).__name__}: no self_attn.q/k/v_proj or qkv_proj to rotate")
    return found


def attention_writer(block: nn.Module) -> nn.Linear:
    if (o := _linear(block.self_attn, "o_proj")) is None:
        raise PrunebenchError(f"{type(block).__name__}: no self_attn.o_proj to rotate")
    return o


def _moe(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(router, fused experts) of a MoE block, or None for a dense MLP."""
    experts = fused_experts(block.mlp)
    if not experts:
        if any(isinstance(getattr(block.mlp, n, None), nn.Parameter) for n in ("gate_up_proj", "down_proj")):
            raise PrunebenchError(
                f"{type(block.mlp).__name__}: experts in a layout SliceGPT's surgery does not know (transposed, with"
                " biases or unfused); only [gate; up] (E, 2I, H) and down (E, H, I) experts are rotated"
            )
        return None
    if len(experts) != 1 or "experts" not in experts or getattr(block.mlp, "shared_expert", None) is not None:
        raise PrunebenchError(f"{type(block.mlp).__name__}: only one fused experts module and its router are rotated")
    router = getattr(block.mlp, "gate", None)
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or getattr(router, "bias", None) is not None:
        raise PrunebenchError(f"{type(block.mlp).__name__}: no bias-free router mlp.gate to rotate")
    return router, experts["experts"]


def is_moe(block: nn.Module) -> bool:
    return _moe(block) is not None


def mlp_readers(block: nn.Module) -> list[Port]:
    """What reads the MLP's input: gate/up (Phi-3's gate_up_proj, Nemotron's up_proj), or a MoE
    block's router and every expert's gate_up."""
    if (moe := _moe(block)) is not None:
        router, experts = moe
        return [Port(router, "weight", -1), Port(experts, "gate_up_proj", -1)]
    names = ("gate_proj", "up_proj", "gate_up_proj")
    found = [Port(m, "weight", -1) for n in names if (m := _linear(block.mlp, n)) is not None]
    if not found:
        raise PrunebenchError(f"{type(block.mlp).__name__}: no gate/up projection to rotate")
    return found


def mlp_writers(block: nn.Module) -> list[Port]:
    if (moe := _moe(block)) is not None:
        return [Port(moe[1], "down_proj", -2)]
    if (down := _linear(block.mlp, "down_proj")) is None:
        raise PrunebenchError(f"{type(block.mlp).__name__}: no down_proj to rotate")
    return _writer_ports(down)


def _writer_ports(linear: nn.Linear) -> list[Port]:
    return [Port(linear, "weight", -2)] + ([Port(linear, "bias", -1)] if linear.bias is not None else [])


def attention_ports(block: nn.Module) -> tuple[list[Port], list[Port]]:
    """(readers, writers) of the attention."""
    return [Port(m, "weight", -1) for m in attention_readers(block)], _writer_ports(attention_writer(block))


def f64_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic runs: the device itself, the CPU for MPS (it has no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


CHUNK = 4096  # rows (or columns) per float64 piece: bounds the temporaries of a vocabulary-sized matrix


def map64(t: torch.Tensor, fn, axis: int, device: torch.device, width: int | None = None) -> torch.Tensor:
    """`fn` applied in float64 on `device` to pieces of `t` that each hold the whole stream dimension
    `axis`: CHUNK rows of a (..., D) tensor (axis -1), or CHUNK columns of each (D, I) matrix of a
    (..., D, I) tensor (axis -2). `fn` maps a piece to one of stream width `width` (default: D). The
    result is in t's dtype and on t's device; only one piece exists in float64 at a time."""
    D, width = t.shape[axis], width or t.shape[axis]
    src = t.detach()
    if axis == -1:
        flat = src.reshape(-1, D)
        out = torch.empty(flat.shape[0], width, dtype=t.dtype, device=t.device)
        for s in range(0, flat.shape[0], CHUNK):
            out[s : s + CHUNK] = fn(flat[s : s + CHUNK].to(device, torch.float64)).to(t.device, t.dtype)
        return out.reshape(*t.shape[:-1], width)
    cols = t.shape[-1]
    flat = src.reshape(-1, D, cols)
    out = torch.empty(flat.shape[0], width, cols, dtype=t.dtype, device=t.device)
    for e in range(flat.shape[0]):
        for s in range(0, cols, CHUNK):
            out[e, :, s : s + CHUNK] = fn(flat[e, :, s : s + CHUNK].to(device, torch.float64)).to(t.device, t.dtype)
    return out.reshape(*t.shape[:-2], width, cols)


def rotate_port(port: Port, Q: torch.Tensor) -> None:
    """Reader: W ← W·Q; writer: W ← Qᵀ·W (bias: b ← b·Q). Q (current width × new width), float64;
    the products in float64 on Q's device, piece by piece, cast back to the tensor's dtype and device."""
    fn = (lambda w: w @ Q) if port.axis == -1 else (lambda w: Q.T @ w)
    port.set(map64(port.tensor, fn, port.axis, Q.device, Q.shape[1]))


def slice_port(port: Port, width: int) -> None:
    """Keep the first `width` entries of the stream dimension (the leading principal directions)."""
    t = port.tensor
    port.set(t.detach().narrow(port.axis, 0, width).clone())


def resize_port(port: Port, width: int) -> None:
    """Empty storage of the sliced shape (before a strict load overwrites it)."""
    t = port.tensor
    shape = list(t.shape)
    shape[port.axis] = width
    port.set(torch.empty(shape, dtype=t.dtype, device=t.device))


# --------------------------------------------------------------------------------------------------
# Norm fusion


def _gain(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(γ, β) of a norm as it acts, in float64: LayerNorm1P and Gemma store γ − 1."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    g = None
    if isinstance(w, torch.Tensor):
        g = w.detach().double()
        if type(norm).__name__.endswith("1P") or type(norm).__name__.startswith("Gemma"):
            g = g + 1.0
    return g, (b.detach().double() if isinstance(b, torch.Tensor) else None)


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float | int):
            return float(value)
    raise PrunebenchError(f"{type(norm).__name__}: no eps attribute (variance_epsilon / eps)")


def _fold(norm: nn.Module, readers: list[Port]) -> None:
    """Readers ← readers·diag(γ); reader bias += W·β (created where absent: a LayerNorm's β)."""
    g, beta = _gain(norm)
    for port in readers:
        t = port.tensor
        dev = f64_device(t.device)
        if beta is not None and bool(beta.any()):
            if not isinstance(port.module, nn.Linear):
                raise PrunebenchError(f"{type(port.module).__name__}: a norm bias cannot fold into a bias-free expert")
            lin, b64 = port.module, beta.to(dev)
            b = torch.zeros(t.shape[0], dtype=torch.float64, device=dev)
            for s in range(0, t.shape[0], CHUNK):  # W·β with the weight as it was, before the gain
                b[s : s + CHUNK] = t.detach()[s : s + CHUNK].to(dev, torch.float64) @ b64
            if lin.bias is not None:
                b = b + lin.bias.detach().to(dev, torch.float64)
            lin.bias = nn.Parameter(b.to(t.device, t.dtype), requires_grad=t.requires_grad)
        if g is not None:
            g64 = g.to(dev)
            port.set(map64(t, lambda w, g64=g64: w * g64, -1, dev))


def _centre(writers: list[Port]) -> None:
    """Subtract, from what writes the stream, its mean over the stream dimension (weights and bias)."""
    for port in writers:
        t = port.tensor
        axis = 0 if port.axis == -2 else -1  # the stream dimension of a piece
        port.set(map64(t, lambda w, a=axis: w - w.mean(dim=a, keepdim=True), port.axis, f64_device(t.device)))


def final_norm_slot(model: nn.Module) -> tuple[nn.Module, str]:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return base, name
    raise PrunebenchError(f"{type(model).__name__}: no final norm before the LM head")


def untie(model: nn.Module) -> bool:
    """Give the LM head its own copy of a tied embedding matrix (the embedding is rotated and sliced,
    the head gets the final norm's gain). True when it was tied."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        raise PrunebenchError(f"{type(model).__name__} has no LM head")
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


def layer_norm_family(model: nn.Module) -> bool:
    return isinstance(find_blocks(model)[0].input_layernorm, nn.LayerNorm)


@torch.no_grad()
def fuse(model: nn.Module, embedding_mean: bool = True) -> dict:
    """Fold every residual norm into its neighbours and make it an RMSN of the original width (see
    the module docstring). `embedding_mean`: subtract each embedding row's mean (the authors do it for
    every family; on a LayerNorm family it is always done, the stream must stay mean-free). Returns
    what was done: tied (the head was untied), layer_norm (means removed from the writers),
    embedding_mean."""
    problem = family_problem(getattr(model.config, "model_type", None))
    if problem:
        raise PrunebenchError(f"pruner=slicegpt: {problem}")
    if is_sliced(model):
        raise PrunebenchError("pruner=slicegpt: this model is already sliced; load the dense model")
    blocks = find_blocks(model)
    width = int(model.config.hidden_size)
    layer_norm = layer_norm_family(model)
    tied = untie(model)
    embed = model.get_input_embeddings()
    if embedding_mean or layer_norm:
        _centre([Port(embed, "weight", -1)])
    for block in blocks:
        attn_in, attn_out = attention_ports(block)
        _fold(block.input_layernorm, attn_in)
        _fold(block.post_attention_layernorm, mlp_readers(block))
        if layer_norm:
            _centre(attn_out + mlp_writers(block))
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(block, name, RMSN(width, norm_eps(getattr(block, name))))
    parent, name = final_norm_slot(model)
    head = model.get_output_embeddings()
    _fold(getattr(parent, name), [Port(head, "weight", -1)])
    setattr(parent, name, RMSN(width, norm_eps(getattr(parent, name))))
    return {"tied": tied, "layer_norm": layer_norm, "embedding_mean": bool(embedding_mean or layer_norm)}


def make_sliced(block: nn.Module, attn_shortcut: torch.Tensor, mlp_shortcut: torch.Tensor) -> None:
    """Give a decoder layer SlicedLayer's forward and its two shortcut matrices (model dtype; trainable
    like the layer's weights, as the authors' nn.Parameter shortcuts: a recovery decides what trains)."""
    ref = block.self_attn.o_proj.weight
    block.__class__ = sliced_class(type(block))
    for name, value in (("attn_shortcut", attn_shortcut), ("mlp_shortcut", mlp_shortcut)):
        param = nn.Parameter(value.to(ref.device, ref.dtype).contiguous(), requires_grad=ref.requires_grad)
        block.register_parameter(name, param)


def set_shortcut(block: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(block, name)
    setattr(block, name, nn.Parameter(value.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad))


def mark_no_split(model: nn.Module) -> None:
    """accelerate keeps a sliced layer on one device (its shortcut multiplies the residual)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    for block in find_blocks(model):
        if type(block).__name__ not in names:
            names.append(type(block).__name__)
    model._no_split_modules = names
