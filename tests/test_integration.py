"""Real embedded model (SmolLM2-135M, dequantized Q4_1) on real data, kept small."""

from __future__ import annotations

import math

import pytest

from prunebench import models
from prunebench.config import instantiate
from prunebench.data import calibration_windows, load_texts
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_cfg()  # the default model; converted once into the user's cache
    return cfg, *models.load(cfg.model, cfg.paths.cache_dir)


def test_wikitext_rows_match_hf_layout():
    rows = load_texts("wikitext2_test")
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


@pytest.fixture(scope="module")
def wikitext(smollm2):
    """The perplexity evaluator (2 windows of 512 tokens), the dense model's result on it, the
    calibration set (4 C4 documents x 256 tokens) and the dense weights to restore: shared by the
    pruner tests below, which xdist can spread over its workers."""
    _, model, tok = smollm2
    ppl = instantiate(compose_cfg("eval.wikitext2.max_windows=2").eval.wikitext2)
    calib = calibration_windows(tok, "c4", nsamples=4, seqlen=256, seed=0, batch_size=4)
    return ppl, ppl(model, tok), calib, {k: v.clone() for k, v in model.state_dict().items()}


def _pruned_ppl(smollm2, wikitext, name: str) -> float:
    """`name` at 50% unstructured from the dense weights: its WikiText-2 perplexity (the dense
    weights are put back afterwards)."""
    _, model, tok = smollm2
    ppl, _, calib, dense = wikitext
    model.load_state_dict(dense)
    try:
        stats = instantiate(compose_cfg(f"pruner={name}").pruner)(model, calib)
        assert stats.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
        return ppl(model, tok)["ppl"]
    finally:
        model.load_state_dict(dense)


@pytest.fixture(scope="module")
def magnitude(smollm2, wikitext) -> float:
    """Magnitude's perplexity at 50% (no calibration), once per worker that needs it."""
    return _pruned_ppl(smollm2, wikitext, "magnitude")


def test_dense_ppl_is_plausible(wikitext):
    _, dense, calib, _ = wikitext
    assert dense["windows"] == 2 and dense["tokens"] == 2 * 512
    assert 5 < dense["ppl"] < 100, dense  # SmolLM2-135M reads English; a random model gives ~49,000
    assert calib.method == "documents" and calib.shape == (4, 256)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "gblm"])
def test_calibrated_pruners_beat_magnitude(smollm2, wikitext, magnitude, name):
    """At 50% each calibrated method lands between the dense model and magnitude pruning
    (SmolLM2: dense ~28, Wanda / GBLM ~60, SparseGPT ~82, magnitude ~345 on these windows)."""
    pruned = _pruned_ppl(smollm2, wikitext, name)
    assert math.isfinite(pruned)
    assert wikitext[1]["ppl"] < pruned < magnitude, (name, pruned, magnitude)


def test_calibration_falls_back_when_documents_are_short(smollm2):
    _, _, tok = smollm2
    calib = calibration_windows(tok, "c4", nsamples=16, seqlen=4096, seed=0)
    assert calib.method == "concatenated" and calib.shape == (16, 4096)


@pytest.mark.parametrize("mode", ["ppl", "gen"])
def test_opencompass_tasks_over_local_files(smollm2, mode):
    from prunebench.evals.opencompass import CATEGORIES, OpenCompass

    _, model, tok = smollm2
    out = OpenCompass(mode=mode, limit=1)(model, tok)  # one example a task: the plumbing
    tasks = [t for t in CATEGORIES if mode == "ppl" or t != "winogrande"]
    assert all(0.0 <= out[t] <= 1.0 for t in tasks)
    assert 0.0 <= out["avg"] <= 1.0 and "cat_reasoning" in out
    assert OpenCompass().relative({"piqa": 0.6}, {"piqa": 0.8}) == {"per": pytest.approx(0.75)}


@pytest.mark.slow  # 200 lm-eval requests, batched 8 at a time
def test_dense_smollm2_above_chance_on_piqa(smollm2):
    from prunebench.evals.opencompass import OpenCompass

    _, model, tok = smollm2
    acc = OpenCompass(tasks=["piqa"], limit=100, batch_size=8)(model, tok)["piqa"]
    print(f"dense SmolLM2 PIQA accuracy on the first 100 examples: {acc:.3f}")  # 0.650 measured
    assert acc > 0.58, acc  # chance is 0.5; 100 examples: a standard error of about 0.048
