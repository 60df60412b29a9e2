"""Saved models whose layers have different widths (LLM-Pruner). Not written yet (issue #28)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SPEC_FILE = "prunebench_widths.json"


def needs_widths(model: nn.Module) -> bool:
    """True when the layers' widths differ (a stock config cannot describe the model)."""
    return False


def save_widths(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    raise NotImplementedError("per-layer widths format: not written yet")


def load_widths(folder: str | Path, dtype: torch.dtype | None = None):
    raise NotImplementedError("per-layer widths format: not written yet")
