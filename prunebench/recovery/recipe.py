"""One training recipe for the recoveries that train a causal LM on a token budget: `kd` (logit
distillation, Minitron arXiv 2407.14679), `lm_finetune` (next-token loss, LaCo's post-training arXiv
2402.11187) and `lora` (either loss on low-rank adapters, LLM-Pruner arXiv 2305.11627). As the Hugging
Face Trainer's `compute_loss` (and torchtune's recipes), a recovery states only what differs:

- `compute_loss(student, teacher, batch, ctx)`: the loss of one micro-batch;
- `trained(model, teacher, device)`: the parameters it trains (the whole student, KD's projection
  beside it, LoRA's adapters), and `after(model, ...)`: what it does with them once trained (LoRA's merge);
- `report(...)`: its own entries of metrics.json.

Everything else is here, once: the training knobs (declared on `Recipe.__init__`, the YAML side in
conf/recovery/_train.yaml), the windows of `source` in a seeded order, one engine for one or many
processes (recovery/engine.py), AdamW with warm-up and linear or cosine decay, pruned weights held at
zero, fp32 masters for a half-precision student, checkpoints and resume (recovery/resume.py), the one
loop (`train.fit`) and one held-out evaluation (next-token cross-entropy, and with a teacher the
forward KL to it, on `val_windows` windows of `val_source`, before and after).

    recovery: {_target_: prunebench.recovery.kd.KD, tokens: 65536, seqlen: 256, lr: 1.0e-4, decay: cosine}
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.knobs import LR, Batch, Flag, Fraction, HeldOut, Seed, TrainPositions
from prunebench.placement import GiB, compute_device, free_bytes
from prunebench.recovery import corpus, resume
from prunebench.recovery.distill import clm_loss, logit_loss
from prunebench.recovery.engine import ENGINES, check_engine, fp32_masters, make_engine, world, write_back
from prunebench.recovery.train import (
    MaskKeeper,
    accumulation,
    adamw,
    autocast,
    check_sharded_checkpoints,
    check_source,
    fit,
    gradient_checkpointing,
    text_windows,
    window_order,
)

# The training knobs, each declared once (prunebench/knobs.py reads these annotations).
Tokens = Annotated[int, Field(ge=0, le=10**12, description="the token budget of the whole job")]
GradAccum = Annotated[int | None, Field(ge=1, le=65536, description="micro-batches per optimiser step")]
GlobalBatch = Annotated[int | None, Field(ge=1, le=2**24, description="windows per optimiser step, all processes")]
Decay = Literal["linear", "cosine"]
Precision = Literal["fp32", "bf16", "fp16"]
EngineName = Literal[ENGINES]
TextField = Annotated[str, Field(min_length=1)]
CheckpointEvery = Annotated[int | None, Field(ge=1, le=10**9)]
KeepCheckpoints = Annotated[int, Field(ge=1, le=1000, description="each checkpoint holds the weights and optimiser")]
Resume = Literal[resume.RESUME]
INT64 = 8  # bytes of one token id, and of one window index, in memory


class Recipe:
    """The training recipe (module docstring). A subclass sets `DEFAULTS` for the knobs whose default
    it changes (its YAML states the same values; tests/test_configs.py compares them), `adapters`
    when it trains only parameters it adds (checkpoints then hold only those), and `desc`."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    adapters: ClassVar[bool] = False
    needs_teacher = False

    def __init__(
        self,
        *,
        name: str,
        tokens: Tokens = 65536,
        seqlen: TrainPositions = 256,
        batch_size: Batch = 1,
        grad_accum: GradAccum = None,
        global_batch: GlobalBatch = None,
        lr: LR = 1e-4,
        min_lr: Fraction = 0.0,
        decay: Decay = "linear",
        warmup: Fraction = 0.05,
        weight_decay: Annotated[float, Field(ge=0.0)] = 0.0,
        clip: Annotated[float | None, Field(gt=0.0)] = 1.0,
        precision: Precision = "fp32",
        source: str = "c4",
        text_field: TextField = "text",
        source_config: str | None = None,  # recovery.source=hf:<id>: its config, split (null = train), streaming
        source_split: str | None = None,
        streaming: Flag = False,
        val_source: str = "wikitext2_valid",
        val_windows: HeldOut = 16,
        log_every: Annotated[int, Field(ge=1)] = 10,
        keep_masks: Flag = True,
        seed: Seed = 0,
        engine: EngineName = "ddp",
        checkpoint_every: CheckpointEvery = None,
        keep_checkpoints: KeepCheckpoints = 2,
        resume: Resume = "auto",
        gradient_checkpointing: Flag = False,
        allow_overlap: Flag = False,
    ):
        from prunebench import knobs

        # built in code too (tests, Minitron's search): the declarations checked here as config.validate does,
        # but for `tokens`, whose bound is a run's; the search probes the other knobs with an unbounded budget
        given = {k: v for k, v in locals().items() if k not in ("self", "knobs", "tokens")}
        knobs.check_args(Recipe, "recovery", given)
        check_engine(engine, precision)
        check_sharded_checkpoints(engine, checkpoint_every)
        world_size = world()[1]
        self.grad_accum = accumulation(global_batch, grad_accum, batch_size, world_size)
        step_tokens = seqlen * batch_size * self.grad_accum * world_size
        if tokens < step_tokens:
            raise PrunebenchError(
                f"recovery.tokens={tokens} is less than one optimiser step of {step_tokens} tokens"
                f" (seqlen × batch_size × grad_accum × {world_size} processes); raise recovery.tokens"
            )
        if min_lr > lr:
            raise PrunebenchError(f"recovery.min_lr={min_lr} is above recovery.lr={lr}; the decay ends at min_lr")
        if warmup >= 1:
            raise PrunebenchError(f"recovery.warmup={warmup} is a fraction of the steps in [0, 1)")
        self.hub = {"source_config": source_config, "source_split": source_split, "streaming": streaming}
        check_source(source, "recovery.source", text_field, **self.hub)
        check_source(val_source, "recovery.val_source")  # model selection on the test split would leak too
        if val_windows and val_source == source:
            raise PrunebenchError(
                f"recovery.val_source={val_source} is the training source; held-out text must differ"
                " (use recovery.val_source=wikitext2_valid with source=c4)"
            )
        corpus.contamination(source, text_field, val_source if val_windows else None, allow_overlap)  # 13-grams
        self.name, self.tokens, self.seqlen, self.batch_size = name, tokens, seqlen, batch_size
        self.lr, self.min_lr, self.decay, self.warmup = lr, min_lr, decay, warmup
        self.weight_decay, self.clip, self.precision = weight_decay, clip, precision
        self.source, self.text_field, self.val_source, self.val_windows = source, text_field, val_source, val_windows
        self.log_every, self.keep_masks, self.seed, self.engine = log_every, keep_masks, seed, engine
        self.checkpoint_every, self.keep_checkpoints, self.resume = checkpoint_every, keep_checkpoints, resume
        self.gradient_checkpointing = gradient_checkpointing
        self.steps = tokens // step_tokens
        self._check_data_fits()
        self.run_dir = None  # set by the pipeline: where checkpoints live (none: no checkpoints)
        self.tokenizer = None

    @property
    def desc(self) -> str:
        """The progress bar's label."""
        return self.name

    # -- what a recovery states (overridden) ----------------------------------------------------
    def compute_loss(self, student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, ctx) -> dict:
        """{"loss": the micro-batch's loss, ...: parts to report}: the next-token cross-entropy."""
        with ctx:
            return {"loss": student(input_ids=batch, labels=batch, use_cache=False).loss}

    def trained(self, model: nn.Module, teacher: nn.Module | None, device) -> tuple[list, nn.Module | None]:
        """(parameters to train, a trained module outside the model or None): every weight that
        requires grad."""
        return [p for p in model.parameters() if p.requires_grad], None

    def after(self, model: nn.Module) -> dict:
        """Once trained (weights written back): anything left to do to the model; its report."""
        return {}

    def report(self, before: dict, after: dict) -> dict:
        """The recovery's own entries of the result (metrics.json `recovery`)."""
        return {}

    def own_fingerprint(self) -> dict:
        """The recovery's own knobs that a checkpoint's training depends on."""
        return {}

    def held_out_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        """The teacher the held-out KL is measured against (None: the cross-entropy only)."""
        return teacher

    # -- shared ---------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """The knobs a checkpoint's training depends on: resuming under other values is refused."""
        keys = ("tokens", "seqlen", "batch_size", "grad_accum", "lr", "min_lr", "decay", "warmup", "weight_decay",
                "clip", "precision", "source", "text_field", "seed", "keep_masks", "steps")  # fmt: skip
        return {
            **{k: getattr(self, k) for k in keys},
            **self.own_fingerprint(),
            **self.hub,
            "world_size": world()[1],
            "corpus": (corpus.digest(self.source) or {}).get("sha256"),  # an edited corpus
        }

    def training_bytes(self, shape: dict, elt: int) -> int:
        """The memory plan's training state on the device (memory.py): fp32 gradients and AdamW's two
        fp32 moments of every weight, plus the fp32 masters' extra 4 − elt bytes of a half-precision
        model (engine.fp32_masters); activations apart. The training data is not here: it stays in host
        memory on every device (one micro-batch at a time is copied over), and `data_bytes` counts it."""
        return (3 * 4 + 4 - elt) * int(shape["params"])

    def data_bytes(self) -> int:
        """The corpus held in memory while training: its token ids (int64), the text it was tokenized
        from while that happens, and one epoch of the seeded window order (int64 a window). A streamed
        Hub split is read up to the token budget (`recovery.tokens`); a loaded one is not known before
        reading (not counted); files are estimated from their sizes (estimate_corpus)."""
        if corpus.is_hub(self.source):
            ids, text = (self.tokens, 4 * self.tokens) if self.hub["streaming"] else (0, 0)
        else:
            ids, text = estimate_corpus(self.source, self.text_field)
        return INT64 * ids + text + INT64 * (ids // self.seqlen)

    def _check_data_fits(self) -> None:
        """The training data lives in host memory whatever the device (batches are copied to it one at a
        time): a corpus that cannot be held stops here, before anything loads (config.validate builds
        the recovery just before the memory plan), in one line naming it. The plan adds it only where
        the host is the device (a CPU run): on a GPU the corpus never fills the GPU's memory."""
        need, free = self.data_bytes(), free_bytes(torch.device("cpu"))
        if need > free:
            raise PrunebenchError(
                f"recovery.source={self.source}: training holds ~{need / GiB:.1f} GiB of it in memory (token ids as"
                f" int64, one epoch of the window order), {free / GiB:.1f} GiB free; use a smaller corpus, or"
                " hf:<id> with recovery.streaming=true and a smaller recovery.tokens"
            )

    @torch.no_grad()
    def validate(self, student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor) -> dict[str, float]:
        """The held-out losses per token: the student's next-token cross-entropy ("lm") and, with a
        teacher, the forward KL(teacher ‖ student) at τ = 1 over the full vocabulary ("kd", Minitron's
        distillation loss), averaged over `windows`; {} without windows."""
        if not len(windows):
            return {}
        device, was_training = compute_device(student), student.training
        student.eval()
        kd = lm = 0.0
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i : i + self.batch_size].to(device)
            with autocast(device, self.precision):
                s = student(input_ids=batch, use_cache=False).logits
                t = teacher(input_ids=batch, use_cache=False).logits if teacher is not None else None
            if t is not None:
                kd += float(logit_loss(s, t, "kld", chunk=getattr(self, "chunk", None))) * len(batch)
            lm += float(clm_loss(s, batch)) * len(batch)
        student.train(was_training)
        out = {"lm": round(lm / len(windows), 5)}
        return {"kd": round(kd / len(windows), 5), **out} if teacher is not None else out

    def held_out(self) -> torch.Tensor:
        if not self.val_windows:
            return torch.zeros(0, self.seqlen, dtype=torch.long)
        return text_windows(self.tokenizer, self.val_source, self.seqlen)[: self.val_windows]

    def train(self, model: nn.Module, teacher: nn.Module | None = None, checkpoints: list[int] | tuple = ()) -> dict:
        """Train `model` in place for `steps` optimiser steps. `checkpoints`: optimiser-step counts at
        which the held-out losses are also measured (returned under "checkpoints")."""
        if self.tokenizer is None:
            raise PrunebenchError(f"{self.name} needs the tokenizer (set by the pipeline)")
        if bad := [c for c in checkpoints if not 1 <= c <= self.steps]:
            raise PrunebenchError(f"checkpoints {bad} are outside 1..{self.steps} steps")
        device = compute_device(model)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        torch.manual_seed(self.seed)  # initialisations (LoRA's A) and dropout
        windows = text_windows(
            self.tokenizer, self.source, self.seqlen, self.text_field, tokens=self.tokens, **self.hub
        )
        val, judge = self.held_out(), self.held_out_teacher(teacher)
        engine = make_engine(self.engine, self.precision, self.batch_size, self.grad_accum, device)
        order = window_order(len(windows), self.steps * engine.global_batch, self.seed)
        t0 = time.perf_counter()
        before = self.validate(model, judge, val)
        val_seconds = time.perf_counter() - t0

        params, extra = self.trained(model, teacher, device)
        if extra is not None and engine.world > 1:
            raise PrunebenchError(
                f"recovery={self.name}: a trained module outside the model (a projection between student and"
                " teacher widths) runs in one process only"
            )
        upcast = fp32_masters(model)  # a bf16/fp16 student trains on fp32 masters, written back below
        opt, sched = adamw(params, self.lr, self.weight_decay, self.steps, self.warmup, self.decay, self.min_lr)
        student, opt = engine.prepare(model, opt)
        bare = engine.unwrap(student)  # what trains: `model` itself, or FSDP's sharded copy of it
        engine.rank_streams(self.seed)  # several processes: each rank its own dropout stream
        keep = MaskKeeper(bare, self.keep_masks and not self.adapters)  # adapters leave the base untouched
        saver = resume.Checkpointer.of(self, bare, opt, sched, len(windows), engine.global_batch, engine,
                                       scaler=engine.scaler, extra=extra, trainable_only=self.adapters)  # fmt: skip
        ctx, last, marks, val_time = autocast(device, self.precision), {}, [], [0.0]
        wanted = set(checkpoints) - {self.steps}

        def loss_fn(step: int, micro: int) -> torch.Tensor:
            k = engine.index(step, micro)
            parts = self.compute_loss(student, teacher, windows[order[k : k + self.batch_size]].to(device), ctx)
            last.update({name: v for name, v in parts.items() if name != "loss"})
            return parts["loss"]

        def on_step(done: int) -> None:
            if done in wanted:
                t1 = time.perf_counter()
                marks.append({"step": done, "tokens": done * engine.global_batch * self.seqlen,
                              **self.validate(bare, judge, val)})  # fmt: skip
                val_time[0] += time.perf_counter() - t1

        t0 = time.perf_counter()
        with gradient_checkpointing(bare, self.gradient_checkpointing):
            curve = fit(student, self.steps, loss_fn, opt, sched, grad_accum=self.grad_accum, clip=self.clip,
                        keep=keep, log_every=self.log_every, desc=self.desc, on_step=on_step, engine=engine,
                        checkpointer=saver)  # fmt: skip
        engine.finish(model)  # FSDP: the trained full weights back into `model`, on every rank
        write_back(model, upcast)
        seconds = time.perf_counter() - t0 - val_time[0]
        done = self.after(model)
        t1 = time.perf_counter()
        after = self.validate(model, judge, val)
        val_seconds += val_time[0] + time.perf_counter() - t1
        tokens = self.steps * engine.global_batch * self.seqlen
        out = {
            "name": self.name,
            "source": self.source,
            "source_digest": corpus.digest(self.source),
            "overlap": corpus.overlap_of(self.source),
            **({"val": {"source": self.val_source, "windows": len(val), "seqlen": self.seqlen}} if len(val) else {}),
            "loss_first": curve[0][1],
            "loss_last": curve[-1][1],
            "loss_curve": curve,
            "steps": self.steps,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "val_seconds": round(val_seconds, 2),
            "precision": self.precision,
            "decay": self.decay,
            **engine.describe(),
            "kept_masks": self.keep_masks,
            "resumed_from_step": saver.resumed_from,
            "gradient_checkpointing": self.gradient_checkpointing,
            **({"last_step": {k: round(float(v), 5) for k, v in last.items()}} if last else {}),
            **done,
            **self.report(before, after),
        }
        if checkpoints:
            if self.steps in set(checkpoints):
                marks.append({"step": self.steps, "tokens": tokens, **after})
            out["checkpoints"] = sorted(marks, key=lambda m: m["step"])
        return out

    def __call__(self, model: nn.Module, teacher: nn.Module | None = None, data=None) -> dict:
        return self.train(model, teacher)


def estimate_corpus(source: str, text_field: str = "text") -> tuple[int, int]:
    """(token ids, bytes of text) a local source will hold in memory, from file sizes before reading:
    the memory plan's view of the corpus. Token files hold ids of 2 bytes or more (.bin: uint16 or
    wider, .npy: its header's count); text is counted as one token per 2 bytes (BPE tokenizers
    average 3-4.5 bytes a token on English text; 2 leaves room for other scripts), and its bytes
    too, held while it is tokenized. A built-in name is its data-root file."""
    if corpus.is_hub(source):
        return 0, 0
    if corpus.is_path(source):
        found, what = corpus.checked(source, text_field, "recovery.source")
    else:
        from prunebench.data.text import LOCAL, find

        path = find(LOCAL[source]) if source in LOCAL else None
        found, what = ([path] if path is not None else []), "text"
    ids = text = 0
    for f in found:
        size = f.stat().st_size
        if f.suffix == ".npy":
            import numpy as np

            ids += int(np.load(f, mmap_mode="r", allow_pickle=False).size)
        elif f.suffix == ".bin" or what == "ids":
            ids += size // 2
        else:
            ids, text = ids + size // 2, text + size
    return ids, text
