"""Benchmark: encoding throughput (sentences/s) and zero-shot STS of each embedded encoder with
12/6/2 layers kept (top strategy, no recovery): the speed-for-quality curve the SBERT
layer-pruning papers did not report.

    python scripts/bench_encoders.py --models me5-small mpnet-base minilm-l6 --layers 12 6 2

Throughput: the STS-B (English) or STS-B Marathi test sentences, encoded in batches of 64 after
one warm-up batch, median of `--repeats`. STS: Spearman ×100 on the whole test set. me5-small
numbers are on dequantized 4-bit weights.
"""

from __future__ import annotations

import statistics

import torch
from benchlib import load_model, measure, parser, table

from prunebench.config import compose
from prunebench.data.labelled import sts
from prunebench.evals.sts import sts_scores
from prunebench.models import count_params
from prunebench.models.encoders import embed
from prunebench.pruners.layer_drop import LayerDrop


def on_device(tok, device: torch.device):
    """`tok` whose encodings land on `device` (embed() leaves them where the tokenizer makes them: the CPU)."""
    return tok if device.type == "cpu" else lambda *a, **kw: tok(*a, **kw).to(device)


def rows(args):
    """One table row per (model, layers kept): throughput, speed-up over the first depth, STS."""
    for name in args.models:
        test_set = "stsb_mr" if name == "me5-small" else "stsb_en"
        pairs = sts(test_set, "test")
        timed = (pairs.first + pairs.second)[: args.sentences]
        base, depth = None, compose(f"model={name}").model.num_layers
        for layers in args.layers:
            if layers > depth:
                continue
            model, tok, cfg = load_model(f"model={name}", device=args.device)
            tok = on_device(tok, args.device)
            LayerDrop(keep="top", layers=layers)(model)
            kw = dict(pooling=cfg.model.pooling, prompt=cfg.model.prompt, batch_size=64, max_length=128)
            embed(model, tok, timed[:64], **kw)  # warm-up
            rates = []
            for _ in range(args.repeats):
                with measure(model, memory=False) as m:
                    embed(model, tok, timed, **kw)
                rates.append(len(timed) / m.seconds)
            rate = statistics.median(rates)
            base = base or rate
            e1, e2 = embed(model, tok, pairs.first, **kw).cpu(), embed(model, tok, pairs.second, **kw).cpu()
            score = sts_scores(e1, e2, pairs.labels)["spearman"]
            params = count_params(model)[0] / 1e6
            yield name, test_set, layers, f"{params:.1f}", f"{rate:.1f}", f"{rate / base:.2f}", f"{score:.2f}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["me5-small", "mpnet-base", "minilm-l6"])
    ap.add_argument("--layers", nargs="+", type=int, default=[12, 6, 2])
    ap.add_argument("--sentences", type=int, default=512, help="sentences timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    columns = ["model", "set", "layers", "params (M)", "sentences/s", "speed-up", "STS Spearman"]
    table(rows(args), columns, "llrrrrr")


if __name__ == "__main__":
    main()
