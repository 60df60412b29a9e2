"""Parity of prunebench's SliceGPT and LLM-Pruner with the authors' code (issue #28 item 4).

scripts/parity.sh runs the authors' code (microsoft/TransformerCompression, horseee/LLM-Pruner) on
the embedded SmolLM2-135M with prunebench's own calibration and WikiText-2 windows and writes one
JSON per setting under <parity dir>/results. This script runs prunebench on the same settings,

    .venv/bin/prunebench run pruner=slicegpt pruner.sparsity=S ... calib.nsamples=N calib.seqlen=L
    .venv/bin/prunebench run pruner=llm_pruner pruner.ratio=R ... calib.nsamples=10 calib.seqlen=64

(the overrides printed per row), reads each run's metrics.json, and prints one Markdown table:
perplexity ours vs theirs with the relative difference ours/theirs - 1, pruning seconds, peak RSS and
parameter counts. Both sides score perplexity the same way: exp(mean over windows of each window's
mean next-token NLL) on the same WikiText-2 test windows.

    .venv/bin/python scripts/parity_compare.py                 # every authors' result found
    .venv/bin/python scripts/parity_compare.py --method slicegpt --theirs-only
    .venv/bin/python scripts/parity_compare.py --rerun         # ignore finished prunebench runs

A prunebench run that fails is one line in the output (its last error line), and its row shows "-".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def overrides(theirs: dict, manifest: dict) -> list[str]:
    """The prunebench overrides that reproduce one authors' setting on the same windows."""
    calib_file = Path(theirs["calib"]["file"]).name
    calib = manifest.get(calib_file)
    if calib is None:
        raise SystemExit(f"{calib_file} is not in the parity data manifest; rerun: scripts/parity.sh data")
    n, seqlen = theirs["calib"]["shape"]
    windows, eval_seqlen = theirs["eval"]["shape"]
    common = [
        f"calib={calib['source']}",
        f"calib.nsamples={n}",
        f"calib.seqlen={seqlen}",
        f"seed={calib['seed']}",
        "eval=[wikitext2]",
        f"eval.wikitext2.seqlen={eval_seqlen}",
        f"eval.wikitext2.max_windows={windows}",
        "eval.wikitext2.batch_size=1",
        "model.dtype=float32",
        "device=cpu",
    ]
    if theirs["method"] == "slicegpt":
        return [
            "pruner=slicegpt",
            f"pruner.sparsity={theirs['sparsity']}",
            f"pruner.round_interval={theirs['round_interval']}",
            f"pruner.final_orientation={theirs['final_orientation']}",
            f"calib.batch_size={theirs['calib'].get('batch_size', 16)}",
            *common,
        ]
    if theirs["method"] == "llm_pruner":
        start, end = theirs["layers"]
        return [
            "pruner=llm_pruner",
            f"pruner.ratio={theirs['pruning_ratio']}",
            "pruner.pruner_type=taylor",
            f"pruner.estimator={theirs['taylor']}",
            f"pruner.grouping={theirs.get('grouping_strategy', 'sum')}",
            f"pruner.attention_layer_start={start}",
            f"pruner.attention_layer_end={end}",
            f"pruner.mlp_layer_start={start}",
            f"pruner.mlp_layer_end={end}",
            f"pruner.num_examples={n}",  # the gradient examples are the calibration windows themselves
            f"pruner.seqlen={seqlen}",
            *common,
        ]
    raise SystemExit(f"unknown method {theirs['method']!r} in an authors' result")


def run_ours(theirs: dict, manifest: dict, run_dir: Path, rerun: bool) -> tuple[dict | None, str]:
    """(metrics.json of the prunebench run, the command); None and the error line when it failed."""
    args = overrides(theirs, manifest)
    cmd = [str(REPO / ".venv" / "bin" / "prunebench"), "run", *args, f"hydra.run.dir={run_dir}"]
    shown = " ".join([".venv/bin/prunebench run", *args])
    metrics = run_dir / "metrics.json"
    if metrics.exists() and not rerun:
        return json.loads(metrics.read_text()), shown
    if metrics.exists():
        metrics.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (run_dir / "prunebench.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not metrics.exists():
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit {done.returncode}"
        print(f"prunebench failed ({theirs['method']}, {theirs['setting']}): {why}", file=sys.stderr)
        return None, shown
    return json.loads(metrics.read_text()), shown


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(theirs: dict, ours: dict | None) -> str:
    ppl_theirs = theirs["ppl"]
    ppl_ours = ours["metrics"].get("wikitext2/ppl") if ours else None
    dense_ours = ours["baseline"].get("wikitext2/ppl") if ours and ours.get("baseline") else None
    rel = None if ppl_ours is None else ppl_ours / ppl_theirs - 1
    prune = ours["prune"] if ours else {}
    params_ours = prune.get("params_after")
    share_ours = None if not prune else 1 - prune["params_after"] / prune["params_before"]
    cells = [
        theirs["method"],
        theirs["setting"],
        f"{fmt(dense_ours, '.3f')} / {theirs['dense_ppl']:.3f}",
        f"{fmt(ppl_ours, '.3f')} / {ppl_theirs:.3f}",
        fmt(rel, "+.2%"),
        f"{fmt(ours['timings'].get('prune') if ours else None, '.1f')} / {theirs['prune_seconds']:.1f}",
        f"{fmt(ours.get('peak_rss_mb') if ours else None, '.0f')} / {theirs['peak_rss_mb']:.0f}",
        f"{fmt(params_ours, ',')} / {theirs['params_after']:,}",
        f"{fmt(share_ours, '.2%')} / {theirs['params_removed_share']:.2%}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parity-dir", type=Path, default=Path("/tmp/parity"), help="scripts/parity.sh's PARITY_DIR")
    p.add_argument("--method", choices=["slicegpt", "llm_pruner"], action="append", help="only these (repeatable)")
    p.add_argument("--theirs-only", action="store_true", help="do not run prunebench; print the authors' side")
    p.add_argument("--rerun", action="store_true", help="rerun prunebench even where a metrics.json exists")
    a = p.parse_args()

    results = a.parity_dir / "results"
    files = sorted(f for f in results.glob("*.json") if not f.name.endswith(".groups.json"))
    if not files:
        print(f"no authors' results under {results}; run scripts/parity.sh first", file=sys.stderr)
        return 2
    manifest = json.loads((a.parity_dir / "data" / "manifest.json").read_text())
    rows, commands, notes, failed = [], [], [], 0
    for f in files:
        theirs = json.loads(f.read_text())
        if a.method and theirs["method"] not in a.method:
            continue
        ours = None
        if not a.theirs_only:
            # keyed by the overrides: authors' variants of one setting (e.g. the GQA fold experiment) share a run
            key = hashlib.sha1(" ".join(overrides(theirs, manifest)).encode()).hexdigest()[:10]
            ours, shown = run_ours(theirs, manifest, a.parity_dir / "ours" / f"{theirs['method']}_{key}", a.rerun)
            failed += ours is None
            commands.append(f"{f.stem}: {shown}")
        rows.append(row(theirs, ours))
        notes.append(
            f"{theirs['method']}, {theirs['setting']}: theirs {theirs['prune_cpu_seconds']:.0f} CPU s for"
            f" {theirs['prune_seconds']:.0f} wall s; RSS {theirs['rss_before_prune_mb']:.0f} MB before pruning,"
            f" {theirs['prune_peak_rss_mb']:.0f} MB peak while pruning"
        )

    print(
        "| method | setting | dense ppl ours / theirs | ppl ours / theirs | rel. diff | prune s ours / theirs"
        " | peak RSS MB ours / theirs | params ours / theirs | removed ours / theirs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nWall seconds on a shared machine vary with its load; CPU seconds less so:")
    print("\n".join(f"  {x}" for x in notes))
    if commands:
        print("\nprunebench commands (hydra.run.dir under " + str(a.parity_dir / "ours") + "):")
        print("\n".join(f"  {c}" for c in commands))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
