"""No pruning: the dense model, for baseline runs."""

from __future__ import annotations

from torch import nn

from prunebench.pruners.base import PruneStats, ShapePruner, measure


class NoPruner(ShapePruner):
    needs_calibration = False
    supports_offload = True
    supports_stream = True

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        return 0, 0

    def __init__(self, name: str = "none", sparsity: float = 0.0, pattern: str = "unstructured"):
        self.name, self.sparsity = name, sparsity

    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        return measure(model, 0.0, {})
