"""Mask rules, pure tensor math: given a score matrix (out, in), which weights to remove.

A mask is a bool tensor, True where the weight is pruned. Lower score = pruned first.
"""

from __future__ import annotations

import torch

from prunebench import PrunebenchError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): N zeros in every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise PrunebenchError(f"pruner.pattern={pattern!r} is not 'unstructured' or 'N:M' (e.g. 2:4, 4:8)") from None
    if not 0 < n < m:
        raise PrunebenchError(f"pruner.pattern={pattern}: N:M needs 0 < N < M (e.g. 2:4, 4:8)")
    return n, m


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-output comparison group (Wanda): in each row, remove the int(in × sparsity) lowest
    scores (stable sort, as the reference)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold per matrix (the magnitude baseline): remove the int(numel × sparsity) lowest
    scores. Exactly k are removed even with ties (the reference's `<= threshold` may remove more)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True)[1][:k]] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every block of M consecutive input columns of a row, remove the N lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    blocks = score.reshape(rows, cols // m, m)
    idx = torch.topk(blocks, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def make_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str = "row") -> torch.Tensor:
    if nm is not None:
        return nm_mask(score, *nm)
    return row_mask(score, sparsity) if group == "row" else matrix_mask(score, sparsity)
