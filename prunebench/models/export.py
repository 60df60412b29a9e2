"""Deployable checkpoints: the pruned model saved as a Hugging Face folder (`save_format: hf`) or in
the compressed-tensors sparse layout (`save_format: compressed-tensors`), plus a model card.

compressed-tensors layout (what llm-compressor wrote for sparse models), in `config.json`:

    quantization_config: {quant_method: compressed-tensors, version: <ct version>,
      sparsity_config: {format: sparse-bitmask | sparse-24-bitmask, targets: [Linear], ignore: [lm_head],
                        global_sparsity: <zeros / weights of the targets>, sparsity_structure: unstructured | 2:4}}

and in the safetensors files, each target Linear `<m>` stores, instead of `<m>.weight` (R x C):
- sparse-bitmask (unstructured): `<m>.compressed` (the non-zeros, row-major, 1-D), `<m>.bitmask`
  (uint8, R x ceil(C/8), little-endian bits), `<m>.row_offsets` (int64, R), `<m>.shape` (int64, [R, C]);
- sparse-24-bitmask (every target has at most 2 non-zeros in each 4 consecutive inputs): `<m>.compressed`
  (R x C/2, two kept values per group of four), `<m>.bitmask`, `<m>.shape` (int64, [[R], [C]]).

compressed-tensors >= 0.15 no longer ships the sparse compressors (vllm-project/compressed-tensors#610;
vLLM >= 0.19.1 refuses Sparse24 models, vllm-project/vllm#36799). The installed release still has
their config classes (`BitmaskConfig`, `Sparse24BitMaskConfig`), the bit packing (`pack_bitmasks`,
`unpack_bitmasks`) and the safetensors reader (`get_nested_weight_mappings`); this module builds on
those and keeps only the two loops they drove (the removed `BitmaskCompressor` and
`Sparse24BitMaskCompressor`, same tensor names and dtypes), so compressed-tensors <= 0.14 and
`load_compressed` below read the folder back.

    save_model: true
    save_format: compressed-tensors   # hf (default) | compressed-tensors
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError

log = logging.getLogger(__name__)

FORMATS = ("hf", "compressed-tensors")
BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
PARAMS = ("shape", "compressed", "bitmask", "row_offsets")  # tensor names per compressed Linear


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise PrunebenchError(f"save_format={fmt!r} must be one of: {', '.join(FORMATS)}")
    return fmt


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row (NVIDIA 2:4)."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _targets(model: nn.Module) -> set[str]:
    """Names of the Linear modules to compress: all but the output head (llm-compressor's default
    ignore: the head is rarely pruned and serving engines want it dense)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def compress_folder(model: nn.Module, folder: Path) -> str:
    """Rewrite the saved safetensors files of `folder` in the compressed-tensors sparse layout and
    record it in config.json. 2:4 when every target is 2:4, else the unstructured bitmask."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    states = {f: load_file(f) for f in files}
    targets = _targets(model)
    keys = {k: f for f, s in states.items() for k in s if k.endswith(".weight") and k[: -len(".weight")] in targets}
    if not keys:
        raise PrunebenchError(f"save_format=compressed-tensors: no Linear weight found in {folder}; use save_format=hf")
    layout = BITMASK_24 if all(is_24(states[f][k]) for k, f in keys.items()) else BITMASK
    zeros = total = 0
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for k, f in keys.items():
        w = states[f].pop(k)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        packed = compress_weight(w, layout)
        states[f].update({f"{k[: -len('.weight')]}.{p}": t for p, t in packed.items()})
        if weight_map is not None:
            weight_map.pop(k, None)
            weight_map.update({f"{k[: -len('.weight')]}.{p}": f.name for p in packed})
    for f, state in states.items():
        save_file({k: v.contiguous() for k, v in state.items()}, f, metadata={"format": "pt"})
    if weight_map is not None:
        index.write_text(json.dumps({**json.loads(index.read_text()), "weight_map": weight_map}, indent=2))
    _write_sparsity_config(folder, layout, zeros / total, sorted(set(_names(model)) - targets))
    return layout


def _names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def compress_weight(w: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """One weight in the layout's tensors (as the removed compressed-tensors compressors stored them)."""
    from compressed_tensors.utils import pack_bitmasks

    w = w.detach().cpu()
    if layout == BITMASK:
        keep = w != 0
        counts = keep.sum(-1)
        return {"shape": torch.tensor(list(w.shape)), "compressed": w[keep], "bitmask": pack_bitmasks(keep),
                "row_offsets": torch.cumsum(counts, 0) - counts}  # fmt: skip
    # 2:4: keep the 2 largest magnitudes of each group of 4 (the non-zeros, plus zeros where a group
    # has fewer than 2 non-zeros), so `compressed` is a dense R x C/2 matrix that shards along any dim.
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    keep = keep.reshape(w.shape)
    return {"shape": torch.tensor(list(w.shape)).reshape(-1, 1), "compressed": w[keep].reshape(w.shape[0], -1),
            "bitmask": pack_bitmasks(keep)}  # fmt: skip


def decompress_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from either layout's tensors."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = tensors["shape"].flatten().tolist()
    keep = unpack_bitmasks(tensors["bitmask"], shape)
    w = torch.zeros(shape, dtype=tensors["compressed"].dtype)
    w[keep] = tensors["compressed"].flatten()
    return w


def _write_sparsity_config(folder: Path, layout: str, sparsity: float, ignore: list[str]) -> None:
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
    )
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    kind = Sparse24BitMaskConfig if layout == BITMASK_24 else BitmaskConfig
    sparsity_cfg = kind(targets=["Linear"], ignore=ignore, global_sparsity=round(sparsity, 6))
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: sparsity_cfg.model_dump(),
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def sparsity_layout(folder: str | Path) -> str | None:
    """The compressed-tensors sparse layout a saved folder uses, or None (a plain Hugging Face folder)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        return None
    return (qcfg.get("sparsity_config") or {}).get("format")


def decompress_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed-tensors sparse folder (one or many safetensors files)."""
    from compressed_tensors.utils import get_nested_weight_mappings
    from safetensors import safe_open

    layout = sparsity_layout(folder)
    if layout not in (BITMASK, BITMASK_24):
        raise PrunebenchError(f"{folder}/config.json names no sparse-bitmask or sparse-24-bitmask layout")
    nested, rest = get_nested_weight_mappings(str(folder), PARAMS, return_unmatched_params=True)

    def read(name: str, file: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name)

    state = {k: read(k, f) for k, f in rest.items()}
    for module, params in nested.items():
        state[f"{module}.weight"] = decompress_weight({p: read(f"{module}.{p}", f) for p, f in params.items()})
    return state


def load_compressed(folder: str | Path):
    """(model, tokenizer or None) from a compressed-tensors sparse folder: the architecture from
    config.json, the dense weights decompressed from the bitmasks."""
    import transformers

    folder = Path(folder)
    state = decompress_folder(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dense again
    arch = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise PrunebenchError(f"{folder}/config.json names the architecture {arch!r}, unknown to transformers")
    dtype = next(iter(state.values())).dtype
    model = cls(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]  # tied copies are fine
    if missing or unexpected:
        raise PrunebenchError(f"{folder} does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def write_model_card(folder: str | Path, result: dict) -> Path:
    """README.md in the saved folder, in the Hugging Face model-card convention: YAML front matter
    (base_model, tags, library_name) then a markdown body. `result` is a metrics.json-like dict."""
    import yaml

    folder = Path(folder)
    cfg = result.get("config") or {}
    model, pruner, recovery = cfg.get("model") or {}, cfg.get("pruner") or {}, cfg.get("recovery") or {}
    prune = result.get("prune") or {}
    method = prune.get("method") or pruner.get("name", "unknown")
    saved = result.get("saved_model") or {}
    front = {"base_model": model["hub_id"]} if model.get("hub_id") else {}
    front["tags"] = ["prunebench", "pruning", method] + (["compressed-tensors"] if saved.get("layout") else [])
    front["library_name"] = "transformers"
    base = model.get("hub_id") or model.get("path") or model.get("package") or model.get("name", "?")

    def knobs(section: dict) -> str:
        rows = [f"| `{k}` | `{v}` |" for k, v in section.items() if not str(k).startswith("_")]
        return "\n".join(["| knob | value |", "|---|---|", *rows]) if rows else "(no knobs)"

    def num(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    metrics, baseline = result.get("metrics") or {}, result.get("baseline") or {}
    rows = [f"| {k} | {num(baseline.get(k))} | {num(v)} |" for k, v in sorted(metrics.items())]
    calib = result.get("calibration")
    calib_line = (f"`{calib['source']}`, {' x '.join(map(str, calib['shape']))} tokens ({calib['method']}),"
                  f" seed {calib['seed']}" if calib else "none (this method reads no calibration data)")  # fmt: skip
    sparsity = prune.get("achieved_sparsity")
    body = [
        f"# {result.get('name', folder.name)}",
        "",
        f"`{base}` pruned with **{method}** ({prune.get('pattern', 'unstructured')}) by prunebench."
        + (f" Achieved sparsity of the pruned matrices: {sparsity:.4f}." if isinstance(sparsity, float) else ""),
        f"Parameters: {prune.get('params_before')} before, {prune.get('params_after')} after"
        f" ({prune.get('nonzero_after')} non-zero).",
        *([f"Note on the base model: {result['model_note']}."] if result.get("model_note") else []),
        "",
        "## Method",
        knobs(pruner),
        "",
        "## Calibration data",
        calib_line,
        "",
        f"## Recovery: {recovery.get('name', 'none')}",
        knobs(recovery) if recovery.get("name", "none") != "none" else "none",
        *_adapter_note(result.get("recovery") or {}),
        "",
        "## Metrics (dense baseline beside the pruned model)",
        "\n".join(["| metric | dense | pruned |", "|---|---|---|", *rows]) if rows else "(no metrics)",
        "",
        "## Checkpoint",
        _loading_note(saved.get("layout")),
        "",
        "## Provenance",
        f"prunebench {(result.get('versions') or {}).get('prunebench', '?')}, git commit"
        f" `{result.get('git_commit') or 'unknown'}`; overrides: `{' '.join(result.get('overrides') or []) or '-'}`.",
    ]
    card = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def _adapter_note(train: dict) -> list[str]:
    """recovery=lora with merge=separate: the metrics are base + adapter, and this folder holds only
    the base, so the card says where the adapter is and how to load the two together."""
    if train.get("merge") != "separate":
        return []
    where = train.get("adapter_dir")
    if where is None:
        return ["", "The metrics below are this pruned base plus a LoRA adapter that was not saved: this folder alone"
                " does not reproduce them."]  # fmt: skip
    return ["", f"The metrics below are this pruned base plus the unmerged LoRA adapter saved in `{where}`"
            " (`../adapter` beside this folder in a run directory). Load both:"
            " `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter_folder)`;"
            " this folder alone is the base without the adapter."]  # fmt: skip


def _loading_note(layout: str | None) -> str:
    if layout is None:
        return "Hugging Face format (dense tensors, pruned weights stored as zeros): `from_pretrained(folder)`."
    return (
        f"compressed-tensors `{layout}` layout (non-zeros + bitmasks; sparsity config in config.json), read by"
        " compressed-tensors <= 0.14 and by `prunebench.models.export.load_compressed(folder)`; newer"
        " compressed-tensors, transformers and vLLM no longer read sparse layouts."
    )
