"""Benchmark: WikiText-2 perplexity throughput (tokens/s) against a bare loop of model forwards
over the same windows, on SmolLM2-135M (dequantized Q4_1).

    python scripts/bench_ppl.py --windows 16 --seqlen 512

Goal (issue 2): evaluator throughput ≥ 0.95 × the bare loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from prunebench import models
from prunebench.config import compose as compose_cfg
from prunebench.evals.perplexity import Perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    cfg = compose_cfg()
    model, tok = models.load(cfg.model, cfg.paths.cache_dir)
    ev = Perplexity(seqlen=args.seqlen, max_windows=args.windows)
    windows = ev.windows(model, tok)
    tokens = windows.numel()
    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)  # warm-up

    def bare():
        with torch.no_grad():
            for w in windows.split(1):
                model(input_ids=w, use_cache=False)

    best = {"bare": float("inf"), "evaluator": float("inf")}
    ppl = None
    for _ in range(args.repeats):  # interleaved, best of N: robust to a busy machine
        t = time.perf_counter()
        bare()
        best["bare"] = min(best["bare"], time.perf_counter() - t)
        t = time.perf_counter()
        ppl = ev(model, tok)["ppl"]
        best["evaluator"] = min(best["evaluator"], time.perf_counter() - t)
    rate = {k: tokens / v for k, v in best.items()}
    for k in best:
        print(f"{k:<10} {best[k]:8.2f} s  {rate[k]:8.1f} tokens/s")
    ratio = rate["evaluator"] / rate["bare"]
    print(
        f"summary: {args.windows} windows x {args.seqlen}, ppl {ppl:.3f}; evaluator/bare throughput {ratio:.3f}"
        f" (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
