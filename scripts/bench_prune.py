"""Benchmark: time and peak memory of Wanda, SparseGPT and GBLM on SmolLM2-135M (dequantized Q4_1)
with the same calibration (C4 sample, seed 0), against the layer-wise bound; then the cost of a
9-point α × sparsity GBLM sweep, sequential and one-shot.

    python scripts/bench_prune.py --nsamples 32 --seqlen 512

The bound: a layer-wise pass needs two block forwards per calibration token (statistics, then the
pruned block's outputs). It is measured as a pass whose per-block edit only collects.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from prunebench import models
from prunebench.calibration import Layerwise
from prunebench.config import compose
from prunebench.data import calibration_windows
from prunebench.pruners.gblm import GBLM
from prunebench.pruners.sparsegpt import SparseGPT
from prunebench.pruners.wanda import Wanda
from prunebench.results import proc_status_mb, reset_peak_rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sweep-nsamples", type=int, default=8)
    ap.add_argument("--skip-methods", action="store_true")
    args = ap.parse_args()

    cfg = compose()
    model, tok = models.load(cfg.model, cfg.paths.cache_dir)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"SmolLM2-135M fp32 {model_mb:.0f} MB; calibration {args.nsamples} x {args.seqlen} C4 windows, seed 0")

    if not args.skip_methods:
        calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0, 4)
        reset_peak_rss()
        base = proc_status_mb("VmRSS")
        t = time.perf_counter()
        Layerwise(model, calib.input_ids, calib.batch_size, desc="bound").run(lambda i, b, collect: collect())
        bound = time.perf_counter() - t
        print(f"bound (2 block forwards per token): {bound:.1f} s, peak +{proc_status_mb('VmHWM') - base:.0f} MB")
        print(
            f"{'method':<10} {'grad pass s':>11} {'forwards s':>10} {'score/update s':>14} {'total s':>8}"
            f" {'x bound':>8} {'peak +MB':>8}"
        )
        with tempfile.TemporaryDirectory() as cache:
            calib.cache_dir = cache  # empty: GBLM computes its gradients here
            for pruner in (Wanda(sparsity=0.5), SparseGPT(sparsity=0.5), GBLM(sparsity=0.5)):
                model.load_state_dict(dense)
                reset_peak_rss()
                base = proc_status_mb("VmRSS")
                t = time.perf_counter()
                stats = pruner(model, calib)
                total = time.perf_counter() - t
                grad = stats.timings["prepare"]
                layerwise = total - grad
                print(
                    f"{pruner.name:<10} {grad:11.1f} {stats.timings['forward']:10.1f}"
                    f" {stats.timings['score_and_mask']:14.2f} {total:8.1f} {layerwise / bound:8.2f}"
                    f" {proc_status_mb('VmHWM') - base:8.0f}"
                )

    # Sweep costs: 3 alphas x 3 sparsities, one gradient pass in all.
    calib = calibration_windows(tok, "c4", args.sweep_nsamples, args.seqlen, 0, 4)
    points = [(a, s) for a in (1.0, 100.0, 10000.0) for s in (0.4, 0.5, 0.6)]
    for sequential in (True, False):
        with tempfile.TemporaryDirectory() as cache:
            calib.cache_dir = cache
            times, grads = [], 0
            for alpha, sparsity in points:
                model.load_state_dict(dense)
                t = time.perf_counter()
                stats = GBLM(sparsity=sparsity, alpha=alpha, sequential=sequential)(model, calib)
                times.append(time.perf_counter() - t)
                grads += not stats.info["gradients_reused"]
        mode = "sequential" if sequential else "one-shot"
        print(
            f"sweep {mode:<10} 9 points ({args.sweep_nsamples} x {args.seqlen}): total {sum(times):.1f} s,"
            f" first {times[0]:.1f} s, later mean {sum(times[1:]) / 8:.1f} s, gradient passes {grads},"
            f" total / first = {sum(times) / times[0]:.2f}"
        )
    print("summary: see rows above; bound = two block forwards per calibration token")


if __name__ == "__main__":
    main()
