"""What every mask pruner shares: the result record and the layer-by-layer mask loop.

A method file supplies only `score(layer, stat)` (pure math lives in a module-level function) and,
if it needs one, the statistic it collects per linear (`make_stat`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunebench.calibration import InputNorms, Layerwise, block_linears, collect_stats, find_blocks
from prunebench.config import parse_pattern
from prunebench.pruners.masks import make_mask


@dataclass
class PruneStats:
    """What a pruner reports: target and achieved sparsity over the pruned matrices, per-matrix
    sparsity, seconds spent in block forwards (calibration) and in scoring/masking."""

    target_sparsity: float
    achieved_sparsity: float = 0.0
    per_matrix: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure(model: nn.Module, target: float, timings: dict, info: dict | None = None) -> PruneStats:
    """Achieved sparsity of every block linear, counted from the weights themselves."""
    per, zeros, total = {}, 0, 0
    for i, block in enumerate(find_blocks(model)):
        for name, layer in block_linears(block).items():
            z = int((layer.weight == 0).sum())
            per[f"{i}.{name}"] = z / layer.weight.numel()
            zeros, total = zeros + z, total + layer.weight.numel()
    return PruneStats(target, zeros / max(total, 1), per, timings, info or {})


class MaskPruner:
    """Remove weights by a score, layer by layer on calibration data (Wanda's loop): for each
    block, collect `make_stat` for every linear, score, mask, then recompute the block outputs."""

    needs_calibration = True
    make_stat = InputNorms

    def __init__(self, name: str, sparsity: float = 0.5, pattern: str = "unstructured", group: str = "row"):
        self.name, self.sparsity, self.pattern, self.group = name, float(sparsity), pattern, group
        self.nm = parse_pattern(pattern)

    def score(self, layer: nn.Linear, stat) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prune_layer(self, layer: nn.Linear, stat) -> None:
        mask = make_mask(self.score(layer, stat), self.sparsity, self.nm, self.group)
        layer.weight[mask] = 0

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        start = time.perf_counter()
        runner = Layerwise(model, calib.input_ids, calib.batch_size, desc=self.name)

        def edit(_i, block, collect):
            linears, stats = collect_stats(block, collect, self.make_stat)
            for name, layer in linears.items():
                self.prune_layer(layer, stats[name])

        runner.run(edit)
        total = time.perf_counter() - start
        timings = {"forward": runner.forward_s, "score_and_mask": total - runner.forward_s}
        return measure(model, self.sparsity, timings)
