"""Saved models whose layers have different widths: a stock config.json holds one head count, one KV
head count and one intermediate size for every layer, so a model pruned in a layer range (LLM-Pruner,
arXiv 2305.11627, keeps the first and last layers whole) cannot be described by it.

Format of a `save_widths` folder (prunebench's own, mirroring `bridges.py`; never a pickle, never code
from the folder):

    config.json              the model's Hugging Face config as it is (a width the layers share is
                             written there by trim.py; a width they do not share keeps its dense value)
    model.safetensors        the whole state dict (tied tensors stored once)
    tokenizer files          as `save_pretrained` writes them
    prunebench_widths.json   {"format": "prunebench-widths", "version": 1, "arch": "LlamaForCausalLM",
                              "num_hidden_layers": 30, "head_dim": 64,
                              "layers": [{"heads": 9, "kv_heads": 3, "intermediate": 1536}, ...]}

`intermediate` is null for a block whose MLP is not one dense MLP (fused experts). `load_widths`
builds the model class named by `arch` (a transformers class, nothing else) from config.json without
random initialisation, trims every layer to its recorded widths with trim.py (it keeps the first
heads of the first KV groups and the first intermediate channels: every weight is overwritten next),
then loads the safetensors strictly. A model whose layers all share their widths needs none of this:
trim.py's config then describes it and `save_pretrained` / `from_pretrained` round-trip it.

Phi-3's attention splits its fused qkv rows at `config.num_attention_heads · head_dim`, read from the
model's shared config at every forward, so a layer narrower than the config would split wrongly:
`pin_layer_shapes` gives such an attention module a view of the config with its own head counts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.spec import WEIGHTS_FILE, folder_tokenizer, load_weights, read_folder
from prunebench.models.trim import _mlp, ffn_size, head_dim, layer_heads, trim_heads, trim_mlp

SPEC_FILE = "prunebench_widths.json"
FORMAT = "prunebench-widths"


def layer_widths(model: nn.Module) -> list[dict]:
    """Per block: query heads, KV heads and intermediate size (None: no dense MLP, e.g. fused
    experts), read from the weights. ValueError for blocks that are not decoder attention blocks."""
    out = []
    for i, block in enumerate(find_blocks(model)):
        heads, kv = layer_heads(model, i)
        try:
            ffn = ffn_size(_mlp(block))
        except ValueError:  # a mixture of experts: no single intermediate size
            ffn = None
        out.append({"heads": heads, "kv_heads": kv, "intermediate": ffn})
    return out


def _config_widths(config) -> tuple[int, int, int | None]:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = getattr(config, "intermediate_size", None)
    return heads, kv, (int(ffn) if ffn is not None else None)


def needs_widths(model: nn.Module) -> bool:
    """True when some layer's widths differ from what the config says (a stock config cannot
    describe the model). False for any model that is not a decoder with q/k/v/o attention."""
    try:
        widths = layer_widths(model)
        heads, kv, ffn = _config_widths(model.config)
    except (ValueError, AttributeError, TypeError):
        return False
    for w in widths:
        if (w["heads"], w["kv_heads"]) != (heads, kv):
            return True
        if w["intermediate"] is not None and ffn is not None and w["intermediate"] != ffn:
            return True
    return False


class LayerConfig:
    """The model's config with a layer's own head counts: every other attribute is read from the
    shared config at the time of reading (e.g. `_attn_implementation` set later still applies)."""

    def __init__(self, base, **overrides):
        self._base, self._overrides = base, dict(overrides)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_base", "_overrides"):  # copy/pickle probes, half-built objects
            raise AttributeError(name)
        overrides = vars(self).get("_overrides", {})
        if name in overrides:
            return overrides[name]
        return getattr(vars(self)["_base"], name)


def pin_layer_shapes(model: nn.Module) -> None:
    """Give each attention module that reads head counts from the shared config (Phi-3) a
    `LayerConfig` with its own counts when they differ from the config's; put the shared config
    back where they agree again."""
    config = model.config
    heads, kv, _ = _config_widths(config)
    for i, block in enumerate(find_blocks(model)):
        attn = getattr(block, "self_attn", None)
        if attn is None or getattr(attn, "config", None) is None:
            continue
        mine = layer_heads(model, i)
        if mine != (heads, kv):
            attn.config = LayerConfig(config, num_attention_heads=mine[0], num_key_value_heads=mine[1])
        elif isinstance(attn.config, LayerConfig):
            attn.config = config


def widths_spec(model: nn.Module) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "arch": type(model).__name__,
        "num_hidden_layers": len(find_blocks(model)),
        "head_dim": head_dim(model),
        "layers": layer_widths(model),
    }


def save_widths(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """config.json + model.safetensors + tokenizer + prunebench_widths.json (see the module docstring)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = widths_spec(model)  # first: a model it cannot describe fails before anything is written
    model.config.save_pretrained(folder)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # sampling defaults, when the model has them
        if model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))  # shared (tied) tensors stored once
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return folder


def _read_spec(folder: Path) -> dict:
    try:
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PrunebenchError(f"cannot read {folder / SPEC_FILE}: {type(err).__name__}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise PrunebenchError(f"{folder / SPEC_FILE} is not a prunebench widths spec")
    layers = spec.get("layers")
    keys = ("heads", "kv_heads", "intermediate")
    ok = isinstance(layers, list) and all(isinstance(w, dict) and set(w) == set(keys) for w in layers)
    ok = ok and all(
        isinstance(w["heads"], int) and isinstance(w["kv_heads"], int) and w["heads"] >= w["kv_heads"] >= 1
        and w["heads"] % w["kv_heads"] == 0 and (w["intermediate"] is None or
                                                 (isinstance(w["intermediate"], int) and w["intermediate"] >= 1))
        for w in layers or []
    )  # fmt: skip
    if not ok or len(layers) != spec.get("num_hidden_layers"):
        raise PrunebenchError(
            f"{folder / SPEC_FILE}: 'layers' must list num_hidden_layers entries of heads, kv_heads (dividing"
            " heads) and intermediate (a positive integer or null)"
        )
    return spec


def _build(spec: dict, config, dtype: torch.dtype | None) -> nn.Module:
    """The transformers class the spec names (never code from the folder), without random init."""
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, str(spec.get("arch", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise PrunebenchError(f"{SPEC_FILE}: arch={spec.get('arch')!r} is not a transformers model class")
    with no_init_weights():  # every parameter is loaded from the safetensors next
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def _trim_to(model: nn.Module, i: int, want: dict, folder: Path) -> None:
    heads, kv = layer_heads(model, i)
    if (want["heads"], want["kv_heads"]) != (heads, kv):
        r, r_new = heads // kv, want["heads"] // want["kv_heads"]
        if want["kv_heads"] > kv or r_new > r:
            raise PrunebenchError(
                f"{folder / SPEC_FILE}: layer {i} has {want['heads']} heads / {want['kv_heads']} KV heads, more than"
                f" config.json's {heads} / {kv}"
            )
        keep = [g * r + j for g in range(want["kv_heads"]) for j in range(r_new)]  # first heads of the first groups
        trim_heads(model, i, keep, range(want["kv_heads"]))
    if want["intermediate"] is not None:
        ffn = ffn_size(_mlp(find_blocks(model)[i]))
        if want["intermediate"] > ffn:
            raise PrunebenchError(
                f"{folder / SPEC_FILE}: layer {i} has intermediate {want['intermediate']}, more than config.json's"
                f" {ffn}"
            )
        if want["intermediate"] < ffn:
            trim_mlp(model, i, range(want["intermediate"]))


def load_widths(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a `save_widths` folder, in eval mode, on the CPU."""
    folder = Path(folder)
    spec = _read_spec(folder)
    _, config = read_folder(folder, SPEC_FILE, "per-layer-widths")
    model = _build(spec, config, dtype)
    blocks = find_blocks(model)
    if len(blocks) != spec["num_hidden_layers"]:
        raise PrunebenchError(f"{folder}: config.json and {SPEC_FILE} disagree on the number of layers")
    if head_dim(model) != spec.get("head_dim"):
        raise PrunebenchError(f"{folder}: config.json and {SPEC_FILE} disagree on head_dim")
    try:
        for i, want in enumerate(spec["layers"]):
            _trim_to(model, i, want, folder)
    except ValueError as err:  # trim.py's own refusal (e.g. an MLP the spec gives a size that has none)
        raise PrunebenchError(f"{folder / SPEC_FILE} does not fit the model: {err}") from None
    pin_layer_shapes(model)
    model.tie_weights()  # no_init_weights skipped the tying post-init does (a no-op for untied models)
    load_weights(model, folder, SPEC_FILE)
    return model.eval(), folder_tokenizer(folder)
