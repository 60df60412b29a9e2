"""What prunebench's own saved formats share (bridges, per-layer widths, sliced): a JSON spec beside
config.json and one safetensors file, read with stock transformers classes only (never code from the
folder), loaded strictly, each failure one line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from torch import nn

from prunebench import PrunebenchError

WEIGHTS_FILE = "model.safetensors"


def read_folder(folder: Path, spec_file: str, what: str) -> tuple[dict, object]:
    """(spec, transformers config) of a saved folder; one line if either is unreadable."""
    import transformers

    try:
        spec = json.loads((folder / spec_file).read_text(encoding="utf-8"))
        config = transformers.AutoConfig.from_pretrained(folder)  # no trust_remote_code: stock classes only
    except (OSError, ValueError) as err:
        raise PrunebenchError(f"cannot read the {what} model in {folder}: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise PrunebenchError(f"{folder / spec_file} is not a JSON object")
    return spec, config


def load_weights(model: nn.Module, folder: Path, spec_file: str) -> None:
    """The folder's safetensors into `model`, strictly (every name and shape), or one line."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    except (OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrunebenchError(f"{folder / WEIGHTS_FILE} does not match {spec_file}: {first}") from None


def folder_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it holds none."""
    import transformers

    with contextlib.suppress(OSError, ValueError):
        return transformers.AutoTokenizer.from_pretrained(folder)
    return None
