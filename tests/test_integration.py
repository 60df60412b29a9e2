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
