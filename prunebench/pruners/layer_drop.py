"""Layer dropping: keep the top, middle or bottom block of layers, keep an explicit list, or remove one.

The depth baseline of LaCo (arXiv 2402.11187) and the pruning step of "Towards Building Efficient
Sentence BERT Models using Layer Pruning" (arXiv 2409.14168): 'top' keeps the first `layers`
blocks (nearest the embeddings), 'bottom' the last, 'middle' the centred run (12 → 6 keeps 4–9,
1-based). Real surgery: the blocks are removed and the config updated.

`bridge_rank: r` (encoders) keeps the depth bookkeeping but puts a MiniBridgeBERT Low Rank Bridge
(prunebench.models.bridges: x + U·V·x + c) in each removed block's slot instead of nothing: the
drop-vs-bridge ablation at equal depth, for any encoder recipe (SBERT's layer pruning included).
`bridge_init: fit` fits every bridge by reduced-rank least squares to its block's input -> output
on the calibration windows, all from the dense model in one pass (a one-shot fit: later bridges
see dense inputs, not their predecessors' outputs); `identity` starts each bridge as the identity
(at first the same function as dropping the block, then trainable by the recovery stage).

    pruner: {_target_: prunebench.pruners.layer_drop.LayerDrop, keep: top, layers: 6, remove: null,
             bridge_rank: null, bridge_init: fit}
"""

from __future__ import annotations

import time
from typing import Annotated

import torch
from omegaconf import ListConfig
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.bridges import BridgeFit, LowRankBridge, replace_block
from prunebench.models.forward import forward_windows, watch_blocks
from prunebench.models.surgery import keep_layers
from prunebench.placement import compute_device
from prunebench.pruners.base import PruneStats, ShapePruner

POSITIONS = ("top", "middle", "bottom")
BRIDGE_INITS = ("fit", "identity")


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


class LayerDrop(ShapePruner):
    needs_calibration = False
    supports_offload = True  # surgery only

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        return 0, 0  # surgery (a bridge fit keeps one block's pairs: small beside the weights)

    def __init__(
        self,
        name: str = "layer_drop",
        keep: str | None = "top",
        layers: Annotated[int | None, Field(ge=1)] = None,
        remove: list[int] | None = None,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
        bridge_rank: int | None = None,
        bridge_init: str = "fit",
    ):
        if bridge_rank is not None and (not isinstance(bridge_rank, int) or bridge_rank <= 0):
            raise PrunebenchError(f"pruner.bridge_rank={bridge_rank} must be a positive integer (or null: drop)")
        if bridge_init not in BRIDGE_INITS:
            raise PrunebenchError(f"pruner.bridge_init={bridge_init!r} must be one of {', '.join(BRIDGE_INITS)}")
        self.bridge_rank, self.bridge_init = bridge_rank, bridge_init
        self.needs_calibration = bridge_rank is not None and bridge_init == "fit"
        self.supports_offload = bridge_rank is None  # the fit runs whole-model forwards
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

    def check(self, num_layers: int, dims: dict | None = None) -> None:
        """Validate against a layer count (and hidden size) known before loading."""
        kept = select_layers(num_layers, self.keep, self.layers, self.remove)
        if (dims or {}).get("model_type") == "modernbert" and kept[0] != 0 and self.bridge_rank is None:
            raise PrunebenchError(
                f"pruner keeps layers {kept[0]}.. of ModernBERT, whose first layer is built without an attention"
                " norm (a saved model would reload without the kept layer's norm); keep layer 0: pruner.keep=top,"
                " or remove layers after it with pruner.remove"
            )
        hidden = (dims or {}).get("hidden_size")
        if self.bridge_rank and hidden and self.bridge_rank > hidden:
            raise PrunebenchError(
                f"pruner.bridge_rank={self.bridge_rank} is larger than the model's hidden size {hidden}"
            )

    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        t = time.perf_counter()
        n = len(find_blocks(model))
        kept = select_layers(n, self.keep, self.layers, self.remove)
        info = {"layers_before": n, "layers_kept": kept, "layer_ratio": 1 - len(kept) / n}
        if self.bridge_rank is None:
            keep_layers(model, kept)
        else:
            info["bridges"] = self._bridge(model, [i for i in range(n) if i not in kept], calib)
        return PruneStats(0.0, 0.0, {}, {"surgery": time.perf_counter() - t}, info)

    def _bridge(self, model: nn.Module, removed: list[int], calib) -> dict:
        """Replace blocks `removed` by bridges (fitted from one pass over `calib`, or the identity);
        {block (0-based): relative fit error or None}."""
        if getattr(model.config, "is_decoder", False) or model.get_output_embeddings() is not None:
            raise PrunebenchError(
                f"pruner.bridge_rank bridges encoder blocks; {type(model).__name__} is a decoder / language model:"
                " drop its layers (pruner.bridge_rank=null) or use an encoder"
            )
        hidden = model.config.hidden_size
        if self.bridge_rank > hidden:
            raise PrunebenchError(
                f"pruner.bridge_rank={self.bridge_rank} is larger than the model's hidden size {hidden}"
            )
        stats = self._fit_stats(model, removed, calib) if self.bridge_init == "fit" else {}
        errors = {}
        for i in removed:
            bridge = LowRankBridge(hidden, self.bridge_rank)
            if i in stats:
                A, b, err = stats[i].solve(self.bridge_rank)
                bridge.set_map(A, b)
                errors[i] = round(err, 6)
            else:
                bridge.set_identity()
                errors[i] = None
            replace_block(model, i, bridge)
        return {"rank": self.bridge_rank, "init": self.bridge_init, "fit_error": errors}

    @torch.no_grad()
    def _fit_stats(self, model: nn.Module, indices: list[int], calib) -> dict[int, BridgeFit]:
        """Each block's input and output token rows over the calibration windows, dense model."""
        if calib is None:
            raise PrunebenchError("pruner.bridge_init=fit needs calibration data (calib.*)")
        device, blocks = compute_device(model), find_blocks(model)
        stats = {i: BridgeFit(model.config.hidden_size, "residual", device) for i in indices}
        was_training = model.training
        model.eval()
        try:
            with watch_blocks({i: blocks[i] for i in indices}, lambda i, x, y: stats[i].add(x, y)):
                forward_windows(model, calib.input_ids, calib.batch_size, lm=False)
        finally:
            model.train(was_training)
        return stats
