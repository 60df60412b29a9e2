"""Causal-LM continued training of a pruned model for a token budget: LaCo's post-training
(arXiv 2402.11187, §post-training), usable after any pruner.

The training recipe of `recipe.py` with the next-token cross-entropy as its objective, every weight
trained: windows of `seqlen` consecutive tokens of the source text in a seeded order; AdamW with
linear warm-up and linear decay; one optimiser step per `batch_size` × `grad_accum` windows (or
`global_batch` over all processes) until `tokens` are consumed; checkpoints, resume and SIGTERM as
`kd`. With `keep_masks: true` weights that were exactly zero before training (unstructured or N:M
masks) are held at zero after every step, so the sparsity survives recovery. `reprune: true` prunes
again with the same pruner afterwards (LaCo's re-pruning; the pipeline does it). No held-out losses
by default (`val_windows: 0`, LaCo reports none); `val_windows: N` measures them as `kd` does.

    recovery: {_target_: prunebench.recovery.lm_finetune.LMFinetune, source: c4, tokens: 65536, seqlen: 256}
"""

from __future__ import annotations

from typing import ClassVar

from prunebench.knobs import Flag
from prunebench.recovery.recipe import Recipe


class LMFinetune(Recipe):
    needs_lm = "continued training on the next-token loss"  # encoders: refused before loading
    DEFAULTS: ClassVar[dict] = {"lr": 2e-5, "clip": None, "val_windows": 0}

    def __init__(self, name: str = "lm_finetune", reprune: Flag = False, **train):
        super().__init__(name=name, **{**self.DEFAULTS, **train})
        self.reprune = reprune

    def report(self, before: dict, after: dict) -> dict:
        if not after:
            return {}
        return {
            "lm_val_loss": {"before": before["lm"], "after": after["lm"]},
            "metrics": {"lm_val_before": before["lm"], "lm_val_after": after["lm"]},
        }
