"""What trust costs: SHA-256 verification of the default run's data files and cache entries, cold
(first run: every file hashed) and warm (later runs: digests remembered by stat, nothing rehashed),
against the wall time of the default embedded run.

    .venv/bin/python scripts/bench_verify.py --run-seconds 150

Each phase runs in a fresh process against a fresh digest memo (cold) or the memo the cold phase
left (warm). The converted SmolLM2 entry is checked where the default cache holds it. Goal (issue 14):
warm verification <= 3% of the default run's wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import benchlib

PHASE = r"""
import json, sys, time
from pathlib import Path
from prunebench import cache
from prunebench.config import compose
from prunebench.data import text, verify

memo = sys.argv[1]
verify.configure(True, memo)
t = time.perf_counter()
for name in ("c4", "wikitext2_test"):  # the default run's calibration and evaluation files
    text.find(text.LOCAL[name])
data_s = time.perf_counter() - t
model = Path(compose().paths.cache_dir) / "models" / "smollm2-135m"
t = time.perf_counter()
model_state = None
if cache.sidecar(model).exists():
    key = json.loads(cache.sidecar(model).read_text())["key"]
    model_state = cache.check(model, key) or "ok"
model_s = time.perf_counter() - t
t = time.perf_counter()  # what a changed stat (a copied cache) costs: every weight file rehashed once
if sys.argv[2] == "rehash" and model.is_dir():
    for f in sorted(model.glob("*.safetensors")):
        cache.sha256_file(f)
rehash_s = time.perf_counter() - t
print(json.dumps({"data_s": data_s, "model_s": model_s, "rehash_s": rehash_s, "model": model_state,
                  "files": [u["path"] for u in verify.used()]}))
"""


def phase(memo: str, rehash: bool = False) -> dict:
    argv = [sys.executable, "-c", PHASE, memo, "rehash" if rehash else "-"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--run-seconds", type=float, default=150.0, help="wall time of the default run here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as memo:
        cold, warm = phase(memo, rehash=True), phase(memo)
    rows = []
    for label, r in (("cold (first run)", cold), ("warm (every later run)", warm)):
        total = r["data_s"] + r["model_s"]
        rows.append([label, f"{1000 * r['data_s']:.1f}", f"{1000 * r['model_s']:.1f}", f"{1000 * total:.1f}",
                     f"{100 * total / args.run_seconds:.3f}%"])  # fmt: skip
    print(f"data files: {', '.join(cold['files'])}; converted model entry: {cold['model'] or 'not cached here'}")
    benchlib.table(rows, ["phase", "data files ms", "model entry ms", "total ms", "share of the run"], "lrrrr")
    print(f"a converted-model entry whose stat changed (a copied cache) is rehashed once: {cold['rehash_s']:.2f} s")


if __name__ == "__main__":
    main()
