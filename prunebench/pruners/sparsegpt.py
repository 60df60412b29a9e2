"""SparseGPT: "Massive Language Models Can Be Accurately Pruned in One-Shot" (arXiv 2301.00774),
the weight-update baseline of Wanda and GBLM-Pruner.

Per linear layer, with H = (2/n)·Σ x xᵀ over the calibration tokens of its input (n samples):
dampen H += λ·mean(diag H)·I (λ = percdamp, 0.01), take U = chol(H⁻¹)ᵀ (upper), then sweep the
columns in blocks of 128 (lazy batch updates). In each block the mask removes the weights of
lowest w² / U_jj², chosen over the whole block for unstructured sparsity (as the reference does,
not per row) or per M columns for N:M. Column j's pruning error e = (w_j − q_j)/U_jj is
propagated to the not-yet-visited columns: W[:, j:] −= e·U[j, j:] inside the block, then
W[:, later] −= E·U[block, later] after it (the OBS update). Blocks are processed sequentially.

    pruner: {_target_: prunebench.pruners.sparsegpt.SparseGPT, sparsity: 0.5, pattern: unstructured,
             blocksize: 128, percdamp: 0.01}
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.pruners.base import MaskPruner, capture_bytes
from prunebench.pruners.masks import matrix_mask, nm_mask


class Hessian:
    """H = (2/n)·Σ_tokens x xᵀ with n the number of calibration samples (the reference's scaling)."""

    def __init__(self, layer: nn.Linear):
        cols = layer.in_features
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    def add(self, x: torch.Tensor, samples: int | None = None) -> None:
        """`samples`: calibration samples behind flattened tokens (an expert's), as InputNorms.add."""
        self.nsamples += samples if samples is not None else (x.shape[0] if x.dim() == 3 else 1)
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.nsamples, 1))


@torch.no_grad()
def prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure OBS reconstruction: returns (updated weight in fp32, bool mask of removed weights).

    The sweep works on Wᵀ, so that a column of W (one step below) is a contiguous row and each
    update touches contiguous memory; the arithmetic is the reference's, step for step."""
    W = weight.detach().clone().float()
    H = hessian.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs that never fire: their weights carry no signal
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Wt = W.t().contiguous()  # [cols, rows]
    mask = torch.zeros_like(Wt, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, m1 = Wt[i1:i2], U[i1:i2, i1:i2], mask[i1:i2]  # views: updated in place
        d = torch.diag(U1).reshape(-1, 1)
        err = torch.empty_like(W1)
        if nm is None:  # one selection over the whole block (w² / U_jj²), as the reference
            m1.copy_(matrix_mask(W1**2 / d**2, sparsity))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # the next M columns, chosen once they are updated
                j = i + nm[1]
                m1[i:j] = nm_mask((W1[i:j] ** 2 / d[i:j] ** 2).t(), *nm).t()
            e = torch.where(m1[i], W1[i], 0.0) / U1[i, i]  # (w − q) / U_ii, q = w with pruned entries 0
            W1[i:] -= U1[i, i:].unsqueeze(1) * e
            W1[i].masked_fill_(m1[i], 0.0)  # exact zeros where pruned
            err[i] = e
        Wt[i2:] -= U[i1:i2, i2:].t() @ err
    return Wt.t(), mask.t()


class SparseGPT(MaskPruner):
    make_stat = Hessian

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        hidden, ffn = int(shape["hidden"]), int(shape["ffn"])
        return capture_bytes(shape, calib, elt), (6 * hidden * hidden + ffn * ffn) * 4  # one block's fp32 Hessians

    def __init__(
        self,
        name: str = "sparsegpt",
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        blocksize: Annotated[int, Field(ge=1, le=65536)] = 128,
        percdamp: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01,
        sequential: bool = True,
        one_forward: bool = False,
    ):
        if not sequential:
            raise PrunebenchError("SparseGPT has no one-shot mode: its Hessians need the pruned blocks' outputs")
        super().__init__(name, sparsity, pattern, "block", sequential, one_forward)
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)
        self.info["mask_selection"] = f"per {self.blocksize}-column block" if self.nm is None else "per N:M group"

    @torch.no_grad()
    def prune_layer(self, name: str, layer: nn.Linear, stat: Hessian) -> None:
        W, _ = prune(layer.weight, stat.hessian, self.sparsity, self.nm, self.blocksize, self.percdamp)
        layer.weight.copy_(W.to(layer.weight.dtype))
