"""Wanda: "A Simple and Effective Pruning Approach for Large Language Models" (arXiv 2306.11695).

Score S_ij = |W_ij| · ||X_j||_2, where ||X_j||² is the squared norm of input column j summed over
a sample's tokens and averaged over calibration samples (the reference's `scaler_row`). Weights
compete within each output row; N:M removes the N lowest of every M consecutive inputs. No weight
update. Blocks are calibrated sequentially: block i sees inputs computed by the pruned blocks < i.

    pruner: {_target_: prunebench.pruners.wanda.Wanda, sparsity: 0.5, pattern: unstructured, group: row,
             sequential: true}
"""

from __future__ import annotations

import torch
from torch import nn

from prunebench.pruners.base import MaskPruner
from prunebench.pruners.stats import InputNorms


def score(weight: torch.Tensor, x_norm_sq: torch.Tensor) -> torch.Tensor:
    """S = |W| · sqrt(||X_j||²), broadcast over output rows."""
    return weight.abs().float() * x_norm_sq.to(weight.device).sqrt().reshape(1, -1)  # cached stats: CPU


class Wanda(MaskPruner):
    def score(self, name: str, layer: nn.Linear, stat: InputNorms) -> torch.Tensor:
        return score(layer.weight, stat.norm_sq)
