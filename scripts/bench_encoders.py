"""Benchmark: encoding throughput (sentences/s) and zero-shot STS of each embedded encoder with
12/6/2 layers kept (top strategy, no recovery): the speed-for-quality curve the SBERT
layer-pruning papers did not report.

    python scripts/bench_encoders.py --models me5-small mpnet-base minilm-l6 --layers 12 6 2

Throughput: the STS-B (English) or STS-B Marathi test sentences, encoded in batches of 64 after
one warm-up batch, median of `--repeats`. STS: Spearman ×100 on the whole test set. me5-small
numbers are on dequantized 4-bit weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench import models
from prunebench.config import compose as compose_cfg
from prunebench.encoders import embed
from prunebench.evals.sts import sts_scores
from prunebench.labelled import sts
from prunebench.pruners.layer_drop import LayerDrop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["me5-small", "mpnet-base", "minilm-l6"])
    ap.add_argument("--layers", nargs="+", type=int, default=[12, 6, 2])
    ap.add_argument("--sentences", type=int, default=512, help="sentences timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    print("| model | set | layers | params (M) | sentences/s | speed-up | STS Spearman |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        cfg = compose_cfg(f"model={name}")
        test_set = "stsb_mr" if name == "me5-small" else "stsb_en"
        pairs = sts(test_set, "test")
        timed = (pairs.first + pairs.second)[: args.sentences]
        base = None
        for layers in args.layers:
            if layers > cfg.model.num_layers:
                continue
            model, tok = models.load(cfg.model, cfg.paths.cache_dir)
            LayerDrop(keep="top", layers=layers)(model)
            kw = dict(pooling=cfg.model.pooling, prompt=cfg.model.prompt, batch_size=64, max_length=128)
            embed(model, tok, timed[:64], **kw)  # warm-up
            rates = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                embed(model, tok, timed, **kw)
                rates.append(len(timed) / (time.perf_counter() - t))
            rate = statistics.median(rates)
            base = base or rate
            e1, e2 = embed(model, tok, pairs.first, **kw), embed(model, tok, pairs.second, **kw)
            score = sts_scores(e1, e2, pairs.labels)["spearman"]
            params = models.count_params(model)[0] / 1e6
            print(f"| {name} | {test_set} | {layers} | {params:.1f} | {rate:.1f} | {rate / base:.2f} | {score:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
