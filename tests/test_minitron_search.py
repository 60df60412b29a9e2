"""Minitron's light architecture search: the exact parameter count, candidate enumeration within the
tolerance, one importance pass for every candidate, rankings at several checkpoints of the short KD,
the best candidate applied, bad knobs, stages, and end-to-end runs on tiny-llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunebench import PrunebenchError, models, pipeline
from prunebench.config import instantiate
from prunebench.models import ByteTokenizer, count_params
from prunebench.pruners.minitron import Minitron
from prunebench.pruners.minitron import importance as mimp
from prunebench.pruners.minitron import plan as mplan
from prunebench.pruners.minitron import search as ms
from prunebench.pruners.minitron.plan import Dims
from tests.conftest import compose_cfg, random_calib

KD = {"seqlen": 32, "val_windows": 2, "log_every": 1, "lr": 3e-3, "min_lr": 3e-4}
SEARCH = {"tokens": 32 * 4, "checkpoints": [1, 2, 4], "max_candidates": 3, "kd": KD}
SMOLLM2 = {  # SmolLM2-135M's config.json, the parts the count reads
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "tie_word_embeddings": True,
}  # fmt: skip
SMOLLM2_DIMS = Dims(30, 9, 3, 1536, 576)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spinning makes each tiny matmul ~100x slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str = "tiny-llama", *over: str, layers: int = 4, seed: int = 0):
    cfg = compose_cfg(f"model={name}", f"model.hf_config.num_hidden_layers={layers}", *over)
    return models.load(cfg.model, cache_dir="/nonexistent", seed=seed)[0], cfg.model


def searcher(**kw) -> Minitron:
    pruner = Minitron(**{"target_params": 0.7, "search": SEARCH, **kw})
    pruner.tokenizer = ByteTokenizer()
    return pruner


# ---------------------------------------------------------------- the parameter count


SHAPES = [
    {"layers": 4, "heads": 4, "kv_heads": 2, "ffn": 128, "hidden": 64},  # dense
    {"layers": 3, "heads": 2, "kv_heads": 2, "ffn": 96, "hidden": 48},
    {"layers": 2, "heads": 2, "kv_heads": 1, "ffn": 40, "hidden": 64},
    {"layers": 4, "heads": 4, "kv_heads": 2, "ffn": 8, "hidden": 20},
    {"layers": 1, "heads": 1, "kv_heads": 1, "ffn": 128, "hidden": 16},
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize(
    "name,over",
    [("tiny-llama", ()), ("tiny-nemotron", ()), ("tiny-llama", ("model.hf_config.tie_word_embeddings=true",))],
    ids=["llama", "nemotron", "llama-tied"],
)
def test_count_equals_a_trimmed_models_real_count(name, over, shape):
    model, cfg = tiny(name, *over)
    from_config = mplan.Arch.of_config(dict(cfg.hf_config))
    from_model = mplan.Arch.of_model(model)
    assert from_config == from_model and from_model.extra == from_model.layer_extra == 0
    assert mplan.param_count(Dims.of(model), from_config) == count_params(model)[0]
    Minitron(target=shape)(model, random_calib(n=4, seqlen=16))
    assert vars(Dims.of(model)) == shape
    assert mplan.param_count(shape, from_config) == count_params(model)[0]


def test_count_of_smollm2_matches_its_published_size():
    arch = mplan.Arch.of_config(SMOLLM2)
    assert arch.tied and arch.gated and arch.head_dim == 64
    assert mplan.param_count(SMOLLM2_DIMS, arch) == 134_515_008  # what the loaded model counts (README, minitron.yaml)


def test_count_of_minitron_8b_and_4b_shapes():
    """Nemotron (relu² MLP, LayerNorm1P with bias, untied 256k vocabulary): the HF cards' sizes."""
    arch = mplan.Arch.of_config({
        "model_type": "nemotron", "vocab_size": 256000, "hidden_size": 4096, "intermediate_size": 16384,
        "num_hidden_layers": 32, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
    })  # fmt: skip
    eight = mplan.param_count(Dims(32, 48, 8, 16384, 4096), arch)
    four = mplan.param_count(Dims(32, 24, 8, 9216, 3072), arch)
    assert 8.0e9 < eight < 8.7e9 and 4.0e9 < four < 4.6e9


# ---------------------------------------------------------------- enumeration


@pytest.mark.parametrize("fraction", [0.5, 0.67, 0.8])
@pytest.mark.parametrize("axes", [["depth"], ["mlp", "att"], ["mlp", "att", "emb"], ["depth", "mlp", "att", "emb"]])
def test_candidates_lie_within_the_tolerance(axes, fraction):
    arch = mplan.Arch.of_config(SMOLLM2)
    target = round(fraction * mplan.param_count(SMOLLM2_DIMS, arch))
    knobs = ms.SearchKnobs.parse({"max_candidates": 6})
    cands, inside, _ = ms.enumerate_candidates(SMOLLM2_DIMS, arch, target, axes, {}, knobs)
    if not cands:  # e.g. depth alone cannot reach half the parameters within L/2..L layers
        return
    assert len(cands) == min(6, inside)
    gaps = [abs(c.params - target) for c in cands]
    assert gaps == sorted(gaps) and max(gaps) <= 0.05 * target
    for c in cands:
        assert c.params == mplan.param_count(c.shape, arch) and abs(c.deviation) <= 0.05
        assert c.shape["kv_heads"] == 3 and c.shape["heads"] % 3 == 0  # heads: multiples of the KV heads
        assert c.shape["ffn"] % 64 == 0 or c.shape["ffn"] == 1536
        for axis, key in ms.AXIS_KEY.items():
            if axis not in axes:
                assert c.shape[key] == getattr(SMOLLM2_DIMS, key)  # an axis not searched keeps the model's size


def test_fixed_targets_and_given_grids():
    arch = mplan.Arch.of_config(SMOLLM2)
    target = round(0.67 * 134_515_008)
    knobs = ms.SearchKnobs.parse({"grid": {"layers": [24, 26, 28, 30]}, "max_candidates": 20})
    cands, _, _ = ms.enumerate_candidates(SMOLLM2_DIMS, arch, target, ["depth", "mlp"], {"heads": 6}, knobs)
    assert cands and {c.shape["layers"] for c in cands} <= {24, 26, 28, 30}
    assert {c.shape["heads"] for c in cands} == {6} and {c.shape["hidden"] for c in cands} == {576}


def test_tiny_grids_use_a_smaller_step():
    g = ms.grids(Dims(2, 4, 2, 128, 64), ["mlp", "att", "emb"], {}, {}, 64)
    assert g["ffn"] == list(range(32, 129, 8)) and g["hidden"] == list(range(32, 65, 4))
    assert g["heads"] == [2, 4] and g["layers"] == [2]


# ---------------------------------------------------------------- ranking (pure)


def test_rankings_record_flips_and_when_they_stabilise():
    def cand(i, losses):
        c = ms.Candidate(i, {}, 0, 0.0)
        c.points = [
            {"step": s, "tokens": 10 * s, "lm": v, "kd": 0.0} for s, v in zip((0, 2, 4, 8), losses, strict=True)
        ]
        return c

    cands = [cand(0, [3.0, 2.0, 1.6, 1.5]), cand(1, [2.5, 2.1, 1.7, 1.6]), cand(2, [4.0, 1.9, 1.5, 1.4])]
    ranks = ms.rankings(cands)
    assert [r["step"] for r in ranks] == [0, 2, 4, 8]
    assert [r["order"] for r in ranks] == [[1, 0, 2], [2, 0, 1], [2, 0, 1], [2, 0, 1]]
    assert [r["discordant_pairs"] for r in ranks] == [3, 0, 0, 0]
    assert ms.stable_from(ranks) == 2


# ---------------------------------------------------------------- the search on a model


@pytest.fixture(scope="module")
def searched():
    """One search on a 4-layer tiny-llama, with compute_importance counted."""
    calls = []
    real = mimp.compute_importance

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(mimp, "compute_importance", spy)
    model, _ = tiny()
    dense = copy.deepcopy(model)
    try:
        stats = searcher()(model, random_calib(n=4, seqlen=16))
    finally:
        mp.undo()
    return model, dense, stats, calls


def test_importance_is_computed_once_for_every_candidate(searched):
    model, _, stats, calls = searched
    search = stats.info["search"]
    assert len(calls) == 1 and search["importance_passes"] == 1
    assert search["evaluated"] == 3 and search["trained"] and search["within_tolerance"] >= 3
    assert set(calls[0]["axes"]) <= {"heads", "ffn", "hidden"} and calls[0]["depth"] is None  # no depth axis


def test_candidates_and_rankings_at_several_checkpoints(searched):
    _, _, stats, _ = searched
    search = stats.info["search"]
    assert search["checkpoints"] == [0, 1, 2, 4]
    assert [r["step"] for r in search["rankings"]] == [0, 1, 2, 4]
    for c in search["candidates"]:
        assert [p["step"] for p in c["val"]] == [0, 1, 2, 4] and all(p["lm"] > 0 for p in c["val"])
        assert abs(c["deviation"]) <= 0.05
    for r in search["rankings"]:
        assert sorted(r["order"]) == [0, 1, 2] and 0 <= r["discordant_pairs"] <= 3
    final = search["rankings"][-1]["order"]
    assert [c["id"] for c in sorted(search["candidates"], key=lambda c: c["rank"])] == final
    losses = {c["id"]: c["val"][-1]["lm"] for c in search["candidates"]}
    assert losses[final[0]] == min(losses.values())
    assert search["stable_from_step"] in (0, 1, 2, 4)


def test_best_candidate_is_applied_from_the_dense_weights(searched):
    model, dense, stats, _ = searched
    best = stats.info["search"]["best"]
    assert best["id"] == stats.info["search"]["rankings"][-1]["order"][0]
    assert vars(Dims.of(model)) == best["shape"] == stats.info["shape_after"]
    assert count_params(model)[0] == best["params"] == stats.info["params_after"]
    assert stats.info["target"] == best["shape"]
    assert stats.info["target_params"] == round(0.7 * stats.info["params_before"])
    assert all(p.requires_grad for p in model.parameters())  # the KD teacher's freeze was undone
    ref = copy.deepcopy(dense)  # re-planned from the same importance: the short KD did not touch the model
    calib = random_calib(n=4, seqlen=16)
    imp = mimp.compute_importance(ref, calib.input_ids, 2, axes=["heads", "ffn", "hidden"], depth=None)
    mplan.apply_plan(ref, mplan.plan(imp, Dims.of(dense), best["shape"]))
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_zero_tokens_ranks_untrained_candidates_and_depth_axis():
    model, _ = tiny(layers=6)
    pruner = searcher(axes=["depth", "mlp"], search={**SEARCH, "tokens": 0, "checkpoints": None})
    stats = pruner(model, random_calib(n=4, seqlen=16))
    search = stats.info["search"]
    assert search["checkpoints"] == [0] and search["evaluated"] >= 2
    assert stats.info["shape_after"] == search["best"]["shape"] and search["best"]["shape"]["hidden"] == 64
    assert "layers" in stats.info["scores"] or search["best"]["shape"]["layers"] == 6


def test_single_candidate_is_applied_without_training():
    model, _ = tiny()
    pruner = searcher(search={**SEARCH, "max_candidates": 1})
    pruner.tokenizer = None  # nothing to rank: no KD, no text needed
    stats = pruner(model, random_calib(n=4, seqlen=16))
    assert not stats.info["search"]["trained"] and stats.info["search"]["candidates"][0]["rank"] == 1


# ---------------------------------------------------------------- bad knobs: one line, with a fix


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(axes=["depth", "width"]), "pruner.axes: unknown axis 'width'"),
        (dict(axes=[]), "pruner.axes is empty"),
        (dict(target_params=-3), "pruner.target_params=-3"),
        (dict(target_params=1.5), "pruner.target_params=1.5"),
        (dict(search={"budget": 3}), "pruner.search.budget is unknown"),
        (dict(search={"tolerance": 2}), "pruner.search.tolerance=2"),
        (dict(search={"max_candidates": 0}), "pruner.search.max_candidates=0"),
        (dict(search={"grid": {"heads": [0]}}), "pruner.search.grid.heads"),
        (dict(search={"grid": {"width": [3]}}), "pruner.search.grid.width is unknown"),
        (dict(search={"tokens": 512, "checkpoints": [3]}), "pruner.search.checkpoints=[3] must be optimiser steps"),
        (dict(search={"tokens": 100}), "pruner.search.tokens=100 is less than one KD step"),
        (dict(search={"kd": {"loss": "kl"}}), "pruner.search.kd.loss='kl'"),
        (dict(stages=[{"tokens": 5}]), "pruner.stages[0] needs target_params or target"),
        (dict(stages=[{"target_params": 0.8, "shape": 3}]), "pruner.stages[0].shape is unknown"),
        (dict(stages=[{"target_params": 0.8, "axes": ["x"]}]), "pruner.stages[0]: pruner.axes: unknown axis"),
    ],
)
def test_bad_search_knobs_at_init(kwargs, needle):
    with pytest.raises(PrunebenchError) as err:
        Minitron(**{"target_params": 0.5, **kwargs})
    assert needle in _one_line(err)


def test_target_larger_than_the_model():
    pruner = Minitron(target_params=200_000_000)
    with pytest.raises(PrunebenchError) as err:
        pruner.check(30, SMOLLM2)
    assert "is more than the model's 134,515,008 parameters" in _one_line(err)
    model, _ = tiny(layers=2)
    with pytest.raises(PrunebenchError, match="more than the model's 107,200 parameters"):
        Minitron(target_params=10**6)(model, random_calib(n=2, seqlen=8))


def test_no_candidate_within_the_tolerance_says_what_to_change():
    pruner = Minitron(target_params=0.4, axes=["mlp", "att"])  # MLP + attention alone cannot reach 40% of SmolLM2
    with pytest.raises(PrunebenchError) as err:
        pruner.check(30, SMOLLM2)
    text = _one_line(err)
    assert "no candidate shape within ±5% of pruner.target_params=53,806,003" in text
    assert "the closest is" in text and "widen pruner.search.grid" in text and "add axes" in text
    model, _ = tiny(layers=2)
    with pytest.raises(PrunebenchError, match="no candidate shape"):
        Minitron(target_params=0.2, axes=["mlp"], search={"tokens": 0})(model, random_calib(n=2, seqlen=8))
    assert count_params(model)[0] == 107200  # untouched


def test_grid_beyond_the_model_and_saved_model_layers():
    with pytest.raises(PrunebenchError, match="pruner.search.grid.ffn has 2048 > the model's 1536"):
        Minitron(target_params=0.67, axes=["mlp"], search={"grid": {"ffn": [1024, 2048]}}).check(30, SMOLLM2)
    with pytest.raises(PrunebenchError, match="multiples of the 3 KV heads"):
        Minitron(target_params=0.67, axes=["att", "mlp"], search={"grid": {"heads": [4]}}).check(30, SMOLLM2)
    # a saved, depth-pruned model.path: its config.json's layer count wins over the YAML's num_layers
    with pytest.raises(PrunebenchError, match="pruner.target.layers=25 is more than the model's 20 layers"):
        Minitron(target={"layers": 25}).check(30, {**SMOLLM2, "num_hidden_layers": 20})


def test_searched_axes_override_target_and_others_stay_fixed():
    default = instantiate(compose_cfg("pruner=minitron", "pruner.target_params=0.67").pruner)
    assert default.target["heads"] == 6 and default._fixed()["heads"] is None  # att is searched
    default.check(30, SMOLLM2)
    depth = Minitron(target={"heads": 6, "ffn": 1024}, target_params=0.6, axes=["depth"])
    fixed = {"layers": None, "heads": 6, "kv_heads": None, "ffn": 1024, "hidden": None, "experts": None}
    assert depth._fixed() == fixed
    depth.check(30, SMOLLM2)


# ---------------------------------------------------------------- stages and model.path chains


def test_two_stages_in_one_run():
    model, _ = tiny()
    pruner = Minitron(
        target={"ffn": 48},
        stages=[{"target": {"ffn": 96}, "tokens": 64}],
        search={"kd": KD},
    )
    pruner.tokenizer = ByteTokenizer()
    stats = pruner(model, random_calib(n=4, seqlen=16))
    (stage,) = stats.info["stages"]
    assert stage["shape"]["ffn"] == 96 and stage["kd"]["tokens"] == 64
    assert stage["kd"]["distillation_loss"]["after"] >= 0
    assert stats.info["shape_before"]["ffn"] == 128 and stats.info["shape_after"]["ffn"] == 48
    assert stats.info["params_before"] == 181184 and model.config.intermediate_size == 48  # 4 tiny layers
    assert all(p.requires_grad for p in model.parameters())


def test_stages_with_searches_count_fractions_of_the_loaded_model():
    model, _ = tiny()
    dense = count_params(model)[0]
    search = {"tokens": 0, "max_candidates": 2, "kd": KD}
    pruner = searcher(target_params=0.6, axes=["mlp", "att"], search=search,
                      stages=[{"target_params": 0.8, "axes": ["mlp"]}])  # fmt: skip
    stats = pruner(model, random_calib(n=4, seqlen=16))
    (stage,) = stats.info["stages"]
    assert stage["search"]["dense_params"] == dense and "kd" not in stage  # tokens 0: no KD between stages
    assert abs(stage["params"] / dense - 0.8) <= 0.05 * 0.8
    assert stats.info["search"]["target_params"] == round(0.6 * dense) and stats.info["params_before"] == dense
    assert abs(count_params(model)[0] / dense - 0.6) <= 0.05 * 0.6
    assert (
        stats.info["shape_before"]["ffn"] == 128 and stats.info["search"]["best"]["shape"] == stats.info["shape_after"]
    )


def _tiny_run(tmp_path, name, *over):
    cfg = compose_cfg(
        "experiment=smoke/tiny",
        "pruner=minitron",
        "calib.nsamples=4",
        "calib.seqlen=32",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *over,
    )
    return pipeline.run(cfg, tmp_path / name), cfg


def test_pipeline_search_then_kd_end_to_end(tmp_path):
    result, cfg = _tiny_run(
        tmp_path,
        "run",
        "pruner.target_params=0.7",
        "pruner.search.tokens=64",
        "pruner.search.max_candidates=2",
        "pruner.search.checkpoints=[1,2]",
        "pruner.search.kd.seqlen=32",
        "pruner.search.kd.val_windows=2",
        "recovery=kd",
        "recovery.tokens=128",
        "recovery.seqlen=32",
        "recovery.val_windows=2",
        "recovery.log_every=1",
    )
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    search = m["prune"]["search"]
    assert len(search["candidates"]) == 2 and search["best"]["shape"] == m["prune"]["shape_after"]
    assert [r["step"] for r in search["rankings"]] == [0, 1, 2]
    assert m["prune"]["params_after"] == search["best"]["params"]
    assert abs(m["prune"]["params_after"] / m["prune"]["params_before"] - 0.7) <= 0.05 * 0.7 + 1e-9
    assert m["recovery"]["steps"] == 4 and len(m["recovery"]["loss_curve"]) == 4
    assert "recovery/lm_val_loss" in m["metrics"] and "wikitext2/ppl" in m["metrics"]
    assert result["recovery"]["teacher"].startswith("unpruned")


def test_a_saved_run_is_the_parent_of_the_next(tmp_path):
    """15B -> 8B -> 4B as two commands: run 1 saves its pruned model, run 2 loads it with model.path
    and prunes again (its fractions are of the loaded, already pruned model)."""
    first, _ = _tiny_run(tmp_path, "one", "pruner.target.heads=2", "pruner.target.ffn=96", "save_model=true")
    saved = tmp_path / "one" / "model"
    assert (saved / "config.json").exists()
    # the tiny model's byte tokenizer saves nothing; a real model (SmolLM2) saves its own tokenizer
    models.loading.char_tokenizer().save_pretrained(saved)
    second, cfg = _tiny_run(
        tmp_path,
        "two",
        f"model.path={saved}",
        "pruner.target.heads=null",
        "pruner.target.ffn=null",
        "pruner.target_params=0.8",
        "pruner.axes=[mlp]",
        "pruner.search.tokens=0",
        "pruner.search.max_candidates=1",
    )
    assert second["prune"]["params_before"] == first["prune"]["params_after"]
    assert second["prune"]["shape_before"] == first["prune"]["shape_after"]
    assert second["prune"]["shape_after"]["ffn"] < 96 and second["prune"]["shape_after"]["heads"] == 2
    saved_config = json.loads((saved / "config.json").read_text())
    instantiate(cfg.pruner).check(30, saved_config)  # checked against the saved shape, not the YAML's
