"""Recovery at scale: tokens/s and peak memory of `recovery=kd` training on 1 and 2 processes
(torchrun, gloo) on the CPU, for a tiny random Llama and for SmolLM2-135M; and the exact GPU
invocation for an 8B teacher -> 4B student on 8 GPUs with FSDP (not run here).

    .venv/bin/python scripts/bench_recovery.py                                 # both models, 1 and 2 processes
    .venv/bin/python scripts/bench_recovery.py --models tiny-llama --steps 8 --seqlen 64

Both runs of a model train the same global batch for the same steps (2 processes x 1 window against
1 process x 2 accumulated windows: the same updates, tests/test_distributed.py), from the same
weights, teacher = an fp32 copy of the model, no pruning and no evaluation. Each process reports its
own training seconds (KD.train's `seconds`: the optimisation loop, first step included, held-out
validation excluded) and its own peak RSS; tokens/s is the job's global tokens over the slowest rank's
seconds. torchrun gives each of its processes one thread (OMP_NUM_THREADS=1); one process runs
twice, with torch's default threads (every core) and with one thread. On a 2-core machine the two
processes share those 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GPU_STEPS = 20  # the GPU invocation's budget: 20 optimiser steps of the paper's 1152 x 4096-token global batch
GPU_COMMAND = (
    "torchrun --standalone --nproc_per_node 8 -m prunebench run experiment=minitron/paper/minitron-8b_to_4b"
    " recovery.engine=fsdp recovery.batch_size=1 recovery.grad_accum=144"  # 1 x 144 x 8 GPUs = 1152 windows a step
    f" recovery.tokens={GPU_STEPS * 1152 * 4096} recovery.log_every=1"
    " eval=[wikitext2] ~eval.lm_eval_mmlu baseline=false"
)


def worker(model_name: str, seqlen: int, steps: int, accum: int) -> dict:
    """One process of the job: load, copy the teacher, run KD for `steps` optimiser steps."""
    import copy

    import torch

    from prunebench import memory, models
    from prunebench.config import compose
    from prunebench.recovery.engine import world
    from prunebench.recovery.kd import KD
    from prunebench.results import peak_rss_mb

    rank, size = world()
    cfg = compose(f"model={model_name}")
    cpu = torch.device("cpu")
    plan = memory.Plan(cpu, torch.float32, "device")
    model, tok = models.load(cfg.model, cfg.paths.cache_dir, seed=cfg.seed, plan=plan)
    teacher = copy.deepcopy(model)
    kd = KD(tokens=steps * seqlen * accum * size, seqlen=seqlen, grad_accum=accum, val_windows=1, log_every=1)
    kd.tokenizer = tok
    out = kd.train(model, teacher)
    return {
        "rank": rank,
        "world_size": size,
        "threads": torch.get_num_threads(),
        "global_batch": out["global_batch"],
        "steps": out["steps"],
        "tokens": out["tokens"],
        "seconds": out["seconds"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "loss_curve": out["loss_curve"],
    }


def job(model_name: str, procs: int, threads: int | None, seqlen: int, steps: int, timeout: int) -> list[dict]:
    """Run the job with `procs` processes of `threads` threads each (None: torch's default; torchrun
    sets 1) on a global batch of 2 windows, and return each rank's report."""
    args = [__file__, "--worker", "--models", model_name, "--seqlen", str(seqlen), "--steps", str(steps)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if procs == 1:
        cmd = [sys.executable, *args, "--accum", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]
        cmd += ["--accum", str(2 // procs)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{model_name} x {procs} processes failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        row["wall_s"] = round(time.perf_counter() - t0, 1)
    return sorted(rows, key=lambda row: row["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-llama,smollm2-135m", help="model configs, comma-separated")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps of a global batch of 2 windows")
    ap.add_argument("--timeout", type=int, default=180, help="seconds allowed for one job")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one process of a job
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.models, a.seqlen, a.steps, a.accum)), flush=True)
        return
    print(f"recovery=kd on the CPU: {a.steps} steps x 2 windows x {a.seqlen} tokens, fp32, {os.cpu_count()} cores\n")
    cols = ["model", "processes", "threads each", "tokens", "train s (slowest rank)", "tokens/s"]
    cols += ["peak RSS per rank (MB)", "job wall s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    summary = []
    for name in a.models.split(","):
        speed = {}
        for procs, threads in ((1, None), (1, 1), (2, None)):
            try:
                rows = job(name, procs, threads, a.seqlen, a.steps, a.timeout)
            except subprocess.TimeoutExpired:
                print(f"| {name} | {procs} | {threads or 'default'} | | not finished in {a.timeout} s | | | |")
                speed[procs, threads] = float("nan")
                continue
            seconds = max(r["seconds"] for r in rows)
            speed[procs, threads] = tps = rows[0]["tokens"] / seconds
            rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
            print(
                f"| {name} | {procs} | {rows[0]['threads']} | {rows[0]['tokens']} | {seconds:.2f} | {tps:.0f}"
                f" | {rss} | {rows[0]['wall_s']} |"
            )
            curves = [r["loss_curve"] for r in rows]
            assert all(c == curves[0] for c in curves), "ranks logged different loss curves"
        two = speed[2, None]
        ratio = f"{two / speed[1, None]:.2f}x ({two / speed[1, 1]:.2f}x against one thread)"
        summary.append(f"{name}: 2 processes / 1 process = {ratio}")
    print("\n" + "; ".join(summary))
    print(
        "\nGPU (not run here, figures still to be measured): Minitron-8B teacher -> the Minitron-4B shape, 8 GPUs,"
        f" FSDP full-shard, bf16 autocast on fp32 masters, {GPU_STEPS} steps of 1152 x 4096 tokens:\n  {GPU_COMMAND}"
    )


if __name__ == "__main__":
    main()
