"""The training plumbing recoveries share: token windows of a text source in a seeded order, AdamW
with a warm-up + decay schedule, pruning masks held at zero, autocast, and one optimisation loop.

`lm_finetune` (causal-LM loss) and `kd` (distillation loss) both run `fit`; only the per-batch loss
differs. The loss math itself lives in `distill.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunebench import PrunebenchError
from prunebench.data import load_texts, tokenize
from prunebench.models.blocks import prunable_weights
from prunebench.recovery.corpus import EVAL_SPLITS  # evaluation data: never a training source
from prunebench.recovery.engine import is_main

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_source(
    source: str,
    knob: str = "recovery.source",
    text_field: str = "text",
    source_config: str | None = None,
    source_split: str | None = None,
    streaming: bool = False,
) -> None:
    """Refuse, before anything loads: an evaluation split (or an unknown name) as training text, files
    that are missing, unreadable kinds or lack the text field, a Hub id without the Hub, and a knob
    the source ignores (`source_config` / `source_split` / `streaming` only mean something for `hf:`
    ids; `text_field` nothing for built-in names or token ids). See recovery/corpus.py."""
    from prunebench.data.text import LOCAL
    from prunebench.recovery import corpus

    if not corpus.is_hub(source):
        hub_only = {"source_config": (source_config, None), "source_split": (source_split, None),
                    "streaming": (streaming, False)}  # fmt: skip
        for name, (value, unset) in hub_only.items():
            if value != unset:
                raise PrunebenchError(
                    f"recovery.{name}={value} is ignored: it only applies to a Hugging Face dataset,"
                    f" {knob}=hf:<id> ({knob}={source})"
                )
    elif knob != "recovery.source":
        raise PrunebenchError(f"{knob}={source}: a Hub dataset can only be recovery.source; give a name or files")
    if corpus.is_hub(source):
        corpus.check_hub(source, source_config, source_split, knob)
        return
    if corpus.is_path(source):  # the user's own files: exist, readable kinds, not an evaluation split
        if corpus.check(source, text_field, knob) == "ids" and text_field != "text":
            raise PrunebenchError(f"recovery.text_field={text_field} is ignored: {knob}={source} holds token ids")
        return
    if text_field != "text":
        raise PrunebenchError(f"recovery.text_field={text_field} is ignored by the built-in {knob}={source}")
    if source in EVAL_SPLITS:
        raise PrunebenchError(
            f"{knob}={source} is an evaluation split and must never be trained on; use {knob}=c4 (or wikitext2_valid)"
        )
    if source not in LOCAL:
        raise PrunebenchError(
            f"{knob}={source!r} is not a known text source; use one of: c4, wikitext2_valid, a file, folder or glob,"
            " or hf:<dataset id>"
        )


def text_windows(
    tokenizer,
    source: str,
    seqlen: int,
    text_field: str = "text",
    source_config: str | None = None,
    source_split: str | None = None,
    streaming: bool = False,
    tokens: int | None = None,
) -> torch.Tensor:
    """All non-overlapping windows (n, seqlen) of the source's rows joined with blank lines: a
    built-in name, files or a Hub id (recovery/corpus.py). `tokens`: the job's token budget, which
    a streamed Hub split is read up to."""
    from prunebench.recovery import corpus

    if corpus.is_hub(source):
        ids = corpus.hub_token_ids(tokenizer, source, text_field, source_config, source_split, streaming, tokens)
    elif corpus.is_path(source):
        ids = corpus.token_ids(tokenizer, source, text_field)
    else:
        ids = tokenize(tokenizer, "\n\n".join(t for t in load_texts(source) if t))
    n = len(ids) // seqlen
    if n == 0:
        raise PrunebenchError(f"{source} has only {len(ids)} tokens, less than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def window_order(n_windows: int, count: int, seed: int) -> torch.Tensor:
    """`count` or more window indices: seeded permutations of all windows, concatenated."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n_windows, generator=g) for _ in range(math.ceil(count / n_windows))])


def lr_lambda(steps: int, warmup: float, decay: str = "linear", min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over `warmup` × steps, then linear decay to 0 or cosine
    decay to `min_ratio` (min_lr / lr)."""
    warm = max(1, int(warmup * steps))
    if decay == "linear":
        return lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))

    def cosine(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine


def adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    steps: int,
    warmup: float,
    decay: str = "linear",
    min_lr: float = 0.0,
):
    """(AdamW, LambdaLR) over `params`."""
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup, decay, min_lr / lr if lr else 0.0))
    return opt, sched


class MaskKeeper:
    """Remembers which prunable block weights (linears, each expert of fused experts) are exactly
    zero and sets them back to zero after each optimiser step, so unstructured and N:M sparsity
    survive training."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.linears = prunable_weights(model) if enabled else {}  # experts of fused MoE tensors too
        self.masks = {n: _local(m.weight) == 0 for n, m in self.linears.items()}

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            _local(self.linears[name].weight)[mask] = 0


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) weight; the weight itself otherwise."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


def autocast(device: torch.device, precision: str):
    """torch.autocast on the model's device for bf16/fp16; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(
    model: nn.Module,
    steps: int,
    loss_fn: Callable[[int, int], torch.Tensor],
    opt: torch.optim.Optimizer,
    sched,
    *,
    grad_accum: int = 1,
    clip: float | None = None,
    keep: MaskKeeper | None = None,
    scaler: torch.amp.GradScaler | None = None,
    log_every: int = 10,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    engine=None,
    start: int = 0,
    curve: list | None = None,
) -> list[list]:
    """`steps` optimiser steps; `loss_fn(step, micro)` returns the loss of one micro-batch. Each step
    accumulates `grad_accum` micro-batches, clips the gradient norm to `clip`, steps the optimiser
    and scheduler and re-applies the masks. `on_step(done)` runs after each step (checkpoints).
    Returns the loss curve [[step, loss], ...] every `log_every` steps and at the last one.

    `engine` (recovery/engine.py, several processes or a sharding engine): `model` and `opt` are the
    engine's wrapped ones; gradients are all-reduced on the last micro-batch only, the engine
    backpropagates and clips (mixed precision is its own), and the logged loss is the mean over
    ranks. `start`: the first step and `curve` the curve so far (a resumed run); the points are
    appended to `curve` as they come, so `on_step` can checkpoint it."""
    params = [p for group in opt.param_groups for p in group["params"]]
    curve = [] if curve is None else curve
    model.train()
    bar = tqdm(range(start, steps), desc=desc, unit="step", leave=False, disable=not is_main())
    for step in bar:
        total = 0.0
        for micro in range(grad_accum):
            if engine is not None:
                with engine.no_sync(model, micro == grad_accum - 1):
                    loss = loss_fn(step, micro)
                    engine.backward(loss / grad_accum if grad_accum > 1 else loss)
            else:
                loss = loss_fn(step, micro)
                scaled = loss / grad_accum if grad_accum > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) / grad_accum
        if engine is not None:
            total = engine.mean(total)
        if scaler is not None:
            scaler.unscale_(opt)
        if clip and engine is not None:
            engine.clip(model, clip)
        elif clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if keep is not None:
            keep.apply()
        if step % log_every == 0 or step == steps - 1:
            curve.append([step, round(total, 5)])
            bar.set_postfix(loss=f"{total:.4f}")
        if on_step is not None:
            on_step(step + 1)
            model.train()
    model.eval()
    return curve
