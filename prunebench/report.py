"""metrics.json files -> one table (Markdown and CSV). Reads nothing but metrics.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prunebench.results import read_json

_COUNTS = ("/windows", "/tokens", "/seqlen")


def collect(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        data = read_json(path)
        if data.get("status") == "complete":
            data["_dir"] = path.parent
            runs.append(data)
    return runs


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def table(runs: list[dict], root: Path) -> tuple[list[str], list[list[str]]]:
    """One row per run: identity columns, then each metric, then the dense baseline's value."""
    keys = sorted({k for r in runs for k in r["metrics"] if not k.endswith(_COUNTS)})
    header = ["run", "model", "pruner", "pattern", "sparsity", "achieved"] + keys + [f"dense {k}" for k in keys]
    rows = []
    for r in runs:
        p = r["prune"]
        rel = str(r["_dir"].relative_to(root)) if r["_dir"] != root else "."
        label = " ".join(o for o in r.get("overrides", []) if not o.startswith("hydra")) or rel
        rows.append(
            [
                label,
                r["config"]["model"]["name"],
                p["method"],
                p["pattern"],
                _fmt(p["target_sparsity"]),
                f"{p['achieved_sparsity']:.4f}",
            ]
            + [_fmt(r["metrics"].get(k)) for k in keys]
            + [_fmt(r["baseline"].get(k)) for k in keys]
        )
    rows.sort(key=lambda row: (row[1], row[2], row[3], row[4]))
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write(header: list[str], rows: list[list[str]], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    md = markdown(header, rows)
    (folder / "report.csv").write_text(buf.getvalue())
    (folder / "report.md").write_text(md + "\n")
    return {"csv": folder / "report.csv", "md": folder / "report.md", "md_text": md}
