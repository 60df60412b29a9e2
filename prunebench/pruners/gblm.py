"""GBLM-Pruner: "Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models"
(arXiv 2311.04902).

Score  W_m[i,j] = |W[i,j]|·||X[:,j]||₂ + α·|W[i,j]|·||G[:,i,j]||_p,  p ∈ {1, 2}

G holds per-sample gradients of the causal-LM loss over the calibration windows (batch 1), taken
once on the dense model. As in the reference (VILA-Lab/GBLM-Pruner), the activation term is
averaged over samples (Wanda's scaler_row) and the gradient term is not; α is the reference's
gradient `--scale` (default 100). Weights compete per output row (or per matrix, an ablation);
unstructured or N:M; no weight update.

Gradient norms depend only on the dense weights and the calibration windows, so they are cached
on disk and reused across α, sparsity, pattern and group (α is applied at scoring time, exact in
fp32). `grad_accum: fp16_reference` reproduces the reference's fp16 accumulation of α·g instead.

    pruner:
      _target_: prunebench.pruners.gblm.GBLM
      sparsity: 0.5
      pattern: unstructured     # or 2:4, 4:8
      alpha: 100
      grad_norm: l1             # or l2
      terms: both               # both | gradient (gradient-only ablation) | activation (= Wanda)
      group: row                # row | matrix
      sequential: true
      grad_accum: fp32          # fp32 | fp16_reference
"""

from __future__ import annotations

import time
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.pruners.base import MaskPruner, capture_bytes
from prunebench.pruners.stats import InputNorms, cached_stats, gradient_norms

TERMS = ("both", "gradient", "activation")


def score(
    weight: torch.Tensor, x_norm_sq: torch.Tensor, g_norm: torch.Tensor, alpha: float, terms: str = "both"
) -> torch.Tensor:
    """|W|·sqrt(||X_j||²) + α·|W|·||G_ij||_p (or one of the two terms, for ablations)."""
    w = weight.abs().float()
    activation = w * x_norm_sq.to(w.device).sqrt().reshape(1, -1)  # cached statistics load on the CPU
    gradient = alpha * w * g_norm.to(w.device).float()
    return {"both": activation + gradient, "gradient": gradient, "activation": activation}[terms]


class GBLM(MaskPruner):
    needs_lm = "GBLM's language-model loss"
    supports_offload = False  # the gradient pass backpropagates through the whole model
    supports_stream = False

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        hidden, ffn, layers = int(shape["hidden"]), int(shape["ffn"]), int(shape["layers"])
        stats = int(shape["params"] - 2 * int(shape["vocab"]) * hidden) * (4 + elt)  # fp32 accumulators + a gradient
        graph = calib.seqlen * layers * (6 * hidden + 3 * ffn) * elt  # one sample's autograd graph
        return max(capture_bytes(shape, calib, elt), graph), stats

    def __init__(
        self,
        name: str = "gblm",
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        alpha: Annotated[float, Field(ge=0.0, le=1e9, description="GBLM's gradient scale; the paper uses 100")] = 100.0,
        grad_norm: str = "l1",
        terms: str = "both",
        group: str = "row",
        sequential: bool = True,
        grad_accum: str = "fp32",
        one_forward: bool = False,
    ):
        super().__init__(name, sparsity, pattern, group, sequential, one_forward)
        if grad_norm not in ("l1", "l2"):
            raise PrunebenchError(f"pruner.grad_norm={grad_norm!r} must be 'l1' or 'l2'")
        if terms not in TERMS:
            raise PrunebenchError(f"pruner.terms={terms!r} must be one of {', '.join(TERMS)}")
        if grad_accum not in ("fp32", "fp16_reference"):
            raise PrunebenchError(f"pruner.grad_accum={grad_accum!r} must be 'fp32' or 'fp16_reference'")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < float("inf"):
            raise PrunebenchError(f"pruner.alpha={alpha} must be a finite number ≥ 0 (the paper uses 100)")
        self.alpha, self.grad_norm, self.terms, self.grad_accum = float(alpha), grad_norm, terms, grad_accum
        self.grads: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, calib) -> None:
        if self.terms == "activation":
            return  # Wanda: no gradients needed
        if model.get_output_embeddings() is None:
            raise PrunebenchError(f"GBLM needs a language-model loss; {type(model).__name__} has no LM head")
        if self.grad_accum == "fp16_reference":
            # The reference scales by α before accumulating in fp16: α is part of what is cached.
            kind, fp16_scale = f"grad-{self.grad_norm}-fp16ref-a{self.alpha:g}", self.alpha
        else:
            kind, fp16_scale = f"grad-{self.grad_norm}-fp32", None
        t = time.perf_counter()
        was_training = model.training
        model.eval()  # Llama has no dropout; eval() keeps any other model deterministic
        self.grads, reused = cached_stats(
            calib, model, kind, lambda: gradient_norms(model, calib.input_ids, self.grad_norm, fp16_scale)
        )
        model.train(was_training)
        self.info.update(gradients_reused=reused, gradient_seconds=round(time.perf_counter() - t, 3), grad_kind=kind)

    def score(self, name: str, layer: nn.Linear, stat: InputNorms) -> torch.Tensor:
        alpha = 1.0 if self.grad_accum == "fp16_reference" else self.alpha  # already inside G there
        g = self.grads.get(name)
        if g is None:
            g = torch.zeros_like(layer.weight)
        return score(layer.weight, stat.norm_sq, g, alpha, self.terms)
