"""Tracker overhead per run: seconds that `tracking.log_run` adds after a job, per logger.

One real run gives the result: by default a tiny one (experiment=smoke/tiny with a short fine-tuning, so
there is a loss curve), with `--quick` the default quick run on the embedded model (`prunebench run`).
Each tracker then logs it in a fresh Python process, as a job would: `cold` is the first job of
a process (the tracker's imports and start-up included), `warm` a second job in the same process (a
sweep on Hydra's basic launcher). Prints a Markdown table and a one-line summary.

    python scripts/bench_tracking.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["experiment=smoke/tiny", "recovery=lm_finetune", "recovery.tokens=640", "recovery.seqlen=64"]


def one(logger: str, metrics: Path, root: Path, overrides: list[str]) -> None:
    """Child process: log the same result as two jobs of a sweep; print {"cold": s, "warm": s}."""
    from prunebench import pipeline, tracking  # noqa: F401 - a job has torch and transformers loaded already
    from prunebench.config import compose

    cfg, result = compose(*overrides, f"logger={logger}"), json.loads(metrics.read_text())
    root.mkdir(parents=True)
    (root / "multirun.yaml").touch()  # the two jobs form a sweep: one experiment/group
    seconds = []
    for job in ("0", "1"):
        (root / job).mkdir(parents=True)
        (root / job / "metrics.json").write_text(metrics.read_text())
        start, cpu = time.perf_counter(), time.process_time()
        assert tracking.log_run(cfg, result, root / job), f"logger={logger} failed"
        seconds += [time.perf_counter() - start, time.process_time() - cpu]
    print(json.dumps(dict(zip(["cold", "cold_cpu", "warm", "warm_cpu"], seconds, strict=True))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the default quick run on the embedded model")
    ap.add_argument("--one", nargs=3, metavar=("LOGGER", "METRICS", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    overrides = [] if args.quick else TINY
    if args.one:
        return one(args.one[0], Path(args.one[1]), Path(args.one[2]), overrides)
    from prunebench import pipeline
    from prunebench.config import compose

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    cfg = compose(*overrides, *([] if args.quick else [f"paths.cache_dir={tmp / 'cache'}"]))
    start, cpu = time.perf_counter(), time.process_time()
    pipeline.run(cfg, tmp / "run")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = []
    for logger in ("mlflow", "tensorboard", "wandb"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                *(["--quick"] if args.quick else []),
                "--one",
                logger,
                str(tmp / "run" / "metrics.json"),
                str(tmp / logger / "sw"),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        t = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((logger, t["cold"], t["cold_cpu"], t["warm"]))
    kind, load = "quick" if args.quick else "tiny", os.getloadavg()[0]
    print(f"{kind} run: wall {wall:.1f} s, CPU {cpu:.1f} s; load average {load:.1f} on {os.cpu_count()} CPUs\n")
    print("| logger | cold s | cold CPU s | warm s | cold / run wall | cold CPU / run CPU |")
    print("|---|---|---|---|---|---|")
    for logger, cold, cold_cpu, warm in rows:
        print(f"| {logger} | {cold:.2f} | {cold_cpu:.2f} | {warm:.2f} | {cold / wall:.1%} | {cold_cpu / cpu:.1%} |")
    worst = max(rows, key=lambda r: r[1])
    print(
        f"\nworst first-job overhead: {worst[0]} {worst[1]:.2f} s = {worst[1] / wall:.1%} of this {kind} run's wall;"
        f" later jobs of a process: <= {max(r[3] for r in rows):.2f} s"
    )


if __name__ == "__main__":
    main()
