"""Benchmark: the mask rules alone on every prunable matrix of SmolLM2-135M (dequantized Q4_1):
magnitude with one threshold per matrix, the per-row rule (Wanda, GBLM) and 2:4, timed over all
210 matrices, best of `--repeat`. The model's weights are dequantized 4-bit values: |W| ties often.

    python scripts/bench_masks.py --repeat 3

To compare two commits, run this script from each checkout in turn (alternating), same machine.
"""

from __future__ import annotations

import time

import torch
from benchlib import device_line, load_model, parser, summary, table

from prunebench.models.blocks import prunable_weights
from prunebench.pruners.masks import make_mask


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model, _, _ = load_model(device=args.device)
    scores = [layer.weight.detach().abs().float() for layer in prunable_weights(model).values()]
    print(f"{len(scores)} matrices, {sum(s.numel() for s in scores) / 1e6:.1f} M weights; {device_line(model)}")
    rules = {"matrix (magnitude)": (None, "matrix"), "row (Wanda, GBLM)": (None, "row"), "2:4": ((2, 4), "row")}
    rows, total = [], 0.0
    for label, (nm, group) in rules.items():
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            removed = sum(int(make_mask(s, 0.5, nm, group).sum()) for s in scores)
            best = min(best, time.perf_counter() - t)
        total += best
        rows.append([label, f"{best:.2f}", f"{removed / sum(s.numel() for s in scores):.4f}"])
    table(rows, ["rule", "best s (all matrices)", "fraction removed"], "lrr")
    summary(f"mask rules over SmolLM2-135M: {total:.2f} s for the three rules, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
