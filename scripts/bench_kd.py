"""Teacher overhead of knowledge distillation: one KD training step (teacher forward + student
forward/backward + AdamW, forward-KL loss) vs one plain causal-LM step, same model and batch.

    .venv/bin/python scripts/bench_kd.py                     # SmolLM2-135M, batch 1 x 256, CPU
    .venv/bin/python scripts/bench_kd.py --device cuda --seqlen 1024

Each mode runs in its own process, so peak RSS (and peak GPU memory) belong to that mode alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time


def measure(mode: str, model_name: str, device: str, batch: int, seqlen: int, steps: int) -> dict:
    import torch

    from prunebench import memory, models, placement
    from prunebench.config import compose
    from prunebench.recovery.distill import logit_loss
    from prunebench.recovery.train import text_windows
    from prunebench.results import peak_rss_mb

    dev = torch.device(device)
    cfg = compose(f"model={model_name}")
    dtype = placement.resolve_dtype(cfg.model.dtype, dev)
    model, tok = models.load(cfg.model, cfg.paths.cache_dir, plan=memory.Plan(dev, dtype, "device"))
    teacher = copy.deepcopy(model).requires_grad_(False) if mode == "kd" else None
    windows = text_windows(tok, "c4", seqlen)[: batch * (steps + 1)].view(steps + 1, batch, seqlen)
    loaded_rss = peak_rss_mb()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times, cpu, teacher_share = [], [], []
    for i, x in enumerate(windows):  # the first step (AdamW state allocation, warm-up) is not timed
        x = x.to(dev)
        placement.sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "kd":  # what distill_step does, with the teacher's forward timed apart
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits
            placement.sync(dev)
            t_teacher = time.perf_counter() - t0
            loss = logit_loss(model(input_ids=x, use_cache=False).logits, t_logits, "kld")
        else:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        placement.sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            teacher_share.append(t_teacher / times[-1] if mode == "kd" else 0.0)
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    wall = statistics.median(times)
    return {
        "mode": mode,
        "s_per_step": wall,
        "cpu_s_per_step": statistics.median(cpu),
        "teacher_share": statistics.median(teacher_share),
        "tokens_per_s": batch * seqlen / wall,
        "rss_after_load_mb": loaded_rss,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": gpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    ap.add_argument("--mode", choices=["clm", "kd"], help=argparse.SUPPRESS)  # internal: one mode per process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(measure(a.mode, a.model, a.device, a.batch, a.seqlen, a.steps)))
        return
    rows = {}
    for mode in ("clm", "kd"):
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{a.model}, batch {a.batch} x {a.seqlen} tokens, {a.device}, median of {a.steps} steps\n")
    print(
        "| step | s/step (wall) | CPU s/step | teacher fwd share | tokens/s | RSS after load (MB) | peak RSS (MB) |"
        " peak GPU (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        cells = [r["mode"], f"{r['s_per_step']:.3f}", f"{r['cpu_s_per_step']:.3f}", f"{r['teacher_share']:.0%}"]
        cells += [f"{r['tokens_per_s']:.0f}", f"{r['rss_after_load_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", gpu]
        print("| " + " | ".join(cells) + " |")
    c, k = rows["clm"], rows["kd"]
    print(
        f"\nKD step = {k['s_per_step'] / c['s_per_step']:.2f}x the CLM step time (wall; CPU time"
        f" {k['cpu_s_per_step'] / c['cpu_s_per_step']:.2f}x; from the teacher's share of the KD step alone"
        f" {1 / (1 - k['teacher_share']):.2f}x), peak RSS {k['peak_rss_mb'] - c['peak_rss_mb']:+.0f} MB"
        " (teacher copy + its forward)"
    )


if __name__ == "__main__":
    main()
