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


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of each row of `score` (2-D), ties taken in column order: the
    same set as the first k indices of a stable sort, found by selection (O(n)) instead of a
    sort (O(n log n)): the k-th smallest value t per row, everything below t, then as many entries
    equal to t as are still needed, leftmost first. Dequantized 4-bit weights tie often."""
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if score.device.type == "cpu":  # CPU: quickselect
        t = torch.kthvalue(score, k, dim=1, keepdim=True).values
    else:  # CUDA's kthvalue gives a whole row to one thread block; its radix sort is faster here
        t = torch.sort(score, dim=1).values[:, k - 1 : k]
    if bool(torch.isnan(t).any()):  # NaN ranks last in a sort but compares unequal to itself
        mask = torch.zeros_like(score, dtype=torch.bool)
        return mask.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], True)
    below = score < t
    tie = score == t
    need = k - below.sum(dim=1, keepdim=True)
    if bool((tie.sum(dim=1, keepdim=True) > need).any()):  # more ties than places: leftmost first
        tie &= tie.cumsum(dim=1) <= need
    return below | tie


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-output comparison group (Wanda): in each row, remove the int(in × sparsity) lowest
    scores (ties: leftmost first, as the reference's stable sort)."""
    return lowest(score, int(score.shape[1] * sparsity))


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold per matrix (the magnitude baseline): remove the int(numel × sparsity) lowest
    scores. Exactly k are removed even with ties (the reference's `<= threshold` may remove more;
    here ties go in row-major order, as a stable sort of the flattened matrix)."""
    return lowest(score.reshape(1, -1), int(score.numel() * sparsity)).view_as(score)


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
