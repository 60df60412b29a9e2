"""Causal-LM continued training of a pruned model for a token budget: LaCo's post-training
(arXiv 2402.11187, §post-training), usable after any pruner.

Windows of `seqlen` consecutive tokens of the source text are drawn in a seeded order; AdamW with
linear warm-up and linear decay; one optimiser step per `batch_size` × `grad_accum` windows (or
`global_batch` over all processes) until `tokens` are consumed. Checkpoints, resume and SIGTERM as
`kd` (recovery/resume.py); `gradient_checkpointing` recomputes activations in the backward pass.
With `keep_masks: true` weights that were exactly zero before training (unstructured or N:M masks)
are held at zero after every step, so the sparsity survives recovery.

    recovery: {_target_: prunebench.recovery.lm_finetune.LMFinetune, source: c4, tokens: 65536, seqlen: 256}
"""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, knobs
from prunebench.knobs import LR, Batch, Flag, Fraction, Seed, TrainPositions
from prunebench.placement import compute_device
from prunebench.recovery import corpus
from prunebench.recovery.engine import check_engine, describe, make_engine, world
from prunebench.recovery.resume import Checkpointer
from prunebench.recovery.train import (
    TRAINING_KNOBS,
    CheckpointEvery,
    EngineName,
    GlobalBatch,
    GradAccum,
    KeepCheckpoints,
    MaskKeeper,
    Resume,
    TextField,
    accumulation,
    adamw,
    check_sharded_checkpoints,
    check_source,
    fit,
    gradient_checkpointing,
    text_windows,
    window_order,
)


class LMFinetune:
    needs_lm = "continued training on the next-token loss"  # encoders: refused before loading
    needs_teacher = False

    def training_bytes(self, shape: dict, elt: int) -> int:
        """Gradients and AdamW's two moments of every weight (the memory plan; activations apart)."""
        return 3 * int(shape["params"]) * elt

    def __init__(
        self,
        name: str = "lm_finetune",
        source: str = "c4",
        tokens: Annotated[int, Field(ge=0, le=10**12)] = 65536,
        seqlen: TrainPositions = 256,
        batch_size: Batch = 1,
        lr: LR = 2e-5,
        warmup: Fraction = 0.05,
        weight_decay: Annotated[float, Field(ge=0.0)] = 0.0,
        keep_masks: Flag = True,
        reprune: Flag = False,
        log_every: Annotated[int, Field(ge=1)] = 10,
        seed: Seed = 0,
        engine: EngineName = "ddp",
        text_field: TextField = "text",
        source_config: str | None = None,  # recovery.source=hf:<id>: its config, split (null = train), streaming
        source_split: str | None = None,
        streaming: Flag = False,
        grad_accum: GradAccum = None,
        global_batch: GlobalBatch = None,
        checkpoint_every: CheckpointEvery = None,
        keep_checkpoints: KeepCheckpoints = 2,
        resume: Resume = "auto",
        gradient_checkpointing: Flag = False,
        allow_overlap: Flag = False,
    ):
        knobs.check_args(LMFinetune, "recovery", {k: v for k, v in locals().items() if k in TRAINING_KNOBS})
        check_engine(engine)
        check_sharded_checkpoints(engine, checkpoint_every)
        grad_accum = accumulation(global_batch, grad_accum, batch_size, world()[1])
        step_tokens = seqlen * batch_size * grad_accum * world()[1]
        if tokens < step_tokens:
            raise PrunebenchError(
                f"recovery.tokens={tokens} is less than one optimiser step of {step_tokens} tokens"
                f" (seqlen × batch_size × grad_accum × {world()[1]} processes)"
            )
        self.hub = {"source_config": source_config, "source_split": source_split, "streaming": streaming}
        check_source(source, "recovery.source", text_field, **self.hub)
        corpus.contamination(source, text_field, None, allow_overlap)  # 13-gram overlap with WikiText-2 test
        self.name, self.source, self.tokens, self.seqlen, self.batch_size = name, source, tokens, seqlen, batch_size
        self.lr, self.warmup, self.weight_decay, self.keep_masks = lr, warmup, weight_decay, keep_masks
        self.reprune, self.log_every, self.seed, self.engine, self.text_field = (
            reprune,
            log_every,
            seed,
            engine,
            text_field,
        )
        self.grad_accum, self.global_batch = grad_accum, global_batch
        self.checkpoint_every, self.keep_checkpoints, self.resume = checkpoint_every, keep_checkpoints, resume
        self.gradient_checkpointing = gradient_checkpointing
        self.run_dir = None  # set by the pipeline: where checkpoints live (none: no checkpoints)
        self.tokenizer = None

    def fingerprint(self) -> dict:
        """The knobs a checkpoint's training depends on: resuming under other values is refused."""
        keys = ("source", "text_field", "tokens", "seqlen", "batch_size", "grad_accum", "lr", "warmup",
                "weight_decay", "keep_masks", "seed")  # fmt: skip
        return {
            **{k: getattr(self, k) for k in keys},
            **self.hub,
            "world_size": world()[1],
            "corpus": (corpus.digest(self.source) or {}).get("sha256"),
        }  # an edited corpus

    def __call__(self, model: nn.Module, teacher=None, data=None) -> dict:
        if self.tokenizer is None:
            raise PrunebenchError("lm_finetune needs the tokenizer (set by the pipeline)")
        windows = text_windows(
            self.tokenizer, self.source, self.seqlen, self.text_field, tokens=self.tokens, **self.hub
        )
        engine = make_engine(self.engine, "fp32", self.batch_size, self.grad_accum, compute_device(model))
        per_step = engine.global_batch if engine is not None else self.batch_size * self.grad_accum
        steps = self.tokens // (self.seqlen * per_step)
        order = window_order(len(windows), steps * per_step, self.seed)
        keep = MaskKeeper(model, self.keep_masks)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, sched = adamw(params, self.lr, self.weight_decay, steps, self.warmup, decay="linear")
        device = compute_device(model)
        student = bare = model
        if engine is not None:
            student, opt = engine.prepare(model, opt)
            bare = engine.unwrap(student)  # what trains: `model` itself, or FSDP's sharded copy of it
            keep = MaskKeeper(bare, self.keep_masks)  # FSDP trains a sharded copy
        saver = Checkpointer.of(self, bare, opt, sched, len(windows), per_step, engine)

        def loss_fn(step: int, micro: int):
            k = engine.index(step, micro) if engine is not None else step * per_step + micro * self.batch_size
            batch = windows[order[k : k + self.batch_size]].to(device)
            return student(input_ids=batch, labels=batch, use_cache=False).loss

        start = time.perf_counter()
        with gradient_checkpointing(bare, self.gradient_checkpointing):
            curve = fit(
                student,
                steps,
                loss_fn,
                opt,
                sched,
                grad_accum=self.grad_accum,
                keep=keep,
                log_every=self.log_every,
                desc="lm_finetune",
                engine=engine,
                checkpointer=saver,
            )
        if engine is not None:
            engine.finish(model)  # FSDP: the trained full weights back into `model`
        return {
            "steps": steps,
            "tokens": steps * per_step * self.seqlen,
            "loss_first": curve[0][1],
            "loss_last": curve[-1][1],
            "loss_curve": curve,
            "seconds": round(time.perf_counter() - start, 2),
            "kept_masks": self.keep_masks,
            "source": self.source,
            "source_digest": corpus.digest(self.source),
            "overlap": corpus.overlap_of(self.source),
            "resumed_from_step": saver.resumed_from,
            "gradient_checkpointing": self.gradient_checkpointing,
            **describe(engine, self.batch_size, self.grad_accum, self.engine),
        }
