"""Causal-LM continued training of a pruned model for a token budget: LaCo's post-training
(arXiv 2402.11187, §post-training), usable after any pruner.

Windows of `seqlen` consecutive tokens of the source text are drawn in a seeded order; AdamW with
linear warm-up and linear decay; one optimiser step per `batch_size` windows until `tokens` are
consumed. With `keep_masks: true` weights that were exactly zero before training (unstructured or
N:M masks) are held at zero after every step, so the sparsity survives recovery.

    recovery: {_target_: prunebench.recovery.lm_finetune.LMFinetune, source: c4, tokens: 65536, seqlen: 256}
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from prunebench import PrunebenchError
from prunebench.calibration import prunable_linears
from prunebench.data import load_texts, tokenize


class LMFinetune:
    needs_teacher = False

    def __init__(
        self,
        name: str = "lm_finetune",
        source: str = "c4",
        tokens: int = 65536,
        seqlen: int = 256,
        batch_size: int = 1,
        lr: float = 2e-5,
        warmup: float = 0.05,
        weight_decay: float = 0.0,
        keep_masks: bool = True,
        reprune: bool = False,
        log_every: int = 10,
        seed: int = 0,
    ):
        if tokens < seqlen * batch_size:
            raise PrunebenchError(f"recovery.tokens={tokens} is less than one batch of {seqlen * batch_size} tokens")
        self.name, self.source, self.tokens, self.seqlen, self.batch_size = name, source, tokens, seqlen, batch_size
        self.lr, self.warmup, self.weight_decay, self.keep_masks = lr, warmup, weight_decay, keep_masks
        self.reprune, self.log_every, self.seed = reprune, log_every, seed
        self.tokenizer = None

    def __call__(self, model: nn.Module, teacher=None, data=None) -> dict:
        if self.tokenizer is None:
            raise PrunebenchError("lm_finetune needs the tokenizer (set by the pipeline)")
        ids = tokenize(self.tokenizer, "\n\n".join(t for t in load_texts(self.source) if t))
        n_windows = len(ids) // self.seqlen
        steps = self.tokens // (self.seqlen * self.batch_size)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.cat(
            [torch.randperm(n_windows, generator=g) for _ in range(math.ceil(steps * self.batch_size / n_windows))]
        )
        windows = ids[: n_windows * self.seqlen].view(n_windows, self.seqlen)
        masks = {n: m.weight == 0 for n, m in prunable_linears(model).items()} if self.keep_masks else {}
        linears = prunable_linears(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(1, int(self.warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        device = next(model.parameters()).device
        curve, start = [], time.perf_counter()
        model.train()
        for step in tqdm(range(steps), desc="lm_finetune", unit="step", leave=False):
            batch = windows[order[step * self.batch_size : (step + 1) * self.batch_size]].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, mask in masks.items():
                    linears[name].weight[mask] = 0
            if step % self.log_every == 0 or step == steps - 1:
                curve.append([step, round(float(loss), 5)])
        model.eval()
        return {
            "steps": steps,
            "tokens": steps * self.batch_size * self.seqlen,
            "loss_first": curve[0][1],
            "loss_last": curve[-1][1],
            "loss_curve": curve,
            "seconds": round(time.perf_counter() - start, 2),
            "kept_masks": self.keep_masks,
        }
