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


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_one_forward_prunes_each_linear_as_its_input_arrives(tiny, name):
    """pruner.one_forward=true (issue 31): every block runs once (the reference codes: twice), each linear
    is pruned from its whole input before it computes, so later linears see the pruned earlier ones. Block
    0's first linears see the same dense input either way: their masks agree with the two-pass run."""
    import copy

    model, _ = tiny
    calib = random_calib(n=4, seqlen=32)
    ref = copy.deepcopy(model)
    calls = []
    for block in find_blocks(model):
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    one = instantiate(compose_cfg(f"pruner={name}", "pruner.one_forward=true").pruner)
    two = instantiate(compose_cfg(f"pruner={name}").pruner)
    stats = one(model, calib)
    two(ref, calib)
    blocks = find_blocks(model)
    # the forward into block 0 that captures its inputs (stopped there), then one call per block, all windows
    assert [id(b) for b in calls] == [id(blocks[0])] + [id(b) for b in blocks]
    assert abs(stats.achieved_sparsity - 0.5) < 0.01 and stats.info["protocol"] == "sequential, one forward a block"
    first = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the block's dense input in both runs
    for n in first:
        a, b = blocks[0].get_submodule(n).weight, find_blocks(ref)[0].get_submodule(n).weight
        assert torch.equal(a == 0, b == 0), n
    later = blocks[-1].mlp.down_proj.weight, find_blocks(ref)[-1].mlp.down_proj.weight
    assert not torch.equal(later[0], later[1])  # its input came through pruned layers: another result
    with pytest.raises(PrunebenchError, match="one_forward=true is a form of the sequential protocol"):
        instantiate(compose_cfg("pruner=wanda", "pruner.one_forward=true", "pruner.sequential=false").pruner)
