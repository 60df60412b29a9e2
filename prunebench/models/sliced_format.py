"""SliceGPT's saved format (the model structure and surgery: prunebench/models/sliced.py).

Saved folders (`save_sliced`): config.json (the model's config: hidden_size is still D, the head
untied), model.safetensors (every tensor, shortcuts included; no pickle), the tokenizer, and
`prunebench_sliced.json`: the family and class, D, ε, the embedding and head widths, (d_in, d_mid,
d_out) and both shortcut shapes per layer, the linears that carry a bias, and the slicing facts the
pruner recorded. `load_sliced` builds the model from config.json with transformers' own classes,
rebuilds the sliced structure (`prunebench.models.sliced`) from the spec with prunebench's modules
(never code from the folder) and loads the safetensors strictly. `prunebench.models.load` does this
for any `model.path` holding the spec.

    {"format": "prunebench-sliced", "version": 1, "family": "llama", "arch": "LlamaForCausalLM",
     "hidden_size": 576, "eps": 1e-05, "embedding": 432, "head": 576, "head_sliced": false,
     "layers": [{"attn_in": 432, "mid": 432, "out": 432, "attn_shortcut": [432, 432],
                 "mlp_shortcut": [432, 432]}, ...], "biases": [], "slicing": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.sliced import (
    RMSN,
    Port,
    attention_ports,
    family_problem,
    final_norm_slot,
    make_sliced,
    mark_no_split,
    mlp_readers,
    mlp_writers,
    resize_port,
    untie,
)
from prunebench.models.spec import WEIGHTS_FILE, folder_tokenizer, load_weights, read_folder

SPEC_FILE = "prunebench_sliced.json"
FORMAT = "prunebench-sliced"


def sliced_spec(model: nn.Module) -> dict:
    """Everything `load_sliced` needs beyond config.json, read from the model itself."""
    blocks = find_blocks(model)
    parent, name = final_norm_slot(model)
    final = getattr(parent, name)
    if not isinstance(final, RMSN):
        raise PrunebenchError("the model's final norm is not SliceGPT's RMSN: not a sliced model")
    layers = []
    for block in blocks:
        a, m = tuple(block.attn_shortcut.shape), tuple(block.mlp_shortcut.shape)
        layers.append({"attn_in": a[0], "mid": a[1], "out": m[1], "attn_shortcut": list(a), "mlp_shortcut": list(m)})
    head = model.get_output_embeddings()
    return {
        "format": FORMAT,
        "version": 1,
        "family": model.config.model_type,
        "arch": type(model).__name__,
        "hidden_size": final.dim,
        "eps": final.eps,
        "embedding": int(model.get_input_embeddings().weight.shape[1]),
        "head": int(head.weight.shape[1]),
        "head_sliced": int(head.weight.shape[1]) < final.dim,
        "layers": layers,
        "biases": sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None),
        "slicing": dict(getattr(model, "prunebench_slicing", {}) or {}),
    }


def save_sliced(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """config.json + model.safetensors + tokenizer + prunebench_sliced.json (see the module docstring)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = sliced_spec(model)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return folder


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunebenchError(f"{SPEC_FILE}: {what}={value!r} must be a positive integer")
    return value


def build_structure(model: nn.Module, spec: dict) -> None:
    """Turn a dense model built from config.json into the sliced shape the spec describes (weights
    left uninitialised: a strict load follows)."""
    blocks = find_blocks(model)
    if len(spec["layers"]) != len(blocks):
        raise PrunebenchError(f"{SPEC_FILE} describes {len(spec['layers'])} layers, config.json {len(blocks)}")
    width, eps = _int(spec["hidden_size"], "hidden_size"), float(spec["eps"])
    untie(model)
    modules = dict(model.named_modules())
    for name in spec.get("biases", []):
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise PrunebenchError(f"{SPEC_FILE}: biases lists {name!r}, not a linear of this model")
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    resize_port(Port(model.get_input_embeddings(), "weight", -1), _int(spec["embedding"], "embedding"))
    for i, (block, s) in enumerate(zip(blocks, spec["layers"], strict=True)):
        d_in, d_mid, d_out = (_int(s[k], f"layers[{i}].{k}") for k in ("attn_in", "mid", "out"))
        attn_in, attn_out = attention_ports(block)
        plan = ((attn_in, d_in), (attn_out, d_mid), (mlp_readers(block), d_mid), (mlp_writers(block), d_out))
        for ports, kept in plan:
            for port in ports:
                resize_port(port, kept)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(block, name, RMSN(width, eps))
        make_sliced(block, torch.zeros(d_in, d_mid), torch.zeros(d_mid, d_out))
    parent, name = final_norm_slot(model)
    setattr(parent, name, RMSN(width, eps))
    resize_port(Port(model.get_output_embeddings(), "weight", -1), _int(spec["head"], "head"))
    model.prunebench_slicing = dict(spec.get("slicing") or {})
    mark_no_split(model)


def load_sliced(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a `save_sliced` folder, in eval mode, on the CPU."""
    import transformers

    folder = Path(folder)
    spec, config = read_folder(folder, SPEC_FILE, "sliced")
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise PrunebenchError(f"{folder / SPEC_FILE} is not a prunebench sliced-model spec")
    if problem := family_problem(getattr(config, "model_type", None)):
        raise PrunebenchError(f"{folder}: {problem}")
    cls = getattr(transformers, str(spec.get("arch", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten by the strict load below
        model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    try:
        build_structure(model, spec)
    except (KeyError, TypeError) as err:
        raise PrunebenchError(f"{folder / SPEC_FILE} is incomplete ({type(err).__name__}: {err})") from None
    load_weights(model, folder, SPEC_FILE)
    return model.eval(), folder_tokenizer(folder)
