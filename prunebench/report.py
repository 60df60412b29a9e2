"""metrics.json files -> tables (Markdown, CSV, LaTeX) and plots. Reads nothing but metrics.json.

Three views: `runs` (one row per run), `pivot` (one row per method, one column per pattern or
sparsity, dense on top: the layout of the Wanda and GBLM tables), and `paper` (each experiment row
beside the paper's number, the difference, and a mark when outside tolerance).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prunebench.results import read_json

_COUNTS = ("/windows", "/tokens", "/seqlen")
METHOD_ORDER = ["none", "magnitude", "wanda", "sparsegpt", "gblm"]


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


def metric_keys(runs: list[dict]) -> list[str]:
    return sorted({k for r in runs for k in r["metrics"] if not k.endswith(_COUNTS)})


def runs_table(runs: list[dict], root: Path) -> tuple[list[str], list[list[str]]]:
    """One row per run: identity columns, then each metric, then the dense baseline's value."""
    keys = metric_keys(runs)
    header = ["run", "model", "pruner", "pattern", "sparsity", "achieved", "layers", *keys]
    header += [f"dense {k}" for k in keys]
    rows = []
    for r in runs:
        p = r["prune"]
        rel = str(r["_dir"].relative_to(root)) if r["_dir"] != root else "."
        label = " ".join(o for o in r.get("overrides", []) if not o.startswith("hydra")) or rel
        rows.append(
            [label, r["config"]["model"]["name"], p["method"], p["pattern"], _fmt(p["target_sparsity"])]
            + [f"{p['achieved_sparsity']:.4f}"]
            + [_layers(p)]
            + [_fmt(r["metrics"].get(k)) for k in keys]
            + [_fmt(r["baseline"].get(k)) for k in keys]
        )
    rows.sort(key=lambda row: (row[1], row[2], row[3], row[4]))
    return header, rows


def _layers(p: dict) -> str:
    """Depth pruners: 'kept/before (ratio removed)', e.g. '21/30 (30% removed)'."""
    if "layers_kept" not in p:
        return ""
    kept, before = len(p["layers_kept"]), p["layers_before"]
    return f"{kept}/{before} ({1 - kept / before:.0%} removed)"


def _column(run: dict) -> str:
    p = run["prune"]
    if "layers_kept" in p:
        return f"{len(p['layers_kept'])}/{p['layers_before']} layers"
    return f"{p['target_sparsity']:.0%}" if p["pattern"] == "unstructured" else p["pattern"]


def pivot_table(runs: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows: dense, then each method; columns: '50%', '60%', '2:4', '4:8' ...; one model per table."""
    columns = sorted({_column(r) for r in runs if r["prune"]["method"] != "none"}, key=lambda c: (":" in c, c))
    methods = sorted({r["prune"]["method"] for r in runs}, key=lambda m: (METHOD_ORDER + [m]).index(m))
    cells = {(r["prune"]["method"], _column(r)): r["metrics"].get(metric) for r in runs}
    dense = next((r["baseline"].get(metric) for r in runs if r["baseline"].get(metric) is not None), None)
    rows = [["dense", *[_fmt(dense)] * len(columns)]] if dense is not None else []
    rows += [[m, *[_fmt(cells.get((m, c))) for c in columns]] for m in methods if m != "none"]
    return [f"method ({metric})", *columns], rows


def _as_list(expected) -> list[dict]:
    return [e for e in (expected if isinstance(expected, list) else [expected]) if e]


def paper_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each run that carries `expected` (from conf/experiment/<paper>/...) beside the paper."""
    header = ["table", "row", "column", "metric", "paper", "reproduced", "diff", "tolerance", "ok"]
    rows = []
    cells = [(r, e) for r in runs for e in _as_list(r["config"].get("expected"))]  # a run may fill several tables
    for r, exp in cells:
        got = r["metrics"].get(exp["metric"]) if exp.get("row") != "Dense" else r["baseline"].get(exp["metric"])
        paper = exp.get("value")
        comparable = paper is not None and got is not None and exp.get("compare", True)
        diff = got - paper if comparable else None
        ok = "" if not comparable else ("yes" if abs(diff) <= exp.get("tolerance", 0) else "NO ✗")
        rows.append(
            [exp.get("table", ""), exp.get("row", ""), exp.get("column", ""), exp["metric"], _fmt(paper)]
            + [_fmt(got), "" if diff is None else f"{diff:+.3f}", _fmt(exp.get("tolerance")), ok]
        )
    rows.sort(key=lambda row: (row[0], (METHOD_ORDER + [row[1].lower()]).index(row[1].lower()) if row[1] else 0))
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def latex(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell) -> str:
        return str(cell).replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")

    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule"]
    lines.append(" & ".join(esc(c) for c in header) + r" \\ \midrule")
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in rows]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])


def write(header: list[str], rows: list[list[str]], folder: Path, stem: str = "report") -> dict:
    """Write <stem>.csv, <stem>.md and <stem>.tex into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    md = markdown(header, rows)
    paths = {ext: folder / f"{stem}.{ext}" for ext in ("csv", "md", "tex")}
    paths["csv"].write_text(buf.getvalue())
    paths["md"].write_text(md + "\n")
    paths["tex"].write_text(latex(header, rows) + "\n")
    return {**paths, "md_text": md}


def plot(runs: list[dict], metric: str, path: Path) -> Path:
    """`metric` against target sparsity, one line per (method, pattern); dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        p, value = r["prune"], r["metrics"].get(metric)
        if value is not None and p["method"] != "none":
            label = p["method"] if p["pattern"] == "unstructured" else f"{p['method']} {p['pattern']}"
            series.setdefault(label, []).append((p["target_sparsity"], value))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    dense = next((r["baseline"].get(metric) for r in runs if r["baseline"].get(metric)), None)
    if dense:
        ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(metric)
    if metric.endswith("ppl"):
        ax.set_yscale("log")
    models = sorted({r["config"]["model"]["name"] for r in runs})
    ax.set_title(", ".join(models))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
