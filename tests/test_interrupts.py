"""Faults from outside, end to end (subprocesses of `prunebench run experiment=smoke/tiny`): SIGINT
and SIGTERM mid-run, and two jobs racing on one cold cache."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunebench import cache

TINY = ["run", "experiment=smoke/tiny"]


def start(*args: str, cache_dir: Path, cwd: Path, **env: str) -> subprocess.Popen:
    env = {**os.environ, "PRUNEBENCH_CACHE": str(cache_dir), "HF_ENDPOINT": "http://127.0.0.1:9", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "prunebench.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
    )  # fmt: skip


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 240) -> str:
    """Output so far, once it contains `needle` (progress bars end lines with \\r, so read bytes)."""
    out, end = b"", time.monotonic() + timeout
    while needle.encode() not in out:
        assert time.monotonic() < end and proc.poll() is None, out.decode(errors="replace")
        if select.select([proc.stdout], [], [], 0.5)[0]:
            out += os.read(proc.stdout.fileno(), 1 << 16)
    return out.decode(errors="replace")


def leftovers(root: Path) -> list[Path]:
    return list(root.rglob(".tmp-*"))


def baseline_entries(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "baselines").glob("*.json") if not p.name.endswith(".sum.json")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_names_the_stage_and_leaves_nothing(tmp_path, sig):
    # The whole WikiText-2 split: the dense baseline runs long enough to be interrupted in it.
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    proc = start(
        *TINY, "eval.wikitext2.max_windows=null", f"hydra.run.dir={run_dir}", cache_dir=cache_dir, cwd=tmp_path
    )
    try:
        read_until(proc, "dense baseline: evaluating")
        time.sleep(0.5)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    text = rest.decode(errors="replace")
    assert proc.returncode == 128 + sig, text
    lines = [line for line in text.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted by {sig.name} during baseline; no result written"], text
    assert "Traceback" not in text
    assert not (run_dir / "metrics.json").exists()
    assert not baseline_entries(cache_dir) and not leftovers(tmp_path)


def test_two_jobs_on_one_cold_cache_and_no_secrets(tmp_path):
    """Both succeed, the dense baseline is computed once (the other job waits on its lock and reuses
    it), the entry verifies; an environment variable's value never reaches metrics.json."""
    cache_dir = tmp_path / "cache"
    secret = "hunter2-do-not-write"
    procs = [
        start(*TINY, f"hydra.run.dir={tmp_path / f'run{i}'}", "name=job-${oc.env:PB_SECRET}",
              cache_dir=cache_dir, cwd=tmp_path, PB_SECRET=secret)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()) for i in range(2)]
    assert [r["status"] for r in results] == ["complete", "complete"]
    assert sorted(r["baseline_reused"] for r in results) == [False, True]
    assert results[0]["baseline"] == results[1]["baseline"]
    (entry,) = baseline_entries(cache_dir)
    key = json.loads(cache.sidecar(entry).read_text())["key"]
    assert cache.check(entry, key) is None and not leftovers(tmp_path)
    for i, r in enumerate(results):
        text = (tmp_path / f"run{i}" / "metrics.json").read_text()
        assert secret not in text and str(cache_dir) not in text
        assert r["name"] == "job-${oc.env:PB_SECRET}"
        assert r["config"]["paths"]["cache_dir"].startswith("${oc.env:PRUNEBENCH_CACHE")


def _stop(*args, **kwargs):
    raise KeyboardInterrupt  # what app.py turns SIGINT / SIGTERM into


def _stages() -> dict:
    """Stage name -> (owner, attribute) whose call runs inside that stage of pipeline.run."""
    from prunebench import models, pipeline
    from prunebench.pruners.wanda import Wanda
    from prunebench.recovery.lm_finetune import LMFinetune

    return {
        "load": (models, "load"),
        "baseline": (pipeline, "dense_baseline"),
        "calibration_data": (pipeline, "calibration_windows"),
        "prune": (Wanda, "__call__"),
        "recover": (LMFinetune, "__call__"),  # recovery=none runs no recover stage
        "eval": (pipeline, "evaluate"),
        "save": (models, "save_checkpoint"),
        "write": (pipeline, "write_json"),
    }


@pytest.mark.parametrize("name", ["load", "baseline", "calibration_data", "prune", "recover", "eval", "save", "write"])
def test_every_stage_interrupted_leaves_no_result(tmp_path, monkeypatch, name):
    """An interrupt in any stage surfaces as Interrupted(<that stage>) and leaves no metrics.json and
    no half-written cache entry (the subprocess tests above check the signal -> one line path)."""
    from prunebench import pipeline
    from prunebench.config import compose

    monkeypatch.setattr(*_stages()[name], _stop)
    knobs = ["baseline=false"] if name == "eval" else []  # the dense baseline calls evaluate() too
    knobs += ["recovery=lm_finetune"] if name == "recover" else []
    cfg = compose("experiment=smoke/tiny", "save_model=true", f"paths.cache_dir={tmp_path / 'cache'}", *knobs)
    with pytest.raises(pipeline.Interrupted) as err:
        pipeline.run(cfg, tmp_path / "run")
    assert err.value.stage == name
    assert not (tmp_path / "run" / "metrics.json").exists() and not leftovers(tmp_path)


def test_interrupted_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    from prunebench import models, pipeline
    from prunebench.config import compose

    real = models.save_checkpoint

    def half(model, tokenizer, folder, *args, **kwargs):
        real(model, tokenizer, folder, *args, **kwargs)  # the files are written, then the signal lands
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_checkpoint", half)
    cfg = compose("experiment=smoke/tiny", "save_model=true", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(pipeline.Interrupted, match="save"):
        pipeline.run(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no model/, no .tmp-model, no metrics


def test_swallowed_interrupt_still_ends_interrupted(tmp_path, monkeypatch):
    """A library that catches the KeyboardInterrupt (a finaliser, a broad except) does not turn an
    interrupted run into a complete one: the handler's record is checked before writing."""
    from prunebench import pipeline
    from prunebench.config import compose
    from prunebench.recovery.lm_finetune import LMFinetune

    got: list[int] = []

    def swallowed(self, *args, **kwargs):
        try:
            got.append(signal.SIGINT)  # what app.interrupts' handler records
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            return {}

    monkeypatch.setattr(LMFinetune, "__call__", swallowed)
    cfg = compose(
        "experiment=smoke/tiny", "save_model=true", "recovery=lm_finetune", f"paths.cache_dir={tmp_path / 'cache'}"
    )
    with pytest.raises(pipeline.Interrupted, match="caught the interrupt"):
        pipeline.run(cfg, tmp_path / "run", signals=got)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no model/, no metrics.json
