"""LLM-Pruner (pruners/llm_pruner.py, llm_pruner_scores.py) and the per-layer widths format (models/widths.py):
the importance math on hand-made numbers, the gradients against the authors' batch backward, whole
KV groups under GQA, every decoder family on tiny models (pruned in a layer range, saved, reloaded
with the same logits), the uniform case through plain from_pretrained, the knob refusals before
loading, LoRA recovery with LLM-Pruner's preset, and SmolLM2 through the CLI (slow)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prunebench import PrunebenchError, models, pipeline
from prunebench.config import validate
from prunebench.models import trim
from prunebench.models.blocks import find_blocks
from prunebench.models.loading import ByteTokenizer
from prunebench.models.widths import SPEC_FILE, LayerConfig, load_widths, needs_widths, save_widths
from prunebench.pruners import llm_pruner_scores as lp
from prunebench.pruners.llm_pruner import LLMPruner
from tests.conftest import compose_cfg as compose
from tests.conftest import random_calib, run_cli

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3",
            "tiny-olmo2", "tiny-nemotron"]  # fmt: skip
MOE = ["tiny-mixtral", "tiny-qwen3-moe"]
X = torch.randint(3, 229, (2, 24), generator=torch.Generator().manual_seed(1))
RANGE = dict(attention_layer_start=1, attention_layer_end=3, mlp_layer_start=2, mlp_layer_end=-1)  # of 4 layers


def tiny(name: str, layers: int = 4, *extra: str) -> nn.Module:
    overrides = [f"model={name}", f"model.hf_config.num_hidden_layers={layers}", *extra]
    if name == "tiny-gemma3":  # one layer type per layer
        kinds = ",".join(["sliding_attention", "full_attention"] * (layers // 2))
        overrides.append(f"model.hf_config.layer_types=[{kinds}]")
    return models.load(compose(*overrides).model, "/nonexistent", seed=0)[0]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


# --- the importance math, by hand ----------------------------------------------------------------------
W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
G = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
F = torch.tensor([[1.0, 2.0], [0.5, 4.0]])


@pytest.mark.parametrize(
    ("estimator", "rows", "cols"),
    [
        ("param_first", [2.5, 4.0], [3.5, 3.0]),  # |w·g| = [[0.5, 2], [3, 1]]
        ("vectorize", [1.5, 2.0], [2.5, 1.0]),  # w·g = [[0.5, -2], [-3, 1]]: |Σ| per row / column
        ("param_second", [9.0, 5.5], [5.5, 9.0]),  # w²·F = [[1, 8], [4.5, 1]]
        ("param_mix", [6.0, 5.75], [5.25, 6.5]),  # w·g − ½w²·F = [[0, -6], [-5.25, 0.5]]
    ],
)
def test_taylor_estimators_by_hand(estimator, rows, cols):
    assert lp.taylor_channels(W, G, F, estimator, 1).tolist() == rows
    assert lp.taylor_channels(W, G, F, estimator, 0).tolist() == cols
    norm = torch.tensor([2.0, -1.0])  # a 1-D norm weight: per element
    expect = {"param_first": [1.0, 1.0], "vectorize": [1.0, 1.0], "param_second": [4.0, 0.5], "param_mix": [1.0, 1.25]}
    assert (
        lp.taylor_channels(norm, torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.5]), estimator, None).tolist()
        == (expect[estimator])
    )


def test_magnitude_reduction_fold_and_selection_by_hand():
    assert lp.magnitude_channels(W, 1, 1).tolist() == [3.0, 3.5]
    assert lp.magnitude_channels(W, 2, 1).tolist() == [5.0, 9.25]
    assert lp.magnitude_channels(W, 2, 0).tolist() == [10.0, 4.25]
    members = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    expect = {"sum": [4.0, 6.0], "mean": [2.0, 3.0], "max": [3.0, 4.0], "prod": [3.0, 8.0]}
    assert {g: lp.reduce_members(members, g).tolist() for g in lp.GROUPINGS} == expect
    # 4 query heads in 2 KV groups, head_dim 2: heads 0, 1 read group 0 (HF's repeat_kv order)
    folded = lp.fold_query(torch.arange(8.0), groups=2, head_dim=2)
    assert folded.tolist() == [0 + 2, 1 + 3, 4 + 6, 5 + 7]
    assert lp.unit_sums(folded, 2).tolist() == [6.0, 22.0]
    assert lp.lowest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2) == [1, 3]


def test_the_authors_counts():
    """n = current − int(initial·(1 − ratio)); attention in whole heads / groups, rounded down."""
    assert lp.removal_count(4096, 4096, 0.25) // 128 == 8  # LLaMA-7B: 8 of 32 heads
    assert lp.removal_count(4096, 4096, 0.2) // 128 == 6  # 820 // 128
    assert lp.removal_count(11008, 11008, 0.25) == 2752
    assert lp.removal_count(192, 192, 0.25) // 64 == 0  # SmolLM2: 3 KV groups, 0.25 removes none
    assert lp.removal_count(192, 192, 0.5) // 64 == 1
    assert lp.default_range(32) == (4, 30) and lp.default_range(30) == (4, 28) and lp.default_range(2) == (0, 2)
    assert lp.resolve_range(4, -2, 30, "mlp") == (4, 28) and lp.resolve_range(None, None, 30, "mlp") == (4, 28)


def test_examples_come_from_different_windows_first():
    windows = torch.arange(3 * 8).reshape(3, 8)
    pieces = lp.calibration_examples(windows, 4)
    assert pieces.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19], [4, 5, 6, 7], [12, 13, 14, 15],
                               [20, 21, 22, 23]]  # fmt: skip
    assert lp.calibration_examples(windows, 64).shape == (3, 8)  # shorter windows: used whole


def test_gradients_are_the_authors_batch_backward_and_fisher():
    model = tiny("tiny-llama", layers=2)
    examples = random_calib(n=3, seqlen=16).input_ids
    w = find_blocks(model)[1].mlp.down_proj.weight
    grads, fisher, losses = lp.taylor_gradients(model, examples, [w], fisher=True)
    ref = copy.deepcopy(model)
    rw = find_blocks(ref)[1].mlp.down_proj.weight
    batch = torch.autograd.grad(ref(input_ids=examples, labels=examples).loss, rw)[0]  # the authors' one batch
    torch.testing.assert_close(grads[id(w)], batch, rtol=1e-4, atol=1e-7)
    per = [torch.autograd.grad(ref(input_ids=x[None], labels=x[None]).loss, rw)[0] for x in examples]
    torch.testing.assert_close(fisher[id(w)], sum(g * g for g in per) / 3, rtol=1e-4, atol=1e-10)
    assert len(losses) == 3 and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # put back as they were


def test_attention_scores_are_the_group_sums_and_whole_kv_groups_go():
    """tiny-llama: 4 query heads, 2 KV groups (r = 2), head_dim 16. Group g's param_first score is Σ|W·g|
    over its k and v rows, the q rows of heads 2g and 2g+1 and their o_proj columns."""
    model = tiny("tiny-llama", layers=2)
    dense = copy.deepcopy(model)
    calib = random_calib(n=4, seqlen=16)
    attn = find_blocks(model)[0].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    grads, _, _ = lp.taylor_gradients(model, calib.input_ids, params, fisher=False)
    s = {n: (p.detach() * grads[id(p)]).abs() for n, p in zip("qkvo", params, strict=True)}
    d = 16
    expect = torch.tensor([
        float(s["k"][g * d:(g + 1) * d].sum() + s["v"][g * d:(g + 1) * d].sum()
              + s["q"][2 * g * d:(2 * g + 2) * d].sum() + s["o"][:, 2 * g * d:(2 * g + 2) * d].sum())
        for g in range(2)
    ])  # fmt: skip
    pruner = LLMPruner(ratio=0.5, attention_layer_start=0, attention_layer_end=1, mlp_layer_start=0, mlp_layer_end=0)
    got = pruner._attention_scores(find_blocks(model)[0], 4, 2, d, grads, None, None)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=0)
    stats = pruner(model, random_calib(n=4, seqlen=16))  # the same windows: the same gradients
    gone = int(expect.argmin())
    kept = 1 - gone
    assert stats.info["kv_groups_removed"] == {"0": [gone]} and stats.info["query_heads_removed"] == {"0": 2}
    new, old = find_blocks(model)[0].self_attn, find_blocks(dense)[0].self_attn
    heads = slice(2 * kept * d, (2 * kept + 2) * d)  # both query heads of the kept group, nothing else
    assert torch.equal(new.q_proj.weight, old.q_proj.weight[heads])
    assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, heads])
    assert torch.equal(new.k_proj.weight, old.k_proj.weight[kept * d : (kept + 1) * d])
    assert torch.equal(new.v_proj.weight, old.v_proj.weight[kept * d : (kept + 1) * d])
    assert trim.layer_heads(model, 0) == (2, 1) and trim.layer_heads(model, 1) == (4, 2)


def test_mlp_keeps_the_highest_channels_and_iterative_steps_reach_the_same_count():
    model = tiny("tiny-llama", layers=2)
    scores = LLMPruner(pruner_type="l2", mlp_layer_start=0, mlp_layer_end=1)._mlp_scores(
        find_blocks(model)[0], {}, None, None
    )
    mlp = find_blocks(model)[0].mlp  # l2 with the authors' mean over gate rows, up rows, down columns
    by_hand = (
        mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    ) / 3
    torch.testing.assert_close(scores, by_hand.detach())
    dense = copy.deepcopy(model)
    LLMPruner(ratio=0.25, pruner_type="l2", attention_layer_end=0, mlp_layer_start=0, mlp_layer_end=1)(model, None)
    keep = sorted(torch.sort(by_hand, descending=True, stable=True).indices[:96].tolist())
    assert torch.equal(find_blocks(model)[0].mlp.down_proj.weight, find_blocks(dense)[0].mlp.down_proj.weight[:, keep])
    stepped = copy.deepcopy(dense)
    stats = LLMPruner(ratio=0.5, pruner_type="l1", iterative_steps=2, attention_layer_end=0)(stepped, None)
    assert [w[2] for w in stats.info["widths"]] == [64, 64]  # 128 → 96 → 64: int(128·0.5) kept at the end


@pytest.mark.parametrize("kind", ["l1", "l2", "random"])
def test_baselines_need_no_calibration(kind):
    model = tiny("tiny-qwen2", layers=2)
    pruner = LLMPruner(ratio=0.5, pruner_type=kind, seed=3)
    assert not pruner.needs_calibration
    stats = pruner(model, None)
    assert stats.info["widths"] == [[2, 1, 64], [2, 1, 64]] and torch.isfinite(logits(model)).all()


# --- every family: pruned in a layer range, saved in the widths format, reloaded ---------------------
@pytest.mark.parametrize("name", FAMILIES + MOE)
def test_family_prunes_in_a_range_and_round_trips(name, tmp_path):
    model = tiny(name)
    before = sum(p.numel() for p in model.parameters())
    stats = LLMPruner(ratio=0.5, estimator="param_mix", **RANGE)(model, random_calib(n=4, seqlen=32))
    info = stats.info
    moe = name in MOE
    ffn = None if moe else 128
    assert info["widths"][0] == info["widths"][3] == [4, 2, ffn]  # outside both ranges: whole
    assert info["widths"][1] == [2, 1, ffn]  # attention range 1..3, MLP range 2..3
    assert info["widths"][2] == [2, 1, None if moe else 64]
    assert (info["attention_layers"], info["mlp_layers"]) == ([1, 3], [2, 3])
    assert {i: len(g) for i, g in info["kv_groups_removed"].items()} == {"1": 1, "2": 1}  # one whole group each
    assert info["params_after"] == sum(p.numel() for p in model.parameters()) < before
    assert info["params_removed_share"] == pytest.approx(1 - info["params_after"] / before, abs=1e-6)
    assert info["mlp_skipped"]["layers"] == [2] if moe else "mlp_skipped" not in info
    assert needs_widths(model) and not info["uniform"]
    out = logits(model)
    assert torch.isfinite(out).all()
    save_widths(model, ByteTokenizer(), tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec["layers"][2] == {"heads": 2, "kv_heads": 1, "intermediate": None if moe else 64}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))  # never a pickle, never code
    again, tok = load_widths(tmp_path)
    torch.testing.assert_close(logits(again), out, rtol=0, atol=0)
    assert tok is not None and tok.encode("ab", add_special_tokens=False) == ByteTokenizer().encode("ab")
    cached = model.generate(X[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(X[:1, :4], max_new_tokens=4, do_sample=False, use_cache=False))


def test_phi3_narrow_layers_read_their_own_head_counts():
    """Phi-3 splits qkv rows at config.num_attention_heads·head_dim at every forward: a pruned layer
    gets its own view of the config (widths.LayerConfig), without which the forward breaks."""
    model = tiny("tiny-phi3")
    LLMPruner(ratio=0.5, **RANGE)(model, random_calib(n=2, seqlen=16))
    attn = find_blocks(model)[1].self_attn
    assert isinstance(attn.config, LayerConfig) and attn.config.num_attention_heads == 2
    assert find_blocks(model)[0].self_attn.config is model.config
    out = logits(model)
    torch.testing.assert_close(logits(copy.deepcopy(model)), out, rtol=0, atol=0)  # the view survives a copy
    attn.config = model.config
    with pytest.raises(RuntimeError):
        logits(model)


def test_iterative_steps_score_the_pruned_model_again():
    """MHA Phi-3 (4 heads): ratio 0.5 in 2 steps removes one head at 0.25, then one more at 0.5, the
    second step's gradients taken through the already narrowed (and pinned) layers."""
    model = tiny("tiny-phi3", 4, "model.hf_config.num_key_value_heads=4")
    stats = LLMPruner(ratio=0.5, iterative_steps=2, **RANGE)(model, random_calib(n=4, seqlen=16))
    assert len(stats.info["calibration_loss"]) == 2 and stats.info["examples"]["shape"] == [4, 16]
    assert [w[:2] for w in stats.info["widths"]] == [[4, 4], [2, 2], [2, 2], [4, 4]]
    assert {i: len(g) for i, g in stats.info["kv_groups_removed"].items()} == {"1": 2, "2": 2}
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-phi3", "tiny-olmo2"])
def test_every_layer_pruned_alike_reloads_with_from_pretrained(name, tmp_path):
    model = tiny(name, layers=2)  # the default range of 2 layers is 0..2: every layer
    stats = LLMPruner(ratio=0.5)(model, random_calib(n=4, seqlen=32))
    assert stats.info["attention_layers"] == [0, 2] and stats.info["uniform"] and not needs_widths(model)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (
        2, 1, 64,
    )  # fmt: skip
    models.save(model, ByteTokenizer(), tmp_path, compose(f"model={name}").model)
    assert not (tmp_path / SPEC_FILE).exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_a_bad_widths_folder_fails_in_one_line(tmp_path):
    model = tiny("tiny-llama")
    LLMPruner(ratio=0.5, **RANGE)(model, random_calib(n=2, seqlen=16))
    save_widths(model, ByteTokenizer(), tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["layers"][1].update(heads=3, kv_heads=2)  # heads not a multiple of the KV heads
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PrunebenchError, match="kv_heads"):
        load_widths(tmp_path)
    spec["layers"][1].update(heads=4, kv_heads=2)  # a valid shape that is not the weights'
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PrunebenchError, match="does not match"):
        load_widths(tmp_path)
    spec["arch"] = "os.system"
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PrunebenchError, match="not a transformers model class"):
        load_widths(tmp_path)


# --- refusals before loading -------------------------------------------------------------------------------
TINY = ("experiment=smoke/tiny", "pruner=llm_pruner")  # tiny-llama: 2 layers, 4 heads / 2 KV heads, FFN 128


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pruner.ratio=1.0"], "pruner.ratio=1.0 is outside [0, 1)"),
        (["pruner.ratio=-0.1"], "pruner.ratio=-0.1 is outside"),
        (["pruner.ratio=0.99"], "would remove all 2 KV groups"),
        (["pruner.attention_layer_start=0", "pruner.attention_layer_end=0", "pruner.ratio=0.999"], "all 128 MLP"),
        (["pruner.attention_layer_end=5"], "pruner.attention_layer_end=5 is outside the model's 2 layers"),
        (["pruner.mlp_layer_start=-3"], "pruner.mlp_layer_start=-3 is outside"),
        (["pruner.mlp_layer_start=2", "pruner.mlp_layer_end=1"], "start must not come after end"),
        (["pruner.estimator=param_third"], "pruner.estimator='param_third' must be one of"),
        (["pruner.grouping=median"], "pruner.grouping='median' must be one of"),
        (["pruner.pruner_type=l3"], "pruner.pruner_type='l3' must be one of"),
        (["pruner.pruner_type=l2", "pruner.estimator=param_mix"], "unused by pruner.pruner_type=l2"),
        (["pruner.global_pruning=true"], "pruner.global_pruning=true is not implemented"),
        (["pruner.sparsity=0.5"], "pruner.sparsity=0.5 is ignored by pruner=llm_pruner"),
        (["pruner.pattern=2:4"], "pruner.pattern=2:4 is ignored"),
        (["pruner.iterative_steps=0"], "pruner.iterative_steps=0"),
        (["pruner.seqlen=100000"], "pruner.seqlen=100000"),
        (["model=tiny-bert", "eval=[]"], "needs a causal language model"),
    ],
)
def test_bad_knobs_fail_before_loading(overrides, message):
    with pytest.raises(PrunebenchError, match=None) as err:
        validate(compose(*TINY, *overrides), build=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_defaults_pass_the_checks_on_every_family():
    for name in FAMILIES + MOE:
        validate(compose(*TINY, f"model={name}"), build=True)
    validate(compose("pruner=llm_pruner", "pruner.ratio=0.5"), build=True)  # SmolLM2: 30 layers


# --- the pipeline: prune -> LoRA (the preset) -> save -> model.path ------------------------------------------
def test_pipeline_lora_preset_and_reload_with_model_path(tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    cfg = compose(*TINY, "model.hf_config.num_hidden_layers=4", "pruner.ratio=0.5", "recovery=lora_llm_pruner",
                  "recovery.tokens=256", "recovery.seqlen=64", "recovery.global_batch=2", "recovery.batch_size=2",
                  "recovery.val_windows=2", "save_model=true", cache)  # fmt: skip
    assert (cfg.recovery.r, cfg.recovery.alpha, cfg.recovery.dropout, cfg.recovery.lr) == (8, 16, 0.05, 1e-4)
    assert cfg.recovery.source == "c4"  # Alpaca is not offline; never an evaluation split
    result = pipeline.run(cfg, tmp_path / "run")
    prune = result["prune"]
    assert prune["attention_layers"] == prune["mlp_layers"] == [1, 4] and not prune["uniform"]  # 4 layers: 1..4
    assert prune["params_removed_share"] == pytest.approx(1 - prune["params_after"] / prune["params_before"], abs=1e-6)
    assert "lm_val_after" in result["recovery"]["metrics"]
    folder = tmp_path / "run" / "model"
    assert (folder / SPEC_FILE).exists()
    again = pipeline.run(
        compose("experiment=smoke/tiny", "pruner=none", f"model.path={folder}", cache), tmp_path / "r2"
    )
    assert again["metrics"]["wikitext2/ppl"] == pytest.approx(result["metrics"]["wikitext2/ppl"], rel=1e-6)


@pytest.mark.slow
def test_smollm2_through_the_cli_and_back(tmp_path):
    """The embedded SmolLM2 (30 layers, 3 KV groups) at ratio 0.5 on layers 4..28: one KV group and half
    the MLP channels of each, ~29% of all parameters; worse than dense, finite, and the saved folder
    gives the same perplexity through model.path."""
    cache = compose().paths.cache_dir  # the converted model lives in the user's cache
    small = ["calib.nsamples=10", "calib.seqlen=64", "eval.wikitext2.max_windows=2"]
    r = run_cli("run", "pruner=llm_pruner", "pruner.ratio=0.5", *small, "save_model=true",
                f"hydra.run.dir={tmp_path / 'run'}", cache=cache, cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    prune = m["prune"]
    assert prune["attention_layers"] == [4, 28] and prune["widths"][4] == [6, 2, 768]
    assert 0.27 < prune["params_removed_share"] < 0.30
    ppl = m["metrics"]["wikitext2/ppl"]
    assert m["baseline"]["wikitext2/ppl"] < ppl < float("inf")
    r2 = run_cli("run", "pruner=none", f"model.path={tmp_path / 'run' / 'model'}", "eval.wikitext2.max_windows=2",
                 "baseline=false", f"hydra.run.dir={tmp_path / 'run2'}", cache=cache, cwd=tmp_path)  # fmt: skip
    assert r2.exit_code == 0, r2.stderr
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())["metrics"]["wikitext2/ppl"]
    assert again == pytest.approx(ppl, rel=1e-5)
