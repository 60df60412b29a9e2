"""Magnitude pruning: score S = |W|, the baseline of Wanda (arXiv 2306.11695) and SparseGPT.

The Wanda repository's baseline uses one threshold per weight matrix (`group: matrix`, default);
`group: row` compares weights within each output row. N:M patterns use the same rule as Wanda.

    pruner:
      _target_: prunebench.pruners.magnitude.Magnitude
      sparsity: 0.5
      pattern: unstructured   # or 2:4, 4:8
      group: matrix           # or row
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prunebench.models.blocks import prunable_weights
from prunebench.pruners.base import MaskPruner, PruneStats, measure


def score(weight: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij|."""
    return weight.abs().float()


class Magnitude(MaskPruner):
    needs_calibration = False

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        return 0, 0  # |W| alone: no calibration pass

    def __init__(
        self, name: str = "magnitude", sparsity: float = 0.5, pattern: str = "unstructured", group: str = "matrix"
    ):
        super().__init__(name, sparsity, pattern, group)

    def score(self, name: str, layer: nn.Linear, stat=None) -> torch.Tensor:
        return score(layer.weight)

    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        start = time.perf_counter()
        for name, layer in prunable_weights(model).items():  # no data needed: no forward passes
            self.prune_layer(name, layer, None)
        return measure(model, self.sparsity, {"forward": 0.0, "score_and_mask": time.perf_counter() - start})
