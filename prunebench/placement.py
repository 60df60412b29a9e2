"""Where a run computes: device, precision, placement and the memory plan. Every stage asks this
module; none decides alone.

- `device`: `auto` (cuda, else mps, else cpu) | `cpu` | `cuda` | `cuda:N` | `mps`.
- `model.dtype`: `float32` | `float16` | `bfloat16` | `auto` (the checkpoint's dtype on an
  accelerator, float32 on the CPU). fp16 on the CPU is upcast to fp32 (CPU fp16 kernels are slow
  or missing), with one log line. Statistics (norms, Hessians, gradients, importance, KD losses)
  accumulate in fp32 whatever the model dtype.
- `placement`: `device` (the whole model on the device) | `offload` (weights stay in CPU memory,
  one block at a time visits the device: the Wanda/SparseGPT reference pattern, for layer-wise
  pruners and perplexity) | `stream` (weights stay on disk: one block at a time is read from the
  safetensors shards, edited, written to the run's model folder and freed, so CPU memory holds one
  block, not the model: models larger than memory; models/stream.py) |
  `device_map` (accelerate's `device_map="auto"` over every GPU, then CPU,
  capped by `max_memory`: evaluation and recovery of models that do not fit one card) | `auto`
  (`device` when the plan fits the free device memory, else `offload` where every stage supports
  it, else `device_map`).
- Several processes (torchrun, accelerate launch, SLURM): each computes on its own GPU
  (`cuda:LOCAL_RANK`); the memory plan is per process (see `plan`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from prunebench import PrunebenchError

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "offload", "stream", "device_map")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GiB = 2**30


def launch() -> tuple[int, int, int]:
    """(world size, processes on this node, local rank) as the launcher exports them (torchrun,
    accelerate launch; a SLURM job of several tasks gets them from recovery.engine.world());
    (1, 1, 0) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), int(os.environ.get("LOCAL_RANK", "0"))


def _rank_gpu(count: int) -> int | None:
    """Under several processes each computes on its own GPU, cuda:LOCAL_RANK (None in one process);
    cuda:0 when the process sees a single GPU (SLURM --gpus-per-task: LOCAL_RANK=3, but CUDA_VISIBLE_DEVICES
    already narrowed this task to its own device)."""
    world, _, local_rank = launch()
    if world == 1:
        return None
    if count == 1:
        return 0
    if local_rank >= count:
        raise PrunebenchError(
            f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): start at most {count}"
            " processes per node (torchrun --nproc_per_node)"
        )
    return local_rank


def resolve_device(spec: str | None) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` | `mps` -> a torch.device that exists on this machine."""
    spec = str(spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            rank_gpu = _rank_gpu(torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device() if rank_gpu is None else rank_gpu)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise PrunebenchError(f"device={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunebenchError(f"device={spec}: CUDA is not available on this machine; use device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and launch()[0] > 1:  # every rank would share that one GPU
            raise PrunebenchError(
                f"device={spec} names one GPU for {launch()[0]} processes; use device=cuda or auto (each process"
                " takes cuda:LOCAL_RANK)"
            )
        index = device.index if device.index is not None else (_rank_gpu(count) or 0)
        if index >= count:
            raise PrunebenchError(f"device={spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise PrunebenchError(f"device={spec}: MPS is not available on this machine; use device=cpu or auto")
        return device
    raise PrunebenchError(f"device={spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(spec: str, device: torch.device, checkpoint: str | None = None) -> torch.dtype:
    """The model's dtype on `device`. `auto` = the checkpoint's dtype on an accelerator, fp32 on the
    CPU. fp16 on the CPU becomes fp32 (one log line)."""
    spec = str(spec)
    if spec == "auto":
        if device.type == "cpu":
            return torch.float32
        if checkpoint in DTYPES:
            return DTYPES[checkpoint]
        return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise PrunebenchError(f"model.dtype={spec!r} must be one of float32, float16, bfloat16, auto")
    dtype = DTYPES[spec]
    if dtype == torch.float16 and device.type == "cpu":
        log.info("model.dtype=float16 on the CPU: upcasting to float32 (CPU fp16 kernels are slow or missing)")
        return torch.float32
    return dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def sync(device: torch.device | None) -> None:
    """Wait for queued kernels, so wall-clock timings measure the work (CUDA and MPS run async)."""
    if device is None:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last reset, MiB (CUDA: allocated by tensors, reserved by the
    caching allocator); {} on the CPU, where peak RSS is the measure."""
    if device.type == "cuda":
        return {
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    if device.type == "mps":
        return {"allocated_mb": round(torch.mps.driver_allocated_memory() / 2**20, 1)}
    return {}


def free_bytes(device: torch.device) -> int:
    """Free memory where the model would live: the device's, or the host's for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    import psutil

    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------------------------
# Moving models


def compute_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the offload device, else the input embeddings' device."""
    offload = getattr(model, "prunebench_offload", None)
    if offload is not None:
        return offload
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def offloaded(model: torch.nn.Module) -> bool:
    return getattr(model, "prunebench_offload", None) is not None


@contextlib.contextmanager
def visit(model: torch.nn.Module, i: int, block: torch.nn.Module, write: bool = False):
    """Block i of `model` ready to compute on its compute device for the body: as it is (placement=
    device), moved from CPU memory and back (offload), or read from disk and freed again (stream;
    write=True: the edited block is written to the run's model folder first). Every layer-wise walk
    (pruning, statistics, perplexity, measuring) goes through here."""
    from prunebench.models.stream import streamed

    if (stream := streamed(model)) is not None:
        with stream.visit(i, block, compute_device(model), write=write):
            yield block
    else:
        with on_device(block, compute_device(model) if offloaded(model) else None):
            yield block


@contextlib.contextmanager
def ends(model: torch.nn.Module):
    """The weights outside the blocks (embeddings, final norm, head) ready on the compute device for the
    body: already there, except on a streamed model, which reads them for the body only."""
    from prunebench.models.stream import streamed

    if (stream := streamed(model)) is None:
        yield
        return
    with stream.ends(compute_device(model)):
        yield


@contextlib.contextmanager
def resident(model: torch.nn.Module, i: int, block: torch.nn.Module):
    """Block i's weights readable where they are for the body (a streamed model's block is read from disk
    to CPU memory and freed after; otherwise nothing moves)."""
    from prunebench.models.stream import streamed

    if (stream := streamed(model)) is None:
        yield block
        return
    with stream.visit(i, block, torch.device("cpu")):
        yield block


@contextlib.contextmanager
def on_device(block: torch.nn.Module, device: torch.device | None):
    """Offload: move one block to the compute device for the body, then back to CPU memory."""
    if device is None:
        yield block
        return
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


# ---------------------------------------------------------------------------------------------
# Stages: synchronised timings, one-line out-of-memory errors

ADVICE = {
    "load": "placement=offload or model.dtype=float16",
    "baseline": "a smaller eval batch_size or seqlen, or placement=offload",
    "calibration_data": "calib.nsamples or calib.seqlen",
    "prune": "calib.batch_size, calib.nsamples, or placement=offload",
    "recover": "recovery.batch_size or recovery.seqlen",
    "eval": "a smaller eval batch_size or seqlen",
}


@contextlib.contextmanager
def stage(timings: dict, name: str, device: torch.device | None = None):
    """Time a pipeline stage with device synchronisation; a device out-of-memory error becomes one
    line naming the stage and the knob to change."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    except torch.OutOfMemoryError:
        raise PrunebenchError(
            f"out of memory on {device} during {name}; try {ADVICE.get(name, 'placement=offload')}"
        ) from None
    sync(device)
    timings[name] = round(time.perf_counter() - start, 3)
