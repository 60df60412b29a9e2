"""Expert pruning: Minitron's structured axis for mixtures of experts (`pruner.target.experts`).

Importance of expert e in a layer (router-weighted activation), over the calibration tokens t the
router sends to e, with g_{t,e} the routing weight the block multiplies e's output by:

    F_expert(e) = Σ_t g_{t,e} · ‖E_e(x_t)‖₂,   E_e(x) = W_down,e (act(W_gate,e x) ⊙ W_up,e x)

i.e. how much e adds to the residual stream; an expert no token reaches scores 0 and goes first.
Each layer keeps its `experts` best (one count for all layers: the Hugging Face config holds one
`num_local_experts` / `num_experts`). Surgery slices the fused 3-D expert tensors and the router's
rows (and bias), so the router's softmax and top-k run over the kept experts only;
`num_experts_per_tok` must not exceed the experts kept (refused otherwise)."""

from __future__ import annotations

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks, fused_experts
from prunebench.models.forward import forward_windows

CONFIG_KEYS = ("num_local_experts", "num_experts")  # Mixtral | Qwen2/3-MoE, OLMoE


def moe_layers(model: nn.Module) -> dict[int, tuple[nn.Module, nn.Module]]:
    """{layer: (experts module, router module)} of the layers with fused experts beside a router."""
    out = {}
    for i, block in enumerate(find_blocks(model)):
        for name, experts in fused_experts(block).items():
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            router = getattr(parent, "gate", None)
            if isinstance(getattr(router, "weight", None), torch.Tensor):
                out[i] = (experts, router)
    return out


def check(model: nn.Module, keep: int) -> None:
    """One line unless `model` has fused experts and `keep` is a valid count for it."""
    layers = moe_layers(model)
    if not layers:
        raise PrunebenchError(
            f"pruner.target.experts: {type(model).__name__} has no fused experts beside a router"
            " (not a mixture of experts); drop pruner.target.experts"
        )
    have = next(iter(layers.values()))[0].gate_up_proj.shape[0]
    top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
    if keep > have:
        raise PrunebenchError(f"pruner.target.experts={keep} is more than the model's {have} experts per layer")
    if keep < top_k:
        raise PrunebenchError(
            f"pruner.target.experts={keep} is below num_experts_per_tok={top_k}: every token is routed to"
            f" {top_k} experts; keep at least {top_k}"
        )


@torch.no_grad()
def expert_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> dict[int, torch.Tensor]:
    """F_expert per MoE layer (fp32), from plain forwards of the model as it is."""
    layers = moe_layers(model)
    scores = {i: torch.zeros(e.gate_up_proj.shape[0], dtype=torch.float32) for i, (e, _) in layers.items()}

    def hook(i: int, m: nn.Module):
        def grab(_m, args, kwargs):
            given = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args, strict=False)) | kwargs
            x = given["hidden_states"].reshape(-1, m.gate_up_proj.shape[-1])
            index, weights = given["top_k_index"], given["top_k_weights"]
            for e in range(m.gate_up_proj.shape[0]):
                tok, slot = torch.where(index == e)
                if tok.numel() == 0:
                    continue
                gate, up = nn.functional.linear(x[tok], m.gate_up_proj[e]).chunk(2, dim=-1)
                y = nn.functional.linear(m.act_fn(gate) * up, m.down_proj[e]).float()
                scores[i][e] += (weights[tok, slot].float() * y.norm(dim=-1)).sum().cpu()

        return grab

    handles = [m.register_forward_pre_hook(hook(i, m), with_kwargs=True) for i, (m, _) in layers.items()]
    forward_windows(model, input_ids, batch_size, handles)
    return scores


def trim_experts(model: nn.Module, layer_idx: int, keep: list[int]) -> None:
    """Keep experts `keep` of one layer: slices of gate_up_proj / down_proj, the router's rows."""
    experts, router = moe_layers(model)[layer_idx]
    idx = torch.as_tensor(sorted(keep), dtype=torch.long)
    with torch.no_grad():
        for module, names in ((experts, ("gate_up_proj", "down_proj")), (router, ("weight", "bias"))):
            for name in names:
                p = getattr(module, name, None)
                if isinstance(p, torch.Tensor):
                    kept = p.index_select(0, idx.to(p.device)).contiguous()
                    setattr(module, name, nn.Parameter(kept, requires_grad=p.requires_grad))
    for module in (experts, router):
        if hasattr(module, "num_experts"):
            module.num_experts = idx.numel()
    counts = {e.gate_up_proj.shape[0] for e, _ in moe_layers(model).values()}
    if len(counts) == 1:
        for key in CONFIG_KEYS:
            if hasattr(model.config, key):
                setattr(model.config, key, next(iter(counts)))
