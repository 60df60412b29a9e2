"""Benchmark: Wanda on SmolLM2-135M (dequantized Q4_1): wall time split into block forwards
(calibration) and scoring/masking, and peak RSS against the fp32 model size.

    python scripts/bench_wanda.py --nsamples 128 --seqlen 512

Goal (issue 2): peak RSS while pruning, above what the warmed-up runtime holds without the model,
≤ 1.5 × model bytes + one block's activations (nsamples × seqlen × hidden × 4 bytes). The runtime
share is measured as RSS after touching every weight and one tiny forward (which maps torch's
kernels) minus the model bytes: safetensors weights are mapped lazily, so RSS right after loading
holds only part of the model.
"""

from __future__ import annotations

import argparse
import time

import psutil
import torch

from prunebench import models
from prunebench.config import compose as compose_cfg
from prunebench.data import calibration_windows
from prunebench.pruners.wanda import Wanda
from prunebench.results import proc_status_mb, reset_peak_rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    rss_start = psutil.Process().memory_info().rss / 2**20
    cfg = compose_cfg()
    model, tok = models.load(cfg.model, cfg.paths.cache_dir)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0, args.batch_size)
    act_mb = args.nsamples * args.seqlen * model.config.hidden_size * 4 / 2**20

    load_peak = proc_status_mb("VmHWM")
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # fault every weight page in
        model(input_ids=calib.input_ids[:1, :8], use_cache=False)  # map the kernels once
    runtime = proc_status_mb("VmRSS") - model_mb
    reset_peak_rss()
    rss_before = proc_status_mb("VmRSS")
    t = time.perf_counter()
    stats = Wanda(sparsity=0.5)(model, calib)
    total = time.perf_counter() - t
    peak = proc_status_mb("VmHWM")
    budget = 1.5 * model_mb + act_mb
    rows = [
        ("calibration windows", f"{args.nsamples} x {args.seqlen} ({calib.method})"),
        ("block forwards (s)", f"{stats.timings['forward']:.1f}"),
        ("score + mask (s)", f"{stats.timings['score_and_mask']:.2f}"),
        ("total (s)", f"{total:.1f}"),
        ("achieved sparsity", f"{stats.achieved_sparsity:.4f}"),
        ("fp32 model (MB)", f"{model_mb:.0f}"),
        ("one block's activations (MB)", f"{act_mb:.0f}"),
        ("RSS before loading the model (MB)", f"{rss_start:.0f}"),
        ("peak RSS while loading (MB)", f"{load_peak:.0f}"),
        ("RSS before pruning, weights resident (MB)", f"{rss_before:.0f}"),
        ("runtime without the model (MB)", f"{runtime:.0f}"),
        ("peak RSS while pruning (MB)", f"{peak:.0f}"),
        ("peak minus runtime (MB)", f"{peak - runtime:.0f}"),
        ("goal: 1.5 x model + activations (MB)", f"{budget:.0f}"),
    ]
    for k, v in rows:
        print(f"{k:<40} {v}")
    ok = peak - runtime <= budget
    print(
        f"summary: wanda {args.nsamples}x{args.seqlen} forwards {stats.timings['forward']:.1f}s"
        f" scoring {stats.timings['score_and_mask']:.2f}s; peak minus runtime {peak - runtime:.0f} MB vs goal"
        f" {budget:.0f} MB: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
