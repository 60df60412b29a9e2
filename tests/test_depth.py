"""Depth pruning: layer selection, surgery, LaCo's merge and loop, ShortGPT's Block Influence."""

from __future__ import annotations

import pytest
import torch

from prunebench import PrunebenchError, models
from prunebench.models import ByteTokenizer
from prunebench.models.blocks import block_linears, find_blocks, prunable_linears
from prunebench.pruners import laco, layer_drop, shortgpt
from tests.conftest import compose_cfg, random_calib


def tiny_model(name: str = "tiny-llama", layers: int = 8):
    cfg = compose_cfg(f"model={name}", f"model.hf_config.num_hidden_layers={layers}")
    return models.load(cfg.model, cache_dir="/nonexistent")[0]


@pytest.mark.parametrize(
    "keep,expected",
    [("top", [0, 1, 2, 3, 4, 5]), ("middle", [3, 4, 5, 6, 7, 8]), ("bottom", [6, 7, 8, 9, 10, 11])],
)
def test_select_layers_positions(keep, expected):
    assert layer_drop.select_layers(12, keep, 6, None) == expected
    assert layer_drop.select_layers(12, keep, 2, None)[0] == {"top": 0, "middle": 5, "bottom": 10}[keep]


@pytest.mark.parametrize("bad", [dict(keep="top", layers=13), dict(keep="side", layers=2), dict(remove=[0, 12])])
def test_select_layers_rejects(bad):
    with pytest.raises(PrunebenchError):
        layer_drop.select_layers(12, bad.get("keep"), bad.get("layers"), bad.get("remove"))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("keep", ["top", "middle", "bottom"])
def test_layer_drop_keeps_intended_layers_unchanged(name, keep):
    model = tiny_model(name, 12)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in find_blocks(model)]
    stats = layer_drop.LayerDrop(keep=keep, layers=6)(model)
    kept = stats.info["layers_kept"]
    assert kept == layer_drop.select_layers(12, keep, 6, None)
    assert model.config.num_hidden_layers == 6 and len(find_blocks(model)) == 6
    for block, original in zip(find_blocks(model), kept, strict=True):
        for k, v in block.state_dict().items():
            assert torch.equal(v, before[original][k])


def test_surgery_generates_with_cache_and_round_trips(tmp_path):
    model = tiny_model("tiny-llama", 6)
    layer_drop.LayerDrop(remove=[1, 3, 4])(model)
    assert [b.self_attn.layer_idx for b in find_blocks(model)] == [0, 1, 2]
    x = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=True)
    out_nocache = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, out_nocache)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    assert again.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["paper", "reference", "drop"])
def test_rdsc_merge_matches_formula(rule):
    model = tiny_model("tiny-llama", 6)
    blocks = find_blocks(model)
    lin = [{k: v.weight.detach().clone() for k, v in block_linears(b).items()} for b in blocks]
    norm = blocks[1].input_layernorm.weight.detach().clone()
    laco.merge_into(blocks[1], [blocks[2], blocks[3], blocks[4]], rule)
    for key, w in block_linears(blocks[1]).items():
        base, others = lin[1][key], [lin[k][key] for k in (2, 3, 4)]
        expected = {"paper": base + sum(o - base for o in others), "reference": others[-1], "drop": base}[rule]
        torch.testing.assert_close(w.weight, expected)
    assert torch.equal(blocks[1].input_layernorm.weight, norm)  # norms are not merged


def test_collapse_follows_algorithm_1():
    """10 layers, C=3, L=1, H=9, I=2: start at l = H − C = 6; scripted accept/reject."""
    script = iter([True, False, True, False, False])
    calls = []

    def try_merge(l, m):
        calls.append((l, m))
        return next(script)

    decisions = laco.collapse(10, C=3, L=1, H=9, I=2, try_merge=try_merge)
    # l=6 kept (10→8 layers, l→4); l=4 rejected (l→3); l=3 kept (8→6, l→1); l=1 rejected (l→0 < L: stop)
    assert calls == [(6, 2), (4, 2), (3, 2), (1, 2)]
    assert [d["kept"] for d in decisions] == [True, False, True, False]


def test_collapse_resets_pointer_past_the_end():
    calls = []
    laco.collapse(6, C=4, L=0, H=8, I=1, try_merge=lambda l, m: calls.append((l, m)) or True)
    # start l = 4: only layer 5 follows (m=1), kept → 5 layers, l → 3; m=min(3, 5−1−3)=1 ...
    assert calls[0] == (4, 1)
    assert all(l + m <= 5 for l, m in calls)


def test_laco_end_to_end_on_tiny_llama():
    model = tiny_model("tiny-llama", 8)
    pruner = laco.LaCo(C=3, L=0, I=1, T=0.05, calib_n=3, calib_chars=60)
    pruner.tokenizer = ByteTokenizer()
    stats = pruner(model)
    n = model.config.num_hidden_layers
    assert n == len(find_blocks(model)) == len(stats.info["layers_kept"]) < 8
    assert all(d.get("similarity") is not None for d in stats.info["decisions"] if d["m"] > 0)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_laco_rejected_trials_restore_the_model():
    model = tiny_model("tiny-llama", 6)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(x).logits
    pruner = laco.LaCo(C=3, L=0, I=1, T=1.0, merge="paper", calib_n=2, calib_chars=40)  # T=1: reject all
    pruner.tokenizer = ByteTokenizer()
    stats = pruner(model)
    assert not any(d["kept"] for d in stats.info["decisions"])
    assert model.config.num_hidden_layers == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_block_influence_of_identity_layers_is_zero():
    model = tiny_model("tiny-llama", 4)
    with torch.no_grad():
        for block in find_blocks(model)[1:3]:  # zero output projections: the block returns its input
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    bi = shortgpt.layer_influence(model, random_calib(n=2, seqlen=16).input_ids)
    assert bi[1] == pytest.approx(0, abs=1e-6) and bi[2] == pytest.approx(0, abs=1e-6)
    assert bi[0] > 1e-3 and bi[3] > 1e-3
    stats = shortgpt.ShortGPT(n=2)(model, random_calib(n=2, seqlen=16))
    assert stats.info["layers_removed"] == [1, 2]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(C=1), "pruner.C"),
        (dict(T=0.0), "pruner.T"),
        (dict(T=1.5), "pruner.T"),
        (dict(L=5, H=3), "pruner.L"),
        (dict(merge="avg"), "pruner.merge"),
    ],
)
def test_laco_bad_knobs(kwargs, needle):
    with pytest.raises(PrunebenchError, match=needle):
        laco.LaCo(**kwargs)


def test_efficiency_flops_halve_with_half_the_layers():
    from prunebench.evals.efficiency import Efficiency, flops_per_token

    model = tiny_model("tiny-llama", 8)
    dense = flops_per_token(model, 64)
    layer_drop.LayerDrop(keep="top", layers=4)(model)
    ratio = flops_per_token(model, 64) / dense
    assert 0.5 <= ratio < 0.6  # blocks halve; the LM head stays
    m = Efficiency(prompt_len=16, gen_len=8, repeats=3)(model)  # medians: decode time above noise
    assert m["layers"] == 4 and m["params"] >= m["nonzero_params"] > 0
    # decode speed is dropped (one warning) when load noise leaves generate no longer than the prefill
    assert m["prefill_ms"] > 0 and m.get("decode_tokens_per_s", 1.0) > 0


def test_lm_finetune_lowers_loss_and_keeps_masks():
    from prunebench.pruners.wanda import Wanda
    from prunebench.recovery.lm_finetune import LMFinetune

    model = tiny_model("tiny-llama", 2)
    Wanda(sparsity=0.5)(model, random_calib())
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    rec = LMFinetune(source="wikitext2_valid", tokens=64 * 30, seqlen=64, lr=3e-3, log_every=1)
    rec.tokenizer = ByteTokenizer()
    out = rec(model)
    assert out["steps"] == 30 and len(out["loss_curve"]) == 30
    first = sum(v for _, v in out["loss_curve"][:5]) / 5
    last = sum(v for _, v in out["loss_curve"][-5:]) / 5
    assert last < first
    for n, m in prunable_linears(model).items():
        assert torch.equal(m.weight == 0, zeros[n]) or bool((m.weight[zeros[n]] == 0).all())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_laco_suffix_shortcut_gives_the_full_forward_decisions(name, monkeypatch):
    results = []
    for shortcut in (True, False):
        model = tiny_model(name, 8)
        if not shortcut:
            monkeypatch.setattr(torch, "allclose", lambda *a, **k: False)  # the self-check fails: full forwards
        pruner = laco.LaCo(C=3, L=0, I=1, T=0.5, calib_n=3, calib_chars=60)
        pruner.tokenizer = ByteTokenizer()
        stats = pruner(model)
        assert stats.info["suffix_shortcut"] is shortcut
        results.append(stats.info["decisions"])
    assert [d["kept"] for d in results[0]] == [d["kept"] for d in results[1]]
    for a, b in zip(results[0], results[1], strict=True):
        assert a.get("similarity") == pytest.approx(b.get("similarity"), abs=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_laco_padded_batch_equals_one_sentence_at_a_time(name):
    model = tiny_model(name, 4)
    lengths = [10, 3, 9, 10]  # groups [3], [9, 10, 10]: the 9-token sentence is right-padded, D's order is restored
    inputs = [torch.arange(20 * i, 20 * i + n).unsqueeze(0) for i, n in enumerate(lengths)]
    final = laco.FinalHidden(model, inputs)
    assert final.shortcut
    assert sorted(idx for idx, _, _ in final.groups) == [[1], [2, 0, 3]]
    merged = final._suffix(0)  # the shortcut path on the padded group gives the same per-sentence states
    with torch.no_grad():
        for x, ref in zip(inputs, final.reference, strict=True):
            alone = model(input_ids=x, output_hidden_states=True).hidden_states[-1][0].flatten()
            torch.testing.assert_close(ref, alone, rtol=1e-4, atol=1e-5)
    for ref, short in zip(final.reference, merged, strict=True):
        torch.testing.assert_close(short, ref, rtol=1e-4, atol=1e-5)


def bert_out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_layer_drop_with_identity_bridges_is_the_dropped_model():
    """bridge_rank with init=identity: a residual bridge that starts as the identity computes exactly
    what dropping the block computes; the parameter count is the dropped model's plus the bridges."""
    from prunebench.models.bridges import LowRankBridge, bridge_count

    bridged, dropped = tiny_model("tiny-bert", 4), tiny_model("tiny-bert", 4)
    dropped.load_state_dict(bridged.state_dict())
    info = layer_drop.LayerDrop(keep=None, remove=[1, 3], bridge_rank=8, bridge_init="identity")(bridged).info
    layer_drop.LayerDrop(keep=None, remove=[1, 3])(dropped)
    assert info["layers_kept"] == [0, 2] and info["bridges"] == {"rank": 8, "init": "identity",
                                                                 "fit_error": {1: None, 3: None}}  # fmt: skip
    assert bridge_count(bridged) == 2 and len(find_blocks(dropped)) == 2
    assert models.count_params(bridged)[0] == models.count_params(dropped)[0] + 2 * LowRankBridge.cost(64, 8)
    ids = random_calib().input_ids
    assert torch.allclose(bert_out(bridged, ids), bert_out(dropped, ids), atol=1e-6)


def test_layer_drop_with_fitted_bridges_beats_dropping():
    """init=fit: the least-squares bridge of the last block reproduces that block's output on the
    calibration windows better than dropping it (identity is a feasible rank-0 fit)."""
    calib = random_calib(n=8)
    dense = tiny_model("tiny-bert", 4)
    fitted, dropped = tiny_model("tiny-bert", 4), tiny_model("tiny-bert", 4)
    fitted.load_state_dict(dense.state_dict())
    dropped.load_state_dict(dense.state_dict())
    pruner = layer_drop.LayerDrop(keep=None, remove=[3], bridge_rank=32)
    assert pruner.needs_calibration and not layer_drop.LayerDrop(keep=None, remove=[3]).needs_calibration
    err = pruner(fitted, calib).info["bridges"]["fit_error"][3]
    layer_drop.LayerDrop(keep=None, remove=[3])(dropped)
    ref = bert_out(dense, calib.input_ids)
    gap = lambda m: float(((bert_out(m, calib.input_ids) - ref) ** 2).sum())  # noqa: E731
    assert 0 <= err < 1 and gap(fitted) < gap(dropped)


def test_layer_drop_bridges_refuse_decoders_and_wide_ranks():
    with pytest.raises(PrunebenchError, match="decoder"):
        layer_drop.LayerDrop(keep="top", layers=1, bridge_rank=8, bridge_init="identity")(tiny_model("tiny-llama", 2))
    with pytest.raises(PrunebenchError, match="hidden size 64"):
        layer_drop.LayerDrop(keep="top", layers=1, bridge_rank=65).check(2, dims={"hidden_size": 64})
    with pytest.raises(PrunebenchError, match="bridge_rank=0"):
        layer_drop.LayerDrop(bridge_rank=0)
    with pytest.raises(PrunebenchError, match="bridge_init"):
        layer_drop.LayerDrop(bridge_rank=4, bridge_init="zeros")
