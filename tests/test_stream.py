"""placement=stream (models/stream.py, issue 31): the model stays on disk and one block at a time is read,
pruned, written as its own shard and freed. On a saved tiny Llama: the same saved weights and perplexity
as placement=device for Wanda and SparseGPT; a run SIGKILLed after its third block and rerun into the same
folder says where it resumes and saves the same weights (digest) as a run never stopped; what cannot
stream says so in one line before loading."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import NO_HUB
from tests.test_cli import prunebench as _prunebench


def prunebench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _prunebench(*args, cache=cwd / "cache", cwd=cwd)


LAYERS = 4
MODEL = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "baseline=false"]
BASE = [*MODEL, "eval.wikitext2.seqlen=64", "eval.wikitext2.max_windows=4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A 4-block tiny Llama saved as a Hugging Face folder (what placement=stream reads)."""
    root = tmp_path_factory.mktemp("stream")
    r = prunebench("run", *MODEL, f"model.hf_config.num_hidden_layers={LAYERS}", "pruner=none", "eval=[]",
                   "save_model=true", f"hydra.run.dir={root / 'src'}", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "src" / "model"


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name, t in sorted(weights(model_dir).items()):
        h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_streamed_run_equals_the_in_memory_run(folder, tmp_path, pruner):
    runs = {}
    for where in ("device", "stream"):
        out = tmp_path / where
        r = prunebench("run", *BASE, f"model.path={folder}", f"pruner={pruner}", f"placement={where}",
                       "save_model=true", f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        runs[where] = json.loads((out / "metrics.json").read_text())
    device, stream = runs["device"], runs["stream"]
    assert stream["device"]["placement"] == "stream"
    assert stream["metrics"]["wikitext2/ppl"] == device["metrics"]["wikitext2/ppl"]
    assert stream["prune"]["achieved_sparsity"] == device["prune"]["achieved_sparsity"] > 0.45
    assert stream["prune"]["nonzero_after"] == device["prune"]["nonzero_after"]
    a, b = weights(tmp_path / "device" / "model"), weights(tmp_path / "stream" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "stream" / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == LAYERS + 1  # a shard per block, one for the rest
    assert not (tmp_path / "stream" / "model" / "progress.json").exists()


KILL_AFTER_THIRD_BLOCK = """
import os, signal, sys
from prunebench.models import stream
write = stream.Stream.write_block
def write_then_die(self, i, block):
    write(self, i, block)
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
stream.Stream.write_block = write_then_die
from prunebench.cli import app
sys.argv = ["prunebench", *sys.argv[1:]]
app()
"""


def test_a_killed_streamed_run_resumes_from_its_last_block(folder, tmp_path):
    """SIGKILL right after block 2's shard and progress line are written (the kernel's OOM killer would
    give no warning either); the rerun verifies blocks 0-2 by SHA-256, replays them to rebuild the
    calibration activations, prunes block 3, and saves what an uninterrupted run saves."""
    args = ["run", *BASE, f"model.path={folder}", "pruner=sparsegpt", "placement=stream", "save_model=true"]
    whole = prunebench(*args, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "killed"
    env_cmd = [sys.executable, "-c", KILL_AFTER_THIRD_BLOCK, *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PRUNEBENCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": NO_HUB}
    killed = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((run_dir / "model.partial" / "progress.json").read_text())
    assert sorted(progress["blocks"]) == ["0", "1", "2"]
    again = prunebench(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stream: resuming after block 2 of 4" in again.stderr + again.stdout
    assert digest(run_dir / "model") == digest(tmp_path / "whole" / "model")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path / "whole"))
    assert a["metrics"]["wikitext2/ppl"] == b["metrics"]["wikitext2/ppl"]


def test_another_configuration_never_resumes_these_blocks(folder, tmp_path):
    args = ["run", *BASE, f"model.path={folder}", "pruner=wanda", "placement=stream"]
    partial = tmp_path / "o" / "model.partial"
    partial.mkdir(parents=True)
    (partial / "progress.json").write_text(json.dumps({"key": "another run", "blocks": {}}))
    r = prunebench(*args, f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2 and "holds the blocks of a streamed run with another configuration" in r.stderr


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["pruner=gblm"], "placement=stream prunes and evaluates one block at a time"),
        (["pruner=wanda", "pruner.sequential=false"], "placement=stream prunes and evaluates one block at a time"),
        (["pruner=wanda", "recovery=kd"], "need the whole model at once"),
        (["pruner=wanda", "save_model=true", "save_format=compressed-tensors"], "writes the pruned blocks as"),
    ],
    ids=["gblm", "one-shot", "recovery", "save-format"],
)
def test_what_cannot_stream_is_refused_in_one_line(folder, tmp_path, extra, needle):
    r = prunebench("run", *BASE, f"model.path={folder}", "placement=stream", *extra,
                   f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in r.stderr.splitlines() if needle in line)
    ]


def test_a_model_built_in_memory_cannot_stream(tmp_path):
    r = prunebench("run", *BASE, "pruner=wanda", "placement=stream", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2 and "is built in memory; save it first (save_model=true)" in r.stderr
