"""MiniBridgeBERT cost (issue 13): (1) the bridged encoder's prefill latency against the dense one,
beside its parameter and FLOP ratios, after 0..6 of the even blocks are bridged; (2) the time and
peak memory of the teacher's CoLA fine-tune and of one progressive step (bridge fit + one KD epoch
against the previous student + dev scoring), from the step rows the pruner itself records.

    .venv/bin/python scripts/bench_minibridge.py                          # mpnet-base, CPU
    .venv/bin/python scripts/bench_minibridge.py --device cuda --train-limit 1024 --batch 32

Latency: every model is measured alternately, `--rounds` times, the fastest round kept (a load change
on a shared machine hits all of them). Which values the bridges hold does not change the speed, so
they start as the identity here. The step cost uses the embedded table's knobs
(conf/experiment/minibridgebert/embedded/_table.yaml) on `--train-limit` sentences and a teacher
fine-tuned for `--teacher-epochs` in a temporary cache (nothing is reused).
"""

from __future__ import annotations

import copy
import tempfile

import benchlib

from prunebench.config import compose, instantiate
from prunebench.evals.efficiency import Efficiency, flops_per_token
from prunebench.models import count_params
from prunebench.models.bridges import LowRankBridge, replace_block

EXPERIMENT = "experiment=minibridgebert/embedded/mpnet_stepwise"


def latency(dense, args) -> None:
    hidden = dense.config.hidden_size
    models = {0: dense}
    for k in range(1, 7):  # blocks 2, 4, ..., 2k (1-based) bridged, as after step k of the table
        m = copy.deepcopy(models[k - 1])
        bridge = LowRankBridge(hidden, args.rank).to(benchlib.device_of(dense))
        bridge.set_identity()
        replace_block(m, 2 * k - 1, bridge)
        models[k] = m.eval()
    ev = Efficiency(prompt_len=args.seqlen, gen_len=1, repeats=args.repeats, batch_size=args.batch)
    prefill: dict[int, float] = {}
    for _ in range(args.rounds):
        for k, m in models.items():
            prefill[k] = min(prefill.get(k, float("inf")), ev(m)["prefill_ms"])
    params = {k: count_params(m)[0] for k, m in models.items()}
    flops = {k: flops_per_token(m, args.seqlen) for k, m in models.items()}
    rows = []
    for k in models:
        speed, pratio, fratio = prefill[0] / prefill[k], params[0] / params[k], flops[0] / flops[k]
        rows.append([k, f"{params[k] / 1e6:.1f}", f"{pratio:.2f}x", f"{fratio:.2f}x", f"{prefill[k]:.1f}",
                     f"{speed:.2f}x", f"{speed / fratio:.0%}"])  # fmt: skip
    benchlib.table(rows, ["bridges", "params (M)", "param ratio", "FLOP ratio", "prefill ms", "speed-up",
                          "speed-up / FLOP ratio"], "rrrrrrr")  # fmt: skip
    benchlib.summary(f"6 bridges: params {params[0] / params[6]:.2f}x fewer, prefill {prefill[0] / prefill[6]:.2f}x"
                     f" faster (FLOP ratio {flops[0] / flops[6]:.2f}x)")  # fmt: skip


def step_cost(args) -> None:
    with tempfile.TemporaryDirectory() as cache:
        model, tok, _ = benchlib.load_model(EXPERIMENT, device=args.device)
        knobs = [EXPERIMENT, "pruner.blocks=[2]", f"pruner.train_limit={args.train_limit}",
                 f"pruner.dev_limit={args.dev_limit}", f"pruner.epochs_teacher={args.teacher_epochs}",
                 f"pruner.batch_size={args.batch}", f"paths.cache_dir={cache}"]  # fmt: skip
        cfg = compose(*knobs)
        pruner = instantiate(cfg.pruner)
        pruner.tokenizer = tok  # as the pipeline gives it: the pruner reads CoLA text itself
        rows = pruner(model).info["steps"]
    per_epoch = -(-args.train_limit // args.batch)  # optimiser steps in one epoch
    gpu = ["peak_allocated_mb", "peak_reserved_mb"] if args.device.type == "cuda" else []
    table = []
    for r in rows:
        batches = per_epoch * (args.teacher_epochs if r["step"] == 0 else 1)
        table.append([r["name"], r["change"], batches, f"{r['seconds']:.1f}", f"{r['seconds'] / batches:.2f}",
                      f"{r['peak_rss_mb']:.0f}", *(f"{r[k]:.0f}" for k in gpu)])  # fmt: skip
    benchlib.table(table, ["row", "what", "optimiser steps", "seconds (incl. dev scoring)", "s / step",
                           "peak RSS MB", *gpu], "llrrrr" + "r" * len(gpu))  # fmt: skip
    step = rows[-1]
    benchlib.summary(f"one progressive step {step['seconds']:.0f} s, peak RSS {step['peak_rss_mb']:.0f} MB")


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=64, help="tokens per sentence (the table's max_length)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=256)
    ap.add_argument("--dev-limit", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--skip-step", action="store_true", help="latency only")
    args = ap.parse_args()
    print(f"{benchlib.device_line(args.device)}, batch {args.batch} x {args.seqlen}"
          f" tokens, rank {args.rank}")  # fmt: skip
    dense, _, _ = benchlib.load_model(EXPERIMENT, device=args.device)
    latency(dense.eval(), args)
    if not args.skip_step:
        step_cost(args)


if __name__ == "__main__":
    main()
