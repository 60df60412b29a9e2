"""GBLM-Pruner and SparseGPT against direct formulas on hand-sized tensors and tiny models."""

from __future__ import annotations

import pytest
import torch

from prunebench.pruners import gblm, magnitude, masks, sparsegpt, wanda
from prunebench.pruners.stats import (
    InputNorms,
    cached_stats,
    collect_full_forward,
    gradient_norms,
    prunable_linears,
)
from tests.conftest import cached_calib, counted, random_calib


def test_gblm_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    x_norm_sq = torch.tensor([4.0, 1.0])
    g = torch.tensor([[0.5, 0.0], [0.1, 0.2]])
    # |W|·||X|| + α·|W|·G with α = 10
    expected = torch.tensor([[2.0 + 5.0, 2.0 + 0.0], [6.0 + 3.0, 4.0 + 8.0]])
    assert torch.allclose(gblm.score(w, x_norm_sq, g, 10.0), expected)
    assert torch.allclose(gblm.score(w, x_norm_sq, g, 10.0, "activation"), wanda.score(w, x_norm_sq))
    assert torch.allclose(gblm.score(w, x_norm_sq, g, 10.0, "gradient"), torch.tensor([[5.0, 0.0], [3.0, 8.0]]))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_norms_equal_direct_per_sample_autograd(tiny, norm):
    model, _ = tiny
    calib = random_calib(n=3, seqlen=16)
    got = gradient_norms(model, calib.input_ids, norm)
    linears = prunable_linears(model)
    acc = {n: torch.zeros_like(layer.weight) for n, layer in linears.items()}
    for window in calib.input_ids:
        x = window[None]
        loss = model(input_ids=x, labels=x).loss
        grads = torch.autograd.grad(loss, [layer.weight for layer in linears.values()])
        for n, g in zip(linears, grads, strict=True):
            acc[n] += g.abs() if norm == "l1" else g * g
    for n in linears:
        expected = acc[n] if norm == "l1" else acc[n].sqrt()
        torch.testing.assert_close(got[n], expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_fp16_reference_accumulates_scaled_gradients(tiny):
    model, _ = tiny
    ids = random_calib(n=2, seqlen=16).input_ids
    fp32 = gradient_norms(model, ids, "l1")
    ref = gradient_norms(model, ids, "l1", fp16_scale=100.0)
    name = next(iter(fp32))
    assert ref[name].dtype == torch.float16
    torch.testing.assert_close(ref[name].float(), 100 * fp32[name], rtol=5e-3, atol=1e-3)


def test_gblm_alpha_zero_equals_wanda(tiny):
    model, _ = tiny
    calib = random_calib()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wanda.Wanda(sparsity=0.5)(model, calib)
    wanda_masks = {n: layer.weight == 0 for n, layer in prunable_linears(model).items()}
    model.load_state_dict(state)
    gblm.GBLM(sparsity=0.5, alpha=0.0)(model, calib)
    for n, layer in prunable_linears(model).items():
        assert torch.equal(layer.weight == 0, wanda_masks[n]), n


@pytest.mark.parametrize("pruner_cls", [wanda.Wanda, gblm.GBLM])
def test_one_shot_uses_dense_statistics_for_every_layer(tiny, pruner_cls, tmp_path):
    model, _ = tiny
    calib = random_calib()
    calib.cache_dir = str(tmp_path)
    dense = {n: layer.weight.detach().clone() for n, layer in prunable_linears(model).items()}
    norms = collect_full_forward(model, calib.input_ids, calib.batch_size, InputNorms)
    grads = gradient_norms(model, calib.input_ids, "l1") if pruner_cls is gblm.GBLM else None
    stats = pruner_cls(sparsity=0.5, sequential=False)(model, calib)
    assert stats.info["protocol"].startswith("one-shot")
    for n, layer in prunable_linears(model).items():
        if grads is None:
            s = wanda.score(dense[n], norms[n].norm_sq)
        else:
            s = gblm.score(dense[n], norms[n].norm_sq, grads[n], 100.0)
        assert torch.equal(layer.weight == 0, masks.row_mask(s, 0.5)), n


def test_cache_hit_miss_and_invalidation(tiny, tmp_path):
    model, _ = tiny
    calib = cached_calib(tmp_path)
    calls, compute = counted({"a": torch.ones(3)})
    _, reused = cached_stats(calib, model, "kind", compute)
    assert not reused and len(calls) == 1
    out, reused = cached_stats(calib, model, "kind", compute)
    assert reused and len(calls) == 1 and torch.equal(out["a"], torch.ones(3))
    cached_stats(calib, model, "other-protocol", compute)  # a different protocol: a miss
    assert len(calls) == 2
    other = cached_calib(tmp_path, seed=1)  # different windows (data or seed): a miss
    cached_stats(other, model, "kind", compute)
    assert len(calls) == 3
    with torch.no_grad():  # changed weights: a miss
        next(iter(prunable_linears(model).values())).weight.mul_(2)
    cached_stats(calib, model, "kind", compute)
    assert len(calls) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_gblm_sweep_reuses_gradients(tiny, tmp_path):
    model, _ = tiny
    calib = random_calib()
    calib.cache_dir = str(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    for alpha, sparsity in [(1.0, 0.5), (100.0, 0.6), (10.0, 0.7)]:
        model.load_state_dict(state)
        seen.append(gblm.GBLM(sparsity=sparsity, alpha=alpha)(model, calib).info["gradients_reused"])
    assert seen == [False, True, True]


def _reconstruction_error(w_new, w, x):
    return float(((x @ w.T - x @ w_new.T) ** 2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    g = torch.Generator().manual_seed(0)
    rows, cols, tokens = 32, 256, 512
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.rand(cols, generator=g) * 3  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    stat = sparsegpt.Hessian(torch.nn.Linear(cols, rows))
    stat.add(x.reshape(4, tokens // 4, cols))
    torch.testing.assert_close(stat.hessian, 2 / 4 * x.T @ x, rtol=1e-4, atol=1e-3)
    w_sgpt, mask = sparsegpt.prune(w, stat.hessian, 0.5, nm, blocksize=64)
    assert torch.equal(w_sgpt == 0, mask)
    if nm:
        assert (mask.view(rows, -1, 4).sum(-1) == 2).all()
    else:
        assert all(int(mask[:, i : i + 64].sum()) == rows * 64 // 2 for i in range(0, cols, 64))
    x_norm_sq = (x * x).sum(0) / 4
    w_mag = w * ~masks.make_mask(magnitude.score(w), 0.5, nm, "row")
    w_wanda = w * ~masks.make_mask(wanda.score(w, x_norm_sq), 0.5, nm, "row")
    e_sgpt, e_mag, e_wanda = (_reconstruction_error(v, w, x) for v in (w_sgpt, w_mag, w_wanda))
    assert e_sgpt < e_wanda < e_mag


def _reference_sparsegpt(W, H, sparsity, nm, blocksize, percdamp=0.01):
    """The authors' loop (sparsegpt.py `fasterprune`): columns of W, in place; except that an
    unstructured block removes exactly k weights (first k of a stable sort), where the reference's
    `<= threshold` also removes the threshold itself (documented in masks.matrix_mask)."""
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diag(U1)
        err = torch.zeros_like(W1)
        if nm is None:
            tmp = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            m1 = torch.zeros_like(tmp, dtype=torch.bool)
            m1[torch.sort(tmp, stable=True)[1][: int(tmp.numel() * sparsity)]] = True
            m1 = m1.view_as(W1)
        else:
            m1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].reshape(1, -1) ** 2
                m1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = w.clone()
            q[m1[:, i]] = 0
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
        mask[:, i1:i2] = m1
    return W, mask


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_equals_the_reference_loop(nm):
    """Our transposed sweep against the authors' column loop: the same masks, the same weights
    (to float rounding)."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 24, 96
    x = torch.randn(300, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols))
    w, h = torch.randn(rows, cols, generator=g), 2 / 3 * x.T @ x
    ours, mask = sparsegpt.prune(w, h, 0.5, nm, blocksize=32)
    ref, ref_mask = _reference_sparsegpt(w, h, 0.5, nm, 32)
    assert torch.equal(mask, ref_mask) and torch.equal(ours == 0, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sparsegpt_zero_sparsity_keeps_weights():
    w = torch.randn(8, 16)
    x = torch.randn(64, 16)
    w_new, mask = sparsegpt.prune(w, 2 * x.T @ x, 0.0, None, blocksize=8)
    assert not mask.any()
    torch.testing.assert_close(w_new, w)
