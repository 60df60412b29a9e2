"""Where recovery training runs: one process (`Engine`, the plain loop), several processes with DDP
through Hugging Face `accelerate` (`DDP`: the default when torchrun / accelerate launch / SLURM start
more than one process), or torch's FSDP2 full-shard wrapped per transformer block (`FSDP`, CPU/gloo
and GPU). `train.fit` has one code path and asks its engine for the rest: wrapping, gradient sync,
backward, clipping and the optimiser step, the mean over ranks, agreeing on a stop.
DeepSpeed is not offered: it was never run here, and accelerate's DeepSpeed path would not clip,
would divide the loss by the accumulation twice and would leave ZeRO-3's parameters partitioned.

Every rank reads its own micro-batches of the same seeded window order: at optimiser step s,
micro-batch m, rank r takes windows `order[s·G + (m·N + r)·b : … + b]` with G = b·accum·N the global
batch. Averaging the gradients over ranks (DDP's all-reduce) then equals one process accumulating the
same G windows: the same update up to the order of floating-point additions. With N = 1 the index is
the one-process loop's, and the one-process engine calls no collective and no accelerate, so its
numbers are those of the plain loop.

Precision: a student loaded in bf16/fp16 trains on fp32 master weights (`fp32_masters`), one design
for every engine: its parameters are upcast in place before the optimiser and the engine see them,
so gradients and AdamW's moments are fp32 as well, `recovery.precision` picks the autocast dtype the
matmuls run in (accelerate's `mixed_precision` under DDP; one process scales an fp16 loss with its own
GradScaler), and the trained weights are rounded back to the loaded dtype at the end.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext

import torch
from torch import nn

from prunebench import PrunebenchError

ENGINES = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun and accelerate launch set RANK
    and WORLD_SIZE); a SLURM job of several tasks (hydra/launcher=slurm_gpu, submitit) has them
    exported from SLURM's own variables first (rendezvous on the first node); (0, 1) for a plain process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return world()[0] == 0


def check_engine(engine: str, precision: str = "fp32") -> None:
    """Refuse an engine that is not offered (deepspeed among them) or fp16 under FSDP (no sharded
    loss scaler here: use bf16), before anything loads."""
    if engine not in ENGINES:
        raise PrunebenchError(
            f"recovery.engine={engine!r} is not offered: use recovery.engine=ddp (replicated) or fsdp (sharded)"
        )
    if engine == "fsdp" and precision == "fp16":
        raise PrunebenchError(
            "recovery.engine=fsdp trains in fp32 or bf16 (fp16 needs loss scaling): use recovery.precision=bf16"
        )


def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group (gloo on the CPU, nccl on CUDA: accelerate's choice) when launched with
    more than one process; a no-op otherwise. `device`: where the model computes (a CPU run on a GPU
    machine stays on gloo). Safe to call more than once (accelerate's state is a singleton)."""
    if world()[1] > 1:
        from accelerate import PartialState

        cpu = (device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
        state = PartialState(cpu=cpu)
        if state.num_processes != world()[1]:  # accelerate found no launcher: ranks would train alone
            raise PrunebenchError(
                f"WORLD_SIZE={world()[1]} but accelerate joined {state.num_processes} process(es); launch with"
                " torchrun, accelerate launch or srun"
            )


def barrier() -> None:
    """Wait for every process of the job (no-op alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order (bit-level: the ranks must agree exactly)."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()


def check_same_weights(model: nn.Module) -> str | None:
    """All ranks hold bit-identical weights before training (pruning ran deterministically on each
    rank); refuses otherwise. Returns the digest, or None in one process."""
    if world()[1] == 1:
        return None
    mine = digest(model)
    every: list = [None] * world()[1]
    torch.distributed.all_gather_object(every, mine)
    if len(set(every)) != 1:
        bad = [r for r, d in enumerate(every) if d != every[0]]
        raise PrunebenchError(
            f"ranks {bad} start recovery from weights that differ from rank 0's (digest {every[0][:12]}); pruning"
            " must be deterministic on every rank"
        )
    return mine


HALF = (torch.bfloat16, torch.float16)


def fp32_masters(model: nn.Module) -> dict[str, torch.dtype]:
    """Mixed-precision training with fp32 master weights (Micikevicius et al., "Mixed Precision
    Training", arXiv 1710.03740): every trainable bf16/fp16 parameter of `model` is upcast to fp32 in
    place (`p.data = p.data.float()`: the same Parameter objects, so the optimiser built afterwards,
    the pruning masks and the engine's wrapper all hold the masters). Gradients and AdamW's two
    moments are then fp32 too; autocast (`recovery.precision`) decides the dtype the matmuls compute
    in. An update smaller than half a bf16 ulp of its weight (at least |w|·2⁻⁹), which a bf16 weight updated
    in place would round away, accumulates in the master. Returns {name: loaded dtype} for
    `write_back`; {} (and nothing touched: bit-identical training) for an fp32 model.

    Chosen over a separate fp32 copy beside the half weights: one copy of the weights instead of two,
    no copy-back after every step, and the same code under DDP / FSDP / ZeRO (accelerate expects fp32
    parameters for its mixed precision). Cost: 4 − 2 bytes more per parameter than the half weights
    (counted by the memory plan)."""
    upcast = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in HALF:
            upcast[name] = p.dtype
            p.data = p.data.float()
    return upcast


@torch.no_grad()
def write_back(model: nn.Module, upcast: dict[str, torch.dtype]) -> None:
    """Round the fp32 masters of `fp32_masters` back to their loaded dtype (round to nearest even,
    torch's cast), looked up by name so a re-wrapped model works too."""
    for name, p in model.named_parameters():
        if name in upcast:
            p.data = p.data.to(upcast[name])


def _block_class_names(model: nn.Module) -> list[str]:
    """The transformer-block classes FSDP wraps one by one (the `_no_split_modules` transformers declares)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise PrunebenchError(f"recovery.engine=fsdp: {type(model).__name__} declares no transformer-block class")
    return names


class Engine:
    """One process: the plain loop (no wrapper, no collective), and the batch geometry every engine
    shares. `name` is the configured engine, recorded in metrics.json (one process has nothing to
    shard or average, so ddp and fsdp both run here). fp16 autocast scales the loss with a GradScaler."""

    def __init__(self, name: str = "ddp", precision: str = "fp32", micro_batch: int = 1, grad_accum: int = 1,
                 device: torch.device | None = None):  # fmt: skip
        self.engine, self.precision, self.device = name, precision, device or torch.device("cpu")
        self.rank, self.world = 0, 1
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def index(self, step: int, micro: int) -> int:
        """First window (in the seeded order) of this rank's micro-batch `micro` at optimiser step `step`."""
        return step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch

    def prepare(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The student (never the teacher: it is replicated, never trained) and its optimiser, wrapped
        for this engine. The LR scheduler stays ours: accelerate's would step once per process."""
        return model, opt

    def rank_streams(self, seed: int) -> None:
        """Give each rank its own RNG stream (dropout) from here on: seed + 1 + rank. One process
        keeps the stream it has, so its numbers are those of the plain loop."""
        if self.world > 1:
            torch.manual_seed(seed + 1 + self.rank)

    def no_sync(self, model: nn.Module, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, clip: float | None) -> None:
        """Clip the gradient norm of the optimiser's parameters to `clip` (unscaled first under fp16),
        then step the optimiser."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (the logged loss is the global batch's)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def agree(self, stop: bool) -> bool:
        """Whether any rank asks to stop: every rank then stops after the same step."""
        return self.mean(float(stop)) > 0 if self.world > 1 else stop

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module that trains (the caller's model; FSDP's sharded copy of it)."""
        return model

    def finish(self, model: nn.Module) -> None:
        """After training: the trained weights in the caller's `model` (FSDP gathers them)."""

    def describe(self) -> dict:
        out = {
            "engine": self.engine,
            "world_size": self.world,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
        }
        if getattr(self, "params_per_rank", None):  # FSDP: the parameters rank 0 held while training
            out["params_per_rank"] = self.params_per_rank
        return out


class DDP(Engine):
    """Data-parallel on an accelerate Accelerator: every rank holds the whole student, gradients are
    all-reduced on the last micro-batch of a step; accelerate's `mixed_precision` autocasts and scales
    (the parameters are fp32 masters, see `fp32_masters`)."""

    def __init__(self, name: str, precision: str, micro_batch: int, grad_accum: int, device: torch.device):
        init_distributed(device)
        super().__init__(name, precision, micro_batch, grad_accum, device)
        self.rank, self.world = world()
        from accelerate import Accelerator

        mixed = {"fp32": "no"}.get(precision, precision)
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
        self.scaler = getattr(self.accelerator, "scaler", None)  # fp16: checkpointed, so a resume keeps the scale

    def prepare(self, model, opt):
        return self.accelerator.prepare(model, opt)

    def no_sync(self, model, last_micro):
        return nullcontext() if last_micro else self.accelerator.no_sync(model)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def step(self, model, opt, clip):
        if clip:
            self.accelerator.clip_grad_norm_(model.parameters(), clip)
        opt.step()  # accelerate's optimiser wrapper steps through its scaler

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)


class FSDP(Engine):
    """torch's FSDP2 (`fully_shard` on each transformer block, then the root, full-shard over every
    rank) called directly: accelerate 1.16 applies its FSDP plugin only on accelerators (on the CPU it
    silently runs DDP), while torch's FSDP2 also shards over gloo, so the one code path is tested on the
    CPU (tests/test_distributed.py) and on GPUs (tests/test_gpu.py). Gradients are reduce-scattered on
    every micro-batch into the sharded gradients (no unsharded accumulation)."""

    def __init__(self, name: str, precision: str, micro_batch: int, grad_accum: int, device: torch.device):
        init_distributed(device)
        super().__init__(name, precision, micro_batch, grad_accum, device)
        self.rank, self.world = world()
        self._twin, self._home = None, None

    def prepare(self, model, opt):
        """FSDP2 full-shard of a copy of `model` (the twin): the caller's model is never sharded in
        place, so after `finish` it is again an ordinary module that rank 0 evaluates and saves alone.
        The copy is made in CPU memory and `model`'s own weights are released while the shards
        train (a rank holds its shard, the teacher and the block being computed); the optimiser is
        pointed at the twin's sharded parameters (by name), its state still empty."""
        import copy

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        blocks = set(_block_class_names(model))
        self._home = next(model.parameters()).device
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to("cpu")
            twin = copy.deepcopy(model)
            for p in model.parameters():  # placeholders until finish() writes the trained weights back
                p.data = torch.empty(0, dtype=p.dtype, device=self._home)
        mesh = init_device_mesh(self.device.type, (self.world,))
        for module in twin.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
        fully_shard(twin, mesh=mesh, reshard_after_forward=True)
        name_of = {id(p): n for n, p in model.named_parameters()}
        sharded = dict(twin.named_parameters())
        for group in opt.param_groups:
            group["params"] = [sharded[name_of[id(p)]] for p in group["params"]]
        self._twin = twin
        self.params_per_rank = sum(p.to_local().numel() for p in twin.parameters())  # this rank's shard
        return twin, opt

    def step(self, model, opt, clip):
        if clip:  # torch's clip works on the sharded (DTensor) gradients: the norm is global
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    def finish(self, model):
        """Gather the full trained weights on every rank into the caller's `model` (back on its device)."""
        if self._twin is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self._twin, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.data = full[name].to(self._home)
        self._twin = None


def make_engine(engine: str, precision: str, micro_batch: int, grad_accum: int, device: torch.device) -> Engine:
    """The engine of a training run: the one-process Engine when there is one process (ddp or fsdp:
    one rank has nothing to shard or average), else DDP or FSDP over every process."""
    check_engine(engine, precision)
    if world()[1] == 1:
        return Engine(engine, precision, micro_batch, grad_accum, device)
    return {"ddp": DDP, "fsdp": FSDP}[engine](engine, precision, micro_batch, grad_accum, device)
