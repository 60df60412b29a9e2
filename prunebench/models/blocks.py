"""Where the transformer blocks and their linears are, for any Hugging Face model: what pruners,
surgery and evaluators walk over."""

from __future__ import annotations

import torch
from torch import nn


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (model.model.layers, bert.encoder.layer, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for mods in lists:
        if len(mods) == n:
            return mods
    raise ValueError(f"no ModuleList of {n} transformer blocks found in {type(model).__name__}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block: what Wanda, SparseGPT and GBLM prune."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All block linears keyed 'i.name' (embeddings and the LM head are never pruned)."""
    return {f"{i}.{n}": m for i, b in enumerate(find_blocks(model)) for n, m in block_linears(b).items()}


class ExpertSlice:
    """One expert's matrix inside a fused 3-D experts parameter (transformers 5: Mixtral, Qwen3-MoE
    `mlp.experts.gate_up_proj` (E, 2·I, H) and `down_proj` (E, H, I)), shaped like an nn.Linear for
    the mask pruners: `weight` is a view of slice `index`, so a masked write lands in the parameter."""

    def __init__(self, param: nn.Parameter, index: int):
        self.param, self.index = param, index

    @property
    def weight(self) -> torch.Tensor:
        return self.param.data[self.index]

    @property
    def in_features(self) -> int:
        return self.param.shape[-1]


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of a block that the mask pruners understand: concatenated
    [gate; up] in `gate_up_proj` (E, 2·I, H), `down_proj` (E, H, I), not transposed, no biases
    (transformers' `use_experts_implementation` flags). Other layouts are left alone, and then
    `measure` reports their weights as neither pruned nor excluded."""
    found = {}
    for name, m in block.named_modules():
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3):
            continue
        layout = (getattr(m, "is_transposed", False), getattr(m, "has_bias", False), getattr(m, "has_gate", True),
                  getattr(m, "is_concatenated", True), getattr(m, "has_post_expert_norm", False))  # fmt: skip
        if layout == (False, False, True, True, False) and hasattr(m, "act_fn"):
            found[name] = m
    return found


def block_weights(block: nn.Module) -> dict[str, nn.Linear | ExpertSlice]:
    """What the mask pruners prune in a block: every nn.Linear, and every expert's gate_up and down
    matrix of a fused experts module, named '<experts>.gate_up_proj.<e>' / '<experts>.down_proj.<e>'."""
    weights: dict[str, nn.Linear | ExpertSlice] = dict(block_linears(block))
    for name, m in fused_experts(block).items():
        for e in range(m.gate_up_proj.shape[0]):
            weights[f"{name}.gate_up_proj.{e}"] = ExpertSlice(m.gate_up_proj, e)
            weights[f"{name}.down_proj.{e}"] = ExpertSlice(m.down_proj, e)
    return weights


def prunable_weights(model: nn.Module) -> dict[str, nn.Linear | ExpertSlice]:
    """`block_weights` of every block keyed 'i.name'."""
    return {f"{i}.{n}": m for i, b in enumerate(find_blocks(model)) for n, m in block_weights(b).items()}


def routers(block: nn.Module) -> set[str]:
    """Names of the router weights of a block (`mlp.gate.weight` beside `mlp.experts`): never pruned
    by the mask pruners, listed as excluded."""
    names = set()
    for name, m in block.named_modules():
        weight = getattr(getattr(m, "gate", None), "weight", None)
        if hasattr(m, "experts") and isinstance(weight, torch.Tensor):
            names.add(f"{name}.gate.weight" if name else "gate.weight")
    return names


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the LM head (Llama/Mistral/Qwen/Nemotron `norm`,
    GPT-2 `ln_f`, OPT/Phi `final_layernorm`)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None) or getattr(getattr(base, "decoder", None), name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"no final norm found in {type(model).__name__}; placement=offload cannot evaluate it")
