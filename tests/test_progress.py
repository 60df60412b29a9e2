"""Progress that survives in a log file (issue 29, first contact): a line per stage start and end, a
progress line at most every EVERY seconds of a loop, a heartbeat for stages without a loop."""

from __future__ import annotations

import logging
import time

from prunebench import progress


def test_progress_logs_periodic_lines_off_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="prunebench.progress")
    bar = progress.progress(range(3), desc="wanda", unit="block")
    seen = []
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
        seen.append(i)
    assert seen == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("wanda: block 1/3, 0 s") and lines[-1].endswith("(loss 2.0)"), lines
    assert len(lines) == 3


def test_disabled_progress_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="prunebench.progress")
    assert list(progress.progress(iter([1, 2]), desc="x", enabled=False)) == [1, 2]
    assert not caplog.records


def test_heartbeat_speaks_when_nothing_else_did(caplog):
    caplog.set_level(logging.INFO, logger="prunebench.progress")
    with progress.heartbeat("load", every=1.0):
        time.sleep(2.6)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("load: still running (") for line in lines), lines


def test_a_run_logs_each_stage_start_and_end_with_its_time(tmp_path):
    """The run's log file (what `prunebench run > run.log 2>&1` also shows) names every stage as it starts
    and ends; recovery=none has no recover stage (no time reported for a stage that did nothing)."""
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    res = run_cli("run", "experiment=smoke/tiny", f"hydra.run.dir={run_dir}", cache=tmp_path / "c", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    log = next(run_dir.glob("*.log")).read_text()
    for stage in ("load", "baseline", "calibration_data", "prune", "eval"):
        assert f"{stage}: started" in log and f"{stage}: done in " in log, stage
    assert "recover: started" not in log and "recover " not in res.stdout.split("seconds:")[-1]


def test_roberta_context_counts_its_position_offset():
    """XLM-R/RoBERTa position ids start at padding_idx + 1: 258 positions hold 256 tokens, so the quick
    profile's windows fit tiny-roberta (a 258-token window crashed it)."""
    from prunebench.knobs import context_of

    assert context_of({"model_type": "xlm-roberta", "max_position_embeddings": 258, "pad_token_id": 1}) == 256
    assert context_of({"model_type": "llama", "max_position_embeddings": 258}) == 258


def test_efficiency_records_no_decode_speed_when_noise_leaves_no_decode_time(monkeypatch, caplog):
    """One repeat on a busy machine: generate can time below the prefill; no 1.5e10 tokens/s is recorded."""
    from prunebench import models
    from prunebench.config import compose
    from prunebench.evals import efficiency

    model, tok = models.load(compose("model=tiny-llama").model, "/nonexistent")
    times = iter([2.0, 1.0])  # prefill 2 s, then generate 1 s

    monkeypatch.setattr(efficiency, "timed", lambda fn, device: next(times))
    out = efficiency.Efficiency(prompt_len=8, gen_len=4, repeats=1)(model, tok)
    assert "decode_tokens_per_s" not in out and out["prefill_ms"] == 2000.0
    assert "no decode tokens/s" in caplog.text
