"""Benchmark: SparseGPT's OBS solve alone (`sparsegpt.prune`) for the seven linears of one
SmolLM2-135M block (q, k, v, o, gate, up, down shapes; random weights, Hessians from 1024 random
tokens), 50% unstructured and 2:4, best of 3, one thread: the part of SparseGPT that is not a
block forward.

    python scripts/bench_sparsegpt.py

To compare two commits, run this script from each checkout in turn (alternating), same machine.
"""

from __future__ import annotations

import time

import torch
from benchlib import summary

from prunebench.pruners.sparsegpt import prune

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mats = []
    for rows, cols in SHAPES:
        x = torch.randn(1024, cols)
        mats.append((torch.randn(rows, cols), 2 * x.T @ x / 4))
    results = []
    for nm in (None, (2, 4)):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for w, h in mats:
                prune(w, h, 0.5, nm)
            best = min(best, time.perf_counter() - t)
        results.append(f"{'unstructured' if nm is None else '2:4'} {best:.2f} s")
    summary("SparseGPT solve, one SmolLM2 block (7 linears), CPU 1 thread: " + ", ".join(results))


if __name__ == "__main__":
    main()
