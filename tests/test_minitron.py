"""Minitron: aggregation math, importance hooks, real trimming (heads, KV groups, MLP, hidden, depth)
on tiny random Llama (gated SiLU MLP, RMSNorm) and Nemotron (relu² MLP, LayerNorm1P, partial rotary)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prunebench import PrunebenchError, models
from prunebench.models import trim
from prunebench.models.blocks import find_blocks
from prunebench.pruners import shortgpt
from prunebench.pruners.minitron import Minitron
from prunebench.pruners.minitron import importance as mimp
from prunebench.pruners.minitron import plan as mplan
from tests.conftest import compose_cfg, random_calib

ARCHS = ["tiny-llama", "tiny-nemotron"]
X = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def tiny(name: str, layers: int = 2, kv: int | None = None, seed: int = 0):
    over = [f"model={name}", f"model.hf_config.num_hidden_layers={layers}"]
    if kv is not None:
        over.append(f"model.hf_config.num_key_value_heads={kv}")
    model = models.load(compose_cfg(*over).model, cache_dir="/nonexistent", seed=seed)[0]
    with torch.no_grad():  # non-trivial norm parameters, so that trimming them is exercised
        g = torch.Generator().manual_seed(seed + 1)
        for norm in trim.residual_norms(model).values():
            norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=g))
            if getattr(norm, "bias", None) is not None:
                norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g))
    return model


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def importance(model, **kw):
    calib = random_calib(n=4, seqlen=16)
    return mimp.compute_importance(model, calib.input_ids, 2, **kw)


# ---------------------------------------------------------------- aggregation on known tensors


def test_reduce_seq_and_batch_on_known_values():
    x = torch.tensor([[[1.0, -2.0], [3.0, 2.0]], [[-1.0, 0.0], [1.0, 0.0]]])  # (B=2, S=2, C=2)
    torch.testing.assert_close(mimp.reduce_seq(x, "mean"), torch.tensor([[2.0, 2.0], [1.0, 0.0]]))
    torch.testing.assert_close(mimp.reduce_seq(x, "l2"), torch.tensor([[10**0.5, 8**0.5], [2**0.5, 0.0]]))
    torch.testing.assert_close(mimp.reduce_seq(x, "var"), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    v = torch.tensor([[3.0, 1.0], [4.0, 3.0]])
    torch.testing.assert_close(mimp.reduce_batch(v, "l2"), torch.tensor([5.0, 10**0.5]))
    torch.testing.assert_close(mimp.reduce_batch(v, "mean"), torch.tensor([3.5, 2.0]))
    torch.testing.assert_close(mimp.reduce_batch(v, "var"), torch.tensor([0.25, 1.0]))
    # the paper's default: batch l2 of the per-window mean |x|
    torch.testing.assert_close(mimp.aggregate(x), torch.tensor([5**0.5, 2.0]))


@pytest.mark.parametrize("how", mimp.AGGS)
def test_streaming_batch_aggregation_equals_whole_tensor(how):
    v = torch.randn(13, 7, generator=torch.Generator().manual_seed(0)).abs() * 3 + 1
    acc = mimp.BatchAgg(how)
    for chunk in v.split([1, 5, 4, 3]):
        acc.add(chunk)
    torch.testing.assert_close(acc.value(), mimp.reduce_batch(v, how), rtol=1e-5, atol=1e-6)


def test_bad_aggregation_names():
    with pytest.raises(ValueError):
        mimp.reduce_seq(torch.ones(1, 2, 3), "max")
    with pytest.raises(ValueError):
        mimp.BatchAgg("median")


def test_head_norms_reshape_heads():
    o_in = torch.zeros(1, 1, 3 * 2)
    o_in[0, 0, 2:4] = torch.tensor([3.0, 4.0])  # head 1
    torch.testing.assert_close(mimp.head_norms(o_in, 2), torch.tensor([[[0.0, 5.0, 0.0]]]))


# ---------------------------------------------------------------- selection (pure)


def test_select_heads_is_gqa_aware():
    # 6 heads, 3 KV groups of 2; group sums: g0 = 1.1, g1 = 9.0, g2 = 5.5
    s = torch.tensor([1.0, 0.1, 4.0, 5.0, 5.0, 0.5])
    kept, groups, ranked = mplan.select_heads(s, 3, heads=3, groups=3)
    assert kept == [0, 3, 4] and groups == [0, 1, 2]  # the best head of every group, not the global top 3
    kept, groups, _ = mplan.select_heads(s, 3, heads=2, groups=1)
    assert groups == [1] and kept == [2, 3]
    kept, groups, _ = mplan.select_heads(s, 3, heads=2, groups=2)
    assert groups == [1, 2] and kept == [3, 4]
    assert ranked[1] == [3, 2]
    with pytest.raises(ValueError):
        mplan.select_heads(s, 3, heads=4, groups=1)  # 4 heads in one group of 2


def test_merge_pairs_follow_the_paper_formula():
    # ranked best first h1..h6, K = 3 kept: h_i takes h_{2K-i+1}: (h1,h6), (h2,h5), (h3,h4)
    assert mplan.merge_pairs([10, 11, 12, 13, 14, 15], 3) == [(10, 15), (11, 14), (12, 13)]
    # K = 2 of 3: only h2 has a partner (h_{2K-1+1} = h4 does not exist)
    assert mplan.merge_pairs([7, 8, 9], 2) == [(8, 9)]


def test_merge_heads_updates_query_rows_only():
    model = tiny("tiny-llama", kv=4)
    attn = find_blocks(model)[0].self_attn
    d = trim.head_dim(model)
    q, k = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    mplan.merge_heads(model, 0, [(0, 3)])
    torch.testing.assert_close(attn.q_proj.weight[:d], 2 * q[:d] - q[3 * d : 4 * d])
    torch.testing.assert_close(attn.q_proj.weight[d:], q[d:])
    assert torch.equal(attn.k_proj.weight, k)


# ---------------------------------------------------------------- planted dead units rank last


@pytest.mark.parametrize("name", ARCHS)
def test_dead_head_ranks_last_and_is_trimmed(name):
    model = tiny(name, kv=4)  # MHA: a single head owns its values
    d = trim.head_dim(model)
    with torch.no_grad():
        find_blocks(model)[1].self_attn.v_proj.weight[2 * d : 3 * d] = 0
    imp = importance(model, axes=["heads"], depth=None)
    assert imp.heads[1][2] == 0 and mplan.ranking(imp.heads[1])[-1] == 2
    assert (imp.heads[0] > 0).all()
    stats = Minitron(target={"heads": 3})(model, random_calib(n=4, seqlen=16))
    assert 2 not in stats.info["heads_kept"]["1"] and len(stats.info["heads_kept"]["1"]) == 3
    assert model.config.num_attention_heads == model.config.num_key_value_heads == 3  # MHA stays MHA


@pytest.mark.parametrize("name", ARCHS)
def test_dead_kv_group_ranks_last_and_is_removed(name):
    model = tiny(name)  # 4 heads, 2 KV groups
    d = trim.head_dim(model)
    with torch.no_grad():
        find_blocks(model)[0].self_attn.v_proj.weight[:d] = 0  # group 0 (heads 0, 1) outputs nothing
    imp = importance(model, axes=["heads"], depth=None)
    assert imp.groups(0).tolist()[0] == 0 and imp.groups(0)[1] > 0
    stats = Minitron(target={"kv_heads": 1, "heads": 2})(model, random_calib(n=4, seqlen=16))
    assert stats.info["kv_groups_kept"]["0"] == [1] and stats.info["heads_kept"]["0"] == [2, 3]
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2


@pytest.mark.parametrize("name", ARCHS)
def test_dead_neuron_ranks_last_and_is_trimmed(name):
    model = tiny(name)
    mlp = find_blocks(model)[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[17] = 0  # act(gate)·0 = 0 (gated), relu²(0) = 0 (Nemotron)
    imp = importance(model, axes=["ffn"], depth=None)
    assert imp.neurons[0][17] == 0 and mplan.ranking(imp.neurons[0])[-1] == 17
    stats = Minitron(target={"ffn": 127})(model, random_calib(n=4, seqlen=16))
    assert stats.info["neurons_kept"]["0"] == [i for i in range(128) if i != 17]
    assert model.config.intermediate_size == 127


@pytest.mark.parametrize("name", ARCHS)
def test_pre_activation_neuron_score(name):
    """neuron_score=pre_act scores |X·W1_i| (the paper's wording): a neuron whose first-linear row is
    zero scores 0 and is trimmed; it is not the default down_proj-input score."""
    model = tiny(name)
    mlp = find_blocks(model)[0].mlp
    first = getattr(mlp, "gate_proj", None) or mlp.up_proj  # gated: the gate; Nemotron: up (relu²)
    with torch.no_grad():
        first.weight[5] = 0
    pre = importance(model, axes=["ffn"], depth=None, neuron="pre_act")
    post = importance(model, axes=["ffn"], depth=None)
    assert pre.neurons[0][5] == 0 and mplan.ranking(pre.neurons[0])[-1] == 5
    assert not torch.allclose(pre.neurons[1], post.neurons[1])
    stats = Minitron(target={"ffn": 127}, neuron_score="pre_act")(model, random_calib(n=4, seqlen=16))
    assert 5 not in stats.info["neurons_kept"]["0"] and stats.info["neuron_score"] == "pre_act"
    with pytest.raises(PrunebenchError, match="neuron_score"):
        Minitron(neuron_score="gate")


@pytest.mark.parametrize("name", ARCHS)
def test_dead_hidden_channel_ranks_last_and_is_trimmed(name):
    model = tiny(name)
    one_p = name == "tiny-nemotron"  # LayerNorm1P scales by (weight + 1)
    with torch.no_grad():
        for norm in trim.residual_norms(model).values():  # every norm output is 0 in channel 9
            norm.weight[9] = -1.0 if one_p else 0.0
            if getattr(norm, "bias", None) is not None:
                norm.bias[9] = 0.0
    imp = importance(model, axes=["hidden"], depth=None)
    assert set(imp.norms) == {"0.input_layernorm", "0.post_attention_layernorm", "1.input_layernorm",
                              "1.post_attention_layernorm", "norm"}  # fmt: skip
    assert imp.hidden()[9] == 0 and mplan.ranking(imp.hidden())[-1] == 9
    stats = Minitron(target={"hidden": 63})(model, random_calib(n=4, seqlen=16))
    assert stats.info["channels_kept"] == [i for i in range(64) if i != 9]


# ---------------------------------------------------------------- trimming = zeroing (exact references)


@pytest.mark.parametrize("name", ARCHS)
def test_trimming_heads_and_groups_equals_zeroing_them(name):
    model = tiny(name, layers=3)
    ref = copy.deepcopy(model)
    d = trim.head_dim(model)
    keep = {0: ([0, 2], [0, 1]), 1: ([2, 3], [1]), 2: ([1, 3], [0, 1])}  # layer 1 drops KV group 0
    with torch.no_grad():
        for i, (heads, _) in keep.items():
            o = find_blocks(ref)[i].self_attn.o_proj.weight
            for h in range(4):
                if h not in heads:
                    o[:, h * d : (h + 1) * d] = 0
    for i, (heads, groups) in keep.items():
        trim.trim_heads(model, i, heads, groups)
    with pytest.raises(ValueError, match="different"):
        trim.check_uniform(model)  # layer 1 has 1 KV head, the others 2: one HF config cannot say so
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-5)


def test_trim_heads_rejects_unbalanced_groups():
    model = tiny("tiny-llama")
    with pytest.raises(ValueError, match="same number"):
        trim.trim_heads(model, 0, [0, 1, 2])
    with pytest.raises(ValueError, match="removed KV groups"):
        trim.trim_heads(model, 0, [0, 2], [1])


@pytest.mark.parametrize("name", ARCHS)
def test_trimming_neurons_equals_zeroing_them(name):
    model = tiny(name)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    keep = [sorted(torch.randperm(128, generator=g)[:80].tolist()) for _ in range(2)]
    with torch.no_grad():
        for i, k in enumerate(keep):
            down = find_blocks(ref)[i].mlp.down_proj.weight
            mask = torch.ones(128, dtype=torch.bool)
            mask[k] = False
            down[:, mask] = 0
    for i, k in enumerate(keep):
        trim.trim_mlp(model, i, k)
    trim.check_uniform(model)
    assert model.config.intermediate_size == 80
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-5)


def _norm_on_kept(norm, keep: torch.Tensor, one_p: bool):
    """Reference: the dense norm computed over the kept channels only, 0 in the removed ones."""
    w = norm.weight.detach() + (1.0 if one_p else 0.0)

    def forward(x):
        xk = x[..., keep].float()
        if isinstance(norm, torch.nn.LayerNorm):
            b = norm.bias.detach()[keep] if norm.bias is not None else None
            yk = F.layer_norm(xk, (keep.numel(),), w[keep], b, norm.eps)
        else:
            yk = w[keep] * (xk * torch.rsqrt(xk.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        out = torch.zeros_like(x)
        out[..., keep] = yk.to(x.dtype)
        return out

    return forward


@pytest.mark.parametrize("name", ARCHS)
def test_trimming_hidden_equals_norms_over_kept_channels(name):
    """What is exactly true: after trimming, every norm normalises over the kept channels (RMS /
    mean / variance over d' channels, not d), and nothing reads the removed residual channels
    except through the norms. So the trimmed model equals the dense one whose norms see only the
    kept channels and output 0 elsewhere, for any channels removed (not only dead ones)."""
    model = tiny(name, layers=3)
    ref = copy.deepcopy(model)
    keep = torch.tensor(sorted(torch.randperm(64, generator=torch.Generator().manual_seed(5))[:40].tolist()))
    for norm in trim.residual_norms(ref).values():
        norm.forward = _norm_on_kept(norm, keep, name == "tiny-nemotron")
    trim.trim_hidden(model, keep.tolist())
    assert model.config.hidden_size == 40 and model.config.head_dim == 16
    assert model.get_input_embeddings().weight.shape == (259, 40)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-5)


def test_trimming_hidden_keeps_a_tied_head_tied(tmp_path):
    cfg = compose_cfg("model=tiny-llama", "model.hf_config.tie_word_embeddings=true")
    model = models.load(cfg.model, cache_dir="/nonexistent")[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trim.trim_hidden(model, list(range(0, 64, 2)))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.in_features == 32
    _round_trip(model, tmp_path)


# ---------------------------------------------------------------- valid configs: save/load, generate


def _round_trip(model, path):
    from transformers import AutoModelForCausalLM

    c = model.config
    assert c.num_attention_heads % c.num_key_value_heads == 0
    x = X[:1, :4]
    cached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (1, 10)
    model.save_pretrained(path)
    again = AutoModelForCausalLM.from_pretrained(path)
    assert again.config.hidden_size == c.hidden_size and again.config.intermediate_size == c.intermediate_size
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_every_axis_trimmed_model_round_trips_and_generates(name, tmp_path):
    model = tiny(name, layers=4)
    params = sum(p.numel() for p in model.parameters())
    target = {"layers": 3, "heads": 2, "kv_heads": 1, "ffn": 96, "hidden": 48}
    stats = Minitron(target=target)(model, random_calib(n=4, seqlen=16))
    assert stats.info["shape_after"] == target
    assert stats.info["params_before"] == params > stats.info["params_after"]
    assert len(find_blocks(model)) == 3 and [b.self_attn.layer_idx for b in find_blocks(model)] == [0, 1, 2]
    assert sorted(stats.info["heads_kept"]) == [str(i) for i in stats.info["layers_kept"]]
    for key in ("layers", "heads", "kv_groups", "ffn", "hidden"):
        assert stats.info["scores"][key]["min"] <= stats.info["scores"][key]["max"]
    trim.check_uniform(model)
    _round_trip(model, tmp_path)


@pytest.mark.parametrize("name", ARCHS)
def test_gqa_heads_trimmed_inside_groups(name, tmp_path):
    model = tiny(name)
    Minitron(target={"heads": 2})(model, random_calib(n=4, seqlen=16))  # one head per KV group
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    _round_trip(model, tmp_path)


def test_head_merge_changes_only_kept_query_heads():
    """Merges stay inside a KV group (query heads sharing K/V): 2 groups of 2 heads, 1 kept in each."""
    a, b = tiny("tiny-llama"), tiny("tiny-llama")
    sa = Minitron(target={"heads": 2})(a, random_calib(n=4, seqlen=16))
    sb = Minitron(target={"heads": 2}, head_merge=True)(b, random_calib(n=4, seqlen=16))
    assert sa.info["heads_kept"] == sb.info["heads_kept"] and sb.info["heads_merged"]
    ba, bb = find_blocks(a)[0].self_attn, find_blocks(b)[0].self_attn
    assert torch.equal(ba.k_proj.weight, bb.k_proj.weight) and torch.equal(ba.o_proj.weight, bb.o_proj.weight)
    assert not torch.equal(ba.q_proj.weight, bb.q_proj.weight)


# ---------------------------------------------------------------- depth


def _identity(block):
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_block_importance_matches_shortgpt():
    model = tiny("tiny-llama", layers=4)
    calib = random_calib(n=4, seqlen=16)
    imp = mimp.compute_importance(model, calib.input_ids, 2, axes=(), depth="bi")
    ref = shortgpt.layer_influence(model, calib.input_ids, 2)
    assert imp.layers == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("metric", ["bi", "ppl"])
@pytest.mark.parametrize("name", ARCHS)
def test_depth_removes_identity_layers(name, metric):
    model = tiny(name, layers=5)
    for i in (1, 3):
        _identity(find_blocks(model)[i])
    stats = Minitron(target={"layers": 3}, depth={"metric": metric})(model, random_calib(n=4, seqlen=16))
    scores = stats.info["scores"]["layers"]["values"]
    assert scores[1] == pytest.approx(0, abs=1e-5) and scores[3] == pytest.approx(0, abs=1e-5)
    # BI >= 0, so the identities go; a random layer may lower the perplexity (Δppl < 0) and go first
    assert stats.info["layers_removed"] == sorted(mplan.ranking(torch.tensor(scores))[-2:])
    if metric == "bi":
        assert stats.info["layers_removed"] == [1, 3]
    assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("metric", ["bi", "ppl"])
def test_depth_contiguous_removes_the_best_run(metric):
    model = tiny("tiny-llama", layers=6)
    for i in (1, 3, 4):
        _identity(find_blocks(model)[i])
    before = logits(model)
    pruner = Minitron(target={"layers": 4}, depth={"metric": metric, "contiguous": True})
    stats = pruner(model, random_calib(n=4, seqlen=16))
    run = stats.info["scores"]["layers"]["runs"]["2"]
    assert len(run) == 5 and run[3] == pytest.approx(0, abs=1e-5)
    start = min(range(5), key=lambda s: run[s])
    assert stats.info["layers_removed"] == [start, start + 1]
    if metric == "bi":  # BI >= 0: the identity pair, not the individually weakest 1 and 3
        assert stats.info["layers_removed"] == [3, 4]
        torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)  # removing identities changes nothing


def test_ppl_scoring_restores_the_model():
    model = tiny("tiny-llama", layers=3)
    before = logits(model)
    imp = importance(model, axes=(), depth="ppl", run_lengths=[2])
    assert len(imp.layers) == 3 and len(imp.runs[2]) == 2 and imp.dense_ppl > 1
    assert model.config.num_hidden_layers == 3 and [b.self_attn.layer_idx for b in find_blocks(model)] == [0, 1, 2]
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


# ---------------------------------------------------------------- importance pass details


def test_one_pass_serves_many_shapes():
    model = tiny("tiny-llama", layers=3)
    imp = importance(model)
    dims = mplan.Dims.of(model)
    for ffn, heads in ((96, 2), (64, 4), (128, 2)):
        m = copy.deepcopy(model)
        mplan.apply_plan(m, mplan.plan(imp, dims, {"ffn": ffn, "heads": heads}))
        assert (m.config.intermediate_size, m.config.num_attention_heads) == (ffn, heads)


def test_importance_does_not_depend_on_batch_size():
    model = tiny("tiny-nemotron", layers=2)
    calib = random_calib(n=4, seqlen=16)
    one = mimp.compute_importance(model, calib.input_ids, 1, batch="var", seq="l2")
    four = mimp.compute_importance(model, calib.input_ids, 4, batch="var", seq="l2")
    every = [
        (one.heads, four.heads),
        (one.neurons, four.neurons),
        (list(one.norms.values()), list(four.norms.values())),
    ]
    for a, b in ((a, b) for xs, ys in every for a, b in zip(xs, ys, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_neuron_importance_is_the_down_proj_input():
    model = tiny("tiny-llama")
    calib = random_calib(n=4, seqlen=16)
    seen = []
    h = find_blocks(model)[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    imp = mimp.compute_importance(model, calib.input_ids, 2, axes=["ffn"], depth=None)
    h.remove()
    torch.testing.assert_close(imp.neurons[1], mimp.aggregate(torch.cat(seen), "l2", "mean"))


# ---------------------------------------------------------------- bad knobs


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(agg={"batch": "max"}), "pruner.agg.batch"),
        (dict(agg={"seq": "sum"}), "pruner.agg.seq"),
        (dict(agg={"tokens": "l2"}), "pruner.agg.tokens"),
        (dict(target={"heads": 6, "kv_heads": 4}), "pruner.target.heads=6 is not divisible"),
        (dict(target={"ffn": 0}), "pruner.target.ffn"),
        (dict(target={"hidden": -3}), "pruner.target.hidden"),
        (dict(target={"width": 3}), "pruner.target.width"),
        (dict(depth={"metric": "cosine"}), "pruner.depth.metric"),
        (dict(depth={"contiguous": "yes"}), "pruner.depth.contiguous"),
        (dict(head_merge="paper"), "pruner.head_merge"),
        (dict(sparsity=0.5), "pruner.sparsity"),
    ],
)
def test_bad_knobs_at_init(kwargs, needle):
    with pytest.raises(PrunebenchError, match=needle):
        Minitron(**kwargs)


DIMS = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.mark.parametrize(
    "target,needle",
    [
        ({"layers": 3}, "pruner.target.layers=3 is more than the model's 2 layers"),
        ({"heads": 8}, "pruner.target.heads=8 is more"),
        ({"ffn": 256}, "pruner.target.ffn=256 is more"),
        ({"hidden": 65}, "pruner.target.hidden=65 is more"),
        ({"kv_heads": 3}, "pruner.target.kv_heads=3 is more"),
        ({"heads": 3}, "not a multiple of the 2 KV heads"),
        ({"kv_heads": 1}, "heads per group"),
    ],
)
def test_bad_targets_for_the_model(target, needle):
    pruner = Minitron(target=target)
    with pytest.raises(PrunebenchError, match=needle):
        pruner.check(2, DIMS)
    model = tiny("tiny-llama")
    with pytest.raises(PrunebenchError, match=needle):
        pruner(model, random_calib(n=2, seqlen=8))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64  # untouched


def test_check_without_dims_only_knows_layers():
    Minitron(target={"heads": 99}).check(30)  # heads are checked once the model is loaded
    with pytest.raises(PrunebenchError, match="pruner.target.layers"):
        Minitron(target={"layers": 31}).check(30)


@pytest.mark.parametrize("key", ["heads", "ffn", "hidden"])
def test_target_on_an_encoder_without_the_axis(key):
    model = models.load(compose_cfg("model=tiny-bert").model, cache_dir="/nonexistent")[0]
    with pytest.raises(PrunebenchError, match=f"pruner.target.{key}"):
        Minitron(target={key: 2})(model, random_calib(n=2, seqlen=8, vocab=100))


def test_depth_only_works_on_an_encoder():
    model = models.load(compose_cfg("model=tiny-bert").model, cache_dir="/nonexistent")[0]
    n = model.config.num_hidden_layers
    stats = Minitron(target={"layers": n - 1})(model, random_calib(n=2, seqlen=8, vocab=100))
    assert len(stats.info["layers_kept"]) == n - 1 == model.config.num_hidden_layers


# ---------------------------------------------------------------- config and pipeline


def test_default_config_targets_smollm2_shape():
    from prunebench.config import instantiate

    pruner = instantiate(compose_cfg("pruner=minitron").pruner)
    assert pruner.target == {"layers": None, "heads": 6, "kv_heads": None, "ffn": 1024, "hidden": None, "experts": None}
    assert (pruner.batch, pruner.seq, pruner.metric, pruner.head_merge) == ("l2", "mean", "bi", False)
    smollm2 = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    pruner.check(30, smollm2)


@pytest.mark.parametrize("name", ARCHS)
def test_pipeline_runs_minitron_end_to_end(name, tmp_path):
    from prunebench import pipeline

    cfg = compose_cfg(
        f"model={name}",
        "pruner=minitron",
        "pruner.target.heads=2",
        "pruner.target.ffn=96",
        "pruner.target.hidden=48",
        "pruner.target.layers=1",
        "calib.nsamples=4",
        "calib.seqlen=32",
        "eval=[]",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "save_model=true",
    )
    result = pipeline.run(cfg, tmp_path / "run")
    prune = result["prune"]
    assert prune["method"] == "minitron" and prune["params_after"] < prune["params_before"]
    assert prune["shape_after"] == {"layers": 1, "heads": 2, "kv_heads": 2, "ffn": 96, "hidden": 48}
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "model" / "config.json").exists()


def test_norm_rescale_makes_rmsnorm_exact_for_a_silent_channel():
    """RMSNorm over d' channels of a vector whose removed channels are 0: mean square is d/d' times
    the one over d, so gains × sqrt(d/d') give the dense outputs exactly (eps = 0)."""
    cfg = compose_cfg("model=tiny-llama", "+model.hf_config.rms_norm_eps=0.0")
    model = models.load(cfg.model, cache_dir="/nonexistent")[0]
    with torch.no_grad():  # channel 7 of the residual stream is 0 everywhere
        model.model.embed_tokens.weight[:, 7] = 0
        for block in find_blocks(model):
            block.self_attn.o_proj.weight[7] = 0
            block.mlp.down_proj.weight[7] = 0
    dense = logits(model)
    plain, scaled = copy.deepcopy(model), model
    keep = [i for i in range(64) if i != 7]
    trim.trim_hidden(plain, keep)
    trim.trim_hidden(scaled, keep, rescale_norms=True)
    torch.testing.assert_close(logits(scaled), dense, rtol=0, atol=1e-5)
    assert (logits(plain) - dense).abs().max() > 1e-4


def test_norm_rescale_of_layernorm1p_scales_the_effective_gain():
    model = tiny("tiny-nemotron")
    norm = find_blocks(model)[0].input_layernorm
    gain = norm.weight.detach() + 1
    stats = Minitron(target={"hidden": 16}, hidden_norm_rescale=True)(model, random_calib(n=2, seqlen=8))
    kept = stats.info["channels_kept"]
    torch.testing.assert_close(norm.weight + 1, gain[kept] * 2.0)  # sqrt(64 / 16)
