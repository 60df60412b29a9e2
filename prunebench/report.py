"""metrics.json files -> tables (Markdown, CSV, LaTeX) and plots. Reads nothing but metrics.json.

Three views: `runs` (one row per run), `pivot` (one row per method, one column per pattern or
sparsity, dense on top: the layout of the Wanda and GBLM tables), and `paper` (each experiment row
beside the paper's number, the difference, and a mark when outside tolerance). Runs that searched
architectures (Minitron's `prune.search`, also inside `prune.stages`) add `search`: one row per
candidate, its shape, parameters, LM validation loss at each checkpoint of the short KD and its
rank (`extra_views`); stepwise runs (MiniBridgeBERT's `prune.steps`) add `steps`. `plot` also
draws the recovery loss curves (`recovery.loss_curve`, [step, loss] pairs) and the candidates'
validation losses into `<stem>_curves.png` (`curves_plot`); for stepwise runs it draws the dev
score against parameters (`steps_plot`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from prunebench.results import read_json

_COUNTS = ("/windows", "/tokens", "/seqlen")
METHOD_ORDER = ["none", "magnitude", "wanda", "sparsegpt", "gblm"]


def collect(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        try:
            data = read_json(path)
        except (ValueError, OSError) as err:  # one broken run does not hide a sweep's others
            print(f"warning: skipping {path}: unreadable ({type(err).__name__})", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        if data.get("status") == "complete":
            data["_dir"] = path.parent
            runs.append(data)
    return runs


def _fmt(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} ⚠"  # kept and marked: an overflowed metric is a result, not a missing one
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def metric_keys(runs: list[dict]) -> list[str]:
    return sorted({k for r in runs for k in r["metrics"] if not k.endswith(_COUNTS)})


def _label(run: dict, root: Path | None) -> str:
    """A run's overrides (without hydra.*), else its directory relative to `root`."""
    d = Path(run.get("_dir", "."))
    if root is None:
        rel = d.name or "."
    else:
        rel = "." if d == root else str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
    label = " ".join(o for o in run.get("overrides", []) if not o.startswith("hydra")) or rel
    return label if len(label) <= 200 else label[:199] + "…"  # an absurd override never floods the table


def _short(run: dict, width: int = 40) -> str:
    """A legend label: the experiment cell's name, else the run directory's name, cut to `width`."""
    cell = next((o.split("=", 1)[1] for o in run.get("overrides", []) if o.startswith("experiment=")), None)
    text = cell.rsplit("/", 1)[-1] if cell else Path(run.get("_dir", "run")).name
    return text if len(text) <= width else text[: width - 1] + "…"


def runs_table(runs: list[dict], root: Path) -> tuple[list[str], list[list[str]]]:
    """One row per run: identity columns, then each metric, then the dense baseline's value."""
    keys = metric_keys(runs)
    header = ["run", "model", "pruner", "pattern", "sparsity", "achieved", "layers", *keys]
    header += [f"dense {k}" for k in keys]
    rows = []
    for r in runs:
        p = r["prune"]
        label = _label(r, root) + (" ⚠ non-finite" if r.get("non_finite") else "")
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
    if "layers_kept" not in p:  # masks or width: every layer stays
        return "all (width)" if p.get("params_removed_share") else "all"
    kept, before = len(p["layers_kept"]), p["layers_before"]
    return f"{kept}/{before} ({1 - kept / before:.0%} removed)"


def _column(run: dict) -> str:
    p = run["prune"]
    if "layers_kept" in p:
        return f"{len(p['layers_kept'])}/{p['layers_before']} layers"
    return f"{p['target_sparsity']:.0%}" if p["pattern"] == "unstructured" else p["pattern"]


# Knobs that never change a run's numbers: where it wrote, what it is called, where it logged.
_NOT_RESULTS = ("name", "paths.", "logger.", "hydra.", "expected", "save_model", "save_format")


def _flat(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: repr(node)}


def _contexts(runs: list[dict]) -> list[str]:
    """Per run, the knobs (other than the pruner's, which the pivot's rows and columns show) whose
    values differ across `runs`, e.g. 'seed=1': runs of one pivot row share every other knob, so a
    dense or pruned cell never mixes seeds, models or evaluation settings. Two runs that would still
    fall into one cell (a pruner knob besides method, sparsity and pattern differs) add those too."""
    flats = [{k: v for k, v in _flat(r.get("config") or {}).items() if not k.startswith(_NOT_RESULTS)} for r in runs]
    keys = sorted({k for f in flats for k in f})

    def varying(group: list[int], prefix_ok) -> list[str]:
        return [k for k in keys if prefix_ok(k) and len({flats[i].get(k) for i in group}) > 1]

    shared = varying(list(range(len(runs))), lambda k: not k.startswith("pruner."))
    labels = [" ".join(f"{k}={flats[i].get(k, '-')}" for k in shared) for i in range(len(runs))]
    cells: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        cells.setdefault((r["prune"]["method"], _column(r), labels[i]), []).append(i)
    for group in (g for g in cells.values() if len(g) > 1):
        extra = varying(group, lambda k: k.startswith("pruner.") and k not in ("pruner.sparsity", "pruner.pattern"))
        for i in group:
            labels[i] = " ".join([labels[i], *(f"{k}={flats[i].get(k, '-')}" for k in extra)]).strip()
    return [label.replace("'", "") for label in labels]


def pivot_table(runs: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows: dense, then each method; columns: '50%', '60%', '2:4', '4:8' ...; one model per table.
    Runs that differ in a knob besides the pivoted ones (a seed, an eval setting) are never merged
    into one row: each such group gets its own dense and method rows, labelled by the knobs that
    differ, e.g. 'wanda (seed=1)'."""
    columns = sorted({_column(r) for r in runs if r["prune"]["method"] != "none"}, key=lambda c: (":" in c, c))
    contexts = _contexts(runs)
    order = sorted(set(contexts))

    def named(name: str, ctx: str) -> str:
        return f"{name} ({ctx})" if ctx else name

    rows = []
    for ctx in order:
        mine = [r for r, c in zip(runs, contexts, strict=True) if c == ctx]
        methods = sorted({r["prune"]["method"] for r in mine}, key=lambda m: (METHOD_ORDER + [m]).index(m))
        cells = {(r["prune"]["method"], _column(r)): r["metrics"].get(metric) for r in mine}
        dense = next((r["baseline"].get(metric) for r in mine if r["baseline"].get(metric) is not None), None)
        if dense is not None:
            rows.append([named("dense", ctx), *[_fmt(dense)] * len(columns)])
        rows += [[named(m, ctx), *[_fmt(cells.get((m, c))) for c in columns]] for m in methods if m != "none"]
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


def _searches(run: dict) -> list[tuple[str, dict]]:
    """(where, search record) of a run: each stage's search, then the final prune's."""
    p = run.get("prune") or {}
    found = [
        (f"stage {s.get('stage', i)}", s["search"]) for i, s in enumerate(p.get("stages") or []) if s.get("search")
    ]
    return found + ([("final", p["search"])] if p.get("search") else [])


SHAPE_KEYS = ("layers", "heads", "kv_heads", "ffn", "hidden")


def search_table(runs: list[dict], root: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Minitron's architecture search: one row per candidate of every run (and stage) that searched,
    its shape, parameters and deviation from the target, the LM validation loss at each checkpoint
    of its short distillation (columns `lm@<step>`), its final rank, and the kept one marked."""
    searches = [(r, where, s) for r in runs for where, s in _searches(r)]
    steps = sorted({v["step"] for _, _, s in searches for c in s["candidates"] for v in c.get("val", [])})
    header = ["run", "stage", "candidate", *SHAPE_KEYS, "params", "vs target", *[f"lm@{k}" for k in steps]]
    header += ["rank", "kept"]
    rows = []
    for r, where, s in searches:
        best = s["best"]["id"]
        for c in sorted(s["candidates"], key=lambda c: (c["rank"] or 0, c["id"])):
            lm = {v["step"]: v["lm"] for v in c.get("val", [])}
            rows.append(
                [_label(r, root), where, str(c["id"]), *[str(c["shape"][k]) for k in SHAPE_KEYS]]
                + [f"{c['params']:,}", f"{c['deviation']:+.2%}", *[_fmt(lm.get(k)) for k in steps]]
                + [_fmt(c["rank"]), "yes" if c["id"] == best else ""]
            )
    return header, rows


def rankings_table(runs: list[dict], root: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """How the candidates' order by LM validation loss changes over the short distillation: one row
    per checkpoint, the order (best first), pairs ordered unlike the final ranking, and whether the
    ranking is already the final one from there on."""
    header = ["run", "stage", "step", "tokens", "order (best first)", "pairs unlike final", "stable"]
    rows = []
    for run, where, s in ((r, w, s) for r in runs for w, s in _searches(r)):
        stable = s.get("stable_from_step")
        for entry in s.get("rankings", []):
            rows.append(
                [_label(run, root), where, str(entry["step"]), str(entry["tokens"])]
                + [" > ".join(str(i) for i in entry["order"]), str(entry.get("discordant_pairs", ""))]
                + ["yes" if stable is not None and entry["step"] >= stable else ""]
            )
    return header, rows


def _step_metric(step: int, last: bool) -> str:
    """The metrics.json name of a stepwise row's score (MiniBridgeBERT: prune.metrics)."""
    return "prune/teacher_cola_mcc" if step == 0 else "prune/cola_mcc" if last else f"prune/step{step}_cola_mcc"


def _paper_values(run: dict) -> dict[str, float]:
    return {e["metric"]: e["value"] for e in _as_list(run["config"].get("expected")) if e.get("value") is not None}


def steps_table(runs: list[dict], root: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Stepwise compression (MiniBridgeBERT's `prune.steps`): one row per step of every run, the
    parameters, bridges and real encoder blocks after it, its dev score beside the paper's row
    (from the cell's `expected`), which model taught it, and its time and peak memory."""
    header = ["run", "row", "change", "params", "bridges", "blocks", "dev MCC", "paper", "teacher", "seconds",
              "peak MB"]  # fmt: skip
    rows = []
    for r in (r for r in runs if (r.get("prune") or {}).get("steps")):
        steps, paper = r["prune"]["steps"], _paper_values(r)
        for i, st in enumerate(steps):
            teacher = "" if st["step"] == 0 else "none (CE only)" if st["teacher_step"] is None else st["teacher_step"]
            teacher = "fine-tuned" if teacher == 0 else f"step {teacher}" if isinstance(teacher, int) else teacher
            peak = st.get("peak_allocated_mb") or st.get("peak_rss_mb")
            rows.append(
                [_label(r, root), st["name"], st["change"], f"{st['params']:,}", str(st["bridges"]), str(st["blocks"])]
                + [_fmt(st["dev_mcc"]), _fmt(paper.get(_step_metric(st["step"], i == len(steps) - 1)))]
                + [teacher, _fmt(st["seconds"]), _fmt(peak)]
            )
    return header, rows


def steps_plot(runs: list[dict], path: Path) -> Path | None:
    """Dev score against parameters, one line per stepwise run (MiniBridgeBERT's table as a curve),
    the paper's rows as a dashed line at the same parameter counts; None without stepwise runs."""
    stepwise = [r for r in runs if (r.get("prune") or {}).get("steps")]
    if not stepwise:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    paper_drawn = False
    for r in stepwise:
        steps = r["prune"]["steps"]
        xs = [st["params"] / 1e6 for st in steps]
        ax.plot(xs, [st["dev_mcc"] for st in steps], marker="o", label=_short(r))
        paper = _paper_values(r)
        last = len(steps) - 1
        pts = [
            (x, paper.get(_step_metric(st["step"], i == last))) for i, (x, st) in enumerate(zip(xs, steps, strict=True))
        ]
        pts = [(x, v) for x, v in pts if v is not None]
        if len(pts) > 1 and not paper_drawn:  # the paper's table once (every cell carries the same rows)
            ax.plot(*zip(*pts, strict=True), color="gray", linestyle="--", marker="x", label="paper")
            paper_drawn = True
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("dev MCC")
    ax.invert_xaxis()  # compression proceeds left to right
    ax.set_title(", ".join(sorted({r["config"]["model"]["name"] for r in stepwise})))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# The cost columns of a method comparison (LaCo's table): where each value is read in metrics.json
COSTS = {
    "params": lambda r, m: m.get("efficiency/params") or r["prune"].get("params_after"),
    "removed": lambda r, m: r["prune"].get("params_removed_share"),
    "prune s": lambda r, m: r["timings"].get("prune"),
    "peak RSS MB": lambda r, m: r.get("peak_rss_mb"),
    "prefill tok/s": lambda r, m: m.get("efficiency/prefill_tokens_per_s"),
    "decode tok/s": lambda r, m: m.get("efficiency/decode_tokens_per_s"),
}


def comparison_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Methods side by side, one row per run (its `expected` row label), the dense model first: the cost
    columns (parameters, share removed, pruning seconds, the run's peak RSS, prefill and decode tokens/s
    where eval=efficiency ran), every metric the cells' `expected` entries name, in their order, then
    the category scores (`*/cat_*`) the runs hold."""
    metrics = list(dict.fromkeys(e["metric"] for r in runs for e in _as_list(r["config"].get("expected"))))
    # category scores (OpenCompass-style cat_*) where the runs have them: the paper's category columns
    metrics += sorted({k for r in runs for k in r["metrics"] if "/cat_" in k} - set(metrics))
    header = ["row", *COSTS, *metrics]
    rows = []
    dense = next((r for r in runs if r.get("baseline")), None)
    if dense is not None:
        base = dense["baseline"]
        params = base.get("efficiency/params") or dense["prune"].get("params_before")
        costs = [_fmt(params), "0", "", "", _fmt(base.get("efficiency/prefill_tokens_per_s"))]
        rows.append(
            ["Dense", *costs, _fmt(base.get("efficiency/decode_tokens_per_s"))] + [_fmt(base.get(k)) for k in metrics]
        )
    for r in runs:
        label = next((e.get("row") for e in _as_list(r["config"].get("expected")) if e.get("row")), _short(r))
        m = r["metrics"]
        costs = [f(r, m) for f in COSTS.values()]
        costs[1] = None if costs[1] is None else f"{costs[1]:.1%}"
        rows.append([label] + [_fmt(c) for c in costs] + [_fmt(m.get(k)) for k in metrics])
    return header, rows


def extra_views(runs: list[dict], root: Path | None = None) -> dict:
    """Views that only some runs have: a method comparison (cells of one table that differ in method),
    the architecture search's candidates and rankings, and the rows of stepwise compression."""
    views = {}
    cells = [r for r in runs if r["config"].get("expected")]
    if len({r["prune"]["method"] for r in cells}) > 1 and len({r["config"]["model"]["name"] for r in cells}) == 1:
        views["comparison"] = comparison_table(cells)
    if any((r.get("prune") or {}).get("steps") for r in runs):
        views["steps"] = steps_table(runs, root)
    if not any(_searches(r) for r in runs):
        return views
    views["search"] = search_table(runs, root)
    if any(s.get("rankings") for r in runs for _, s in _searches(r)):
        views["rankings"] = rankings_table(runs, root)
    return views


def _curves(runs: list[dict]) -> list[tuple[str, list]]:
    out = []
    for r in runs:
        curve = (r.get("recovery") or {}).get("loss_curve")
        if curve:
            name = (r.get("recovery") or {}).get("name") or (r.get("recovery") or {}).get("loss") or "recovery"
            out.append((f"{_short(r)} ({name})", curve))
    return out


def curves_plot(runs: list[dict], path: Path) -> Path | None:
    """The recovery loss curves ([step, loss] per logged step; one line per run) and, for runs that
    searched architectures, each candidate's LM validation loss at the checkpoints of its short
    distillation (a second panel). None when no run has either."""
    curves = _curves(runs)
    searches = [(r, w, s) for r in runs for w, s in _searches(r) if s.get("rankings")]
    several = len({id(r) for r, _, _ in searches}) > 1
    if not curves and not searches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(curves)) + int(bool(searches))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if curves:
        ax = axes.pop(0)
        for label, curve in curves:
            xs, ys = zip(*[(int(step), float(loss)) for step, loss in curve], strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss")
        ax.set_title("recovery loss curve")
        ax.legend(fontsize=7)
    if searches:
        ax = axes.pop(0)
        for run, where, s in searches:
            for c in s["candidates"]:
                pts = [(v["step"], v["lm"]) for v in c.get("val", [])]
                xs, ys = zip(*pts, strict=True)
                shape = c["shape"]
                label = f"#{c['id']} L{shape['layers']} H{shape['heads']} F{shape['ffn']} D{shape['hidden']}"
                label = f"{_short(run, 24)} {where} {label}" if several else f"{where} {label}"
                ax.plot(xs, ys, marker="o", linewidth=2.5 if c["id"] == s["best"]["id"] else 1, label=label)
        ax.set_xlabel("step of the short distillation")
        ax.set_ylabel("LM validation loss")
        ax.set_title("architecture search candidates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: list[dict], metric: str, path: Path) -> Path:
    """`metric` against target sparsity, one line per (method, pattern); dense as a dashed line. Runs
    with recovery loss curves or an architecture search also get `<stem>_curves.png` beside it.
    Stepwise runs (MiniBridgeBERT), whose sparsity is always 0, get the score against parameters
    (`steps_plot`) instead."""
    if all((r.get("prune") or {}).get("steps") for r in runs):
        return steps_plot(runs, path)
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
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 200, not 2×10²
        # minor ticks: label 2· and 5· each decade only (all eight crowd the axis)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    models = sorted({r["config"]["model"]["name"] for r in runs})
    ax.set_title(", ".join(models))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    curves_plot(runs, path.with_name(f"{path.stem}_curves.png"))
    return path
