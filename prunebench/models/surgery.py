"""Real model surgery for depth pruning: remove transformer blocks and keep the Hugging Face config
consistent (num_hidden_layers, layer_types, each attention layer's KV-cache index), so the smaller
model generates with a KV cache and round-trips through save_pretrained / from_pretrained."""

from __future__ import annotations

from torch import nn

from prunebench.models.blocks import find_blocks


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        if module is child:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr
    raise ValueError("module not found in model")


def set_blocks(model: nn.Module, blocks: list[nn.Module], layer_types: list | None = None) -> None:
    """Make `blocks` the model's transformer blocks, renumber, and update the config."""
    parent, attr = _parent_of(model, find_blocks(model))
    setattr(parent, attr, nn.ModuleList(blocks))
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # KV-cache slot of attention layers (Llama, Mistral, ...)
                module.layer_idx = new_index
    config = model.config
    if layer_types is not None:
        config.layer_types = list(layer_types)
    config.num_hidden_layers = len(blocks)


def snapshot(model: nn.Module) -> tuple[list[nn.Module], list | None]:
    """The current blocks (by reference, no copies) and layer types, for `set_blocks` to restore."""
    types = getattr(model.config, "layer_types", None)
    return list(find_blocks(model)), (list(types) if types else None)


def fixed_first_layer(model: nn.Module) -> bool:
    """ModernBERT builds its first layer without an attention norm (Identity, by layer index): another
    layer moved into slot 0 would lose its norm when the saved model is reloaded."""
    return getattr(model.config, "model_type", None) == "modernbert"


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep blocks `keep` (in the given order), drop the rest, renumber, update the config."""
    blocks, types = snapshot(model)
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < len(blocks) for i in keep):
        raise ValueError(f"invalid layers to keep {keep} for a model of {len(blocks)} layers")
    if fixed_first_layer(model) and keep[0] != 0:
        raise ValueError("ModernBERT's first layer has no attention norm by construction: keep layer 0 first")
    set_blocks(model, [blocks[i] for i in keep], [types[i] for i in keep] if types else None)


def remove_layers(model: nn.Module, remove: list[int]) -> list[int]:
    """Drop blocks `remove`; returns the kept original indices."""
    n = len(find_blocks(model))
    keep = [i for i in range(n) if i not in set(remove)]
    keep_layers(model, keep)
    return keep
