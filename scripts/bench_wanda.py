"""Benchmark: Wanda on SmolLM2-135M (dequantized Q4_1): wall time split into block forwards
(calibration) and scoring/masking, and peak RSS against the fp32 model size.

    python scripts/bench_wanda.py --nsamples 128 --seqlen 512

Goal (issue 2): peak RSS while pruning, above what the warmed-up runtime holds without the model,
≤ 1.5 × model bytes + one block's activations (nsamples × seqlen × hidden × 4 bytes). The runtime
share is measured as RSS after touching every weight and one tiny forward (which maps torch's
kernels) minus the model bytes: safetensors weights are mapped lazily, so RSS right after loading
holds only part of the model. On a GPU the peak CUDA memory is reported as well.
"""

from __future__ import annotations

import torch
from benchlib import cuda_columns, load_model, measure, parser, summary, table, weights_mb

from prunebench.data import calibration_windows
from prunebench.pruners.wanda import Wanda
from prunebench.results import proc_status_mb


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    rss_start = proc_status_mb("VmRSS")
    model, tok, _ = load_model(device=args.device)
    model_mb = weights_mb(model)
    calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0, args.batch_size)
    act_mb = args.nsamples * args.seqlen * model.config.hidden_size * 4 / 2**20

    load_peak = proc_status_mb("VmHWM")
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # fault every weight page in
        model(input_ids=calib.input_ids[:1, :8].to(args.device), use_cache=False)  # map the kernels once
    runtime = proc_status_mb("VmRSS") - model_mb
    with measure(model) as m:
        stats = Wanda(sparsity=0.5)(model, calib)
    peak = m.rss_peak_mb
    budget = 1.5 * model_mb + act_mb
    rows = [
        ("calibration windows", f"{args.nsamples} x {args.seqlen} ({calib.method})"),
        ("block forwards (s)", f"{stats.timings['forward']:.1f}"),
        ("score + mask (s)", f"{stats.timings['score_and_mask']:.2f}"),
        ("total (s)", f"{m.seconds:.1f}"),
        ("achieved sparsity", f"{stats.achieved_sparsity:.4f}"),
        ("fp32 model (MB)", f"{model_mb:.0f}"),
        ("one block's activations (MB)", f"{act_mb:.0f}"),
        ("RSS before loading the model (MB)", f"{rss_start:.0f}"),
        ("peak RSS while loading (MB)", f"{load_peak:.0f}"),
        ("RSS before pruning, weights resident (MB)", f"{m.rss_base_mb:.0f}"),
        ("runtime without the model (MB)", f"{runtime:.0f}"),
        ("peak RSS while pruning (MB)", f"{peak:.0f}"),
        ("peak minus runtime (MB)", f"{peak - runtime:.0f}"),
        ("goal: 1.5 x model + activations (MB)", f"{budget:.0f}"),
        *zip(cuda_columns(args.device), m.cuda_cells(), strict=True),
    ]
    table(rows, ["quantity", "value"])
    ok = peak - runtime <= budget
    summary(
        f"wanda {args.nsamples}x{args.seqlen} forwards {stats.timings['forward']:.1f}s"
        f" scoring {stats.timings['score_and_mask']:.2f}s; peak minus runtime {peak - runtime:.0f} MB vs goal"
        f" {budget:.0f} MB: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
