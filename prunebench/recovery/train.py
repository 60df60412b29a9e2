"""The training pieces every trainer shares: token windows of a text source in a seeded order, AdamW
with a warm-up + decay schedule, pruning masks held at zero, autocast, and the one optimisation loop
`fit` (one code path for one or many processes: the engine of `engine.py` does what differs).

The LM recoveries (`kd`, `lm_finetune`, `lora`) are one recipe (`recipe.py`) around `fit`; MiniBridge's
progressive KD (pruners/minibridge.py) calls `adamw` and `fit` directly, and the classification
fine-tune of evals/finetune.py uses `lr_lambda`. The loss math lives in `distill.py`, checkpoints,
resume and stopping on a signal in `resume.py`.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable, Iterable

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.data import load_texts, tokenize
from prunebench.models.blocks import prunable_weights
from prunebench.progress import progress
from prunebench.recovery import resume
from prunebench.recovery.corpus import EVAL_SPLITS  # evaluation data: never a training source
from prunebench.recovery.engine import Engine, is_main

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
    from prunebench.recovery import corpus, hub

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
        hub.check_hub(source, source_config, source_split, knob)
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
    from prunebench.recovery import corpus, hub

    if corpus.is_hub(source):
        ids = hub.hub_token_ids(tokenizer, source, text_field, source_config, source_split, streaming, tokens)
    elif corpus.is_path(source):
        ids = corpus.token_ids(tokenizer, source, text_field)
    else:
        ids = tokenize(tokenizer, "\n\n".join(t for t in load_texts(source) if t))
    n = len(ids) // seqlen
    if n == 0:
        raise PrunebenchError(f"{source} has only {len(ids)} tokens, less than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


class WindowOrder:
    """`count` or more window indices: seeded permutations of all windows, concatenated (epoch after
    epoch, one generator), built one epoch at a time. Holding the whole order would cost 8 bytes a
    window of the token budget (recovery.tokens=1e12 at 256 tokens: 31 GB); one epoch costs 8 bytes a
    window of the corpus, which is in memory anyway. Slices `order[k : k + b]` may cross an epoch."""

    def __init__(self, n_windows: int, count: int, seed: int):
        self.n, self.seed = n_windows, seed
        self.epochs = math.ceil(count / n_windows)
        self._reset()

    def _reset(self) -> None:
        self._g = torch.Generator().manual_seed(self.seed)
        self._e, self._perm = -1, None

    def _epoch(self, e: int) -> torch.Tensor:
        if e < self._e:  # a resume that went back: replay the generator from the start
            self._reset()
        while self._e < e:
            self._perm, self._e = torch.randperm(self.n, generator=self._g), self._e + 1
        return self._perm

    def __len__(self) -> int:
        return self.epochs * self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("WindowOrder takes contiguous slices only")
            parts, k = [], start
            while k < stop:
                e, i = divmod(k, self.n)
                take = min(stop - k, self.n - i)
                parts.append(self._epoch(e)[i : i + take])
                k += take
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        e, i = divmod(int(index) % len(self), self.n)
        return self._epoch(e)[i]


def window_order(n_windows: int, count: int, seed: int) -> WindowOrder:
    """The seeded window order of a training run (see WindowOrder)."""
    return WindowOrder(n_windows, count, seed)


def lr_lambda(steps: int, warmup: float, decay: str = "linear", min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over `warmup` × steps, then linear or cosine decay to
    `min_ratio` (min_lr / lr)."""
    warm = max(1, int(warmup * steps))
    if decay == "linear":  # min_ratio 0: exactly the linear decay to 0 (0 + 1·x is x in floating point)
        return lambda s: min((s + 1) / warm, min_ratio + (1 - min_ratio) * max(0.0, (steps - s) / max(1, steps - warm)))

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


def accumulation(global_batch: int | None, grad_accum: int | None, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step. `recovery.global_batch` G, when set, fixes the windows of one
    optimiser step over all processes: grad_accum = G / (batch_size × world size), so the same G gives
    the same training on 1 or N processes. G must be a multiple of batch_size × world size; a
    grad_accum also given must agree with G (both stated is allowed, never contradictory); neither set
    means one micro-batch per step."""
    if global_batch is None:
        return 1 if grad_accum is None else grad_accum
    unit = batch_size * world_size
    procs = f"{world_size} process{'es' if world_size > 1 else ''}"
    if global_batch % unit:
        near = sorted({unit * max(1, global_batch // unit), unit * (global_batch // unit + 1)})
        raise PrunebenchError(
            f"recovery.global_batch={global_batch} is not a multiple of recovery.batch_size={batch_size} × {procs}"
            f" = {unit}; use recovery.global_batch={' or '.join(map(str, near))}, or another batch_size"
        )
    if grad_accum is not None and grad_accum != global_batch // unit:
        raise PrunebenchError(
            f"recovery.global_batch={global_batch} and recovery.grad_accum={grad_accum} disagree (batch_size"
            f" {batch_size} × grad_accum {grad_accum} × {procs} = {unit * grad_accum}); set only one of them"
        )
    return global_batch // unit


def check_sharded_checkpoints(engine: str, checkpoint_every: int | None) -> None:
    """Checkpoints hold the full, unsharded state that one process (or each DDP rank) has; an FSDP or
    ZeRO shard is not that, so periodic checkpoints are refused there (and SIGTERM saves nothing)."""
    if checkpoint_every is not None and engine != "ddp":
        raise PrunebenchError(
            f"recovery.checkpoint_every is not supported under recovery.engine={engine} yet (each rank holds a"
            " shard; checkpoints hold the full state, written under engine=ddp): use recovery.engine=ddp, or"
            " recovery.checkpoint_every=null"
        )


def checkpointing_on(model: nn.Module) -> bool:
    """Whether the model recomputes activations (transformers ≥ 5 names it is_activation_checkpointing)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool):
    """`recovery.gradient_checkpointing`: Hugging Face's activation checkpointing (each block's
    activations recomputed in the backward pass instead of stored) for the training only, switched off
    again afterwards. Non-reentrant torch.utils.checkpoint: gradients reach frozen-base adapters
    (LoRA) without input grads, and the recomputation replays the RNG, so dropout draws are unchanged."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PrunebenchError(
            f"recovery.gradient_checkpointing=true: {type(model).__name__} does not support gradient"
            " checkpointing; set recovery.gradient_checkpointing=false"
        )
    was, hooked = checkpointing_on(model), hasattr(model, "_require_grads_hook")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old names are deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if not was:
            off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            off()
            if not hooked and hasattr(model, "_require_grads_hook"):  # enable added it, disable leaves it
                model.disable_input_require_grads()


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
    log_every: int = 10,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    engine: Engine | None = None,
    checkpointer=None,
) -> list[list]:
    """`steps` optimiser steps; `loss_fn(step, micro)` returns the loss of one micro-batch. Each step
    accumulates `grad_accum` micro-batches, clips the gradient norm to `clip`, steps the optimiser
    and scheduler and re-applies the masks. `on_step(done)` runs after each step (held-out losses).
    Returns the loss curve [[step, loss], ...] every `log_every` steps and at the last one.

    `engine` (recovery/engine.py; the one-process Engine when not given): `model` and `opt` are the
    ones it prepared; it syncs gradients on the last micro-batch only, backpropagates (scaling an fp16
    loss), clips and steps, and the logged loss is its mean over ranks. `checkpointer`
    (recovery/resume.py): the loop starts from its newest checkpoint (resume), saves every
    `checkpoint_every` steps, and on SIGTERM (or submitit's preemption signal) finishes the current
    step, saves and stops; with several processes the ranks agree on stopping at the same step."""
    engine = engine if engine is not None else Engine()
    saving = checkpointer is not None and checkpointer.enabled
    start, curve = checkpointer.resume() if checkpointer is not None else (0, [])
    model.train()
    bar = progress(range(start, steps), desc=desc, unit="step", enabled=is_main())
    with resume.stop_signals(saving) as request:
        for step in bar:
            total = 0.0
            for micro in range(grad_accum):
                with engine.no_sync(model, micro == grad_accum - 1):
                    loss = loss_fn(step, micro)
                    engine.backward(loss / grad_accum if grad_accum > 1 else loss)
                total += float(loss.detach()) / grad_accum
            total = engine.mean(total)
            engine.step(model, opt, clip)
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
            if saving:
                checkpointer.periodic(step + 1, steps, curve)
                if engine.agree(request.signum is not None):  # every rank stops after the same step
                    request.signum = request.signum or signal.SIGTERM
                    checkpointer.stop(step + 1, curve, request)
    model.eval()
    return curve
