"""LoRA recovery (recovery=lora, masked merge) vs full fine-tuning (recovery=lm_finetune) at the same token
budget, after the same pruning: wall and CPU seconds of the whole recovery call, and its peak memory.

    .venv/bin/python scripts/bench_lora.py                          # SmolLM2-135M, wanda 50%, 4096 tokens x 256
    .venv/bin/python scripts/bench_lora.py --device cuda --tokens 65536

Each mode runs in its own process (the same seeded load and pruning), so peak RSS and peak GPU memory belong
to that mode alone. CPU seconds (process_time, all threads) are printed beside wall seconds, because wall time
on a machine shared with other jobs says little on its own. LoRA runs without held-out losses
(recovery.val_windows=0), so both modes time training (+ the merge) only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import benchlib


def measure(mode: str, a) -> dict:
    from prunebench import memory, placement
    from prunebench.config import compose, instantiate
    from prunebench.data import calibration_windows
    from prunebench.models import load

    dev = a.device
    overrides = [f"model={a.model}", f"pruner={a.pruner}", f"pruner.sparsity={a.sparsity}", f"recovery={mode}"]
    overrides += [f"recovery.tokens={a.tokens}", f"recovery.seqlen={a.seqlen}", f"recovery.batch_size={a.batch}"]
    if mode == "lora":
        overrides += ["recovery.val_windows=0"]
    cfg = compose(*overrides)
    dtype = placement.resolve_dtype(cfg.model.dtype, dev)
    model, tok = load(cfg.model, cfg.paths.cache_dir, seed=cfg.seed, plan=memory.Plan(dev, dtype, "device"))
    pruner = instantiate(cfg.pruner)
    calib = None
    if pruner.needs_calibration:
        calib = calibration_windows(tok, cfg.calib.source, a.calib, a.seqlen, cfg.seed, cfg.calib.batch_size)
    pruner(model, calib)
    recovery = instantiate(cfg.recovery)
    recovery.tokenizer = tok
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu0 = time.process_time()
    with benchlib.measure(dev) as m:
        out = recovery(model, None, cfg)
    cpu = time.process_time() - cpu0
    if mode == "lora":
        trainable = out["trainable_params"]
    zeros = sum(int((w == 0).sum()) for n, w in model.named_parameters() if "layers." in n and w.dim() == 2)
    total = sum(w.numel() for n, w in model.named_parameters() if "layers." in n and w.dim() == 2)
    return {
        "mode": mode,
        "steps": out["steps"],
        "tokens": out["tokens"],
        "wall_s": m.seconds,
        "cpu_s": cpu,
        "train_s": out["seconds"],
        "trainable": trainable,
        "rss_base_mb": m.rss_base_mb,
        "rss_growth_mb": m.rss_growth_mb,
        "rss_peak_mb": m.rss_peak_mb,
        "cuda_mb": m.cuda_cells(),
        "loss": [out["loss_first"], out["loss_last"]],
        "sparsity": zeros / total,
    }


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of seqlen tokens for the pruner")
    ap.add_argument("--mode", choices=["lm_finetune", "lora"], help=argparse.SUPPRESS)  # internal: one mode per process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(measure(a.mode, a)))
        return
    rows = []
    for mode in ("lm_finetune", "lora"):
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
    print(
        f"{a.model}, {a.pruner} {a.sparsity:g}, {rows[0]['tokens']} tokens ({rows[0]['steps']} steps of"
        f" {a.batch} x {a.seqlen}), {a.device}\n"
    )
    columns = ["recovery", "trainable params", "wall s", "CPU s", "CPU s/step", "RSS at start MB", "peak RSS MB"]
    columns += ["peak growth MB", *benchlib.cuda_columns(a.device), "train loss first -> last", "sparsity after"]
    benchlib.table(
        (
            [
                r["mode"],
                f"{r['trainable']:,}",
                f"{r['wall_s']:.1f}",
                f"{r['cpu_s']:.1f}",
                f"{r['cpu_s'] / r['steps']:.2f}",
            ]
            + [f"{r['rss_base_mb']:.0f}", f"{r['rss_peak_mb']:.0f}", f"{r['rss_growth_mb']:.0f}", *r["cuda_mb"]]
            + [f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}", f"{r['sparsity']:.4f}"]
            for r in rows
        ),
        columns,
        "l" + "r" * (7 + len(benchlib.cuda_columns(a.device))) + "lr",
    )
    ft, lo = rows
    benchlib.summary(
        f"LoRA recovery {lo['cpu_s'] / ft['cpu_s']:.2f}x the CPU time of lm_finetune"
        f" (wall {lo['wall_s'] / ft['wall_s']:.2f}x),"
        f" peak memory growth {lo['rss_growth_mb']:.0f} vs {ft['rss_growth_mb']:.0f} MB,"
        f" {lo['trainable'] / ft['trainable']:.2%} of the parameters trained"
    )


if __name__ == "__main__":
    main()
