"""The CLI end to end on tiny-llama: run, run -m, ls, report, and bad input. Most tests run it in this
process (conftest's `cli_inproc`); `cli`, a real `python -m prunebench.cli` subprocess, covers the
entry point itself (test_run_writes_metrics, test_multirun_and_report)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from prunebench.cli import split_args
from tests.conftest import NO_HUB

TINY = ["experiment=smoke/tiny"]


def prunebench(*args: str, cache, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNEBENCH_CACHE": str(cache), "HF_ENDPOINT": NO_HUB}
    return subprocess.run(
        [sys.executable, "-m", "prunebench.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture
def cli(tmp_path):
    return lambda *args: prunebench(*args, cache=tmp_path / "cache", cwd=tmp_path)


def test_run_writes_metrics(cli, tmp_path):
    out = tmp_path / "run1"
    r = cli("run", *TINY, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    assert "dense" in r.stdout and "pruned" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    assert set(m["metrics"]) >= {"wikitext2/ppl", "wikitext2/windows", "wikitext2/tokens"}
    assert m["baseline"]["wikitext2/ppl"] > 0 and not m["baseline_reused"]
    assert m["prune"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for key in ("config", "timings", "peak_rss_mb", "versions", "git_commit", "prune"):
        assert key in m
    # A rerun into the same directory is refused and leaves the first result untouched.
    before = (out / "metrics.json").read_bytes()
    r2 = cli("run", *TINY, f"hydra.run.dir={out}")
    assert r2.returncode == 2 and "already" in r2.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_multirun_and_report(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("run", "-m", *TINY, "pruner=magnitude,wanda", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    runs = sorted(sweep.rglob("metrics.json"))
    assert len(runs) == 2
    second = json.loads(runs[1].read_text())
    assert second["baseline_reused"]  # the dense baseline is computed once per sweep
    r = cli("report", str(sweep))
    assert r.returncode == 0, r.stderr
    assert "| magnitude |" in r.stdout.replace("  ", " ") or "magnitude" in r.stdout
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(row["pruner"] for row in rows) == ["magnitude", "wanda"]
    assert (sweep / "report.md").exists()


def test_ls(cli_inproc):
    r = cli_inproc("ls")
    assert r.exit_code == 0
    for group in ("model:", "calib:", "pruner:", "recovery:", "eval:", "experiment:"):
        assert group in r.stdout
    r = cli_inproc("ls", "pruner")
    assert "wanda" in r.stdout and "model:" not in r.stdout
    assert cli_inproc("ls", "nope").exit_code == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["pruner=foo"], "unknown pruner 'foo'"),
        (["pruner.sparsity=1.5"], "outside [0, 1)"),
        (["pruner.pattern=4:2"], "N < M"),
        (["calib.seqlen=0"], "calib.seqlen"),
        (["calib.nsamples=-4"], "calib.nsamples"),
        (["pruner.nope=1"], "pruner.nope"),
        (["-m", "pruner=wanda", "pruner.sparsity=0.5,1.2"], "1.2"),
        (["model=llama2-7b"], "model.path"),
        (["pruner=gblm", "pruner.grad_norm=l3"], "grad_norm"),
        (["pruner=sparsegpt", "pruner.sequential=false"], "one-shot"),
        (["pruner=wanda", "pruner.group=column"], "pruner.group"),
        (["pruner=layer_drop", "pruner.layers=31"], "pruner.layers"),
        (["pruner=layer_drop", "pruner.keep=null", "pruner.remove=[]"], "pruner.remove"),
        (["pruner=laco", "pruner.C=1"], "pruner.C"),
        (["pruner=laco", "pruner.H=40"], "pruner.H"),
        (["pruner=shortgpt", "pruner.n=30"], "pruner.n"),
        (["device=cuda:7"], "device=cuda:7"),
        (["placement=banana"], "placement="),
        (["model.dtype=int3"], "model.dtype"),
        (["pruner=gblm", "placement=offload"], "placement=offload"),
    ],
)
def test_bad_input_is_one_line(cli_inproc, tmp_path, args, needle):
    r = cli_inproc("run", *args, f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.exit_code == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_depth_pruner_runs_end_to_end(cli_inproc, tmp_path):
    out = tmp_path / "depth"
    r = cli_inproc(
        "run",
        *TINY,
        "model.hf_config.num_hidden_layers=6",
        "pruner=laco",
        "pruner.T=0.05",
        "pruner.L=0",
        f"hydra.run.dir={out}",
    )
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["prune"]["params_after"] < m["prune"]["params_before"]
    assert m["config"]["model"]["name"] == "tiny-llama" and "layers" in r.stdout
    r = cli_inproc("report", str(out))
    kept = len(m["prune"]["layers_kept"])
    assert r.exit_code == 0 and f"| {kept}/6 ({1 - kept / 6:.0%} removed) |" in r.stdout


def test_failed_run_leaves_no_metrics(cli_inproc, tmp_path):
    out = tmp_path / "enc"
    r = cli_inproc("run", "model=tiny-bert", "calib.nsamples=2", "calib.seqlen=16", f"hydra.run.dir={out}")
    assert r.exit_code == 2 and "causal language model" in r.stderr
    assert not (out / "metrics.json").exists()


def test_hydra_flags_pass_through(cli_inproc):
    r = cli_inproc("run", *TINY, "--cfg", "job")
    assert r.exit_code == 0 and "tiny-llama" in r.stdout
    assert split_args(["-m", "--cfg", "job", "a=1", "--info", "defaults", "b=2"]) == ["a=1", "b=2"]


def test_report_pivot_plot_and_bad_metric(cli_inproc, tmp_path):
    sweep = tmp_path / "grid"
    r = cli_inproc(
        "run", "-m", *TINY, "pruner=magnitude,wanda", "pruner.pattern=unstructured,2:4", f"hydra.sweep.dir={sweep}"
    )
    assert r.exit_code == 0, r.stderr
    r = cli_inproc("report", str(sweep), "--plot")
    assert r.exit_code == 0, r.stderr
    assert "| dense |" in r.stdout and "| 2:4 |" in r.stdout.replace("50% | 2:4", "| 2:4")
    for name in ("report.csv", "report.md", "report.tex", "pivot.csv", "pivot.md", "pivot.tex", "report.png"):
        assert (sweep / name).exists(), name
    r = cli_inproc("report", str(sweep), "--metric", "nope/ppl")
    assert r.exit_code == 2 and "wikitext2/ppl" in r.stderr


@pytest.mark.parametrize("paper", ["gblm", "minitron", "minibridgebert"])
def test_reproduce_paper_scale_fails_cleanly(cli_inproc, tmp_path, paper):
    """No Hub here: the paper-scale models (Llama, Minitron-8B, bert-base-uncased) end in one line."""
    r = cli_inproc("reproduce", paper, "--scale", "paper")  # cwd is tmp_path
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "model.path" in r.stderr.splitlines()[-1]
    assert not list(tmp_path.rglob("metrics.json"))


def test_reproduce_unknown_paper(cli_inproc):
    r = cli_inproc("reproduce", "nope")
    assert r.exit_code == 2 and "available:" in r.stderr


def test_sweep_check_composes_a_kd_teacher():
    # A KD teacher given by name composes its model config while the sweep check holds Hydra: no re-init error.
    from prunebench.cli import check_overrides

    assert check_overrides(["experiment=smoke/tiny", "recovery=kd", "recovery.teacher=tiny-llama"]) == 1


def test_reproduce_forces_knobs_the_master_config_lacks():
    # Hydra composes a multirun's master config without the swept experiment: its knobs must be force-set.
    from prunebench.cli import _force

    assert _force("pruner.train_limit=512") == "++pruner.train_limit=512"
    for arg in ("model=tiny-llama", "eval=[efficiency]", "+x=1", "~y", "hydra.verbose=true", "--cfg", "-m"):
        assert _force(arg) == arg


def test_reproduce_resume_skips_complete_cells(cli_inproc, tmp_path):
    from prunebench.cli import remaining

    r = cli_inproc("run", *TINY, f"hydra.run.dir={tmp_path / 'table' / '0'}")
    assert r.exit_code == 0, r.stderr
    assert remaining(["smoke/tiny", "smoke/other"], tmp_path / "table") == ["smoke/other"]
    r = cli_inproc("reproduce", "gblm", "--resume", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "--resume" in r.stderr.splitlines()[-1]


def test_reproduce_passes_group_choices_through_and_checks_save_format():
    from prunebench import PrunebenchError
    from prunebench.cli import _force, check_overrides

    for arg in ("hydra/launcher=joblib", "hydra/sweeper=optuna_alpha", "model@teacher=tiny-llama"):
        assert _force(arg) == arg
    with pytest.raises(PrunebenchError, match="save_format"):
        check_overrides(["experiment=smoke/tiny", "save_model=true", "save_format=compresed-tensors"])


def test_summary_says_when_nothing_was_evaluated(tmp_path):
    """eval=[] is a valid pruning-only run, and the summary says that nothing was evaluated."""
    from prunebench.app import summary

    prune = {"method": "wanda", "pattern": "unstructured", "target_sparsity": 0.5, "achieved_sparsity": 0.5,
             "nonzero_before": 10, "nonzero_after": 5}  # fmt: skip
    result = {"config": {"model": {"name": "m"}, "eval": {}}, "prune": prune, "metrics": {}, "baseline": {},
              "timings": {"prune": 1.0}, "peak_rss_mb": 1.0}  # fmt: skip
    assert "nothing evaluated (eval=[])" in summary(result, tmp_path)
    result["config"]["eval"] = {"wikitext2": {"_target_": "prunebench.evals.perplexity.Perplexity"}}
    assert "nothing evaluated" not in summary(result, tmp_path)


def test_quick_profile_fits_its_windows_to_a_shorter_context(cli_inproc, tmp_path):
    """`prunebench run model=tiny-llama pruner=wanda`: the quick profile's 512-token windows exceed the
    model's 256 positions; with no length set, the run uses 256 and says so."""
    out = tmp_path / "quick"
    r = cli_inproc("run", "model=tiny-llama", "pruner=wanda", "calib.nsamples=2", "eval.wikitext2.max_windows=2",
            f"hydra.run.dir={out}")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "calib.seqlen=256, eval.wikitext2.seqlen=256, model tiny-llama's context" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["shape"] == [2, 256] and m["metrics"]["wikitext2/seqlen"] == 256
