"""Benchmark: WikiText-2 perplexity throughput (tokens/s) against a bare loop of model forwards
over the same windows, on SmolLM2-135M (dequantized Q4_1).

    python scripts/bench_ppl.py --windows 16 --seqlen 512

Goal (issue 2): evaluator throughput ≥ 0.95 × the bare loop.
"""

from __future__ import annotations

import torch
from benchlib import load_model, measure, parser, summary, table

from prunebench.evals.perplexity import Perplexity


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok, _ = load_model(device=args.device)
    ev = Perplexity(seqlen=args.seqlen, max_windows=args.windows)
    windows = ev.windows(model, tok)
    tokens = windows.numel()
    with torch.no_grad():
        model(input_ids=windows[:1].to(args.device), use_cache=False)  # warm-up

    def bare():
        with torch.no_grad():
            for w in windows.split(1):
                model(input_ids=w.to(args.device), use_cache=False)  # the evaluator also moves each batch

    best = {"bare": float("inf"), "evaluator": float("inf")}
    ppl = None
    for _ in range(args.repeats):  # interleaved, best of N: robust to a busy machine
        with measure(model, memory=False) as m:
            bare()
        best["bare"] = min(best["bare"], m.seconds)
        with measure(model, memory=False) as m:
            ppl = ev(model, tok)["ppl"]
        best["evaluator"] = min(best["evaluator"], m.seconds)
    rate = {k: tokens / v for k, v in best.items()}
    table([(k, f"{best[k]:.2f}", f"{rate[k]:.1f}") for k in best], ["loop", "best s", "tokens/s"], "lrr")
    ratio = rate["evaluator"] / rate["bare"]
    summary(
        f"{args.windows} windows x {args.seqlen}, ppl {ppl:.3f}; evaluator/bare throughput {ratio:.3f}"
        f" (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
