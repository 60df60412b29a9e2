"""Knowledge-distillation recovery of a pruned causal LM: Minitron's retraining (arXiv 2407.14679,
§3.4): L = clm_weight · L_CLM + L_logit + α · L_is with α = L_logit / L_is, logit-only forward KL at
τ = 1 by default (the paper's best setting). The loss math is `distill.py`; the loop is `train.py`.

Teacher: the unpruned model (the pipeline deep-copies it before pruning), or `teacher:` a model
config name from conf/model or a saved Hugging Face folder, loaded here once on the student's device.
Training text: `tokens` tokens of `source` (never an evaluation split) in `seqlen` windows, seeded
order; AdamW, linear warm-up then cosine decay to `min_lr`, gradient clipping, `grad_accum`
micro-batches per step, autocast for bf16/fp16; pruned weights stay zero (`keep_masks`): the
training recipe of `recipe.py`, with the distillation loss as its objective.
Reported, as Minitron's Table 1: the distillation loss (KL to the teacher) and the LM loss on
held-out windows of `val_source`, before → after, plus the loss curve.

    recovery: {_target_: prunebench.recovery.kd.KD, loss: kld, temperature: 1.0, tokens: 65536, seqlen: 256}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from omegaconf import OmegaConf
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, knobs
from prunebench.memory import Plan
from prunebench.placement import compute_device
from prunebench.recovery.distill import DistillLoss, check_knobs, distill_step
from prunebench.recovery.recipe import Recipe

log = logging.getLogger(__name__)


class KD(Recipe):
    """Logit (and optionally intermediate-state) distillation from a teacher: the recipe's objective is
    `distill.DistillLoss`, and it trains every weight of the student (plus the projection between
    student and teacher widths for intermediate states)."""

    needs_lm = "KD distils next-token logits"  # an encoder is refused before loading (config.validate)
    DEFAULTS: ClassVar[dict] = {"min_lr": 1e-5, "decay": "cosine"}

    def __init__(
        self,
        name: str = "kd",
        loss: str = "kld",
        temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0,
        topk: Annotated[int | None, Field(ge=1)] = None,
        clm_weight: Annotated[float, Field(ge=0.0)] = 0.0,
        intermediate: dict | None = None,
        teacher: str | None = None,
        chunk: Annotated[int | None, Field(ge=1)] = None,
        **train,
    ):
        knobs.check_args(KD, "recovery", {"chunk": chunk})  # the loss knobs: distill.check_knobs below
        super().__init__(name=name, **{**self.DEFAULTS, **train})
        check_knobs(loss, temperature, topk, clm_weight, intermediate)
        if not self.val_windows:
            raise PrunebenchError("recovery.val_windows=0: kd reports its held-out losses before and after; give ≥ 1")
        if teacher is not None:
            _teacher_cfg(teacher)  # exists? (cheap: composes a config or checks a folder)
        self.loss = DistillLoss(loss, temperature, topk, clm_weight, intermediate, chunk)
        self.kind, self.teacher, self.chunk = loss, teacher, chunk

    @property
    def desc(self) -> str:
        return f"kd ({self.kind})"

    @property
    def needs_teacher(self) -> bool:
        """The pipeline copies the unpruned model only when no teacher is configured."""
        return self.teacher is None

    def own_fingerprint(self) -> dict:
        loss = {k: getattr(self.loss, k) for k in ("temperature", "topk", "clm_weight", "intermediate")}
        return {"loss": self.kind, "teacher": self.teacher, **loss}

    def compute_loss(self, student, teacher, batch, ctx) -> dict:
        return distill_step(student, teacher, {"input_ids": batch}, self.loss, ctx)

    def trained(self, model, teacher, device):
        extra = self.loss.setup_projection(model.config.hidden_size, teacher.config.hidden_size, device)
        return [p for p in model.parameters() if p.requires_grad] + extra, self.loss.projection

    def report(self, before: dict, after: dict) -> dict:
        return {
            "loss": self.kind,
            "temperature": self.loss.temperature,
            "topk": self.loss.topk,
            "clm_weight": self.loss.clm_weight,
            "intermediate": self.loss.intermediate,
            "teacher": self.teacher or "unpruned model (copied before pruning)",
            "distillation_loss": {"before": before["kd"], "after": after["kd"]},
            "lm_val_loss": {"before": before["lm"], "after": after["lm"]},
            "metrics": {"kd_val_before": before["kd"], "kd_val_after": after["kd"], "lm_val_loss": after["lm"]},
        }

    def __call__(self, model: nn.Module, teacher: nn.Module | None = None, data=None) -> dict:
        if self.teacher is not None:
            cache_dir = OmegaConf.select(data, "paths.cache_dir") if data is not None else None
            dtype = next(model.parameters()).dtype
            teacher = load_teacher(self.teacher, compute_device(model), dtype, cache_dir, self.tokenizer)
        elif teacher is None:
            raise PrunebenchError("kd needs a teacher: run it through the pipeline or set recovery.teacher")
        return self.train(model, teacher)


def _teacher_cfg(teacher: str):
    """The model config of a teacher given as a conf/model name or a saved Hugging Face folder."""
    from prunebench import CONF_DIR
    from prunebench.config import compose

    if (CONF_DIR / "model" / f"{teacher}.yaml").exists():
        return compose(f"model={teacher}").model
    path = Path(teacher).expanduser()
    if not (path / "config.json").exists():
        raise PrunebenchError(
            f"recovery.teacher={teacher!r} is neither a model config name in conf/model nor"
            " a saved Hugging Face folder (config.json); use e.g. recovery.teacher=smollm2-135m"
        )
    return OmegaConf.create(
        {
            "name": path.name,
            "kind": "causal_lm",
            "source": "path",
            "path": str(path),
            "dtype": "float32",
            "reinit": False,
        }
    )


def load_teacher(
    teacher: str, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None, tokenizer=None
) -> nn.Module:
    """Load a configured teacher once, straight onto `device` in `dtype` (the student's), in eval mode
    with gradients off; refuses a teacher whose tokenizer differs from the student's."""
    from prunebench import models
    from prunebench.config import compose

    cfg = _teacher_cfg(teacher)
    cache_dir = cache_dir or compose().paths.cache_dir
    model, tok = models.load(cfg, cache_dir, plan=Plan(torch.device(device), dtype, "device"))
    if hasattr(tok, "get_vocab") and hasattr(tokenizer, "get_vocab") and tok.get_vocab() != tokenizer.get_vocab():
        raise PrunebenchError(
            f"recovery.teacher={teacher}: its tokenizer differs from the student's; logit KD needs the same vocabulary"
        )
    log.info("kd teacher %s loaded on %s", teacher, device)
    return model.eval().requires_grad_(False)


def kd_checkpoints(
    student: nn.Module, teacher: nn.Module, tokenizer, tokens: int, checkpoints: list[int], **knobs
) -> list[dict]:
    """A short KD of `student` for `tokens` tokens, returning the held-out losses at the given
    optimiser-step counts (and before training, step 0): [{"step", "tokens", "kd", "lm"}, ...].
    Minitron's architecture search ranks candidates by the LM val loss ("lm") at these points."""
    kd = KD(tokens=tokens, **knobs)
    kd.tokenizer = tokenizer
    out = kd.train(student, teacher, checkpoints)
    first = {"step": 0, "tokens": 0, "kd": out["distillation_loss"]["before"], "lm": out["lm_val_loss"]["before"]}
    return [first, *out.get("checkpoints", [])]
