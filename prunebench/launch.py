"""`prunebench run --nproc N ...`: torchrun's one-node launch (`torchrun --standalone --nproc_per_node N
-m prunebench run ...`) from inside prunebench, so that a multi-process job reads like a one-process one:

- the config is checked once, in the launching process, before any worker starts, with WORLD_SIZE=N so
  that the rules that depend on the number of processes (recovery.global_batch) apply: a refusal is
  one `error:` line and exit 2, never one line per rank;
- a worker that fails is reported in one line naming its rank and how it ended (a signal: SIGKILL is
  most often the kernel's out-of-memory killer), the exit status is the worker's (128 + signal when it
  was killed), and torchrun's `ChildFailedError` traceback and its log lines never show.

Plain torchrun, accelerate launch and SLURM keep working: prunebench reads RANK/WORLD_SIZE either way.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from prunebench import PrunebenchError

MAX_NPROC = 1024


def split_nproc(args: list[str]) -> tuple[int | None, list[str]]:
    """(N, the other arguments) from `--nproc N` / `--nproc=N` anywhere among `run`'s arguments."""
    rest, nproc, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--nproc" or arg.startswith("--nproc="):
            if arg == "--nproc":
                if i + 1 >= len(args) or "=" in args[i + 1] or args[i + 1].startswith("-"):
                    raise PrunebenchError("--nproc needs a number of processes, e.g. --nproc 2")
                value, i = args[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            if not value.isdigit() or not 1 <= int(value) <= MAX_NPROC:
                raise PrunebenchError(f"--nproc {value} must be a whole number of processes from 1 to {MAX_NPROC}")
            nproc = int(value)
        else:
            rest.append(arg)
            i += 1
    return nproc, rest


def under_launcher() -> bool:
    """Already one process of a multi-process job (torchrun, accelerate launch, SLURM tasks)."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launch(nproc: int, args: list[str]) -> int:
    """Run `prunebench run ARGS` in `nproc` worker processes on this node (torch's elastic agent, one
    attempt, a fresh rendezvous on a free port); the exit status of the job."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's own warnings and errors ("Sending process N closing signal", "failed (exitcode: 2)"):
    # what they say is reported below in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun's default on CPU: the cores split between the workers instead of each taking all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "prunebench", "run", *args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode >= 0:  # the worker said why itself (rank 0's error line, a traceback)
            return failure.exitcode or 1
        name = failure.signal_name()
        why = " (most often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        print(
            f"error: process {rank} of {nproc} was killed by {name}{why}; the others were stopped; rerun the"
            " same command (recovery resumes from its last checkpoint, if one was saved)",
            file=sys.stderr,
        )
        return 128 - failure.exitcode
    except SignalException as err:  # Ctrl-C or SIGTERM to the launcher: the workers said what they saved
        return 128 + int(err.sigval)
    return 0


def lost_peer(err: BaseException) -> bool:
    """A collective that failed because another process of the job ended (gloo: connection reset or
    closed by peer; NCCL: DistBackendError), as opposed to a bug in this process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or "by peer" in text or "Connection closed" in text
