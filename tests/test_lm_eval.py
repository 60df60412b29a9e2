"""eval=lm_eval: any lm-evaluation-harness task on the in-memory tiny Llama, local task data offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prunebench import PrunebenchError
from prunebench.evals import lm_eval as lm_eval_mod
from prunebench.evals.lm_eval import LMEval, hf_tokenizer
from prunebench.evals.opencompass import OpenCompass
from prunebench.models.loading import ByteTokenizer
from tests.conftest import NO_HUB, compose_cfg


def test_hf_tokenizer_keeps_the_byte_tokenizer_ids():
    byte = ByteTokenizer()
    fast = hf_tokenizer(byte)
    for text in ["Question: héllo wörld?\nAnswer:", "  two  spaces\ttab", "मराठी ०१"]:
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == byte.encode(text)
        assert fast.decode(ids) == text
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    assert hf_tokenizer(fast) is fast  # a Hugging Face tokenizer passes through


def test_local_tasks_give_every_metric_with_stderr(tiny, tmp_path):
    model, tok = tiny
    ev = LMEval(tasks=["piqa", "arc_easy", "winogrande"], limit=4, num_fewshot=1, cache_dir=str(tmp_path))
    out = ev(model, tok)
    expected = {f"{t}/{m}" for t in ("piqa", "arc_easy") for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    assert set(out) == expected | {"winogrande/acc", "winogrande/acc_stderr"}
    assert all(0.0 <= v <= 1.0 for v in out.values()), out
    assert all(out[k] * 4 == pytest.approx(round(out[k] * 4)) for k in out if not k.endswith("stderr"))  # 4 examples
    json.dumps(out)  # plain floats: metrics.json takes them as they are
    # The OpenCompass preset runs the same lm-eval task: its score is lm_eval's acc.
    preset = OpenCompass(tasks=["piqa"], limit=4, cache_dir=str(tmp_path))(model, tok)
    assert preset["piqa"] == out["piqa/acc"] and preset["avg"] == out["piqa/acc"]


def test_bad_input_is_one_line(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    with pytest.raises(PrunebenchError, match="tasks is empty"):
        LMEval(tasks=[])
    with pytest.raises(PrunebenchError, match="num_fewshot=-1"):
        LMEval(tasks=["piqa"], num_fewshot=-1)
    # Name checks read lm-eval's task index; an index without built-in tasks keeps this test fast.
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(lm_eval_mod, "task_manager", lambda defaults: TaskManager(include_defaults=False))
    with pytest.raises(PrunebenchError, match=r"unknown lm-eval task\(s\) \['nope'\]") as err:
        LMEval(tasks=["piqa", "nope"], cache_dir=str(tmp_path))(model, tok)
    assert "\n" not in str(err.value)


def test_encoder_is_refused(tmp_path):
    from prunebench import models

    model, tok = models.load(compose_cfg("model=tiny-bert").model, cache_dir="/nonexistent")
    with pytest.raises(PrunebenchError, match="needs a causal language model"):
        LMEval(tasks=["piqa"], cache_dir=str(tmp_path))(model, tok)


@pytest.mark.slow  # indexes lm-eval's ~15,000 built-in tasks, here and in a fresh process (tens of seconds each)
def test_cli_local_task_and_offline_hub_task(tmp_path, cli_inproc):
    run = ["run", "model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "pruner=magnitude", "eval=[lm_eval]"]

    def offline(*args):
        # A subprocess: huggingface_hub and datasets read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, when
        # imported, so setting them in this process would change nothing. Environment as conftest.run_cli's.
        env = {**os.environ, "PRUNEBENCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": NO_HUB,
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        argv = [sys.executable, "-m", "prunebench.cli", *run, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    out = tmp_path / "run"
    r = cli_inproc(*run, "eval.lm_eval.tasks=[piqa]", "eval.lm_eval.limit=2", f"hydra.run.dir={out}")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    for result in (m["metrics"], m["baseline"]):
        assert 0.0 <= result["lm_eval/piqa/acc"] <= 1.0 and "lm_eval/piqa/acc_norm_stderr" in result
    # A task whose data lives only on the Hub: one line naming it and the Hub, no traceback.
    r = offline("eval.lm_eval.tasks=[piqa,mmlu_abstract_algebra]", "eval.lm_eval.limit=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "mmlu_abstract_algebra" in line[0] and "Hugging Face Hub" in line[0], r.stderr
