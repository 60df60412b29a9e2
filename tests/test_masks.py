"""Pure scoring and mask math on hand-sized tensors."""

import pytest
import torch

from prunebench.pruners import magnitude, masks, wanda
from prunebench.pruners.masks import parse_pattern


def test_wanda_score_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    x_norm_sq = torch.tensor([4.0, 1.0, 0.25])  # ||X_j|| = 2, 1, 0.5
    expected = torch.tensor([[2.0, 2.0, 1.5], [8.0, 5.0, 3.0]])
    assert torch.equal(wanda.score(w, x_norm_sq), expected)
    assert torch.equal(magnitude.score(w), w.abs())


def test_row_mask_removes_lowest_per_row():
    score = torch.tensor([[2.0, 2.5, 1.5, 9.0], [8.0, 5.0, 3.0, 0.1]])
    mask = masks.row_mask(score, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_matrix_mask_one_threshold():
    score = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 9.0]])
    mask = masks.matrix_mask(score, 0.5)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


def _stable_sort_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The reference rule: the first k indices of a stable sort of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], True)


@pytest.mark.parametrize("levels", [3, 16, None])  # few distinct values (dequantized 4-bit), or continuous
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.5, 0.93, 0.99])
def test_selection_masks_equal_a_stable_sort_with_ties(levels, sparsity):
    """`lowest` finds the k-th value by selection; the mask must be exactly the stable sort's,
    ties included, for rows and for the flattened matrix (also with inf and NaN scores)."""
    g = torch.Generator().manual_seed(levels or 0)
    score = torch.rand(37, 96, generator=g)
    if levels:
        score = (score * levels).floor()
    score[3, :5] = torch.inf
    k = int(96 * sparsity)
    assert torch.equal(masks.row_mask(score, sparsity), _stable_sort_mask(score, k))
    flat = _stable_sort_mask(score.reshape(1, -1), int(score.numel() * sparsity)).view_as(score)
    assert torch.equal(masks.matrix_mask(score, sparsity), flat)
    score[5, 7] = torch.nan  # NaN ranks last, as in a sort
    assert torch.equal(masks.row_mask(score, sparsity), _stable_sort_mask(score, k))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("rule", ["row", "matrix"])
def test_achieved_sparsity_equals_target(sparsity, rule):
    score = torch.rand(64, 200)
    mask = masks.make_mask(score, sparsity, None, rule)
    if rule == "row":
        assert (mask.sum(1) == int(200 * sparsity)).all()
    else:
        assert int(mask.sum()) == int(score.numel() * sparsity)


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "4:8", "3:8"])
def test_nm_masks_are_valid(pattern):
    n, m = parse_pattern(pattern)
    score = torch.rand(16, 64)
    mask = masks.nm_mask(score, n, m)
    blocks = mask.view(16, 64 // m, m)
    assert (blocks.sum(-1) == n).all()
    # the removed ones are the lowest of their block
    s = score.view(16, 64 // m, m)
    kept_min = torch.where(blocks, torch.inf, s).min(-1).values
    removed_max = torch.where(blocks, s, -torch.inf).max(-1).values
    assert (removed_max <= kept_min).all()


def test_nm_needs_divisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        masks.nm_mask(torch.rand(2, 6), 2, 4)
