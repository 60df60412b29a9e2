"""Recovery training on several processes through Hugging Face `accelerate`: DDP (the default when
torchrun / accelerate launch / SLURM start more than one process), FSDP2 full-shard wrapped per
transformer block, or DeepSpeed ZeRO (only when `deepspeed` is installed).

One process with `recovery.engine=ddp` never builds an Accelerator: `train.fit` runs its own loop
exactly as before, so the single-process numbers do not change. With N processes every rank reads
its own micro-batches of the same seeded window order: at optimiser step s, micro-batch m, rank r
takes windows `order[s·G + (m·N + r)·b : … + b]` with G = b·accum·N the global batch. Averaging the
gradients over ranks (DDP's all-reduce) then equals one process accumulating the same G windows:
the same update up to the order of floating-point additions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import nullcontext

import torch
from torch import nn

from prunebench import PrunebenchError

ENGINES = ("ddp", "fsdp", "deepspeed")


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
    """Refuse an unknown engine, or deepspeed without the package, before anything loads."""
    if engine not in ENGINES:
        raise PrunebenchError(f"recovery.engine={engine!r} must be one of {', '.join(ENGINES)}")
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise PrunebenchError("recovery.engine=deepspeed needs the deepspeed package (pip install deepspeed)")


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


def digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order (bit-level: the ranks must agree exactly)."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
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


def _block_class_names(model: nn.Module) -> list[str]:
    """The transformer-block classes FSDP wraps one by one (the `_no_split_modules` transformers declares)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise PrunebenchError(f"recovery.engine=fsdp: {type(model).__name__} declares no transformer-block class")
    return names


class Engine:
    """An accelerate Accelerator configured for one recovery: engine, mixed precision (autocast with
    fp32 master weights and optimiser state: the weights stay in their loaded dtype, fp32 on the CPU),
    and the batch geometry. `fit` calls prepare / no_sync / backward / clip / mean."""

    def __init__(self, engine: str, precision: str, micro_batch: int, grad_accum: int, device: torch.device):
        check_engine(engine, precision)
        init_distributed(device)
        from accelerate import Accelerator

        self.engine, self.rank, self.world = engine, *world()
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        kw: dict = {"mixed_precision": {"fp32": "no"}.get(precision, precision), "cpu": device.type == "cpu"}
        if engine == "deepspeed":
            from accelerate.utils import DeepSpeedPlugin

            kw["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=grad_accum)
        self._fsdp = engine == "fsdp"
        self.accelerator = Accelerator(**kw) if not self._fsdp else None
        self._kw = kw

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def index(self, step: int, micro: int) -> int:
        """First window (in the seeded order) of this rank's micro-batch `micro` at optimiser step `step`."""
        return step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch

    def prepare(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the student (never the teacher: it is replicated, never trained) and its optimiser.
        The LR scheduler stays ours: accelerate's would step once per process."""
        if self._fsdp:
            from accelerate import Accelerator
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                reshard_after_forward=True,  # FSDP2's FULL_SHARD
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=_block_class_names(model),
                state_dict_type="FULL_STATE_DICT",
            )
            self.accelerator = Accelerator(fsdp_plugin=plugin, **self._kw)
        wrapped, opt = self.accelerator.prepare(model, opt)
        return wrapped, opt

    def no_sync(self, model: nn.Module, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return nullcontext() if last_micro or self.world == 1 else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, model: nn.Module, clip: float) -> None:
        self.accelerator.clip_grad_norm_(model.parameters(), clip)

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (the logged loss is the global batch's)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean"))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def describe(self) -> dict:
        return {
            "engine": self.engine,
            "world_size": self.world,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
        }


def make_engine(engine: str, precision: str, micro_batch: int, grad_accum: int, device: torch.device) -> Engine | None:
    """An Engine when there is more than one process or a sharding engine is asked for; None (the
    plain loop, today's numbers) for DDP in one process."""
    check_engine(engine, precision)
    if engine == "ddp" and world()[1] == 1:
        return None
    return Engine(engine, precision, micro_batch, grad_accum, device)


def describe(engine: Engine | None, micro_batch: int, grad_accum: int) -> dict:
    """What metrics.json records about the engine, also for the plain one-process loop."""
    if engine is not None:
        return engine.describe()
    return {"engine": "ddp", "world_size": 1, "micro_batch": micro_batch, "grad_accum": grad_accum,
            "global_batch": micro_batch * grad_accum}  # fmt: skip
