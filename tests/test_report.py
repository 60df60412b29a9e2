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


def fake_search_run(folder: Path) -> None:
    """A Minitron run that searched two candidates and then distilled (metrics.json's shape)."""
    shape = {"layers": 30, "heads": 6, "kv_heads": 3, "ffn": 832, "hidden": 576}

    def cand(i, losses, rank):
        val = [{"step": s, "tokens": 256 * s, "lm": v, "kd": v / 3} for s, v in zip((0, 2, 4), losses, strict=True)]
        return {"id": i, "shape": {**shape, "ffn": 832 + 128 * i}, "params": 91_384_128 + i, "deviation": 0.014,
                "val": val, "rank": rank, "seconds": 1.0}  # fmt: skip

    search = {
        "candidates": [cand(0, [4.0, 3.5, 3.3], 2), cand(1, [3.9, 3.6, 3.2], 1)],
        "rankings": [
            {"step": 0, "tokens": 0, "order": [1, 0], "discordant_pairs": 0},
            {"step": 2, "tokens": 512, "order": [0, 1], "discordant_pairs": 1},
            {"step": 4, "tokens": 1024, "order": [1, 0], "discordant_pairs": 0},
        ],
        "stable_from_step": 4,
        "best": {"id": 1, "shape": {**shape, "ffn": 960}, "params": 91_384_129, "deviation": 0.014},
    }
    folder.mkdir(parents=True)
    data = {
        "status": "complete",
        "overrides": ["pruner=minitron", "pruner.target_params=0.67"],
        "config": {"model": {"name": "m"}, "expected": None},
        "metrics": {"wikitext2/ppl": 40.0, "recovery/lm_val_loss": 3.1},
        "baseline": {"wikitext2/ppl": 20.0},
        "prune": {
            "method": "minitron",
            "pattern": "unstructured",
            "target_sparsity": 0.0,
            "achieved_sparsity": 0.0,
            "layers_kept": list(range(30)),
            "layers_before": 30,
            "search": search,
        },
        "recovery": {"name": "kd", "loss_curve": [[0, 1.2], [2, 0.9], [4, 0.7]]},
    }
    (folder / "metrics.json").write_text(json.dumps(data))


def test_search_candidates_table_and_rankings(tmp_path):
    fake_search_run(tmp_path / "s")
    fake_run(tmp_path / "w", "wanda", "unstructured", 15.0)  # runs without a search add no rows
    runs = report.collect(tmp_path)
    views = report.extra_views(runs, tmp_path)
    header, rows = views["search"]
    assert header[-5:] == ["lm@0", "lm@2", "lm@4", "rank", "kept"] and len(rows) == 2
    first = dict(zip(header, rows[0], strict=True))
    assert first["candidate"] == "1" and first["kept"] == "yes" and first["ffn"] == "960" and first["lm@4"] == "3.2"
    assert first["params"] == "91,384,129" and first["vs target"] == "+1.40%" and first["stage"] == "final"
    header, rows = views["rankings"]
    assert [r[header.index("order (best first)")] for r in rows] == ["1 > 0", "0 > 1", "1 > 0"]
    assert [r[header.index("stable")] for r in rows] == ["", "", "yes"]
    assert "|" in report.markdown(*views["search"])
    assert report.extra_views([r for r in runs if "search" not in r["prune"]]) == {}


def test_plot_draws_the_kd_loss_curve_and_candidates(tmp_path):
    fake_search_run(tmp_path / "s")
    runs = report.collect(tmp_path)
    png = report.plot(runs, "wikitext2/ppl", tmp_path / "report.png")
    assert png.stat().st_size > 1000 and (tmp_path / "report_curves.png").stat().st_size > 1000
    assert report.curves_plot([{"recovery": None, "prune": {}}], tmp_path / "none.png") is None


def fake_steps_run(folder: Path) -> None:
    """A MiniBridgeBERT-shaped metrics.json: the teacher row, then two bridge steps."""
    folder.mkdir(parents=True)
    steps = [
        {"name": "teacher", "step": 0, "change": "fine-tuned", "params": 1000, "bridges": 0, "blocks": 4,
         "dev_mcc": 40.0, "teacher_step": None, "seconds": 5.0, "peak_rss_mb": 900.0},
        {"name": "(a)", "step": 1, "change": "bridge block 2", "params": 800, "bridges": 1, "blocks": 3,
         "dev_mcc": 38.5, "teacher_step": 0, "seconds": 3.0, "peak_rss_mb": 950.0},
        {"name": "(b)", "step": 2, "change": "bridge block 4", "params": 600, "bridges": 2, "blocks": 2,
         "dev_mcc": 35.25, "teacher_step": 1, "seconds": 3.5, "peak_rss_mb": 940.0},
    ]  # fmt: skip
    expected = [{"metric": "prune/teacher_cola_mcc", "value": 56.6}, {"metric": "prune/step1_cola_mcc", "value": 56.7},
                {"metric": "prune/cola_mcc", "value": 56.0}]  # fmt: skip
    data = {
        "status": "complete",
        "overrides": ["experiment=minibridgebert/embedded/mpnet_stepwise"],
        "config": {"model": {"name": "mpnet-base"}, "expected": expected},
        "metrics": {"prune/cola_mcc": 35.25, "prune/teacher_cola_mcc": 40.0},
        "baseline": {},
        "prune": {"method": "minibridge", "pattern": "unstructured", "target_sparsity": 0.0,
                  "achieved_sparsity": 0.0, "steps": steps},
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(data))


def test_stepwise_runs_get_the_steps_table_and_score_against_parameters(tmp_path):
    fake_steps_run(tmp_path / "b")
    runs = report.collect(tmp_path)
    header, rows = report.extra_views(runs, tmp_path)["steps"]
    col = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    assert col["row"] == ["teacher", "(a)", "(b)"] and col["params"] == ["1,000", "800", "600"]
    assert col["dev MCC"] == ["40", "38.5", "35.25"] and col["paper"] == ["56.6", "56.7", "56"]  # last row: cola_mcc
    assert col["teacher"] == ["", "fine-tuned", "step 1"] and col["peak MB"] == ["900", "950", "940"]
    png = report.plot(runs, "prune/cola_mcc", tmp_path / "report.png")  # sparsity is 0: MCC vs parameters
    assert png.stat().st_size > 1000
    fake_run(tmp_path / "w", "wanda", "unstructured", 20.0)
    assert report.steps_plot([r for r in report.collect(tmp_path) if r["prune"]["method"] == "wanda"], png) is None


def test_pivot_never_merges_runs_of_different_seeds(tmp_path):
    """Dense and pruned cells of one row come from runs that share every knob but the pivoted ones:
    two seeds give two labelled groups, each with its own dense baseline."""
    for seed, dense, pruned in ((0, 10.0, 15.0), (1, 11.0, 17.0)):
        for method, ppl in (("magnitude", pruned * 2), ("wanda", pruned)):
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            cfg = {
                "model": {"name": "m"},
                "seed": seed,
                "name": f"m_{method}",
                "pruner": {"name": method, "sparsity": 0.5},
            }
            data = {
                "status": "complete",
                "config": cfg,
                "metrics": {"wikitext2/ppl": ppl},
                "baseline": {"wikitext2/ppl": dense},
                "prune": {"method": method, "pattern": "unstructured", "target_sparsity": 0.5},
            }
            (folder / "metrics.json").write_text(json.dumps(data))
    header, rows = report.pivot_table(report.collect(tmp_path), "wikitext2/ppl")
    assert header == ["method (wikitext2/ppl)", "50%"]
    assert rows == [
        ["dense (seed=0)", "10"], ["magnitude (seed=0)", "30"], ["wanda (seed=0)", "15"],
        ["dense (seed=1)", "11"], ["magnitude (seed=1)", "34"], ["wanda (seed=1)", "17"],
    ]  # fmt: skip


def test_pivot_labels_runs_that_would_share_a_cell(tmp_path):
    """Two GBLM runs differing only in alpha would fall into one cell: the row names the alpha."""
    for alpha, ppl in ((1, 20.0), (100, 18.0)):
        folder = tmp_path / f"a{alpha}"
        folder.mkdir()
        cfg = {"model": {"name": "m"}, "seed": 0, "pruner": {"name": "gblm", "sparsity": 0.5, "alpha": alpha}}
        data = {"status": "complete", "config": cfg, "metrics": {"wikitext2/ppl": ppl},
                "baseline": {"wikitext2/ppl": 10.0},
                "prune": {"method": "gblm", "pattern": "unstructured", "target_sparsity": 0.5}}  # fmt: skip
        (folder / "metrics.json").write_text(json.dumps(data))
    _, rows = report.pivot_table(report.collect(tmp_path), "wikitext2/ppl")
    assert ["gblm (pruner.alpha=1)", "20"] in rows and ["gblm (pruner.alpha=100)", "18"] in rows


def test_runs_table_cuts_an_absurd_override(tmp_path):
    fake_run(tmp_path / "a", "wanda", "unstructured", 15.0)
    data = json.loads((tmp_path / "a" / "metrics.json").read_text())
    data["overrides"].append("+pruner.note=" + "x" * 100_000)
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(data))
    _, rows = report.runs_table(report.collect(tmp_path), tmp_path)
    assert len(rows[0][0]) == 200 and rows[0][0].endswith("…")


def test_comparison_view_puts_methods_side_by_side_with_their_costs():
    """LaCo's table: one row per method (its expected row label), the dense row first, cost columns and the
    cells' metrics plus category scores."""
    from prunebench.report import comparison_table, extra_views

    def run(method, row, removed, ppl):
        return {
            "config": {"model": {"name": "m"}, "expected": [{"row": row, "metric": "wikitext2/ppl"}]},
            "prune": {
                "method": method,
                "params_before": 100,
                "params_after": 100 - removed,
                "params_removed_share": removed / 100,
            },
            "metrics": {"wikitext2/ppl": ppl, "opencompass/cat_reasoning": 0.5, "efficiency/decode_tokens_per_s": 9.0},
            "baseline": {"wikitext2/ppl": 10.0, "opencompass/cat_reasoning": 0.6},
            "timings": {"prune": 1.5},
            "peak_rss_mb": 123.0,
        }

    runs = [run("laco", "LaCo", 24, 30.0), run("slicegpt", "SliceGPT", 23, 40.0)]
    header, rows = comparison_table(runs)
    assert header[-2:] == ["wikitext2/ppl", "opencompass/cat_reasoning"] and "prune s" in header
    assert [r[0] for r in rows] == ["Dense", "LaCo", "SliceGPT"]
    assert rows[0][1] == "100" and rows[0][-2] == "10" and rows[2][2] == "23.0%" and rows[2][-2] == "40"
    assert "comparison" in extra_views(runs)
