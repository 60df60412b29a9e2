"""SliceGPT (pruner=slicegpt, prunebench/models/sliced*.py) on the tiny models of every family it
supports: function preservation at sparsity 0 (norm fusion + rotation, nothing sliced), the sliced
model's consistency (a random orientation of the kept block gives the same model), the parameter
count with the shortcuts, generation with a KV cache, gradients and LoRA, the saved format, the
refusals before loading; and one slow run of the CLI on the embedded SmolLM2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunebench import PrunebenchError, memory, models, pipeline
from prunebench.config import instantiate, selected_evals, validate
from prunebench.models import sliced
from prunebench.models.blocks import find_blocks
from prunebench.models.loading import ByteTokenizer
from prunebench.models.sliced import RMSN, SlicedLayer, is_sliced
from prunebench.models.sliced_format import SPEC_FILE, load_sliced, save_sliced
from prunebench.pruners.slicegpt import SliceGPT, kept_width, layer_widths, max_sparsity, pca
from tests.conftest import compose_cfg, random_calib, run_cli

SUPPORTED = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-mixtral",
             "tiny-qwen3-moe", "tiny-nemotron"]  # fmt: skip
X = torch.randint(3, 229, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny(name: str) -> nn.Module:
    """A tiny random model whose norms have non-trivial gains (and biases): random init leaves them
    at 1 (0), which would make the fusion a no-op."""
    model = models.load(compose_cfg(f"model={name}").model, "/nonexistent", seed=0)[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1 and "q_norm" not in n and "k_norm" not in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


CALIB = random_calib(n=4, seqlen=16)


# --- the math --------------------------------------------------------------------------------------
def test_kept_width_rounds_down_like_the_authors_script():
    assert kept_width(4096, 0.25, 8) == 3072 and kept_width(4096, 0.20, 8) == 3272  # Llama-2-7B
    assert kept_width(4096, 0.30, 8) == 2864 and kept_width(576, 0.25, 8) == 432
    assert kept_width(576, 0.30, 8) == 400 and kept_width(576, 0.30, 1) == 403 and kept_width(64, 0.0, 8) == 64
    assert kept_width(576, max_sparsity(576, 64, 8), 8) >= 64  # the bound the refusal suggests is accepted


def test_layer_widths_keep_the_head_wide_and_moe_square():
    assert layer_widths(64, 48, [False, False], slice_head=False) == [(48, 48, 48), (48, 48, 64)]
    assert layer_widths(64, 48, [False, False], slice_head=True) == [(48, 48, 48), (48, 48, 48)]
    assert layer_widths(64, 48, [True, True], slice_head=False) == [(48, 48, 48), (48, 64, 64)]


def test_pca_sorts_descending_and_damping_keeps_the_eigenvectors():
    x = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([5.0, 1, 3, 0.1, 2, 0.5], dtype=torch.float64)
    vals, Q, damp = pca(x.T @ x, 0.01)
    assert bool((vals[:-1] >= vals[1:]).all()) and damp > 0
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64))
    _, Q0, _ = pca(x.T @ x, 0.0)
    torch.testing.assert_close((Q * Q0).sum(0).abs(), torch.ones(6, dtype=torch.float64))  # same axes up to sign


# --- function preservation and consistency ------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_sparsity_zero_preserves_the_function(name):
    """Fusion + 2L+1 rotations with nothing sliced: the same logits (fp32 rounding). The embedding mean
    is kept (embedding_mean=false) except on Nemotron, whose LayerNorm needs the centred stream and is
    exact with it."""
    model = tiny(name)
    dense = logits(model)
    stats = SliceGPT(sparsity=0.0, embedding_mean=name == "tiny-nemotron")(model, CALIB)
    assert is_sliced(model) and stats.info["d"] == model.config.hidden_size
    blocks = find_blocks(model)
    assert all(isinstance(b, SlicedLayer) and isinstance(b.input_layernorm, RMSN) for b in blocks)
    torch.testing.assert_close(logits(model), dense, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-nemotron"])
def test_float64_pieces_give_the_same_model(name, monkeypatch):
    """The float64 products run a few rows (columns) at a time; pieces of 5 change nothing."""
    whole = tiny(name)
    SliceGPT(sparsity=0.25)(whole, CALIB)
    monkeypatch.setattr(sliced, "CHUNK", 5)
    pieces = tiny(name)
    SliceGPT(sparsity=0.25)(pieces, CALIB)
    torch.testing.assert_close(logits(pieces), logits(whole), rtol=1e-5, atol=1e-6)


def test_embedding_mean_is_not_exact_on_rmsnorm_models():
    """The authors centre the embeddings of every family: on an RMSNorm model the logits move."""
    model = tiny("tiny-llama")
    dense = logits(model)
    SliceGPT(sparsity=0.0)(model, CALIB)
    assert float((logits(model) - dense).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["tiny-phi3", "tiny-mixtral"])
def test_random_orientation_gives_the_same_sliced_model(name):
    """The random orthogonal turn of each kept block leaves the kept subspaces as they are: with the
    shortcuts, readers and writers consistent, the sliced model is the same as with pca (exact
    arithmetic), whatever the seed; the weights differ."""
    runs = []
    for orientation, seed in (("pca", 0), ("random", 0), ("random", 1)):
        model = tiny(name)
        SliceGPT(sparsity=0.25, final_orientation=orientation, seed=seed)(model, CALIB)
        runs.append((logits(model), find_blocks(model)[0].attn_shortcut.detach().clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(runs[2][0], runs[0][0], rtol=1e-4, atol=2e-5)
    assert not torch.allclose(runs[1][1], runs[2][1]) and not torch.allclose(runs[0][1], runs[1][1])
    again = tiny(name)
    SliceGPT(sparsity=0.25, final_orientation="random", seed=0)(again, CALIB)
    assert torch.equal(find_blocks(again)[0].attn_shortcut, runs[1][1])  # seeded: reproducible


def _reference(model: nn.Module, calib, widths: list) -> nn.Module:
    """SliceGPT written the other way round: no rotated weights, the fused dense model with the
    stream PROJECTED onto the kept principal subspace (P = Q_d·Q_dᵀ) after the embedding, at each
    layer's mid point (residual included) and at its output; each P from the PCA of the projected
    model's own stream at that point, in order. Equal to the sliced model in exact arithmetic."""
    ref = copy.deepcopy(model)
    sliced.fuse(ref, embedding_mean=True)
    blocks, P, seen = find_blocks(ref), {}, {}

    def project(x, key):
        seen[key] = seen.get(key, 0) + x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()
        return x if key not in P else (x.double() @ P[key]).to(x.dtype)

    def layer_forward(block, i):
        def forward(hidden_states, **kwargs):
            h = block.self_attn(hidden_states=block.input_layernorm(hidden_states), **kwargs)[0]
            mid = project(hidden_states + h, ("mid", i))
            return project(mid + block.mlp(block.post_attention_layernorm(mid)), ("out", i))

        return forward

    ref.get_input_embeddings().register_forward_hook(lambda _m, _i, out: project(out, ("embed", 0)))
    for i, block in enumerate(blocks):
        block.forward = layer_forward(block, i)
    points = [(("embed", 0), widths[0][0])]
    for i, (_, d_mid, d_out) in enumerate(widths):
        points += [(("mid", i), d_mid), (("out", i), d_out)]
    for key, width in points:
        seen.clear()
        with torch.no_grad():
            for batch in calib.input_ids.split(calib.batch_size):
                ref(input_ids=batch, use_cache=False)
        Q = pca(seen[key], 0.0)[1][:, :width]
        P[key] = Q @ Q.T
    return ref


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe", "tiny-nemotron"])
def test_sliced_model_equals_the_projected_reference(name):
    model = tiny(name)
    reference = _reference(model, CALIB, layer_widths(64, 48, [sliced.is_moe(b) for b in find_blocks(model)], False))
    SliceGPT(sparsity=0.25)(model, CALIB)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=5e-5)


def test_offload_slices_the_same_model():
    model, moved = tiny("tiny-llama"), tiny("tiny-llama")
    moved = memory.place(moved, memory.Plan(torch.device("cpu"), torch.float32, "offload"))
    for m in (model, moved):
        SliceGPT(sparsity=0.25)(m, CALIB)
    torch.testing.assert_close(logits(moved), logits(model), rtol=0, atol=0)


# --- shapes, parameters, statistics -----------------------------------------------------------------
def test_slicing_shapes_and_the_parameter_count_with_shortcuts():
    model = tiny("tiny-llama")  # V 259, D 64, 2 layers, q 64 rows, k/v 32, FFN 128, untied head
    stats = SliceGPT(sparsity=0.25)(model, CALIB)
    V, D, d, F, L = 259, 64, 48, 128, 2
    layer = (64 + 32 + 32) * d + d * 64 + 2 * F * d  # q/k/v read d, o writes d, gate/up read d
    expected = V * d + L * layer + (L - 1) * d * F + D * F + V * D  # down: d rows, the last D; head D wide
    shortcuts = L * d * d + d * d + d * D  # attn d×d each; mlp d×d, the last d×D
    assert stats.info["shortcut_params"] == shortcuts
    assert stats.info["params_after"] == models.count_params(model)[0] == expected + shortcuts
    share = 1 - (expected + shortcuts) / stats.info["params_before"]
    assert stats.info["params_removed_share"] == pytest.approx(share, abs=1e-6)
    assert stats.target_sparsity == 0.25 and stats.achieved_sparsity == pytest.approx(0.25)
    assert stats.info["pcas"] == 5 and len(stats.info["pca_energy_kept"]["per_pca"]) == 5
    assert min(stats.info["pca_energy_kept"]["per_pca"]) >= d / D  # the top-d directions hold at least their share
    b0, b1 = find_blocks(model)
    assert b0.self_attn.q_proj.weight.shape == (64, d) and b0.mlp.down_proj.weight.shape == (d, F)
    assert b1.mlp.down_proj.weight.shape == (D, F) and tuple(b1.mlp_shortcut.shape) == (d, D)
    assert model.get_input_embeddings().weight.shape == (V, d) and model.lm_head.weight.shape == (V, D)
    assert stats.per_matrix["0.self_attn.q_proj"] == pytest.approx(0.25) and stats.per_matrix["1.mlp.down_proj"] == 0
    assert set(stats.timings) >= {"fuse", "forward", "pca", "rotate"}


def test_slicing_reduces_parameters_and_a_tied_head_is_untied():
    model = tiny("tiny-qwen3")  # tied embeddings
    before = models.count_params(model)[0]
    stats = SliceGPT(sparsity=0.5, slice_head=True)(model, CALIB)
    assert stats.info["head_untied"] and model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.lm_head.weight.shape[1] == 32 and models.count_params(model)[0] < before
    assert 0 < stats.info["params_removed_share"] < 0.5  # shortcuts and the untied head cost parameters
    assert torch.isfinite(logits(model)).all()


# --- generation, gradients, LoRA -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
def test_generate_with_a_kv_cache(name):
    model = tiny(name)
    dense = model.generate(X[:1, :4], max_new_tokens=5, do_sample=False)
    SliceGPT(sparsity=0.0, embedding_mean=False)(model, CALIB)
    cached = model.generate(X[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, dense)  # nothing sliced: the same greedy tokens
    model = tiny(name)
    SliceGPT(sparsity=0.25)(model, CALIB)
    cached = model.generate(X[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(X[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False))


def test_gradients_reach_the_sliced_weights_and_shortcuts():
    """Also through transformers' activation checkpointing, which wraps the sliced layer's forward."""
    model = tiny("tiny-phi3")
    SliceGPT(sparsity=0.25)(model, CALIB)
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    block = find_blocks(model)[0]
    params = (block.self_attn.qkv_proj.weight, block.mlp.gate_up_proj.weight, block.attn_shortcut, block.mlp_shortcut)
    grads = [p.grad.clone() for p in params]
    assert all(torch.isfinite(g).all() and bool(g.any()) for g in grads)
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids=X, labels=X, use_cache=False).loss.backward()
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_half_precision_keeps_its_dtype():
    model = tiny("tiny-llama").to(torch.bfloat16)
    SliceGPT(sparsity=0.25)(model, CALIB)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and torch.isfinite(logits(model)).all()


def test_lora_recovery_runs_on_a_sliced_model_and_the_saved_model_evaluates_the_same(tmp_path):
    cfg = compose_cfg(
        "experiment=smoke/tiny", "model=tiny-qwen3", "pruner=slicegpt", "recovery=lora", "recovery.val_windows=2",
        "recovery.lr=3e-3", "recovery.tokens=128", "recovery.seqlen=32", "eval.wikitext2.max_windows=2",
        "save_model=true", f"paths.cache_dir={tmp_path / 'c'}",
    )  # fmt: skip
    result = pipeline.run(cfg, tmp_path / "run")
    prune = result["prune"]
    assert prune["method"] == "slicegpt" and prune["d"] == 48 and prune["achieved_sparsity"] == 0.25
    assert prune["params_removed_share"] == pytest.approx(1 - prune["params_after"] / prune["params_before"], abs=1e-6)
    assert result["recovery"]["metrics"]["lm_val_after"] < result["recovery"]["metrics"]["lm_val_before"]
    folder = tmp_path / "run" / "model"
    spec = json.loads((folder / SPEC_FILE).read_text())
    assert spec["format"] == "prunebench-sliced" and spec["slicing"]["sparsity"] == 0.25
    again, tok = models.load(compose_cfg("model=tiny-qwen3", f"model.path={folder}").model, tmp_path / "c")
    evaluators = {n: instantiate(e) for n, e in selected_evals(cfg).items()}
    assert pipeline.evaluate(evaluators, again, tok) == {
        k: v for k, v in result["metrics"].items() if k.startswith("wikitext2/")
    }


# --- save / reload -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-phi3", "tiny-mixtral", "tiny-nemotron"])
def test_save_and_reload_give_the_same_logits(name, tmp_path):
    model = tiny(name)
    SliceGPT(sparsity=0.25)(model, CALIB)
    save_sliced(model, ByteTokenizer(), tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec["hidden_size"] == 64 and spec["embedding"] == 48 and spec["head"] == 64 and not spec["head_sliced"]
    assert spec["layers"][0]["attn_shortcut"] == [48, 48] and spec["layers"][1]["mlp_shortcut"][1] == 64
    if name == "tiny-nemotron":  # the LayerNorm biases folded into biases the config does not have
        assert "model.layers.0.self_attn.q_proj" in spec["biases"]
    again, _ = load_sliced(tmp_path)
    assert json.loads(again.config.to_json_string())["hidden_size"] == 64
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    via_path, _ = models.load(compose_cfg(f"model={name}", f"model.path={tmp_path}").model, "/nonexistent")
    torch.testing.assert_close(logits(via_path), logits(model), rtol=0, atol=0)
    assert models.count_params(via_path) == models.count_params(model)


def test_a_spec_that_does_not_match_the_weights_is_one_line(tmp_path):
    model = tiny("tiny-llama")
    SliceGPT(sparsity=0.25)(model, CALIB)
    save_sliced(model, ByteTokenizer(), tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["embedding"] = 40
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PrunebenchError, match="does not match") as err:
        load_sliced(tmp_path)
    assert "\n" not in str(err.value)


# --- refusals before loading -------------------------------------------------------------------------
REFUSED = [
    ("gemma2", ["model=tiny-gemma2"], "does not commute with the rotation"),
    ("gemma3", ["model=tiny-gemma3"], "does not commute with the rotation"),
    ("olmo2", ["model=tiny-olmo2"], "does not commute with the rotation"),
    ("encoder", ["model=tiny-bert", "eval=[]", "calib.seqlen=16"], "needs a causal language model"),
    ("pattern", ["pruner.pattern=2:4"], "pruner.pattern=2:4 is ignored by pruner=slicegpt"),
    ("below-a-head", ["pruner.sparsity=0.9"], r"less than one head dimension \(16\); use pruner.sparsity <= 0.75"),
    ("zero-width", ["pruner.sparsity=0.95", "pruner.round_interval=1"], "keeps d=3"),
    ("whole", ["pruner.sparsity=1.0"], r"outside \[0, 1\)"),
    ("orientation", ["pruner.final_orientation=svd"], "must be pca or random"),
    ("layernorm-mean", ["model=tiny-nemotron", "pruner.embedding_mean=false"], "mean-free stream"),
]


@pytest.mark.parametrize("overrides,needle", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refusals_are_one_line_before_loading(overrides, needle, record_property):
    with pytest.raises(PrunebenchError, match=needle) as err:
        validate(compose_cfg("experiment=smoke/tiny", "pruner=slicegpt", *overrides), build=True)
    assert "\n" not in str(err.value)
    record_property("refused", str(err.value))


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_families_pass_the_checks(name):
    validate(compose_cfg("experiment=smoke/tiny", f"model={name}", "pruner=slicegpt"), build=True)


def test_a_refused_family_is_refused_on_a_loaded_model_too():
    model = models.load(compose_cfg("model=tiny-gemma2").model, "/nonexistent", seed=0)[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunebenchError, match="Gemma 2"):
        SliceGPT(sparsity=0.25)(model, CALIB)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched


# --- the embedded SmolLM2 through the CLI -----------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_cli_slices_and_the_saved_model_reloads(tmp_path):
    """25% slicing from 8 C4 windows of 256 tokens: a finite perplexity worse than dense, the true
    parameter share in metrics.json, and the saved folder evaluates the same through model.path."""
    cache = compose_cfg().paths.cache_dir  # the converted SmolLM2 lives there
    ppl = ["eval.wikitext2.max_windows=2", "eval.wikitext2.seqlen=512"]
    first = tmp_path / "sliced"
    r = run_cli("run", "pruner=slicegpt", "pruner.sparsity=0.25", "calib.nsamples=8", "calib.seqlen=256", *ppl,
                "save_model=true", f"hydra.run.dir={first}", cache=cache, cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    result = json.loads((first / "metrics.json").read_text())
    mine, dense = result["metrics"]["wikitext2/ppl"], result["baseline"]["wikitext2/ppl"]
    assert torch.isfinite(torch.tensor(mine)) and mine > dense
    prune = result["prune"]
    assert prune["d"] == 432 and prune["pcas"] == 61 and prune["head_untied"]
    assert prune["params_removed_share"] == pytest.approx(1 - prune["params_after"] / prune["params_before"], abs=1e-6)
    second = tmp_path / "reloaded"
    r = run_cli("run", "pruner=none", f"model.path={first / 'model'}", "baseline=false", *ppl,
                f"hydra.run.dir={second}", cache=cache, cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    again = json.loads((second / "metrics.json").read_text())["metrics"]["wikitext2/ppl"]
    assert again == pytest.approx(mine, rel=1e-6)
