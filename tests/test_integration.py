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


def test_dense_ppl_is_plausible_and_calibrated_pruners_beat_magnitude(smollm2):
    cfg, model, tok = smollm2
    ppl = instantiate(compose_cfg("eval.wikitext2.max_windows=4").eval.wikitext2)
    dense = ppl(model, tok)
    assert dense["windows"] == 4 and dense["tokens"] == 4 * 512
    assert 5 < dense["ppl"] < 100, dense  # SmolLM2-135M reads English; a random model gives ~49,000
    calib = calibration_windows(tok, "c4", nsamples=8, seqlen=256, seed=0, batch_size=4)
    assert calib.method == "documents" and calib.shape == (8, 256)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name in ("magnitude", "wanda", "sparsegpt", "gblm"):
        model.load_state_dict(state)
        stats = instantiate(compose_cfg(f"pruner={name}").pruner)(model, calib)
        assert stats.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
        results[name] = ppl(model, tok)["ppl"]
    model.load_state_dict(state)
    assert math.isfinite(results["wanda"])
    for name in ("wanda", "sparsegpt", "gblm"):
        assert dense["ppl"] < results[name] < results["magnitude"], results


def test_calibration_falls_back_when_documents_are_short(smollm2):
    _, _, tok = smollm2
    calib = calibration_windows(tok, "c4", nsamples=16, seqlen=4096, seed=0)
    assert calib.method == "concatenated" and calib.shape == (16, 4096)


@pytest.mark.parametrize("mode", ["ppl", "gen"])
def test_opencompass_tasks_over_local_files(smollm2, mode):
    from prunebench.evals.opencompass import CATEGORIES, OpenCompass

    _, model, tok = smollm2
    out = OpenCompass(mode=mode, limit=2)(model, tok)
    tasks = [t for t in CATEGORIES if mode == "ppl" or t != "winogrande"]
    assert all(0.0 <= out[t] <= 1.0 for t in tasks)
    assert 0.0 <= out["avg"] <= 1.0 and "cat_reasoning" in out
    assert OpenCompass().relative({"piqa": 0.6}, {"piqa": 0.8}) == {"per": pytest.approx(0.75)}


@pytest.mark.slow  # 400 lm-eval requests, batched 8 at a time
def test_dense_smollm2_above_chance_on_piqa(smollm2):
    from prunebench.evals.opencompass import OpenCompass

    _, model, tok = smollm2
    acc = OpenCompass(tasks=["piqa"], limit=200, batch_size=8)(model, tok)["piqa"]
    print(f"dense SmolLM2 PIQA accuracy on 200 examples: {acc:.3f}")
    assert acc > 0.58, acc  # chance is 0.5; 200 examples: a standard error of about 0.035
