"""MiniBridgeBERT: low-rank bridges (fit, surgery, save/load) and the stepwise pruner with
progressive KD, on tiny random BERTs (and a tiny MPNet for the tuple-returning layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from prunebench import PrunebenchError, models, pipeline, results
from prunebench.config import validate
from prunebench.models.blocks import find_blocks
from prunebench.models.bridges import (
    HEAD_FILE,
    SPEC_FILE,
    BridgeBlock,
    LowRankBridge,
    bridge_spec,
    classifier_logits,
    fit_bridge,
    load_bridged,
    replace_block,
    save_bridged,
)
from prunebench.models.encoders import Classifier
from prunebench.pruners import minibridge
from prunebench.pruners.minibridge import MiniBridge, plan_steps
from prunebench.pruners.stats import model_digest
from tests.conftest import compose_cfg

SMALL = dict(rank=16, train_limit=16, dev_limit=16, batch_size=8, fit_samples=16, epochs_teacher=1, epochs_step=1,
             teacher_cache=False, max_length=32)  # fmt: skip
TEXTS = ["the cat sat on the mat", "colourless green ideas sleep furiously", "him went store"]


def tiny(name: str = "tiny-bert4"):
    return models.load(compose_cfg(f"model={name}").model, cache_dir="/nonexistent")


def hidden_out(model, tok, texts=TEXTS) -> torch.Tensor:
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state


def run_pruner(model, tok, **knobs):
    pruner = MiniBridge(**{**SMALL, **knobs})
    pruner.tokenizer = tok
    return pruner(model).info


# ---------------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("form", ["residual", "plain"])
@pytest.mark.parametrize("method", ["rrr", "svd"])
def test_fit_is_exact_at_full_rank_for_a_linear_map(form, method):
    torch.manual_seed(0)
    x = torch.randn(400, 32) * torch.linspace(0.1, 3, 32)
    W, c = torch.randn(32, 32), torch.randn(32)
    y = x @ W + c
    bridge = fit_bridge(x, y, 32, form, bias=True, method=method)
    x_new = torch.randn(50, 32)
    torch.testing.assert_close(bridge(x_new), x_new @ W + c, rtol=1e-4, atol=1e-4)
    assert bridge.fit_error < 1e-10
    no_bias = fit_bridge(x, x @ W, 32, form, bias=False, method=method)
    assert no_bias.up.bias is None
    torch.testing.assert_close(no_bias(x_new), x_new @ W, rtol=1e-4, atol=1e-4)


def test_fit_low_rank_exact_and_reduced_rank_beats_truncation():
    torch.manual_seed(0)
    x = torch.randn(600, 32) * torch.linspace(0.05, 5, 32)  # anisotropic, as hidden states are
    low = torch.randn(32, 4) @ torch.randn(4, 32)
    bridge = fit_bridge(x, x @ low, 4, "plain")
    torch.testing.assert_close(bridge(x), x @ low, rtol=1e-3, atol=1e-3)
    y = x @ torch.randn(32, 32)
    rrr, svd = fit_bridge(x, y, 8, "plain", method="rrr"), fit_bridge(x, y, 8, "plain", method="svd")
    with torch.no_grad():
        err = [float(((b(x) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()) for b in (rrr, svd)]
    assert err[0] < err[1]
    assert abs(err[0] - rrr.fit_error) < 1e-4  # the error reported from the moments is the real one


class LinearBlock(nn.Module):
    """A transformer block that is a plain linear map (BertLayer's call signature, tensor out)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, hidden_states, *args, **kwargs):
        return self.lin(hidden_states)


@pytest.mark.parametrize("form", ["residual", "plain"])
def test_pruner_fit_reproduces_a_linear_block_at_full_rank(form):
    model, tok = tiny()
    torch.manual_seed(1)
    find_blocks(model)[1] = LinearBlock(64)
    before = hidden_out(model, tok)
    pruner = MiniBridge(**{**SMALL, "rank": 64, "form": form, "fit_samples": 16})
    pruner.tokenizer = tok
    train = minibridge.classification("cola", "in_domain_train").sample(16, 0)
    stats = pruner._fit_stats(Classifier(model, 2, 0.1), [1], train)
    assert stats[1].n > 64  # token rows, padding excluded
    bridge, err = pruner._bridge(64, stats[1])
    assert err < 1e-8
    replace_block(model, 1, bridge)
    torch.testing.assert_close(hidden_out(model, tok), before, rtol=1e-4, atol=1e-4)


def test_identity_init_and_bridge_cost():
    bridge = LowRankBridge(64, 16)
    bridge.set_identity()
    x = torch.randn(3, 5, 64)
    assert torch.equal(bridge(x), x)
    assert sum(p.numel() for p in bridge.parameters()) == LowRankBridge.cost(64, 16) == 2 * 64 * 16 + 64
    assert LowRankBridge.cost(768, 256) == 393_984  # BERT-base: 7,087,872 - 393,984 = 6.69M removed per step
    with pytest.raises(PrunebenchError, match="identity"):
        LowRankBridge(64, 16, "plain").set_identity()


# ---------------------------------------------------------------------------------------------- surgery, save/load


def test_bridged_bert_saves_and_loads_through_model_path(tmp_path):
    model, tok = tiny()
    replace_block(model, 1, LowRankBridge(64, 16))
    replace_block(model, 3, LowRankBridge(64, 8, "plain", bias=False))
    assert model.config.num_hidden_layers == 4 and isinstance(find_blocks(model)[1], BridgeBlock)
    expect = hidden_out(model, tok)
    cfg = compose_cfg("model=tiny-bert4")
    models.save(model, tok, tmp_path / "m", cfg.model)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {SPEC_FILE, "model.safetensors", "config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]  # no pickle
    spec = json.loads((tmp_path / "m" / SPEC_FILE).read_text())
    assert [(b["index"], b["rank"], b["form"], b["bias"]) for b in spec["bridges"]] == [
        (1, 16, "residual", True),
        (3, 8, "plain", False),
    ]
    again, tok2 = models.load(compose_cfg("model=tiny-bert4", f"model.path={tmp_path / 'm'}").model, "/nonexistent")
    assert bridge_spec(again) == bridge_spec(model)
    assert torch.equal(hidden_out(again, tok2), expect)
    assert models.count_params(again) == models.count_params(model)


def test_compressed_classifier_round_trips_with_identical_logits(tmp_path):
    model, tok = tiny()
    run_pruner(model, tok, blocks=[2, 3])
    models.save(model, tok, tmp_path / "m", compose_cfg("model=tiny-bert4").model)
    assert (tmp_path / "m" / HEAD_FILE).exists()
    again, tok2 = models.load(compose_cfg("model=tiny-bert4", f"model.path={tmp_path / 'm'}").model, "/nonexistent")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expect = classifier_logits(model, enc)
        got = classifier_logits(again, tok2(TEXTS, padding=True, return_tensors="pt"))
    assert expect.shape == (3, 2) and torch.equal(got, expect)
    assert models.count_params(again) == models.count_params(model)


def test_mpnet_layer_returns_a_tuple_and_round_trips(tmp_path):
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = MPNetModel(cfg).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    block = replace_block(model, 1, LowRankBridge(32, 8))
    assert block.returns == "tuple"
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save_bridged(model, None, tmp_path / "mp")
    again, _ = load_bridged(tmp_path / "mp")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).last_hidden_state, expect)


# ---------------------------------------------------------------------------------------------- the pruner


def test_parameter_counts_per_step_are_exact():
    model, tok = tiny()
    # tiny-bert4: hidden 64, FFN 128, vocab 259, 256 positions. Embeddings 259·64 + 256·64 + 2·64 + 2·64
    # = 33,216; pooler 64·64 + 64 = 4,160; a block: 4·(64·64 + 64) + 2·64 + (64·128 + 128) + (128·64 + 64)
    # + 2·64 = 33,472; a rank-16 bridge: 2·64·16 + 64 = 2,112.
    block, bridge = 33_472, 2_112
    dense = 33_216 + 4_160 + 4 * block
    assert models.count_params(model)[0] == dense == 171_264
    # Raise the process's memory high-water mark far above what a step needs, as an earlier test in the
    # same process may have: each step's peak must still be its own (reset when the step begins).
    big = torch.ones(96 * 2**20)  # 384 MiB, touched
    del big
    process_peak = results.proc_status_mb("VmHWM")
    info = run_pruner(model, tok, blocks=[2, 4])
    rows = info["steps"]
    assert [r["params"] for r in rows] == [dense, dense - block + bridge, dense - 2 * (block - bridge)]
    assert [(r["bridges"], r["blocks"]) for r in rows] == [(0, 4), (1, 3), (2, 2)]
    assert [r["change"] for r in rows] == ["fine-tuned", "bridge block 2", "bridge block 4"]
    assert models.count_params(model)[0] == rows[-1]["params"]  # the caller's model is the bridged encoder
    assert [type(b).__name__ for b in find_blocks(model)] == ["BertLayer", "BridgeBlock", "BertLayer", "BridgeBlock"]
    assert info["metrics"]["cola_mcc"] == rows[-1]["dev_mcc"] and info["teacher_mcc"] == rows[0]["dev_mcc"]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in rows)  # each step's own time and peak
    if Path("/proc/self/clear_refs").exists():  # Linux: the step's peak, not the process's
        assert all(r["peak_rss_mb"] < process_peak - 200 for r in rows), (process_peak, rows)

    dropped, tok = tiny()
    rows = run_pruner(dropped, tok, blocks=[4, 2], drop_instead=True)["steps"]
    assert [(r["params"], r["bridges"], r["blocks"]) for r in rows] == [
        (dense, 0, 4),
        (dense - block, 0, 3),
        (dense - 2 * block, 0, 2),
    ]
    assert dropped.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "knobs,teachers",
    [
        ({}, [0, 1, 2]),  # progressive: step k's teacher is step k-1's student
        ({"progressive": False, "one_shot": "original_teacher"}, [0, 0, 0]),
        ({"progressive": False, "one_shot": "all_at_once"}, [0]),
        ({"kd": False}, [None, None, None]),
    ],
)
def test_teacher_of_each_step(monkeypatch, knobs, teachers):
    """A spy on the training call: the teacher's weights at step k equal the student's at the end
    of step k-1 (progressive), the fine-tuned model's (original teacher), or there is none (kd=false)."""
    seen = []
    original = MiniBridge._train

    def spy(self, student, teacher, train, epochs, bridges, tag):
        t = None if teacher is None else model_digest(teacher)
        out = original(self, student, teacher, train, epochs, bridges, tag)
        seen.append((tag, t, model_digest(student)))
        return out

    monkeypatch.setattr(MiniBridge, "_train", spy)
    model, tok = tiny()
    info = run_pruner(model, tok, blocks=[1, 3, 4], **knobs)
    ends = [s for _, _, s in seen]  # the student after the teacher's fine-tune, after step 1, ...
    assert [t for _, t, _ in seen[1:]] == [None if k is None else ends[k] for k in teachers]
    assert [r["teacher_step"] for r in info["steps"][1:]] == teachers
    if teachers[0] is not None and len(teachers) > 1 and teachers[1] == 1:
        assert ends[1] != ends[0]  # the student did change: step 2's teacher is not the original
    if knobs.get("one_shot") == "all_at_once":
        assert info["steps"][-1]["bridges"] == 3 and len(info["steps"]) == 2
        assert "all blocks at once" in info["protocol"]


def test_hidden_state_loss_matches_the_bridge_outputs(monkeypatch):
    calls, original = [], minibridge.state_loss

    def spy(student, teacher, kind, mask):
        calls.append((len(student), student[0].shape, teacher[0].shape, kind))
        return original(student, teacher, kind, mask)

    monkeypatch.setattr(minibridge, "state_loss", spy)
    model, tok = tiny()
    run_pruner(model, tok, blocks=[2], hidden_loss=1.0, hidden_loss_kind="cosine")
    assert calls and all(n == 1 and s == t and s[-1] == 64 and k == "cosine" for n, s, t, k in calls)


def test_plan_steps_order_and_modes():
    assert plan_steps([2, 4, 6], "listed", True, "all_at_once") == [[1], [3], [5]]
    assert plan_steps([2, 4, 6], "reverse", True, "all_at_once") == [[5], [3], [1]]
    assert plan_steps([2, 4, 6], "listed", False, "all_at_once") == [[1, 3, 5]]
    assert plan_steps([2, 4, 6], "listed", False, "original_teacher") == [[1], [3], [5]]
    assert plan_steps([], "listed", True, "all_at_once") == []


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -4}, "rank"),
        ({"blocks": [0, 2]}, "count from 1"),
        ({"blocks": [2, 4, 2]}, "twice"),
        ({"order": "random"}, "order"),
        ({"form": "diagonal"}, "form"),
        ({"init": "zeros"}, "init"),
        ({"one_shot": "sometimes"}, "one_shot"),
        ({"temperature": 0}, "temperature"),
        ({"kd": False, "ce_weight": 0}, "ce_weight"),
        ({"ce_weight": -1}, "ce_weight"),
        ({"alpha_kd": 0}, "alpha_kd"),
        ({"hidden_loss": -1}, "hidden_loss"),
        ({"epochs_step": 0}, "epochs_step"),
        ({"train_limit": 0}, "train_limit"),
    ],
)
def test_bad_knobs_raise_in_init(knobs, message):
    with pytest.raises(PrunebenchError, match=message):
        MiniBridge(**knobs)


def test_bad_knobs_against_the_model():
    with pytest.raises(PrunebenchError, match="outside the model's 12 blocks"):
        MiniBridge(blocks=[2, 13]).check(12)
    MiniBridge().check(12)
    with pytest.raises(PrunebenchError, match="outside the model's 2 blocks"):  # before loading
        cfg = compose_cfg("model=tiny-bert", "pruner=minibridge", "pruner.blocks=[3]", "eval=[efficiency]")
        validate(cfg, build=True)
    model, tok = tiny()
    before = model_digest(model)
    with pytest.raises(PrunebenchError, match="hidden size 64"):
        run_pruner(model, tok, rank=65, blocks=[2])
    with pytest.raises(PrunebenchError, match="identity"):
        run_pruner(model, tok, rank=16, form="plain", init="identity", blocks=[2])
    assert model_digest(model) == before  # refused before any change
    llama, byte_tok = tiny("tiny-llama")
    with pytest.raises(PrunebenchError, match="decoder"):
        run_pruner(llama, byte_tok, blocks=[1])


def test_bad_rank_in_a_run_writes_nothing(tmp_path):
    cfg = compose_cfg("model=tiny-bert", "pruner=minibridge", "pruner.rank=65", "pruner.blocks=[2]", "eval=[]",
                      f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu")  # fmt: skip
    with pytest.raises(PrunebenchError, match="rank=65"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_pipeline_run_writes_steps_and_saves_the_bridged_model(tmp_path):
    overrides = ["model=tiny-bert", "pruner=minibridge", "pruner.blocks=[2]", "pruner.rank=8", "pruner.train_limit=16",
                 "pruner.dev_limit=16", "pruner.batch_size=8", "pruner.fit_samples=16", "pruner.epochs_teacher=1",
                 "pruner.epochs_step=1", "eval=[]", "save_model=true", "device=cpu",
                 f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    result = pipeline.run(compose_cfg(*overrides), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    steps = written["prune"]["steps"]
    assert [s["name"] for s in steps] == ["teacher", "(a)"] and steps[0]["teacher"] == "fine-tuned"
    assert written["prune"]["params_after"] == steps[-1]["params"] < written["prune"]["params_before"]
    assert all(-100 <= s["dev_mcc"] <= 100 for s in steps)
    assert (tmp_path / "run" / "model" / SPEC_FILE).exists()
    assert result["prune"]["metrics"]["bridges"] == 1
    # a second run reuses the cached teacher (same model, data and knobs): same teacher score
    again = pipeline.run(compose_cfg(*overrides), tmp_path / "run2")
    assert again["prune"]["steps"][0]["teacher"] == "cache"
    assert again["prune"]["teacher_mcc"] == written["prune"]["teacher_mcc"]
