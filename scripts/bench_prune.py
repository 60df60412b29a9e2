"""Benchmark: time and peak memory of Wanda, SparseGPT and GBLM on SmolLM2-135M (dequantized Q4_1)
with the same calibration (C4 sample, seed 0), against the layer-wise bound; then the cost of a
9-point α × sparsity GBLM sweep, sequential and one-shot.

    python scripts/bench_prune.py --nsamples 32 --seqlen 512

The bound: a layer-wise pass needs two block forwards per calibration token (statistics, then the
pruned block's outputs). It is measured as a pass whose per-block edit only collects.
"""

from __future__ import annotations

import tempfile

from benchlib import cuda_columns, load_model, measure, parser, summary, table, weights_mb

from prunebench.data import calibration_windows
from prunebench.models.forward import Layerwise
from prunebench.pruners.gblm import GBLM
from prunebench.pruners.sparsegpt import SparseGPT
from prunebench.pruners.wanda import Wanda


def method_rows(model, dense: dict, calib):
    """The bound, then Wanda, SparseGPT and GBLM from the dense weights: one table row each."""
    with measure(model) as m:
        Layerwise(model, calib.input_ids, calib.batch_size, desc="bound").run(lambda i, b, collect: collect())
    bound = m.seconds
    yield ["bound", "", f"{bound:.1f}", "", f"{bound:.1f}", "1.00", f"{m.rss_growth_mb:.0f}", *m.cuda_cells()]
    with tempfile.TemporaryDirectory() as cache:
        calib.cache_dir = cache  # empty: GBLM computes its gradients here
        for pruner in (Wanda(sparsity=0.5), SparseGPT(sparsity=0.5), GBLM(sparsity=0.5)):
            model.load_state_dict(dense)
            with measure(model) as m:
                stats = pruner(model, calib)
            grad = stats.timings["prepare"]
            yield [
                pruner.name, f"{grad:.1f}", f"{stats.timings['forward']:.1f}",
                f"{stats.timings['score_and_mask']:.2f}", f"{m.seconds:.1f}", f"{(m.seconds - grad) / bound:.2f}",
                f"{m.rss_growth_mb:.0f}", *m.cuda_cells(),
            ]  # fmt: skip


def sweep_rows(model, dense: dict, calib, points):
    """GBLM over `points` (alpha, sparsity), sequential then one-shot, one gradient pass per sweep."""
    for sequential in (True, False):
        with tempfile.TemporaryDirectory() as cache:
            calib.cache_dir = cache
            times, grads = [], 0
            for alpha, sparsity in points:
                model.load_state_dict(dense)
                with measure(model, memory=False) as m:
                    stats = GBLM(sparsity=sparsity, alpha=alpha, sequential=sequential)(model, calib)
                times.append(m.seconds)
                grads += not stats.info["gradients_reused"]
        later = sum(times[1:]) / (len(times) - 1)
        mode = "sequential" if sequential else "one-shot"
        yield [mode, f"{sum(times):.1f}", f"{times[0]:.1f}", f"{later:.1f}", grads, f"{sum(times) / times[0]:.2f}"]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sweep-nsamples", type=int, default=8)
    ap.add_argument("--skip-methods", action="store_true")
    args = ap.parse_args()

    model, tok, _ = load_model(device=args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"SmolLM2-135M fp32 {weights_mb(model):.0f} MB; calibration {args.nsamples} x {args.seqlen} C4 windows, seed 0"
    )
    if not args.skip_methods:
        calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0, 4)
        columns = ["method", "grad pass s", "forwards s", "score/update s", "total s", "x bound", "peak +MB"]
        table(method_rows(model, dense, calib), columns + cuda_columns(args.device), "lrrrrrrrr")

    # Sweep costs: 3 alphas x 3 sparsities, one gradient pass in all.
    calib = calibration_windows(tok, "c4", args.sweep_nsamples, args.seqlen, 0, 4)
    points = [(a, s) for a in (1.0, 100.0, 10000.0) for s in (0.4, 0.5, 0.6)]
    print(f"\nGBLM sweep, {len(points)} points ({args.sweep_nsamples} x {args.seqlen}):")
    columns = ["sweep", "total s", "first s", "later mean s", "gradient passes", "total / first"]
    table(sweep_rows(model, dense, calib, points), columns, "lrrrrr")
    summary("see rows above; bound = two block forwards per calibration token")


if __name__ == "__main__":
    main()
