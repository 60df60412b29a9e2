"""Every pruner on tiny random Llama and BERT models."""

import pytest
import torch

from prunebench import PrunebenchError
from prunebench.config import group_options, instantiate
from prunebench.pruners import wanda
from prunebench.pruners.masks import row_mask
from prunebench.pruners.stats import InputNorms, collect_full_forward, find_blocks, prunable_linears
from tests.conftest import compose_cfg, random_calib

PRUNERS = list(group_options("pruner"))


DEPTH = {"layer_drop": [], "shortgpt": [], "laco": ["pruner.L=0", "pruner.T=0.01"]}  # 2-layer tiny models


STRUCTURED = ("minitron", "minibridge", "llm_pruner", "slicegpt")  # no weight masks: their own tests


@pytest.mark.parametrize("tiny", ["tiny-llama", "tiny-bert"], indirect=True)
@pytest.mark.parametrize("name", [p for p in PRUNERS if p not in DEPTH and p not in STRUCTURED])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_mask_pruner_runs(tiny, name, pattern):
    model, _ = tiny
    cfg = compose_cfg(f"pruner={name}", f"pruner.pattern={pattern}")
    pruner = instantiate(cfg.pruner)
    calib = random_calib() if pruner.needs_calibration else None
    if name == "gblm" and model.get_output_embeddings() is None:
        with pytest.raises(PrunebenchError, match="language-model loss"):  # an encoder has no LM loss
            pruner(model, calib)
        return
    stats = pruner(model, calib)
    expected = 0.0 if name == "none" else 0.5
    assert stats.achieved_sparsity == pytest.approx(expected, abs=1e-6)
    for layer_name, layer in prunable_linears(model).items():
        assert stats.per_matrix[layer_name] == pytest.approx(expected, abs=1e-6)
        if pattern == "2:4" and name != "none":
            assert ((layer.weight == 0).view(layer.out_features, -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("tiny", ["tiny-llama", "tiny-bert"], indirect=True)
@pytest.mark.parametrize("name", list(DEPTH))
def test_every_depth_pruner_runs(tiny, name):
    model, tokenizer = tiny
    pruner = instantiate(compose_cfg(f"pruner={name}", *DEPTH[name]).pruner)
    if hasattr(pruner, "tokenizer"):
        pruner.tokenizer = tokenizer
    if name == "laco":  # 2 layers leave nothing to merge: an error naming the 3 layers LaCo needs, not a no-op
        with pytest.raises(PrunebenchError, match="LaCo needs at least 3"):
            pruner(model, None)
        return
    stats = pruner(model, random_calib() if pruner.needs_calibration else None)
    kept = len(stats.info["layers_kept"])
    assert model.config.num_hidden_layers == len(find_blocks(model)) == kept
    assert kept == 1  # (LaCo runs on 8 layers in test_depth.py)


def test_wanda_removes_lowest_scores_of_dense_first_block(tiny):
    """Block 0 sees dense inputs, so its masks must equal the direct formula on full-forward norms."""
    model, _ = tiny
    calib = random_calib(n=4, seqlen=32)
    norms = collect_full_forward(model, calib.input_ids, 4, InputNorms)
    dense = {k: v.weight.detach().clone() for k, v in prunable_linears(model).items()}
    wanda.Wanda(sparsity=0.5)(model, calib)
    for name, layer in prunable_linears(model).items():
        if not name.startswith("0."):
            continue
        expected = row_mask(wanda.score(dense[name], norms[name].norm_sq), 0.5)
        assert torch.equal(layer.weight == 0, expected), name


def test_magnitude_matrix_threshold(tiny):
    model, _ = tiny
    dense = {k: v.weight.detach().clone() for k, v in prunable_linears(model).items()}
    instantiate(compose_cfg("pruner=magnitude").pruner)(model, None)
    for name, layer in prunable_linears(model).items():
        kept = dense[name][layer.weight != 0].abs()
        removed = dense[name][layer.weight == 0].abs()
        assert removed.max() <= kept.min()
