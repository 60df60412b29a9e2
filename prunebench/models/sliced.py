"""Saved models whose SliceGPT models. Not written yet (issue #28)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SPEC_FILE = "prunebench_sliced.json"


def is_sliced(model: nn.Module) -> bool:
    return False


def save_sliced(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    raise NotImplementedError("sliced format: not written yet")


def load_sliced(folder: str | Path, dtype: torch.dtype | None = None):
    raise NotImplementedError("sliced format: not written yet")
