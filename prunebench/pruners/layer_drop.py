"""Layer dropping: keep the top, middle or bottom block of layers, keep an explicit list, or remove one.

The depth baseline of LaCo (arXiv 2402.11187) and the pruning step of "Towards Building Efficient
Sentence BERT Models using Layer Pruning" (arXiv 2409.14168): 'top' keeps the first `layers`
blocks (nearest the embeddings), 'bottom' the last, 'middle' the centred run (12 → 6 keeps 4–9,
1-based). Real surgery: the blocks are removed and the config updated.

    pruner: {_target_: prunebench.pruners.layer_drop.LayerDrop, keep: top, layers: 6, remove: null}
"""

from __future__ import annotations

import time

from omegaconf import ListConfig
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.surgery import keep_layers
from prunebench.pruners.base import PruneStats

POSITIONS = ("top", "middle", "bottom")


def select_layers(n: int, keep: str | list[int] | None, layers: int | None, remove: list[int] | None) -> list[int]:
    """Indices (0-based, in order) of the blocks to keep out of n."""
    if isinstance(keep, list):
        bad = [i for i in keep if not 0 <= i < n]
        if not keep or bad or len(set(keep)) != len(keep):
            raise PrunebenchError(f"pruner.keep={keep} must list distinct layers among 0..{n - 1} (at least one)")
        return sorted(keep)
    if remove is not None:
        bad = [i for i in remove if not 0 <= i < n]
        if bad or len(set(remove)) >= n:
            raise PrunebenchError(f"pruner.remove={list(remove)} must name 0..{n - 1} and leave at least one layer")
        return [i for i in range(n) if i not in set(remove)]
    if keep not in POSITIONS:
        raise PrunebenchError(f"pruner.keep={keep!r} must be one of {', '.join(POSITIONS)} (or set pruner.remove)")
    layers = n // 2 if layers is None else layers
    if not isinstance(layers, int) or not 0 < layers <= n:
        raise PrunebenchError(f"pruner.layers={layers} must be between 1 and the model's {n} layers")
    start = {"top": 0, "middle": (n - layers) // 2, "bottom": n - layers}[keep]
    return list(range(start, start + layers))


class LayerDrop:
    needs_calibration = False
    supports_offload = True  # surgery only

    def __init__(
        self,
        name: str = "layer_drop",
        keep: str | None = "top",
        layers: int | None = None,
        remove: list[int] | None = None,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        keep = list(keep) if isinstance(keep, list | tuple | ListConfig) else keep
        self.name, self.keep, self.layers = name, keep, layers
        self.remove = list(remove) if remove is not None else None
        if isinstance(keep, list) and not keep:
            raise PrunebenchError("pruner.keep is an empty list; name the layers to keep, e.g. pruner.keep=[0,1,2]")
        if self.remove is None and not isinstance(keep, list) and keep not in POSITIONS:
            raise PrunebenchError(f"pruner.keep={keep!r} must be one of {', '.join(POSITIONS)} (or set pruner.remove)")
        if self.remove is not None and not self.remove:
            raise PrunebenchError("pruner.remove is an empty list; name the layers to remove, e.g. pruner.remove=[3,4]")
        # `remove` and `keep` name the same thing twice: one would be silently ignored. keep=top is the
        # default, so it yields to `remove`; any other keep, or `layers`, beside `remove` is an error.
        if self.remove is not None and (isinstance(keep, list) or keep in ("middle", "bottom") or layers is not None):
            raise PrunebenchError(
                f"pruner.remove={self.remove} and pruner.keep={keep} / pruner.layers={layers} both choose the layers;"
                " set only one (pruner.keep=null with pruner.remove)"
            )
        if isinstance(keep, list) and layers is not None:
            raise PrunebenchError(f"pruner.layers={layers} is ignored when pruner.keep lists the layers; drop it")

    def check(self, num_layers: int) -> None:
        """Validate against a layer count known before loading (model.num_layers)."""
        select_layers(num_layers, self.keep, self.layers, self.remove)

    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        t = time.perf_counter()
        n = len(find_blocks(model))
        kept = select_layers(n, self.keep, self.layers, self.remove)
        keep_layers(model, kept)
        info = {"layers_before": n, "layers_kept": kept, "layer_ratio": 1 - len(kept) / n}
        return PruneStats(0.0, 0.0, {}, {"surgery": time.perf_counter() - t}, info)
