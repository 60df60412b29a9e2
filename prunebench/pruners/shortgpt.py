"""ShortGPT: "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"
(arXiv 2403.03853), a depth baseline of LaCo.

Block Influence  BI_i = E_tokens[1 − cos(h_i,in, h_i,out)]  over the calibration tokens (a NaN
cosine, from a zero vector, counts as 0.5 as in the public implementation;
`prunebench.models.forward.block_influence`); the `n` layers of lowest BI are removed (real surgery).

    pruner: {_target_: prunebench.pruners.shortgpt.ShortGPT, n: 8}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.forward import block_influence, forward_windows, watch_blocks
from prunebench.models.surgery import fixed_first_layer, remove_layers
from prunebench.pruners.base import PruneStats, ShapePruner


@torch.no_grad()
def layer_influence(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> list[float]:
    """Mean Block Influence of every block over the calibration tokens (dense whole-model forwards,
    each block's input and output seen by `watch_blocks`)."""
    blocks = find_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)

    def add(i: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        sums[i] += float(block_influence(h_in, h_out).sum())

    with watch_blocks(blocks, add):
        count = forward_windows(model, input_ids, batch_size)
    return (sums / max(count, 1)).tolist()


class ShortGPT(ShapePruner):
    needs_calibration = True

    def __init__(
        self,
        name: str = "shortgpt",
        n: Annotated[int, Field(ge=1)] = 1,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        if not isinstance(n, int) or n < 1:
            raise PrunebenchError(f"pruner.n={n} must be a positive number of layers to remove")
        self.name, self.n = name, n

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        if self.n >= num_layers:
            raise PrunebenchError(f"pruner.n={self.n} would remove all {num_layers} layers")

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        t = time.perf_counter()
        layers = len(find_blocks(model))
        self.check(layers)
        bi = layer_influence(model, calib.input_ids, calib.batch_size)
        first = 1 if fixed_first_layer(model) else 0  # ModernBERT: layer 0 is built differently, never removed
        remove = sorted(sorted(range(first, layers), key=lambda i: bi[i])[: self.n])
        kept = remove_layers(model, remove)
        info = {
            "layers_before": layers,
            "layers_kept": kept,
            "layers_removed": remove,
            "layer_ratio": len(remove) / layers,
            "block_influence": [round(b, 6) for b in bi],
        }
        return PruneStats(0.0, 0.0, {}, {"block_influence": time.perf_counter() - t}, info)
