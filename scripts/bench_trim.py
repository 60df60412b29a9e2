"""Minitron trimming pays in real latency: prefill latency and decode speed of trimmed SmolLM2 shapes
against the dense model, beside each shape's FLOP ratio (eval=efficiency's counter).

    .venv/bin/python scripts/bench_trim.py                      # CPU, batch 1 x 128-token prompt
    .venv/bin/python scripts/bench_trim.py --device cuda --prompt-len 1024 --batch 8

Every shape is trimmed by the Minitron pruner from one small calibration set (which channels are
kept does not change the speed); dense and trimmed models are measured alternately, `--rounds`
times, and the fastest round of each is kept, so a load change on a shared machine hits both.
Goal (issue 12): the latency speed-up within 10% of the FLOP ratio.
"""

from __future__ import annotations

import copy

import benchlib

from prunebench.data import calibration_windows
from prunebench.evals.efficiency import Efficiency, flops_per_token
from prunebench.models import count_params
from prunebench.pruners.minitron import Minitron

SHAPES = {  # the reproduce minitron shapes (conf/experiment/minitron/embedded)
    "depth 20 layers": {"layers": 20},
    "heads 6, ffn 832 (kd_kld)": {"heads": 6, "ffn": 832},
    "hidden 384, heads 6, ffn 640 (40%)": {"hidden": 384, "heads": 6, "ffn": 640},
}


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dense, tok, cfg = benchlib.load_model("model=smollm2-135m", device=args.device)
    dense.eval()
    calib = calibration_windows(tok, "c4", 8, 128, cfg.seed)
    models = {"dense": dense}
    for label, target in SHAPES.items():
        m = copy.deepcopy(dense)
        Minitron(target=target)(m, calib)
        models[label] = m
    ev = Efficiency(prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats, batch_size=args.batch)
    prefill: dict[str, float] = {}
    decode: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, m in models.items():
            out = ev(m)
            prefill[label] = min(prefill.get(label, float("inf")), out["prefill_ms"])
            decode[label] = max(decode.get(label, 0.0), out["decode_tokens_per_s"])
    flops = {label: flops_per_token(m, args.prompt_len) for label, m in models.items()}
    rows = []
    for label, m in models.items():
        ratio = flops["dense"] / flops[label]
        speed = prefill["dense"] / prefill[label]
        rows.append([
            label, f"{count_params(m)[0] / 1e6:.1f}", f"{flops[label] / 1e6:.0f}", f"{ratio:.2f}x",
            f"{prefill[label]:.1f}", f"{speed:.2f}x", f"{speed / ratio:.0%}",
            f"{decode[label]:.1f}", f"{decode[label] / decode['dense']:.2f}x",
        ])  # fmt: skip
    device = benchlib.device_of(dense)
    print(f"{benchlib.device_line(device)}, batch {args.batch} x {args.prompt_len}-token prompt, "
          f"{args.gen_len} generated tokens, fastest of {args.rounds} rounds x {args.repeats} repeats")  # fmt: skip
    benchlib.table(rows, ["shape", "params (M)", "MFLOPs/token", "FLOP ratio", "prefill ms", "prefill speed-up",
                          "speed-up / FLOP ratio", "decode tok/s", "decode speed-up"], "lrrrrrrrr")  # fmt: skip


if __name__ == "__main__":
    main()
