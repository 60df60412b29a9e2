"""Knowledge-distillation recovery of a pruned causal LM: Minitron's retraining (arXiv 2407.14679,
§3.4): L = clm_weight · L_CLM + L_logit + α · L_is with α = L_logit / L_is, logit-only forward KL at
τ = 1 by default (the paper's best setting). The loss math is `distill.py`; the loop is `train.py`.

Teacher: the unpruned model (the pipeline deep-copies it before pruning), or `teacher:` a model
config name from conf/model or a saved Hugging Face folder, loaded here once on the student's device.
Training text: `tokens` tokens of `source` (never an evaluation split) in `seqlen` windows, seeded
order; AdamW, linear warm-up then cosine decay to `min_lr`, gradient clipping, `grad_accum`
micro-batches per step, autocast for bf16/fp16; pruned weights stay zero (`keep_masks`).
Reported, as Minitron's Table 1: the distillation loss (KL to the teacher) and the LM loss on
held-out windows of `val_source`, before → after, plus the loss curve.

    recovery: {_target_: prunebench.recovery.kd.KD, loss: kld, temperature: 1.0, tokens: 65536, seqlen: 256}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import torch
from omegaconf import OmegaConf
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, knobs
from prunebench.knobs import LR, Batch, Flag, Fraction, HeldOut, Seed, TrainPositions
from prunebench.memory import Plan
from prunebench.placement import compute_device
from prunebench.recovery import corpus
from prunebench.recovery.distill import DistillLoss, check_knobs, clm_loss, distill_step, logit_loss
from prunebench.recovery.engine import check_engine, describe, fp32_masters, make_engine, world, write_back
from prunebench.recovery.resume import Checkpointer
from prunebench.recovery.train import (
    PRECISIONS,
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
    autocast,
    check_sharded_checkpoints,
    check_source,
    fit,
    gradient_checkpointing,
    text_windows,
    window_order,
)

log = logging.getLogger(__name__)


class KD:
    needs_lm = "KD distils next-token logits"  # an encoder is refused before loading (config.validate)

    def __init__(
        self,
        name: str = "kd",
        loss: str = "kld",
        temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0,
        topk: Annotated[int | None, Field(ge=1)] = None,
        clm_weight: Annotated[float, Field(ge=0.0)] = 0.0,
        intermediate: dict | None = None,
        teacher: str | None = None,
        tokens: Annotated[int, Field(ge=0, le=10**12)] = 65536,
        seqlen: TrainPositions = 256,
        batch_size: Batch = 1,
        grad_accum: GradAccum = None,
        lr: LR = 1e-4,
        min_lr: Fraction = 1e-5,
        warmup: Fraction = 0.05,
        weight_decay: Annotated[float, Field(ge=0.0)] = 0.0,
        clip: Annotated[float | None, Field(gt=0.0)] = 1.0,
        precision: str = "fp32",
        source: str = "c4",
        val_source: str = "wikitext2_valid",
        val_windows: HeldOut = 16,
        log_every: Annotated[int, Field(ge=1)] = 10,
        keep_masks: Flag = True,
        chunk: Annotated[int | None, Field(ge=1)] = None,
        seed: Seed = 0,
        engine: EngineName = "ddp",
        text_field: TextField = "text",
        source_config: str | None = None,  # recovery.source=hf:<id>: its config, split (null = train), streaming
        source_split: str | None = None,
        streaming: Flag = False,
        checkpoint_every: CheckpointEvery = None,
        keep_checkpoints: KeepCheckpoints = 2,
        resume: Resume = "auto",
        gradient_checkpointing: Flag = False,
        global_batch: GlobalBatch = None,
        allow_overlap: Flag = False,
    ):
        knobs.check_args(KD, "recovery", {k: v for k, v in locals().items() if k in TRAINING_KNOBS})
        check_engine(engine, precision)
        check_sharded_checkpoints(engine, checkpoint_every)
        _, world_size = world()
        check_knobs(loss, temperature, topk, clm_weight, intermediate)
        for knob, value in (
            ("seqlen", seqlen),
            ("batch_size", batch_size),
            ("val_windows", val_windows),
            ("log_every", log_every),
        ):
            if not isinstance(value, int) or value < 1:
                raise PrunebenchError(f"recovery.{knob}={value} must be a positive integer")
        grad_accum = accumulation(global_batch, grad_accum, batch_size, world_size)
        step_tokens = seqlen * batch_size * grad_accum * world_size
        if not isinstance(tokens, int) or tokens < step_tokens:
            raise PrunebenchError(
                f"recovery.tokens={tokens} is less than one optimiser step of {step_tokens} tokens"
                f" (seqlen × batch_size × grad_accum × {world_size} processes); raise recovery.tokens"
            )
        if lr <= 0 or not 0 <= min_lr <= lr:
            raise PrunebenchError(f"recovery.lr={lr}, recovery.min_lr={min_lr}: need lr > 0 and 0 ≤ min_lr ≤ lr")
        if not 0 <= warmup < 1:
            raise PrunebenchError(f"recovery.warmup={warmup} is a fraction of the steps in [0, 1)")
        if clip is not None and clip <= 0:
            raise PrunebenchError(f"recovery.clip={clip} must be > 0 or null (no clipping)")
        if precision not in PRECISIONS:
            raise PrunebenchError(f"recovery.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise PrunebenchError(f"recovery.chunk={chunk} must be a positive number of tokens or null")
        self.hub = {"source_config": source_config, "source_split": source_split, "streaming": streaming}
        check_source(source, "recovery.source", text_field, **self.hub)
        check_source(val_source, "recovery.val_source")  # model selection on the test split would leak too
        if val_source == source:
            raise PrunebenchError(
                f"recovery.val_source={val_source} is the training source; held-out text must differ"
                " (use recovery.val_source=wikitext2_valid with source=c4)"
            )
        corpus.contamination(source, text_field, val_source, allow_overlap)  # 13-grams vs WikiText-2 test, held-out
        if teacher is not None:
            _teacher_cfg(teacher)  # exists? (cheap: composes a config or checks a folder)
        self.loss = DistillLoss(loss, temperature, topk, clm_weight, intermediate, chunk)
        self.name, self.kind, self.teacher = name, loss, teacher
        self.tokens, self.seqlen, self.batch_size, self.grad_accum = tokens, seqlen, batch_size, grad_accum
        self.lr, self.min_lr, self.warmup, self.weight_decay, self.clip = lr, min_lr, warmup, weight_decay, clip
        self.precision, self.source, self.val_source, self.val_windows = precision, source, val_source, val_windows
        self.log_every, self.keep_masks, self.seed = log_every, keep_masks, seed
        self.engine, self.text_field = engine, text_field
        self.checkpoint_every, self.keep_checkpoints, self.resume = checkpoint_every, keep_checkpoints, resume
        self.gradient_checkpointing, self.global_batch = gradient_checkpointing, global_batch
        self.run_dir = None  # set by the pipeline: where checkpoints live (none: no checkpoints)
        self.steps = tokens // step_tokens
        self.tokenizer = None

    def fingerprint(self) -> dict:
        """The knobs a checkpoint's training depends on: resuming under other values is refused."""
        keys = ("teacher", "tokens", "seqlen", "batch_size", "grad_accum", "lr", "min_lr", "warmup",
                "weight_decay", "clip", "precision", "source", "text_field", "seed", "keep_masks", "steps")  # fmt: skip
        loss = {k: getattr(self.loss, k) for k in ("temperature", "topk", "clm_weight", "intermediate")}
        return {
            "loss": self.kind,
            **{k: getattr(self, k) for k in keys},
            **loss,
            **self.hub,
            "world_size": world()[1],
            "corpus": (corpus.digest(self.source) or {}).get("sha256"),
        }  # an edited corpus

    @property
    def needs_teacher(self) -> bool:
        """The pipeline copies the unpruned model only when no teacher is configured."""
        return self.teacher is None

    def training_bytes(self, shape: dict, elt: int) -> int:
        """fp32 gradients and AdamW's two fp32 moments of every weight, plus the fp32 masters' extra
        4 − elt bytes of a half-precision model (engine.fp32_masters); activations apart."""
        return (3 * 4 + 4 - elt) * int(shape["params"])

    # -- held-out losses -----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, student: nn.Module, teacher: nn.Module, windows: torch.Tensor) -> dict[str, float]:
        """Forward KL(teacher ‖ student) per token (τ = 1, no truncation: Minitron's distillation
        loss) and the student's next-token cross-entropy, averaged over the held-out windows."""
        device = compute_device(student)
        was_training = student.training
        student.eval()
        kd = lm = 0.0
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i : i + self.batch_size].to(device)
            with autocast(device, self.precision):
                s, t = (m(input_ids=batch, use_cache=False).logits for m in (student, teacher))
            n = len(batch)
            kd += float(logit_loss(s, t, "kld", chunk=self.loss.chunk)) * n
            lm += float(clm_loss(s, batch)) * n
        student.train(was_training)
        return {"kd": round(kd / len(windows), 5), "lm": round(lm / len(windows), 5)}

    # -- training ------------------------------------------------------------------------------
    def train(self, model: nn.Module, teacher: nn.Module, checkpoints: list[int] | tuple = ()) -> dict:
        """Distil `teacher` into `model` in place. `checkpoints`: optimiser-step counts at which the
        held-out losses are also measured (returned under "checkpoints")."""
        if self.tokenizer is None:
            raise PrunebenchError("kd needs the tokenizer (set by the pipeline)")
        if bad := [c for c in checkpoints if not 1 <= c <= self.steps]:
            raise PrunebenchError(f"checkpoints {bad} are outside 1..{self.steps} steps")
        device = compute_device(model)
        teacher.eval().requires_grad_(False)
        torch.manual_seed(self.seed)
        windows = text_windows(
            self.tokenizer, self.source, self.seqlen, self.text_field, tokens=self.tokens, **self.hub
        )
        val = text_windows(self.tokenizer, self.val_source, self.seqlen)[: self.val_windows]
        engine = make_engine(self.engine, self.precision, self.batch_size, self.grad_accum, device)
        per_step = engine.global_batch if engine is not None else self.batch_size * self.grad_accum
        order = window_order(len(windows), self.steps * per_step, self.seed)

        start = time.perf_counter()
        before = self.validate(model, teacher, val)
        val_seconds = time.perf_counter() - start

        extra = self.loss.setup_projection(model.config.hidden_size, teacher.config.hidden_size, device)
        if extra and engine is not None:
            raise PrunebenchError(
                "recovery.intermediate with a projection (student and teacher widths differ) runs in one process"
                " only: the projection is outside the engine's wrapped model"
            )
        upcast = fp32_masters(model)  # a bf16/fp16 student trains on fp32 masters, written back below
        params = [p for p in model.parameters() if p.requires_grad] + extra
        opt, sched = adamw(params, self.lr, self.weight_decay, self.steps, self.warmup, "cosine", self.min_lr)
        bare, student = model, model
        if engine is not None:
            student, opt = engine.prepare(model, opt)
            bare = engine.unwrap(student)  # what trains: `model` itself, or FSDP's sharded copy of it
        keep = MaskKeeper(bare, self.keep_masks)
        fp16_alone = self.precision == "fp16" and engine is None  # an engine scales the loss itself
        scaler = torch.amp.GradScaler(device.type) if fp16_alone else None
        ctx = autocast(device, self.precision)
        last: dict = {}

        def loss_fn(step: int, micro: int) -> torch.Tensor:
            k = engine.index(step, micro) if engine is not None else step * per_step + micro * self.batch_size
            batch = windows[order[k : k + self.batch_size]].to(device)
            parts = distill_step(student, teacher, {"input_ids": batch}, self.loss, ctx)
            last.update({name: v for name, v in parts.items() if name != "loss"})
            return parts["loss"]

        marks, wanted = [], set(checkpoints) - {self.steps}
        val_time = [0.0]
        saver = Checkpointer.of(
            self, bare, opt, sched, len(windows), per_step, engine,
            # DDP + fp16: accelerate's own GradScaler, so the loss scale survives a resume too
            scaler=scaler if engine is None else getattr(engine.accelerator, "scaler", None),
            extra=self.loss.projection,
        )  # fmt: skip

        def on_step(done: int) -> None:
            if done in wanted:
                t0 = time.perf_counter()
                marks.append(
                    {"step": done, "tokens": done * per_step * self.seqlen, **self.validate(bare, teacher, val)}
                )
                val_time[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        with gradient_checkpointing(bare, self.gradient_checkpointing):
            curve = fit(
                student,
                self.steps,
                loss_fn,
                opt,
                sched,
                grad_accum=self.grad_accum,
                clip=self.clip,
                keep=keep,
                scaler=scaler,
                log_every=self.log_every,
                desc=f"kd ({self.kind})",
                on_step=on_step,
                engine=engine,
                checkpointer=saver,
            )
        seconds = time.perf_counter() - t0 - val_time[0]
        if engine is not None:
            engine.finish(model)  # FSDP: the trained full weights back into `model`, on every rank
        write_back(model, upcast)
        t1 = time.perf_counter()
        after = self.validate(model, teacher, val)
        val_seconds += val_time[0] + time.perf_counter() - t1
        tokens = self.steps * per_step * self.seqlen
        if self.steps in set(checkpoints):
            marks.append({"step": self.steps, "tokens": tokens, **after})
        out = {
            "name": self.name,
            "loss": self.kind,
            "temperature": self.loss.temperature,
            "topk": self.loss.topk,
            "clm_weight": self.loss.clm_weight,
            "intermediate": self.loss.intermediate,
            "teacher": self.teacher or "unpruned model (copied before pruning)",
            "source": self.source,
            "source_digest": corpus.digest(self.source),
            "overlap": corpus.overlap_of(self.source),
            "val": {"source": self.val_source, "windows": len(val), "seqlen": self.seqlen},
            "distillation_loss": {"before": before["kd"], "after": after["kd"]},
            "lm_val_loss": {"before": before["lm"], "after": after["lm"]},
            "loss_curve": curve,
            "tokens": tokens,
            "steps": self.steps,
            "seconds": round(seconds, 2),
            "val_seconds": round(val_seconds, 2),
            "precision": self.precision,
            **describe(engine, self.batch_size, self.grad_accum, self.engine),
            "kept_masks": self.keep_masks,
            "resumed_from_step": saver.resumed_from,
            "gradient_checkpointing": self.gradient_checkpointing,
            "last_step": {k: round(v, 5) for k, v in last.items()},
            "metrics": {"kd_val_before": before["kd"], "kd_val_after": after["kd"], "lm_val_loss": after["lm"]},
        }
        if checkpoints:
            out["checkpoints"] = sorted(marks, key=lambda m: m["step"])
        return out

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
