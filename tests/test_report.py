"""report: runs table, the papers' method x pattern pivot, paper comparison, LaTeX, plot."""

from __future__ import annotations

import json
from pathlib import Path

from prunebench import report


def fake_run(folder: Path, method: str, pattern: str, ppl: float, expected: dict | None = None) -> None:
    folder.mkdir(parents=True)
    data = {
        "status": "complete",
        "overrides": [f"pruner={method}", f"pruner.pattern={pattern}"],
        "config": {"model": {"name": "m"}, "expected": expected},
        "metrics": {"wikitext2/ppl": ppl, "wikitext2/windows": 4},
        "baseline": {"wikitext2/ppl": 10.0},
        "prune": {"method": method, "pattern": pattern, "target_sparsity": 0.5, "achieved_sparsity": 0.5},
    }
    (folder / "metrics.json").write_text(json.dumps(data))


def test_pivot_has_dense_on_top_and_one_column_per_pattern(tmp_path):
    for i, (m, p, v) in enumerate(
        [("magnitude", "unstructured", 30.0), ("wanda", "unstructured", 15.0), ("wanda", "2:4", 25.0)]
    ):
        fake_run(tmp_path / str(i), m, p, v)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metrics.json").write_text(json.dumps({"status": "running"}))
    runs = report.collect(tmp_path)
    assert len(runs) == 3  # incomplete runs are skipped
    header, rows = report.pivot_table(runs, "wikitext2/ppl")
    assert header == ["method (wikitext2/ppl)", "50%", "2:4"]
    assert rows == [["dense", "10", "10"], ["magnitude", "30", ""], ["wanda", "15", "25"]]
    tex = report.latex(header, rows)
    assert r"50\%" in tex and tex.startswith(r"\begin{tabular}")
    png = report.plot(runs, "wikitext2/ppl", tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_paper_table_marks_outside_tolerance(tmp_path):
    exp = {"table": "T3", "row": "Wanda", "column": "7B 50%", "metric": "wikitext2/ppl", "tolerance": 0.05}
    fake_run(tmp_path / "a", "wanda", "unstructured", 6.45, {**exp, "value": 6.42})
    fake_run(tmp_path / "b", "wanda", "2:4", 11.2, {**exp, "column": "7B 2:4", "value": 11.02})
    fake_run(tmp_path / "c", "wanda", "4:8", 9.0, {**exp, "column": "x", "value": 7.97, "compare": False})
    header, rows = report.paper_table(report.collect(tmp_path))
    by_col = {r[2]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_col["7B 50%"]["ok"] == "yes" and by_col["7B 50%"]["diff"] == "+0.030"
    assert by_col["7B 2:4"]["ok"].startswith("NO")
    assert by_col["x"]["ok"] == "" and by_col["x"]["diff"] == ""  # other model: shown, not judged
