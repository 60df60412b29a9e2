"""recovery=lora (PEFT adapters) on tiny models: masks survive the merge, only adapters train, the KD
objective, the separate adapter folder, structured pruners, encoders refused, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunebench import PrunebenchError, models, pipeline
from prunebench.config import instantiate
from prunebench.models.blocks import prunable_linears
from prunebench.pruners.magnitude import Magnitude
from prunebench.recovery import recipe as recipe_mod
from tests.conftest import compose_cfg as compose

TINY = ("recovery=lora", "recovery.seqlen=32", "recovery.tokens=320", "recovery.val_windows=2",
        "recovery.log_every=1", "recovery.lr=3e-3")  # fmt: skip


def setup(*overrides: str, pattern: str = "unstructured"):
    """A magnitude-pruned tiny Llama (50% or N:M), its dense copy, and the LoRA recovery."""
    cfg = compose("model=tiny-llama", *TINY, *overrides)
    model, tok = models.load(cfg.model, "/nonexistent", seed=0)
    dense = copy.deepcopy(model)
    Magnitude(sparsity=0.5, pattern=pattern)(model, None)
    rec = instantiate(cfg.recovery)
    rec.tokenizer = tok
    return model, dense, rec, cfg


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masked_merge_keeps_every_pruned_weight_zero_and_recovers(pattern):
    model, _, rec, cfg = setup(pattern=pattern)
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    before = logits(model)
    out = rec(model, None, cfg)
    for n, m in prunable_linears(model).items():
        assert type(m) is nn.Linear  # PEFT's layers are gone after the merge
        assert bool((m.weight[zeros[n]] == 0).all()), n
    assert out["sparsity"]["after_merge"] == out["sparsity"]["before"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < out["masked_delta_share"] < 1  # part of the update fell on pruned weights and was dropped
    assert out["loss_last"] < out["loss_first"]  # the adapters change (lower) the training loss
    assert out["lm_val_loss"]["after"] < out["lm_val_loss"]["before"]
    assert not torch.equal(logits(model), before)
    shapes = [m.weight.shape for m in prunable_linears(model).values()]
    assert out["adapted_linears"] == 14 and out["trainable_params"] == sum(8 * (i + o) for o, i in shapes)
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
    assert set(out["metrics"]) == {"lm_val_before", "lm_val_after", "sparsity_after_merge"}


def test_only_adapter_params_train(monkeypatch):
    model, _, rec, cfg = setup("recovery.merge=separate", "recovery.target_modules=[q_proj,down_proj]")
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    seen = {}
    real_fit = recipe_mod.fit

    def spy(m, steps, loss_fn, opt, *args, **kw):
        seen["trainable"] = {n for n, p in m.named_parameters() if p.requires_grad}
        seen["optimised"] = {id(p) for g in opt.param_groups for p in g["params"]}
        return real_fit(m, steps, loss_fn, opt, *args, **kw)

    monkeypatch.setattr(recipe_mod, "fit", spy)
    out = rec(model, None, cfg)
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in seen["trainable"]} == {"q_proj", "down_proj"}
    assert len(seen["optimised"]) == len(seen["trainable"]) == 2 * 2 * 2  # A and B, 2 targets, 2 blocks
    assert out["target_modules"] == ["down_proj", "q_proj"] and out["loss_last"] < out["loss_first"]
    after = model.state_dict()  # separate: the base weights are exactly the pruned ones
    assert set(after) == set(base) and all(torch.equal(after[n], base[n]) for n in base)


def test_kd_objective_distils_from_the_dense_model():
    model, dense, rec, cfg = setup("recovery.objective=kd")
    assert rec.needs_teacher and not instantiate(compose("recovery=lora").recovery).needs_teacher
    out = rec(model, dense, cfg)
    assert out["objective"] == "kd" and out["kd"]["loss"] == "kld"
    assert out["metrics"]["kd_val_after"] < out["metrics"]["kd_val_before"]
    assert out["loss_last"] < out["loss_first"]
    with pytest.raises(PrunebenchError, match="teacher"):
        rec(model, None, cfg)


def test_separate_saves_a_peft_adapter_and_keeps_the_base_clean(tmp_path):
    import peft

    model, _, rec, cfg = setup("recovery.merge=separate", f"recovery.adapter_dir={tmp_path / 'adapter'}")
    pruned = copy.deepcopy(model)
    out = rec(model, None, cfg)
    assert out["adapter_dir"] == str(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert not any("lora" in k for k in model.state_dict())  # what save_model writes: the pruned base only
    assert not torch.equal(logits(model), logits(pruned))  # the evaluated model runs base + adapter
    loaded = peft.PeftModel.from_pretrained(pruned, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_separate_without_a_folder_says_the_adapter_was_not_saved():
    model, _, rec, cfg = setup("recovery.merge=separate", "recovery.val_windows=0")
    out = rec(model, None, cfg)
    assert out["adapter_dir"] is None and "not saved" in out["adapter_note"] and out["metrics"] == {}


@pytest.mark.parametrize(
    "pruner",
    [
        ("pruner=layer_drop", "pruner.layers=1"),
        ("pruner=minitron", "pruner.target.heads=2", "pruner.target.ffn=96", "pruner.target.hidden=48"),
        ("pruner=wanda", "pruner.pattern=2:4"),
    ],
    ids=["depth", "minitron", "wanda-2:4"],
)
def test_pipeline_after_structured_and_mask_pruners(pruner, tmp_path):
    cfg = compose(
        "model=tiny-llama", *TINY, *pruner, "calib.nsamples=4", "calib.seqlen=32", "eval=[]",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    result = pipeline.run(cfg, tmp_path / "run")
    rec = result["recovery"]
    assert rec["loss_last"] < rec["loss_first"] and rec["steps"] == 10
    assert result["metrics"]["recovery/sparsity_after_merge"] == rec["sparsity"]["before"]
    assert result["prune"]["nonzero_after"] <= result["prune"]["nonzero_before"]


def test_encoder_and_bad_knobs_are_refused():
    cfg = compose("model=tiny-bert", *TINY)
    model, tok = models.load(cfg.model, "/nonexistent", seed=0)
    rec = instantiate(cfg.recovery)
    rec.tokenizer = tok
    with pytest.raises(PrunebenchError, match="encoder"):
        rec(model, None, cfg)
    for override, knob in [
        ("recovery.merge=both", "recovery.merge"),
        ("recovery.objective=mse", "recovery.objective"),
        ("recovery.r=0", "recovery.r"),
        ("recovery.source=wikitext2_test", "evaluation split"),
        ("recovery.tokens=16", "recovery.tokens"),
        ("recovery.kd.loss=l1", "recovery.kd.loss"),
    ]:
        with pytest.raises(PrunebenchError, match=knob):
            instantiate(compose("model=tiny-llama", *TINY, override).recovery)
    model, _, rec, cfg = setup("recovery.target_modules=[qkv]")
    with pytest.raises(PrunebenchError, match="target_modules"):
        rec(model, None, cfg)


def test_cli_runs_lora(cli_inproc, tmp_path):
    cli = cli_inproc
    out = tmp_path / "run"
    r = cli("run", "experiment=smoke/tiny", *TINY, f"hydra.run.dir={out}")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["recovery"]["name"] == "lora" and m["recovery"]["steps"] == 10
    assert m["metrics"]["recovery/sparsity_after_merge"] == pytest.approx(0.5, abs=1e-3)
    sep = tmp_path / "sep"
    r = cli("run", "experiment=smoke/tiny", *TINY, "recovery.merge=separate", "save_model=true", f"hydra.run.dir={sep}")
    assert r.exit_code == 0, r.stderr
    assert (sep / "model" / "config.json").exists() and (sep / "adapter" / "adapter_config.json").exists()
    card = (sep / "model" / "README.md").read_text()
    assert f"unmerged LoRA adapter saved in `{sep / 'adapter'}`" in card and "PeftModel.from_pretrained" in card
    r = cli("run", "experiment=smoke/tiny", *TINY, "recovery.merge=both", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.exit_code == 2 and "recovery.merge" in r.stderr and "Traceback" not in r.stderr
