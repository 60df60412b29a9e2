"""Statistics capture for the pruners: what feeds each prunable weight (input norms, experts'
routed tokens), per-sample gradients, and the cache of both.

Layer-by-layer calibration runs on `prunebench.models.forward.Layerwise`: a pruner hooks the
linears of block i, runs the block over the calibration batches to collect its statistics, edits
the block, and the block's outputs are recomputed through the *edited* block to feed block i+1
(the sequential protocol of Wanda and SparseGPT).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import (  # noqa: F401  (prunable_linears: re-exported for callers)
    ExpertSlice,
    block_weights,
    find_blocks,
    fused_experts,
    prunable_linears,
    prunable_weights,
)
from prunebench.models.forward import Layerwise, block_input, forward_windows
from prunebench.placement import compute_device, offloaded
from prunebench.progress import progress

log = logging.getLogger(__name__)


class InputNorms:
    """Squared L2 norm of each input column, summed over the tokens of a sample and averaged over
    samples: Wanda's `scaler_row` (lib/layerwrapper.py), accumulated as an exact sum in fp32."""

    def __init__(self, layer: nn.Linear):
        self.sum = torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    def add(self, x: torch.Tensor, samples: int | None = None) -> None:
        """`samples`: how many calibration samples `x` came from, when its tokens are flattened (an
        expert's routed tokens); otherwise the batch dimension of a 3-D `x`."""
        self.nsamples += samples if samples is not None else (x.shape[0] if x.dim() == 3 else 1)
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x * x).sum(0)

    @property
    def norm_sq(self) -> torch.Tensor:
        return self.sum / max(self.nsamples, 1)

    @classmethod
    def of(cls, norm_sq: torch.Tensor) -> InputNorms:
        """Wrap a stored ||X_j||² (e.g. from the one-shot cache)."""
        stat = cls.__new__(cls)
        stat.sum, stat.nsamples = norm_sq, 1
        stat.tokens = None  # unknown: `routed_nothing` reads an all-zero norm as no tokens
        return stat


def routed_nothing(stat) -> bool:
    """True for an expert's statistic that saw no calibration token (its router never picked it)."""
    tokens = getattr(stat, "tokens", None)
    if tokens is None and hasattr(stat, "norm_sq"):
        return not bool(stat.norm_sq.any())
    return tokens == 0


def hook_block(block: nn.Module, stats: dict, make_stat, prefix: str = "") -> tuple[dict, list]:
    """Create `stats[prefix + name]` for every prunable weight of `block` and hook what feeds it:
    a linear's input, and for fused experts the tokens routed to each expert (gate_up's input) and
    act(gate)·up of those tokens (down's input, computed from the weights as they are). An expert
    statistic also counts its tokens (`stat.tokens`) and averages over calibration samples, not
    tokens, like the dense linears. Returns (weights, hook handles)."""
    weights = block_weights(block)
    for name, layer in weights.items():
        stats[prefix + name] = make_stat(layer)
    handles = [
        layer.register_forward_hook(lambda _m, inp, _out, s=stats[prefix + name]: s.add(inp[0]))
        for name, layer in weights.items()
        if isinstance(layer, nn.Module)
    ]
    experts = fused_experts(block)
    if experts:
        samples = [1]  # the batch size of the block's current call (experts see flattened tokens)

        def batch(_m, args, kwargs):
            h = block_input(args, kwargs)
            samples[0] = h.shape[0] if h.dim() == 3 else 1

        handles.append(block.register_forward_pre_hook(batch, with_kwargs=True))
        for name, m in experts.items():
            hook = _expert_hook(m, f"{prefix}{name}", stats, samples)
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return weights, handles


def _expert_hook(m: nn.Module, name: str, stats: dict, samples: list):
    def grab(_m, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        given = dict(zip(names, args, strict=False)) | kwargs
        x, index = given["hidden_states"], given["top_k_index"]
        x = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            for e in range(m.gate_up_proj.shape[0]):
                xe = x[(index == e).any(-1)]
                gate, up = nn.functional.linear(xe, m.gate_up_proj[e]).chunk(2, dim=-1)
                for kind, inp in (("gate_up_proj", xe), ("down_proj", m.act_fn(gate) * up)):
                    stat = stats[f"{name}.{kind}.{e}"]
                    stat.add(inp, samples=samples[0])
                    stat.tokens = getattr(stat, "tokens", 0) + xe.shape[0]

    return grab


def _process_group():
    """torch.distributed's default group when this run is one of several processes, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def calibration_share(input_ids: torch.Tensor) -> torch.Tensor:
    """Calibration over processes (issue 31): under torchrun / accelerate / SLURM each process forwards
    a contiguous share of the calibration windows through the current block, and the statistics are
    summed over processes (`reduce_stats`) before the edit, so every process makes the same edit. One
    process: every window."""
    if (dist := _process_group()) is None:
        return input_ids
    rank, world, n = dist.get_rank(), dist.get_world_size(), input_ids.shape[0]
    if n < world:
        raise PrunebenchError(f"calib.nsamples={n} is fewer than the {world} processes that share it; raise it")
    return input_ids[rank * n // world : (rank + 1) * n // world]


def reduce_stats(stats: Mapping) -> None:
    """Sum every statistic over the processes of the job, in place: the floating-point accumulators
    (Wanda's column norms, SparseGPT's XᵀX, ...) and the counts (samples, routed tokens). Each is an
    exact sum over windows, so the result is one process's sum up to the order of float additions
    (the all-reduce adds the processes' partial sums), identical on every process. No-op alone."""
    if (dist := _process_group()) is None:
        return
    for stat in stats.values():
        fields = vars(stat)
        tensors = [v for v in fields.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        for t in tensors:
            dist.all_reduce(t)
        counts = [k for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool)]
        if counts:
            device = tensors[0].device if tensors else torch.device("cpu")
            total = torch.tensor([fields[k] for k in counts], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            for k, v in zip(counts, total.tolist(), strict=True):
                setattr(stat, k, int(v))


def collect_stats(block: nn.Module, collect: Callable[[], None], make_stat) -> tuple[dict, dict]:
    """Hook every prunable weight in `block`, run `collect()`, return (weights, stats)."""
    stats: dict = {}
    weights, handles = hook_block(block, stats, make_stat)
    try:
        collect()
    finally:
        for h in handles:
            h.remove()
    return weights, stats


@torch.no_grad()
def collect_full_forward(model: nn.Module, input_ids: torch.Tensor, batch_size: int, make_stat) -> dict:
    """Statistics of every prunable block weight from plain full-model forwards on the dense model
    (the one-shot protocol; also the reference the layer-wise path is tested against). An offloaded
    model runs block by block instead: with no edits in between that is the same computation."""
    if offloaded(model):
        stats = {}

        def grab(i, block, collect):
            _, block_stats = collect_stats(block, collect, make_stat)
            stats.update({f"{i}.{name}": s for name, s in block_stats.items()})

        Layerwise(model, input_ids, batch_size, desc="statistics").run(grab)
        return stats
    stats, handles = {}, []
    for i, block in enumerate(find_blocks(model)):
        handles += hook_block(block, stats, make_stat, f"{i}.")[1]
    forward_windows(model, input_ids, batch_size, handles)
    return stats


def model_digest(model: nn.Module) -> str:
    """Cheap fingerprint of the weights (shape and sum of every tensor): a cache made for other
    weights is never reused."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def cached_stats(calib, model: nn.Module, kind: str, compute: Callable[[], dict[str, torch.Tensor]]):
    """Load statistics `kind` for (these weights, these calibration windows) from the cache, or
    compute and store them. `kind` names the protocol and its knobs (e.g. 'grad-l1-fp32'), so a
    changed protocol is a different entry; the file is checksummed (prunebench.cache), so a truncated
    or corrupted one is recomputed with a warning. Returns (tensors, reused)."""
    if not getattr(calib, "cache_dir", None):
        return compute(), False
    from safetensors.torch import load_file, save_file

    from prunebench import cache

    key = f"{kind}-{model_digest(model)}-{calib.key}"

    def build(tmp: Path) -> dict[str, torch.Tensor]:
        tensors = compute()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        log.info("cached %s statistics at %s", kind, Path(calib.cache_dir) / f"{key}.safetensors")
        return tensors

    def load(path: Path) -> dict[str, torch.Tensor]:
        log.info("reusing cached %s statistics from %s", kind, path)
        return load_file(path)

    return cache.entry(Path(calib.cache_dir) / f"{key}.safetensors", key, build, load, f"{kind} statistics")


def dense_input_norms(model: nn.Module, calib) -> tuple[dict[str, torch.Tensor], bool]:
    """||X_j||² of every block linear from the *dense* model (one-shot protocol), cached."""

    def compute():
        stats = collect_full_forward(model, calib.input_ids, calib.batch_size, InputNorms)
        return {name: s.norm_sq for name, s in stats.items()}

    return cached_stats(calib, model, "xnorm-dense", compute)


def gradient_norms(
    model: nn.Module, input_ids: torch.Tensor, norm: str, fp16_scale: float | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample gradient norms of every prunable block weight (GBLM-Pruner's G), experts included.

    One window at a time (`sample_gradients`): each sample's gradient is folded into its
    accumulator the moment it is computed and freed. Only the pruned weights require grad.

    norm='l1': Σ_s |g_s|;  norm='l2': sqrt(Σ_s g_s²), in fp32 and unscaled: the reference's α·g
    scaling is linear, so α is applied at scoring time and one cache serves every α.
    fp16_scale=α reproduces the reference exactly instead: accumulate α·g in fp16 (may overflow).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"grad_norm must be 'l1' or 'l2', not {norm!r}")
    if offloaded(model):
        raise PrunebenchError(
            "gblm's gradient pass needs the whole model on the device: use placement=device or device_map"
        )
    # One accumulator per parameter: a fused experts tensor is one parameter holding every
    # expert's matrix, and per-sample |g| or g² is elementwise, so its slices are the experts' G.
    targets = {n: (w.param, w.index) if isinstance(w, ExpertSlice) else (w.weight, None)
               for n, w in prunable_weights(model).items()}  # fmt: skip
    params = {id(p): p for p, _ in targets.values()}
    acc_dtype = torch.float16 if fp16_scale else torch.float32
    acc = {k: torch.zeros_like(p, dtype=acc_dtype) for k, p in params.items()}

    def fold(key: int, grad: torch.Tensor) -> None:
        g = grad.to(acc_dtype)
        if fp16_scale:
            g = g * fp16_scale
        acc[key] += g.abs() if norm == "l1" else g * g

    sample_gradients(model, input_ids, params, fold)
    out = {k: (a if norm == "l1" else a.float().sqrt().to(acc_dtype)) for k, a in acc.items()}
    return {n: out[id(p)] if e is None else out[id(p)][e].clone() for n, (p, e) in targets.items()}


def sample_gradients(
    model: nn.Module,
    windows: torch.Tensor,
    params: Mapping[int, nn.Parameter],
    fold: Callable[[int, torch.Tensor], None],
    who: str | None = None,
) -> list[float]:
    """One backward per window (batch 1, causal-LM loss with labels = inputs), each parameter's
    gradient handed to `fold(key, grad)` the moment it is accumulated (a post-accumulate hook) and
    freed, so at most one sample's gradient exists beside the caller's accumulators. Only `params`
    require grad during the pass; every flag is restored afterwards, also on an error. With `who`,
    a non-finite loss stops the pass with one line naming the pruner. Returns the per-window losses."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def hook(key: int):
        def grab(p: torch.Tensor) -> None:
            fold(key, p.grad)
            p.grad = None

        return grab

    handles = []
    for key, p in params.items():
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(hook(key)))
    device, losses = compute_device(model), []
    try:
        for window in progress(windows, desc="gradients", unit="sample"):
            x = window.unsqueeze(0).to(device)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            if who is not None:  # a sync per window: only where the caller records the losses
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise PrunebenchError(f"{who}: the calibration loss is {value} (non-finite gradients)")
                losses.append(value)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return losses
