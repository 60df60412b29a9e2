"""What every mask pruner shares: the result record and the mask loop.

A method file supplies `score(name, layer, stat)` (its pure math lives in a module-level
function), optionally the statistic it collects per linear (`make_stat`), a `prepare` step run on
the dense model (GBLM's gradient pass), or its own `prune_layer` (SparseGPT's weight update).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.knobs import Flag, linear_widths
from prunebench.models.blocks import ExpertSlice, block_weights, find_blocks, prunable_weights, routers
from prunebench.models.forward import Layerwise
from prunebench.placement import resident
from prunebench.pruners.masks import make_mask, parse_pattern
from prunebench.pruners.stats import (
    InputNorms,
    calibration_share,
    collect_stats,
    dense_input_norms,
    reduce_stats,
    routed_nothing,
)

log = logging.getLogger(__name__)


@dataclass
class PruneStats:
    """What a pruner reports: target and achieved sparsity over the pruned matrices, per-matrix
    sparsity, seconds per phase, and method-specific facts (cache reuse, protocol)."""

    target_sparsity: float
    achieved_sparsity: float = 0.0
    per_matrix: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure(model: nn.Module, target: float, timings: dict, info: dict | None = None) -> PruneStats:
    """Achieved sparsity over every prunable block weight (linears and each expert of fused 3-D
    experts), counted from the weights themselves. Every other ≥ 2-D weight inside the blocks is
    listed in info['excluded_weights'] with the reason (routers are excluded by rule); one that no
    rule covers is named in a warning, so achieved_sparsity never silently leaves weights out."""
    per, zeros, total = {}, 0, 0
    excluded: dict[str, str] = {}
    for i, block in enumerate(find_blocks(model)):
        with resident(model, i, block):  # stream: block i read back from the shard this run wrote
            zeros, total = _measure_block(i, block, per, excluded, zeros, total)
    info = dict(info or {})
    if excluded:
        info["excluded_weights"] = excluded
    if unhandled := [n for n, why in excluded.items() if why == "not handled"]:
        more = ", ..." if len(unhandled) > 4 else ""
        log.warning(
            "%d weight(s) inside the blocks are neither pruned nor excluded by rule (%s%s); achieved_sparsity"
            " counts only the pruned ones", len(unhandled), ", ".join(unhandled[:4]), more,
        )  # fmt: skip
    return PruneStats(target, zeros / max(total, 1), per, timings, info)


def _measure_block(i: int, block: nn.Module, per: dict, excluded: dict, zeros: int, total: int) -> tuple[int, int]:
    weights = block_weights(block)
    for name, layer in weights.items():
        z = int((layer.weight == 0).sum())
        per[f"{i}.{name}"] = z / layer.weight.numel()
        zeros, total = zeros + z, total + layer.weight.numel()
    covered = {id(w.param if isinstance(w, ExpertSlice) else w.weight) for w in weights.values()}
    rules = routers(block)
    for pname, p in block.named_parameters():
        if p.dim() >= 2 and id(p) not in covered:
            excluded[f"{i}.{pname}"] = "router (never pruned)" if pname in rules else "not handled"
    return zeros, total


def mask_agreement(a: nn.Module, b: nn.Module) -> float:
    """Fraction of identical mask entries (weight == 0) over the prunable block weights of two models of
    one architecture: how far a precision, device or placement change moves the masks."""
    same = total = 0
    for x, y in zip(prunable_weights(a).values(), prunable_weights(b).values(), strict=True):
        same += int(((x.weight == 0) == (y.weight == 0).to(x.weight.device)).sum())
        total += x.weight.numel()
    return same / max(total, 1)


def capture_bytes(shape: Mapping, calib, elt: int) -> int:
    """Bytes a layer-wise pass over the calibration windows holds: every window's block input
    (nsamples × seqlen × hidden) plus one batch's block intermediates."""
    hidden, ffn = int(shape["hidden"]), int(shape["ffn"])
    return calib.nsamples * calib.seqlen * hidden * elt + calib.batch_size * calib.seqlen * (4 * hidden + 3 * ffn) * elt


def norm_bytes(shape: Mapping) -> int:
    """fp32 input-norm accumulators of one block's linears."""
    return (4 * int(shape["hidden"]) + 2 * int(shape["ffn"])) * 4


class ShapePruner:
    """What every pruner that removes whole layers or channels (no weight masks) shares: it takes
    `sparsity` and `pattern` only so that a config can name them, and refuses them."""

    def memory_bytes(self, shape: Mapping, calib, elt: int) -> tuple[int, int]:
        """(activations, statistics) in bytes beside the weights, for the memory plan (memory.py):
        by default one layer-wise statistics pass over the calibration windows."""
        return capture_bytes(shape, calib, elt), norm_bytes(shape)

    @classmethod
    def check_knobs(cls, knobs: Mapping) -> None:
        sparsity, pattern = knobs.get("sparsity", 0.0), knobs.get("pattern", "unstructured")
        if sparsity != 0 or pattern != "unstructured":
            knob = f"pruner.sparsity={sparsity}" if sparsity != 0 else f"pruner.pattern={pattern}"
            raise PrunebenchError(
                f"{knob} is ignored by pruner={knobs.get('name')} (it removes whole layers or channels, no weight"
                " masks); drop it, or choose a mask pruner (magnitude, wanda, sparsegpt, gblm)"
            )


class MaskPruner:
    """Remove weights by a score. `sequential=True` (the papers' protocol): block by block, the
    statistics of block i come from inputs computed by the already-pruned blocks < i.
    `sequential=False` (one-shot): every statistic comes from the dense model, is cached, and all
    layers are pruned at once; cheaper in sweeps, not the papers' protocol."""

    needs_calibration = True
    supports_offload = True  # layer-wise: one block at a time can visit the device
    make_stat = InputNorms

    @property
    def supports_stream(self) -> bool:
        """placement=stream: the sequential, layer-wise protocol (one-shot needs the dense statistics first)."""
        return self.sequential

    def __init__(
        self,
        name: str = "",
        sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5,
        pattern: str = "unstructured",
        group: str = "row",
        sequential: Flag = True,
        one_forward: Flag = False,
    ):
        self.name = name or type(self).__name__.lower()
        self.sparsity, self.pattern, self.group = float(sparsity), pattern, group
        self.sequential, self.one_forward = sequential, one_forward
        if one_forward and not sequential:
            raise PrunebenchError(
                "pruner.one_forward=true is a form of the sequential protocol; drop pruner.sequential=false"
            )
        self.nm = parse_pattern(pattern)
        protocol = "sequential, one forward a block" if one_forward else "sequential"
        self.info: dict = {"protocol": protocol if sequential else "one-shot (dense statistics)"}

    @classmethod
    def check_knobs(cls, knobs: Mapping) -> None:
        """The pattern's syntax, the pattern against the sparsity, the comparison group."""
        sparsity = knobs.get("sparsity", 0.5)
        nm = parse_pattern(knobs.get("pattern", "unstructured"))
        if nm is not None and abs(float(sparsity) - nm[0] / nm[1]) > 1e-9:
            raise PrunebenchError(
                f"pruner.pattern={knobs['pattern']} removes {nm[0]}/{nm[1]} of the weights but"
                f" pruner.sparsity={sparsity}; set pruner.sparsity={nm[0] / nm[1]:g}"
            )
        if "group" in knobs and knobs["group"] not in ("row", "matrix"):
            raise PrunebenchError(f"pruner.group={knobs['group']!r} must be 'row' or 'matrix'")

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """An N:M pattern groups inputs along every block linear's input width: each must be a multiple of M."""
        if self.nm is None or not dims:
            return
        m = self.nm[1]
        if bad := {k: w for k, w in linear_widths(dims).items() if w % m}:
            shown = ", ".join(f"{k}={w}" for k, w in bad.items())
            raise PrunebenchError(
                f"pruner.pattern={self.pattern} groups every {m} inputs but the model has {shown}, not a multiple"
                f" of {m}; use pruner.pattern=unstructured or an M that divides it"
            )

    def memory_bytes(self, shape: Mapping, calib, elt: int) -> tuple[int, int]:
        """(activations, statistics) beside the weights: the block inputs of every calibration window
        and one block's input-norm accumulators (a method that keeps more says so itself)."""
        return capture_bytes(shape, calib, elt), norm_bytes(shape)

    def prepare(self, model: nn.Module, calib) -> None:
        """Work on the dense model before any block is pruned (default: none)."""

    def score(self, name: str, layer: nn.Linear, stat) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prune_layer(self, name: str, layer: nn.Linear, stat) -> None:
        score = self.score(name, layer, stat)
        if bool(torch.isnan(score).any()):  # NaN has no rank: the mask would be arbitrary (inf still ranks)
            raise PrunebenchError(f"prune: {self.name}'s scores for {name} hold NaN (non-finite statistics)")
        mask = make_mask(score, self.sparsity, self.nm, self.group)
        layer.weight[mask] = 0

    @torch.no_grad()
    def prune_weight(self, name: str, layer, stat) -> None:
        """`prune_layer`, except for an expert that no calibration token reached: its statistics are
        empty, so it is pruned by magnitude |W| under the method's mask rule (its comparison group:
        row for Wanda and GBLM, the whole matrix for SparseGPT; N:M as set) with no weight update,
        and named in info['experts_without_tokens']."""
        if isinstance(layer, ExpertSlice) and routed_nothing(stat):
            self.info.setdefault("experts_without_tokens", []).append(name)
            layer.weight[make_mask(layer.weight.abs().float(), self.sparsity, self.nm, self.group)] = 0
            return
        self.prune_layer(name, layer, stat)

    def _prune_on_first_call(self, i: int, block: nn.Module, _collect) -> None:
        """pruner.one_forward: each linear of block i is pruned in a pre-hook, from the statistics of the
        input it is called with (every calibration window at once), before it computes; so the block's
        one forward gives the next block's inputs, and later linears see the pruned earlier ones (as
        SparseGPT's "true sequential" option). The reference codes forward each block twice (statistics
        from the dense block, then outputs of the pruned one): the default."""
        linears = block_weights(block)
        if any(not isinstance(layer, nn.Linear) for layer in linears.values()):
            raise PrunebenchError("pruner.one_forward=true prunes nn.Linear layers; this model has fused experts")
        handles = []

        def hook(name: str, layer: nn.Linear):
            def prune_first(_module, args):
                stat = self.make_stat(layer)
                stat.add(args[0])
                reduce_stats({name: stat})
                self.prune_weight(f"{i}.{name}", layer, stat)
                handles[index].remove()  # once: the one call carries every window

            index = len(handles)
            return prune_first

        for name, layer in linears.items():
            handles.append(layer.register_forward_pre_hook(hook(name, layer)))

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        if calib is None:
            raise PrunebenchError(f"{self.name} needs calibration data")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        self.prepare(model, calib)
        timings["prepare"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.sequential:
            # several processes: each forwards its share of the windows; the statistics are summed
            share = calibration_share(calib.input_ids)
            if len(share) < len(calib.input_ids):
                self.info["calibration_windows_per_process"] = len(share)
            if self.one_forward:  # all windows in one batch: a linear's statistics are whole at its first call
                runner = Layerwise(model, share, len(share), desc=self.name)
                runner.run(self._prune_on_first_call, outputs=True)
            else:
                runner = Layerwise(model, share, calib.batch_size, desc=self.name)

                def edit(i, block, collect):
                    linears, stats = collect_stats(block, collect, self.make_stat)
                    reduce_stats(stats)
                    for name, layer in linears.items():
                        self.prune_weight(f"{i}.{name}", layer, stats[name])

                runner.run(edit)
            timings["forward"] = runner.forward_s
        else:
            if self.make_stat is not InputNorms:
                raise PrunebenchError(f"{self.name} has no one-shot mode; use pruner.sequential=true")
            norms, reused = dense_input_norms(model, calib)
            self.info["dense_norms_reused"] = reused
            timings["forward"] = time.perf_counter() - t
            for name, layer in prunable_weights(model).items():
                self.prune_weight(name, layer, InputNorms.of(norms[name]))
        timings["score_and_mask"] = time.perf_counter() - t - timings["forward"]
        return measure(model, self.sparsity, timings, dict(self.info))
