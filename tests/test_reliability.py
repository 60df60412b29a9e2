"""Issue 23 (items 1-5, 9, 12): a run-dir lock, non-finite results, names that become paths, an
unreachable tracker, files outside the named folders, SIGTERM between sweep jobs, offline data.
The bad inputs among them (one `error:` line, exit 2) are rows of tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunebench import PrunebenchError, cache, tracking
from prunebench.cli import app
from prunebench.results import check_metrics, check_numbers, check_weights, git_commit, nonfinite

TINY = ["experiment=smoke/tiny"]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return CliRunner()


# ------------------------------------------------------------------------------------- 1. run-dir lock
def _holder(folder: Path) -> subprocess.Popen:
    """Another live process holding the folder's lock, as a running prunebench job does."""
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
        " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    )
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_locked_dir_refuses_at_once_and_a_rerun_after_works(runner, tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        start = time.perf_counter()
        r = runner.invoke(app, ["run", *TINY, f"hydra.run.dir={out}"])
        assert r.exit_code == 2 and "Traceback" not in r.stderr
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert "another prunebench run is writing into" in line and str(out) in line
        assert time.perf_counter() - start < 30
        assert not (out / "metrics.json").exists() and not (out / ".hydra").exists()  # nothing written there
    finally:
        holder.kill()
        holder.wait()
    # The lock lives only as long as its process: once the holder is gone the same folder runs.
    r = runner.invoke(app, ["run", *TINY, f"hydra.run.dir={out}"])
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    assert list(out.glob("*.lock")) == []  # flock on the folder itself: no lock file left behind


def test_run_dir_lock_is_reentrant_and_released(tmp_path):
    with cache.run_dir_lock(tmp_path / "d"), cache.run_dir_lock(tmp_path / "d"):  # the CLI, then the job
        holder = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY),"
             " fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / "d")], capture_output=True, text=True,
        )  # fmt: skip
        assert holder.returncode != 0 and "BlockingIOError" in holder.stderr
    with cache.run_dir_lock(tmp_path / "d"):  # released: taken again
        pass


# ------------------------------------------------------------------------------------- 2. non-finite results
def test_nan_weights_stop_at_load_naming_the_stage(runner, tmp_path, monkeypatch):
    from prunebench import models

    real = models.load

    def poisoned(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        with torch.no_grad():
            next(iter(model.parameters())).view(-1)[7] = float("nan")
        return model, tok

    monkeypatch.setattr(models, "load", poisoned)
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", *TINY, f"hydra.run.dir={out}"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: load: 1 of ") and "NaN or inf" in line
    assert not (out / "metrics.json").exists()


def test_metric_rule_nan_is_an_error_inf_is_flagged(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_metrics({"wikitext2/ppl": math.inf, "x/acc": 0.5}, "eval") == ["wikitext2/ppl"]
    assert "eval: wikitext2/ppl is inf" in caplog.text
    with pytest.raises(PrunebenchError, match="baseline: wikitext2/ppl is NaN"):
        check_metrics({"wikitext2/ppl": math.nan}, "baseline")
    assert nonfinite({"a": [1.0, [2, -math.inf]], "b": {"c": math.nan}}) == [("a[1][1]", -math.inf), ("b.c", math.nan)]


def test_diverged_training_and_nan_weights_are_errors():
    with pytest.raises(PrunebenchError, match=r"recover: recovery.loss_curve\[1\]\[1\]=nan"):
        check_numbers({"loss_curve": [[0, 2.0], [10, math.nan]]}, "recover", "recovery")
    model = torch.nn.Linear(4, 4)
    check_weights(model, "prune")
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(PrunebenchError, match="prune: 1 of 16 values of weight are NaN or inf"):
        check_weights(model, "prune")


def test_nan_scores_stop_the_pruner(tiny):
    from prunebench.pruners.magnitude import Magnitude

    model, _ = tiny
    pruner = Magnitude(sparsity=0.5)
    pruner.score = lambda name, layer, stat: torch.full_like(layer.weight, math.nan)
    with pytest.raises(PrunebenchError, match="scores for .* hold NaN"):
        pruner.prune_layer("layer", model.model.layers[0].mlp.up_proj, None)


def _overflowing(layers: int):
    """A tiny Llama whose top MLP overflows fp32: finite weights, non-finite activations."""
    from tests.test_depth import tiny_model

    model = tiny_model("tiny-llama", layers)
    with torch.no_grad():
        for lin in ("gate_proj", "up_proj", "down_proj"):  # ~1e90 before the residual: inf, then NaN in the norms
            getattr(model.model.layers[-1].mlp, lin).weight.mul_(1e30)
    return model


def test_nan_similarity_stops_laco():
    from prunebench.models import ByteTokenizer
    from prunebench.pruners import laco

    pruner = laco.LaCo(C=3, L=0, I=1, T=0.5, calib_n=3, calib_chars=60)
    pruner.tokenizer = ByteTokenizer()
    with pytest.raises(PrunebenchError, match=r"prune: LaCo's similarity for merging layers \d+\.\.\d+ is nan"):
        pruner(_overflowing(6))


def test_non_finite_importance_stops_minitron():
    from prunebench.pruners.minitron import importance as mimp
    from tests.conftest import random_calib

    calib = random_calib(n=4, seqlen=16)
    with pytest.raises(PrunebenchError, match="prune: minitron's .* importance .* is not finite"):
        mimp.compute_importance(_overflowing(4), calib.input_ids, 2)


def test_report_marks_non_finite_rows_and_keeps_them(tmp_path):
    from prunebench import report

    base = {"status": "complete", "overrides": [], "config": {"model": {"name": "m"}}, "recovery": None}
    for i, (method, ppl) in enumerate([("wanda", 12.5), ("magnitude", math.inf)]):
        run = {**base, "metrics": {"wikitext2/ppl": ppl}, "baseline": {"wikitext2/ppl": 10.0},
               "non_finite": [] if math.isfinite(ppl) else ["wikitext2/ppl"],
               "prune": {"method": method, "pattern": "unstructured", "target_sparsity": 0.5,
                         "achieved_sparsity": 0.5}}  # fmt: skip
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(run))
    runs = report.collect(tmp_path)
    _, rows = report.runs_table(runs, tmp_path)
    assert len(rows) == 2 and any("⚠ non-finite" in r[0] and "inf ⚠" in r for r in rows)
    _, pivot = report.pivot_table(runs, "wikitext2/ppl")
    assert ["magnitude", "inf ⚠"] in pivot and ["wanda", "12.5"] in pivot


# ------------------------------------------------------------------------------------- 3. names that become paths
def test_model_name_cannot_write_outside_the_cache_or_outputs(runner, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the default run dir: outputs/<date>/<time>_<name> under the cwd
    r = runner.invoke(app, ["run", *TINY, "model.name=../../../escaped"])
    assert r.exit_code == 0, r.stderr
    (found,) = list(tmp_path.rglob("metrics.json"))
    assert found.parent.parent.parent == tmp_path / "work" / "outputs" and found.parent.name.endswith("_escaped_wanda")
    entries = [e for e in (tmp_path / "cache" / "baselines").glob("*.json") if not e.name.endswith(".sum.json")]
    assert [e.name.startswith("_.._.._escaped-") for e in entries] == [True]
    assert list(tmp_path.parent.glob("escaped*")) == []  # where cache/baselines/../../../escaped-*.json would be
    assert cache.safe_name("..") == "unnamed" and cache.safe_name("a/b\\c:d") == "a_b_c_d"


def test_relative_adapter_dir_goes_into_the_run_dir(tmp_path, monkeypatch):
    from prunebench.recovery.lora import LoRA

    with pytest.raises(PrunebenchError, match=r"recovery.adapter_dir=../out leaves the run directory"):
        LoRA(merge="separate", adapter_dir="../out")
    lora = LoRA(merge="separate", adapter_dir="adapters/a")
    with pytest.raises(PrunebenchError, match="relative to the run directory"):  # no run dir given
        lora._adapter_dir(None)
    lora.run_dir = tmp_path / "run"  # as the pipeline gives it
    assert lora._adapter_dir(None) == (tmp_path / "run" / "adapters" / "a").resolve()
    assert LoRA(merge="separate", adapter_dir=str(tmp_path / "abs"))._adapter_dir(None) == tmp_path / "abs"


# ------------------------------------------------------------------------------------- 4. unreachable tracker
def test_unreachable_tracker_checked_once_warned_once_never_waits(tmp_path, caplog):
    tracking._UNREACHABLE.clear()
    cfg = {"logger": {"_target_": "prunebench.tracking.MLflow", "name": "mlflow", "tracking_uri": "http://127.0.0.1:9"}}
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert tracking.preflight(cfg) is False
        for _ in range(3):  # a sweep's jobs: none of them retries
            assert tracking.log_run(cfg, {"config": {"name": "x"}, "metrics": {}}, tmp_path) is None
            assert tracking.log_failure(cfg, tmp_path, "boom") is None
    assert time.perf_counter() - start < 10
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "http://127.0.0.1:9 is unreachable" in warnings[0].getMessage()
    assert tracking.preflight({"logger": {"_target_": "prunebench.tracking.TensorBoard"}}) is True  # local: no check
    tracking._UNREACHABLE.clear()


def test_a_stalled_tracker_call_is_bounded():
    tracking._UNREACHABLE.clear()
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="no answer within"):
        tracking._bounded(lambda: time.sleep(30), "http://stalled", 0.5)
    assert time.perf_counter() - start < 5 and "http://stalled" in tracking._UNREACHABLE
    assert tracking._bounded(lambda: 42, "http://fine", 5) == 42
    tracking._UNREACHABLE.clear()


# ------------------------------------------------------------------------------------- 5. files outside the folders
def test_git_commit_takes_no_index_lock(tmp_path, monkeypatch):
    calls = tmp_path / "argv"
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    answer = 'case "$*" in *rev-parse*) echo abc123;; *) echo " M x.py";; esac'  # a commit, a modified file
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{answer}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert git_commit() == "abc123-dirty"
    argvs = [line.split() for line in calls.read_text().splitlines()]
    # describe --dirty takes .git/index.lock even with --no-optional-locks; rev-parse and status do not.
    assert all(a[0] == "--no-optional-locks" and "describe" not in a for a in argvs)
    assert [a[3] for a in argvs] == ["rev-parse", "status"]


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_git_commit_opens_no_lock_file_in_the_repository(tmp_path):
    trace = tmp_path / "trace"
    code = "from prunebench.results import git_commit; print(git_commit())"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.strip()) >= 40, r.stderr[-1000:]
    assert ".lock" not in "".join(line for line in trace.read_text().splitlines() if "/.git/" in line)


def test_wandb_keeps_its_files_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for var in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{var}_DIR", "")  # registered, so monkeypatch restores the absence afterwards
        monkeypatch.delenv(f"WANDB_{var}_DIR")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    cfg = {"logger": {"_target_": "prunebench.tracking.WandB", "name": "wandb", "mode": "offline"}}
    result = {"config": {"name": "w"}, "metrics": {"x/ppl": 1.0}, "prune": {}, "recovery": None}
    assert tracking.log_run(cfg, result, run_dir)
    assert os.environ["WANDB_CACHE_DIR"] == str(run_dir / "wandb" / "cache")
    assert [p for p in home.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------------- 9. SIGTERM between sweep jobs
def test_sigterm_between_two_jobs_ends_in_one_line(monkeypatch, capsys):
    from prunebench import app as app_mod

    def sweep():  # Hydra's basic launcher: job 1 under its own handler, then a signal before job 2
        with app_mod.interrupts():
            app_mod._FINISHED.append(Path("job0"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("the signal did not stop the sweep")

    monkeypatch.setattr(app_mod, "task", sweep)
    with pytest.raises(SystemExit) as exit_:
        app_mod.run_task()
    assert exit_.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted by SIGTERM between jobs (1 finished, their results kept); no further job runs"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


# ------------------------------------------------------------------------------------- 12. offline, fast
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_offline_data_fails_fast_in_one_line(tmp_path, monkeypatch, capfd, offline):
    from prunebench.data import text
    from prunebench.models import loading

    monkeypatch.setattr(text, "data_roots", lambda: [tmp_path / "empty"])
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    loading.hub_reachable.cache_clear()
    start = time.perf_counter()
    try:
        with pytest.raises(PrunebenchError, match=r"dataset c4 not found: .* \(unreachable\)"):
            text.load_texts("c4")
    finally:
        loading.hub_reachable.cache_clear()
    assert time.perf_counter() - start < 5
    out = capfd.readouterr()
    assert "retry" not in (out.out + out.err).lower()


def test_offline_data_refused_before_the_model_loads(runner, tmp_path, monkeypatch):
    """No data root and no Hub: the run stops at validation, naming the knob, before any model loads."""
    from prunebench.data import text
    from prunebench.models import loading

    monkeypatch.setattr(text, "data_roots", lambda: [tmp_path / "empty"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = []
    monkeypatch.setattr("prunebench.models.load", lambda *a, **k: loaded.append(1))
    loading.hub_reachable.cache_clear()
    try:
        r = runner.invoke(app, ["run", "experiment=smoke/tiny", "pruner=wanda", f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        loading.hub_reachable.cache_clear()
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(
        r"error: (calib\.source|eval\.wikitext2\.dataset): dataset \w+ not found: .*\(unreachable\)", last
    ), last
    assert not loaded and not (tmp_path / "run" / "metrics.json").exists()


def test_two_resumes_of_one_table_do_not_both_run(runner, tmp_path):
    table = tmp_path / "table"
    holder = _holder(table)  # a first `reproduce --resume table` still running
    try:
        r = runner.invoke(app, ["reproduce", "gblm", "--resume", str(table)])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "another prunebench run is writing into" in r.stderr.strip().splitlines()[-1]
    assert not list(table.rglob("metrics.json"))


def test_data_fetch_offline_is_one_line(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    from prunebench.models import loading

    loading.hub_reachable.cache_clear()
    try:
        r = runner.invoke(app, ["data", "fetch", "wikitext2", "--root", str(tmp_path / "data")])
    finally:
        loading.hub_reachable.cache_clear()
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: could not download wikitext2: the Hugging Face Hub is unreachable; run this where it is"
    ]
    assert not (tmp_path / "data").exists()


def test_tracker_folders_relative_to_the_run_dir(tmp_path):
    run = tracking.Run(name="r", group="g", root=tmp_path, run_dir=tmp_path / "run", config={})
    with pytest.raises(PrunebenchError, match=r"logger.log_dir=../tb leaves the run directory"):
        tracking.TensorBoard(log_dir="../tb")
    with pytest.raises(PrunebenchError, match=r"logger.dir=../../w leaves the run directory"):
        tracking.WandB(dir="../../w")
    pytest.importorskip("torch.utils.tensorboard")
    assert tracking.TensorBoard(log_dir="tb").log(run) == f"event files in {tmp_path / 'run' / 'tb'}"
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    shared = tmp_path / "shared"
    assert tracking.TensorBoard(log_dir=str(shared)).log(run) == f"event files in {shared / 'run'}"


def test_summary_says_which_metrics_overflowed():
    from prunebench.app import summary

    result = {"config": {"model": {"name": "m"}}, "prune": {"method": "wanda", "pattern": "unstructured",
              "target_sparsity": 0.5, "achieved_sparsity": 0.5, "nonzero_before": 2, "nonzero_after": 1},
              "metrics": {"wikitext2/ppl": math.inf}, "baseline": {"wikitext2/ppl": 10.0}, "timings": {},
              "peak_rss_mb": 1.0, "non_finite": ["wikitext2/ppl"]}  # fmt: skip
    text = summary(result, Path("run"))
    assert "inf" in text and "warning: wikitext2/ppl overflowed to inf (metrics.json non_finite)" in text
