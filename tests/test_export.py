"""Deployable checkpoints: the compressed-tensors sparse layouts round-trip exactly, are smaller than
the dense folder, and the model card follows the Hugging Face convention."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunebench import PrunebenchError, models
from prunebench.models.export import BITMASK, BITMASK_24, load_compressed, write_model_card
from prunebench.models.loading import save_checkpoint
from prunebench.pruners.wanda import Wanda
from tests.conftest import compose_cfg, random_calib, run_cli


def pruned(name: str = "tiny-llama", pattern: str = "unstructured"):
    cfg = compose_cfg(f"model={name}")
    model, tokenizer = models.load(cfg.model, cache_dir="/nonexistent", seed=0)
    vocab = 229 if name == "tiny-bert" else 259
    Wanda(sparsity=0.5, pattern=pattern)(model, random_calib(vocab=vocab))
    return model, tokenizer, cfg.model


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(("pattern", "layout"), [("2:4", BITMASK_24), ("unstructured", BITMASK)])
def test_compressed_tensors_round_trip_is_exact_and_smaller(tmp_path, pattern, layout):
    from compressed_tensors.config import SparsityCompressionConfig

    model, tokenizer, cfg = pruned(pattern=pattern)
    hf = save_checkpoint(model, tokenizer, tmp_path / "hf", cfg, "hf")
    ct = save_checkpoint(model, tokenizer, tmp_path / "ct", cfg, "compressed-tensors")
    assert hf["layout"] is None and ct == {**ct, "format": "compressed-tensors", "layout": layout}

    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    sparsity = SparsityCompressionConfig.load_from_registry(
        qcfg["sparsity_config"]["format"], **qcfg["sparsity_config"]
    )
    assert sparsity.format == layout and sparsity.ignore == ["lm_head"] and sparsity.targets == ["Linear"]
    assert sparsity.sparsity_structure == ("2:4" if pattern == "2:4" else "unstructured")
    assert sparsity.global_sparsity == pytest.approx(0.5, abs=1e-3)

    # The pruned linears are stored as non-zeros + bitmask; embeddings and the head stay dense.
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in stored and "lm_head.weight" in stored
    assert stored[f"{q}.bitmask"].dtype == torch.uint8 and stored[f"{q}.bitmask"].shape == (64, 8)
    if pattern == "2:4":
        assert stored[f"{q}.compressed"].shape == (64, 32) and stored[f"{q}.shape"].tolist() == [[64], [64]]
    else:
        assert stored[f"{q}.compressed"].shape == (64 * 32,) and stored[f"{q}.row_offsets"].shape == (64,)

    back, _ = load_compressed(tmp_path / "ct")
    for name, w in linear_weights(model).items():
        assert torch.equal(back.get_parameter(name), w), name
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)

    # Smaller than the dense fp32 folder: each pruned fp32 weight costs 4 bytes kept, 1 bit of mask.
    assert ct["weight_bytes"] < 0.75 * hf["weight_bytes"], (ct["weight_bytes"], hf["weight_bytes"])
    linear_dense = sum(4 * w.numel() for n, w in linear_weights(model).items() if not n.startswith("lm_head"))
    linear_stored = sum(t.numel() * t.element_size() for k, t in stored.items() if not k.endswith(".weight"))
    assert linear_stored < 0.6 * linear_dense  # 0.5 values + 1/32 mask (+ int64 row offsets: 0.56 here)


def test_encoder_round_trip(tmp_path):
    """A tiny BERT saved as a sentence-transformers folder, then compressed, reads back exactly."""
    model, tokenizer, cfg = pruned("tiny-bert")
    info = save_checkpoint(model, tokenizer, tmp_path / "ct", cfg, "compressed-tensors")
    assert info["layout"] == BITMASK and (tmp_path / "ct" / "modules.json").exists()
    back, tok = load_compressed(tmp_path / "ct")
    enc = tokenizer(["a short sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(back(**enc).last_hidden_state, model(**enc).last_hidden_state)
    assert tok is not None


def test_bad_format_is_one_line(tmp_path):
    model, tokenizer, cfg = pruned()
    with pytest.raises(PrunebenchError, match="save_format='gguf' must be one of: hf, compressed-tensors"):
        save_checkpoint(model, tokenizer, tmp_path / "x", cfg, "gguf")


def test_model_card_from_a_real_run(tmp_path):
    """The card of a run's metrics.json: HF front matter, the knobs, data, metrics beside the dense
    baseline, version and commit."""
    out = tmp_path / "run"
    knobs = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "eval.wikitext2.seqlen=64"]
    r = run_cli("run", *knobs, "eval.wikitext2.max_windows=2", f"hydra.run.dir={out}", cache=tmp_path, cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    result = json.loads((out / "metrics.json").read_text())
    result["config"]["model"]["hub_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as a Hub model's config has
    result["saved_model"] = {"format": "compressed-tensors", "layout": BITMASK}
    card = write_model_card(out / "model", result).read_text()

    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                    "tags": ["prunebench", "pruning", "wanda", "compressed-tensors"]}  # fmt: skip
    assert "| `sparsity` | `0.5` |" in body and "| `sequential` | `True` |" in body  # the method's knobs
    assert "`c4`, 4 x 64 tokens" in body  # calibration data
    assert "## Recovery: none" in body
    dense, mine = result["baseline"]["wikitext2/ppl"], result["metrics"]["wikitext2/ppl"]
    assert f"| wikitext2/ppl | {dense:.4g} | {mine:.4g} |" in body
    assert f"prunebench {result['versions']['prunebench']}" in body and str(result["git_commit"]) in body
    assert "sparse-bitmask" in body


def test_cli_saves_compressed_with_card(tmp_path):
    out = tmp_path / "run"
    knobs = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "eval.wikitext2.seqlen=64"]
    knobs.append("pruner.pattern=2:4")
    r = run_cli("run", *knobs, "save_model=true", "save_format=compressed-tensors", f"hydra.run.dir={out}",
                cache=tmp_path, cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["saved_model"]["layout"] == BITMASK_24 and (out / "model" / "README.md").exists()
    assert load_compressed(out / "model")[0] is not None


def test_compressed_folder_follows_device_map_placement(tmp_path):
    """placement=device_map reaches the folders prunebench decompresses itself: accelerate maps the
    model (hf_device_map set) and the logits are the saved model's."""
    from prunebench import memory

    model, tokenizer, cfg = pruned()
    save_checkpoint(model, tokenizer, tmp_path / "ct", cfg, "compressed-tensors")
    plan = memory.Plan(torch.device("cpu"), torch.float32, "device_map", max_memory={"cpu": "1GiB"})
    mapped, _ = models.load(compose_cfg(f"model.path={tmp_path / 'ct'}", "model=tiny-llama").model, "/none", plan=plan)
    assert getattr(mapped, "hf_device_map", None)
    x = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=x).logits, model(input_ids=x).logits)


def test_byte_tokenizer_saves_as_files_that_reload_with_the_same_ids(tmp_path):
    """The tiny models' in-memory ByteTokenizer is saved as a Hugging Face tokenizer with its ids."""
    from transformers import AutoTokenizer

    model, tokenizer, cfg = pruned()
    save_checkpoint(model, tokenizer, tmp_path / "m", cfg, "hf")
    again = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "Hello wörld\n\n  é 中文\t!"
    assert again(text).input_ids == tokenizer.encode(text)
    assert again.decode(again(text).input_ids) == text
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_saved_tiny_run_reloads_with_model_path_and_is_labelled_by_its_folder(tmp_path):
    """save_model=true on a model whose tokenizer lives in memory writes a folder that `model.path=`
    runs from, and that run is labelled by the folder it loaded, not by the config's 'random weights'."""
    knobs = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "eval.wikitext2.seqlen=64"]
    first = tmp_path / "first"
    r = run_cli("run", *knobs, "save_model=true", f"hydra.run.dir={first}", cache=tmp_path, cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    second = tmp_path / "second"
    r = run_cli("run", *knobs, f"model.path={first / 'model'}", "pruner=none", f"hydra.run.dir={second}",
                cache=tmp_path, cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert m2["model_note"] == f"weights loaded from {first / 'model'}" and "random weights" not in r.stdout
    assert m2["baseline"]["wikitext2/ppl"] == pytest.approx(m1["metrics"]["wikitext2/ppl"], rel=1e-5)
