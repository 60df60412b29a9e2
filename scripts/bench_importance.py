"""Minitron's importance pass against one bare forward over the same calibration windows (issue 12
goal: ≤ 1.2×). The pass (heads, neurons, hidden channels and Block Importance, one hooked forward)
stops at the final norm, so the forward stopped there is timed too, to show what the hooks cost.

    .venv/bin/python scripts/bench_importance.py                      # SmolLM2-135M, 8 x 256, CPU
    .venv/bin/python scripts/bench_importance.py --device cuda --nsamples 128 --seqlen 2048

The three are measured alternately, `--rounds` times, and the fastest round of each is kept (a load
change on a shared machine hits all three).
"""

from __future__ import annotations

import contextlib

import benchlib
import torch

from prunebench.data import calibration_windows
from prunebench.models.blocks import find_blocks
from prunebench.models.forward import Stop
from prunebench.pruners.minitron.importance import compute_importance


@torch.no_grad()
def bare(model, ids: torch.Tensor, batch: int, stop_at_norm: bool) -> None:
    """The plain forward over the windows (logits included), or stopped at the final norm."""
    device = benchlib.device_of(model)
    handle = None
    if stop_at_norm:

        def stop(*_):
            raise Stop

        handle = find_blocks(model)[-1].register_forward_hook(stop)
    try:
        for x in ids.split(batch):
            with contextlib.suppress(Stop):
                model(input_ids=x.to(device), use_cache=False)
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model, tok, cfg = benchlib.load_model(f"model={args.model}", device=args.device)
    model.eval()
    ids = calibration_windows(tok, "c4", args.nsamples, args.seqlen, cfg.seed).input_ids
    runs = {
        "bare forward (with LM head)": lambda: bare(model, ids, args.batch, False),
        "forward stopped at the final norm": lambda: bare(model, ids, args.batch, True),
        "importance pass (heads, neurons, channels, BI)": lambda: compute_importance(
            model, ids.to(benchlib.device_of(model)), args.batch
        ),
    }
    best: dict[str, benchlib.Measurement] = {}
    for _ in range(args.rounds):
        for label, fn in runs.items():
            with benchlib.measure(model) as m:
                fn()
            if label not in best or m.seconds < best[label].seconds:
                best[label] = m
    device = benchlib.device_of(model)
    print(f"{benchlib.device_line(device)}, {args.model}, {args.nsamples} x"
          f" {args.seqlen} tokens, batch {args.batch}, fastest of {args.rounds} rounds")  # fmt: skip
    ref = best["bare forward (with LM head)"].seconds
    rows = [[label, f"{m.seconds:.2f}", f"{m.seconds / ref:.2f}x", f"{m.rss_growth_mb:.0f}", *m.cuda_cells()]
            for label, m in best.items()]  # fmt: skip
    benchlib.table(rows, ["pass", "seconds", "vs bare forward", "RSS growth MB", *benchlib.cuda_columns(device)],
                   "lrrr" + "r" * len(benchlib.cuda_columns(device)))  # fmt: skip
    ratio = best["importance pass (heads, neurons, channels, BI)"].seconds / ref
    benchlib.summary(f"importance pass {ratio:.2f}x one bare forward (goal ≤ 1.2x)")


if __name__ == "__main__":
    main()
