"""Set-up shared by the scripts/bench_*.py benchmarks: arguments with `--device`, a composed and
loaded model, timing that waits for the GPU, peak memory, and Markdown output.

The scripts import it as `benchlib` (Python puts the script's own folder on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunebench import models
from prunebench.config import compose
from prunebench.results import proc_status_mb, reset_peak_rss

CUDA_COLUMNS = ["peak CUDA allocated MiB", "peak CUDA reserved MiB"]


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` → cuda when available, else cpu; any other name (cpu, cuda, cuda:1) as given."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser showing the script's docstring, with `--device` (auto|cpu|cuda[:N]) already added:
    `args.device` is a torch.device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=resolve_device, default="auto", help="auto = cuda if available, else cpu")
    return ap


def load_model(*overrides: str, device: str | torch.device = "cpu"):
    """Compose the config with `overrides`, load its model (seeded by cfg.seed) and move it to `device`:
    (model, tokenizer, cfg)."""
    cfg = compose(*overrides)
    model, tok = models.load(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    return model.to(resolve_device(device)), tok, cfg


def weights_mb(model: nn.Module) -> float:
    """Bytes of the model's parameters, in MiB."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def device_of(where: nn.Module | torch.Tensor | str | torch.device) -> torch.device:
    """The device of a model (its first parameter), a tensor, or a device name."""
    if isinstance(where, nn.Module):
        return next(where.parameters()).device
    if isinstance(where, torch.Tensor):
        return where.device
    return resolve_device(where)


def device_line(where: nn.Module | torch.Tensor | str | torch.device) -> str:
    """'device cuda:0 (NVIDIA H100 ...), threads N': the card named, as every benchmark's figures must be."""
    device = device_of(where)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"device {device} ({card}), threads {torch.get_num_threads()}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA, or another accelerator where torch has the API)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize()


def cuda_columns(device: torch.device) -> list[str]:
    """The extra table columns for GPU peak memory: CUDA_COLUMNS on a CUDA device, none on the CPU."""
    return list(CUDA_COLUMNS) if device.type == "cuda" else []


@dataclass
class Measurement:
    """What `measure` recorded: wall seconds, RSS (MB) before and at peak, CUDA peaks (MiB) on a GPU."""

    seconds: float = 0.0
    rss_base_mb: float | None = None
    rss_peak_mb: float | None = None
    cuda_allocated_mb: float | None = None
    cuda_reserved_mb: float | None = None

    @property
    def rss_growth_mb(self) -> float:
        """Peak RSS during the block minus RSS at its start."""
        return self.rss_peak_mb - self.rss_base_mb

    def cuda_cells(self) -> list[str]:
        """The CUDA peaks formatted for the `cuda_columns` of a table; none when no GPU was measured."""
        if self.cuda_allocated_mb is None:
            return []
        return [f"{self.cuda_allocated_mb:.0f}", f"{self.cuda_reserved_mb:.0f}"]


@contextlib.contextmanager
def measure(where: nn.Module | torch.Tensor | str | torch.device = "cpu", memory: bool = True) -> Iterator[Measurement]:
    """Time the block (synchronising the device on entry and exit); with `memory`, reset and record peak RSS
    and, on CUDA, peak allocated/reserved GPU memory."""
    device, m = device_of(where), Measurement()
    if memory:
        reset_peak_rss()
        m.rss_base_mb = proc_status_mb("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t = time.perf_counter()
    yield m
    synchronize(device)
    m.seconds = time.perf_counter() - t
    if memory:
        m.rss_peak_mb = proc_status_mb("VmHWM")
        if device.type == "cuda":
            m.cuda_allocated_mb = torch.cuda.max_memory_allocated(device) / 2**20
            m.cuda_reserved_mb = torch.cuda.max_memory_reserved(device) / 2**20


def table(rows: Iterable[Sequence], columns: Sequence[str], align: str | None = None) -> None:
    """Print a Markdown table: the header at once, then each row as `rows` yields it (a generator shows a long
    benchmark's rows as they finish). Cells print with str(); `align` gives 'l' or 'r' per column (missing: 'l')."""
    align = (align or "").ljust(len(columns), "l")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" if align[i] == "r" else "---" for i in range(len(columns))) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


def summary(line: str) -> None:
    """Print the one-line result that closes every benchmark: `summary: <line>`."""
    print(f"summary: {line}", flush=True)
