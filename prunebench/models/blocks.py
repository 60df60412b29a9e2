"""Where the transformer blocks and their linears are, for any Hugging Face model: what pruners,
surgery and evaluators walk over."""

from __future__ import annotations

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


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the LM head (Llama/Mistral/Qwen/Nemotron `norm`,
    GPT-2 `ln_f`, OPT/Phi `final_layernorm`)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None) or getattr(getattr(base, "decoder", None), name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"no final norm found in {type(model).__name__}; placement=offload cannot evaluate it")
