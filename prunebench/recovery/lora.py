"""LoRA recovery of a pruned causal LM through PEFT: LLM-Pruner's cheap post-training (Ma et al., arXiv
2305.11627, §3.3) with low-rank adapters (Hu et al., arXiv 2106.09685). Usable after any pruner.

Each target linear W (frozen) gains a trainable low-rank path:  y = W x + (α / r) · B A dropout(x),
A ∈ R^{r×in} (random init), B ∈ R^{out×r} (zero init, so training starts from the pruned model).
Targets: every nn.Linear of the transformer blocks (`target_modules: null`; embeddings and the LM
head excluded), or the block linears whose name ends with one of `target_modules` (q_proj, ...).
Adapters are fp32 (PEFT upcasts them when the base is bf16/fp16) and live on each layer's device.

Objective: `clm` (next-token cross-entropy) or `kd` (the logit distillation loss of `distill.py`, from
the unpruned model the pipeline copies before pruning, as recovery=kd). The budget is `tokens`
tokens of `source` (never an evaluation split) in `seqlen` windows, seeded order, AdamW with linear
warm-up and decay, `batch_size` × `grad_accum` windows per step on each process (or `global_batch`
over all of them), as lm_finetune. Under several processes (torchrun, accelerate launch, SLURM) the
adapters train data-parallel (recovery/engine.py's DDP: each rank its own micro-batches of the same
seeded order, the adapters' gradients averaged; the frozen base is replicated and never all-reduced);
each rank draws its own dropout masks (seed + rank), so with dropout 0 two processes × 1 window equal
one process × 2 accumulated windows up to float summation order. FSDP is not offered: the adapters
are small and the frozen base needs no sharded optimiser state. Checkpoints hold the adapters (the
frozen base is rebuilt by the rerun), the optimiser, scheduler and every rank's RNG (dropout);
resume and SIGTERM as kd (recovery/resume.py).

After training, `merge`:
- `masked`: W' = (W + (α / r) B A) ⊙ M, M = the non-zero pattern of W before training, so
  unstructured and N:M sparsity survive (the part of the update that fell on pruned weights is
  dropped; its share of ‖(α / r) B A‖² is reported as `masked_delta_share`, with the block-linear
  sparsity before and after merging). Structured pruning (depth, Minitron's trimmed shapes) has no
  zeros to keep: the merge is a plain merge.
- `separate`: W stays as pruned; the adapter stays unmerged in the forward and is saved as a PEFT
  folder (`PeftModel.from_pretrained(base, folder)` loads it) to `adapter_dir`, by default
  `<run dir>/adapter` beside `<run dir>/model` when `save_model` is set. Without either, the adapter
  is evaluated but not written (the result says so).

    recovery: {_target_: prunebench.recovery.lora.LoRA, r: 8, alpha: 16, objective: clm, merge: masked, tokens: 65536}
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
from prunebench.cache import output_folder
from prunebench.knobs import LR, Batch, Flag, Fraction, HeldOut, Seed, TrainPositions
from prunebench.models.blocks import prunable_linears
from prunebench.placement import compute_device
from prunebench.recovery import corpus
from prunebench.recovery.distill import DistillLoss, check_knobs, clm_loss, distill_step, logit_loss
from prunebench.recovery.engine import describe, make_engine, world
from prunebench.recovery.resume import Checkpointer
from prunebench.recovery.train import (
    TRAINING_KNOBS,
    CheckpointEvery,
    GlobalBatch,
    GradAccum,
    KeepCheckpoints,
    Resume,
    TextField,
    accumulation,
    adamw,
    check_source,
    fit,
    gradient_checkpointing,
    text_windows,
    window_order,
)

log = logging.getLogger(__name__)

OBJECTIVES = ("clm", "kd")
MERGES = ("masked", "separate")


class LoRA:
    needs_lm = "LoRA trains on next-token logits"  # an encoder is refused before loading (config.validate)

    def __init__(
        self,
        name: str = "lora",
        r: Annotated[int, Field(ge=1, le=65536)] = 8,
        alpha: float = 16.0,
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05,
        target_modules: list[str] | None = None,
        objective: str = "clm",
        kd: dict | None = None,
        merge: str = "masked",
        adapter_dir: str | None = None,
        source: str = "c4",
        val_source: str = "wikitext2_valid",
        val_windows: HeldOut = 16,
        tokens: Annotated[int, Field(ge=0, le=10**12)] = 65536,
        seqlen: TrainPositions = 256,
        batch_size: Batch = 1,
        lr: LR = 1e-4,
        warmup: Fraction = 0.05,
        weight_decay: Annotated[float, Field(ge=0.0)] = 0.0,
        clip: Annotated[float | None, Field(gt=0.0)] = 1.0,
        log_every: Annotated[int, Field(ge=1)] = 10,
        seed: Seed = 0,
        text_field: TextField = "text",  # recovery.source as files: the field holding the text (recovery/corpus.py)
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
        knobs.check_args(LoRA, "recovery", {k: v for k, v in locals().items() if k in TRAINING_KNOBS})
        for knob, value in (("r", r), ("seqlen", seqlen), ("batch_size", batch_size), ("log_every", log_every)):
            if not isinstance(value, int) or value < 1:
                raise PrunebenchError(f"recovery.{knob}={value} must be a positive integer")
        if not isinstance(val_windows, int) or val_windows < 0:
            raise PrunebenchError(f"recovery.val_windows={val_windows} must be ≥ 0 (0: no held-out losses)")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise PrunebenchError(f"recovery.alpha={alpha} must be > 0 (the update is scaled by alpha / r)")
        if not 0 <= dropout < 1:
            raise PrunebenchError(f"recovery.dropout={dropout} must be in [0, 1)")
        if objective not in OBJECTIVES:
            raise PrunebenchError(f"recovery.objective={objective!r} must be clm or kd")
        if merge not in MERGES:
            raise PrunebenchError(f"recovery.merge={merge!r} must be masked (keep sparsity) or separate (keep adapter)")
        world_size = world()[1]
        grad_accum = accumulation(global_batch, grad_accum, batch_size, world_size)
        step_tokens = seqlen * batch_size * grad_accum * world_size
        if not isinstance(tokens, int) or tokens < step_tokens:
            raise PrunebenchError(
                f"recovery.tokens={tokens} is less than one step of {step_tokens} tokens"
                f" (seqlen × batch_size × grad_accum × {world_size} processes); raise recovery.tokens"
            )
        if lr <= 0 or not 0 <= warmup < 1:
            raise PrunebenchError(f"recovery.lr={lr}, recovery.warmup={warmup}: need lr > 0 and warmup in [0, 1)")
        if clip is not None and clip <= 0:
            raise PrunebenchError(f"recovery.clip={clip} must be > 0 or null (no clipping)")
        if target_modules is not None and (isinstance(target_modules, str) or not len(target_modules)):
            raise PrunebenchError(
                f"recovery.target_modules={target_modules!r} must be null (all block linears)"
                " or a list of names, e.g. [q_proj,v_proj]"
            )
        self.text_field = text_field
        self.hub = {"source_config": source_config, "source_split": source_split, "streaming": streaming}
        check_source(source, "recovery.source", text_field, **self.hub)
        check_source(val_source, "recovery.val_source")
        if adapter_dir and merge != "separate":  # merge=masked folds the adapter in: no folder to write
            raise PrunebenchError(
                f"recovery.adapter_dir={adapter_dir} is only used by recovery.merge=separate (merge={merge} folds"
                " the adapter into the weights); add recovery.merge=separate or drop recovery.adapter_dir"
            )
        if adapter_dir:  # relative: inside the run directory (never climbing out of it)
            output_folder(adapter_dir, "recovery.adapter_dir")
        if val_windows and val_source == source:
            raise PrunebenchError(
                f"recovery.val_source={val_source} is the training source; held-out text must differ"
                " (use recovery.val_source=wikitext2_valid with source=c4)"
            )
        corpus.contamination(source, text_field, val_source if val_windows else None, allow_overlap)  # 13-grams
        kd = dict(kd or {})
        if set(kd) - {"loss", "temperature", "topk", "clm_weight"}:
            extra = ", ".join(sorted(set(kd) - {"loss", "temperature", "topk", "clm_weight"}))
            raise PrunebenchError(
                f"recovery.kd has unknown keys ({extra}); it takes loss, temperature, topk, clm_weight"
            )
        kd = {"loss": "kld", "temperature": 1.0, "topk": None, "clm_weight": 0.0, **kd}
        check_knobs(kd["loss"], kd["temperature"], kd["topk"], kd["clm_weight"], None, prefix="recovery.kd.")
        self.name, self.r, self.alpha, self.dropout = name, r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.objective, self.kd, self.merge, self.adapter_dir = objective, kd, merge, adapter_dir
        self.source, self.val_source, self.val_windows = source, val_source, val_windows
        self.tokens, self.seqlen, self.batch_size = tokens, seqlen, batch_size
        self.lr, self.warmup, self.weight_decay, self.clip = lr, warmup, weight_decay, clip
        self.log_every, self.seed, self.text_field = log_every, seed, text_field
        self.grad_accum, self.global_batch = grad_accum, global_batch
        self.checkpoint_every, self.keep_checkpoints, self.resume = checkpoint_every, keep_checkpoints, resume
        self.gradient_checkpointing = gradient_checkpointing
        self.steps = tokens // step_tokens
        self.run_dir = None  # set by the pipeline: where checkpoints live (none: no checkpoints)
        self.tokenizer = None

    def fingerprint(self) -> dict:
        """The knobs a checkpoint's training depends on: resuming under other values is refused."""
        keys = ("r", "alpha", "dropout", "target_modules", "objective", "kd", "source", "text_field", "tokens",
                "seqlen", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "clip", "seed")  # fmt: skip
        return {
            **{k: getattr(self, k) for k in keys},
            **self.hub,
            "world_size": world()[1],
            "corpus": (corpus.digest(self.source) or {}).get("sha256"),
        }  # an edited corpus

    @property
    def needs_teacher(self) -> bool:
        """The pipeline copies the unpruned model only for the kd objective."""
        return self.objective == "kd"

    def training_bytes(self, shape: dict, elt: int) -> int:
        """fp32 adapters, their gradients and AdamW's two moments: r·(in + out) per adapted linear of
        every block (q, k, v, o ~ 8·hidden; gate, up, down 3·(hidden + ffn)), all linears assumed."""
        hidden, layers = int(shape["hidden"]), int(shape["layers"])
        ffn = int(shape.get("ffn") or 4 * hidden)
        return 4 * 4 * self.r * layers * (8 * hidden + 3 * (hidden + ffn))

    # -- targets -------------------------------------------------------------------------------
    def targets(self, model: nn.Module) -> list[str]:
        """Full module names of the block linears to adapt (PEFT matches them exactly, so the LM head
        and embeddings, which live outside the blocks, are never adapted)."""
        names = {id(m): n for n, m in model.named_modules()}
        linears = prunable_linears(model)  # 'i.self_attn.q_proj' -> Linear (trimmed shapes included)
        if self.target_modules is None:
            chosen = linears
        else:
            known = sorted({k.split(".", 1)[1] for k in linears})
            unknown = [t for t in self.target_modules if not any(k == t or k.endswith(f".{t}") for k in known)]
            if unknown:
                raise PrunebenchError(
                    f"recovery.target_modules {unknown} match no block linear; use null (all) or names among: "
                    + ", ".join(sorted({k.rsplit(".", 1)[-1] for k in known}))
                )
            chosen = {k: m for k, m in linears.items() if any(k.endswith(f".{t}") for t in self.target_modules)}
        return [names[id(m)] for m in chosen.values()]

    # -- held-out losses -----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor) -> dict[str, float]:
        """Next-token cross-entropy (and, with a teacher, forward KL to it) per token on held-out windows."""
        if not len(windows):
            return {}
        device, was_training = compute_device(model), model.training
        model.eval()
        lm = kd = 0.0
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i : i + self.batch_size].to(device)
            s = model(input_ids=batch, use_cache=False).logits
            lm += float(clm_loss(s, batch)) * len(batch)
            if teacher is not None:
                kd += float(logit_loss(s, teacher(input_ids=batch, use_cache=False).logits, "kld")) * len(batch)
        model.train(was_training)
        out = {"lm": round(lm / len(windows), 5)}
        return {**out, "kd": round(kd / len(windows), 5)} if teacher is not None else out

    # -- training ------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, teacher: nn.Module | None = None, data=None) -> dict:
        import peft

        if self.tokenizer is None:
            raise PrunebenchError("lora needs the tokenizer (set by the pipeline)")
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise PrunebenchError(
                f"recovery=lora trains a causal LM (objective clm or kd on next-token logits); {type(model).__name__}"
                " is an encoder: use recovery=sbert_nli_sts or recovery=none"
            )
        if self.objective == "kd" and teacher is None:
            raise PrunebenchError("recovery.objective=kd needs the unpruned teacher: run it through the pipeline")
        adapter_dir = self._adapter_dir(data)
        device = compute_device(model)
        torch.manual_seed(self.seed)  # A's random init and the dropout masks
        windows = text_windows(
            self.tokenizer, self.source, self.seqlen, self.text_field, tokens=self.tokens, **self.hub
        )
        val = text_windows(self.tokenizer, self.val_source, self.seqlen)[: self.val_windows] if self.val_windows else []
        engine = make_engine("ddp", "fp32", self.batch_size, self.grad_accum, device)
        per_step = engine.global_batch if engine is not None else self.batch_size * self.grad_accum
        order = window_order(len(windows), self.steps * per_step, self.seed)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        kd_teacher = teacher if self.objective == "kd" else None
        t0 = time.perf_counter()
        before = self.validate(model, kd_teacher, val)
        val_seconds = time.perf_counter() - t0

        sparsity_before = _sparsity(model)
        targets = self.targets(model)
        grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets)
        wrapped = peft.get_peft_model(model, config)  # injects into `model` in place; freezes all but the adapters
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt, sched = adamw(params, self.lr, self.weight_decay, self.steps, self.warmup, decay="linear")
        loss = DistillLoss(self.kd["loss"], self.kd["temperature"], self.kd["topk"], self.kd["clm_weight"])
        student = model
        if engine is not None:
            # DDP over the adapters (the only parameters that require grad); A's init is the same on
            # every rank (same seed) and DDP broadcasts rank 0's anyway. Dropout: a stream per rank.
            student, opt = engine.prepare(model, opt)
            torch.manual_seed(self.seed + 1 + engine.rank)
        saver = Checkpointer.of(self, model, opt, sched, len(windows), per_step, engine, trainable_only=True)

        def loss_fn(step: int, micro: int) -> torch.Tensor:
            k = engine.index(step, micro) if engine is not None else step * per_step + micro * self.batch_size
            batch = windows[order[k : k + self.batch_size]].to(device)
            if self.objective == "kd":
                return distill_step(student, teacher, {"input_ids": batch}, loss)["loss"]
            return student(input_ids=batch, labels=batch, use_cache=False).loss

        t0 = time.perf_counter()
        desc = f"lora ({self.objective})"
        with gradient_checkpointing(model, self.gradient_checkpointing):
            curve = fit(
                student,
                self.steps,
                loss_fn,
                opt,
                sched,
                grad_accum=self.grad_accum,
                clip=self.clip,
                log_every=self.log_every,
                desc=desc,
                engine=engine,
                checkpointer=saver,
            )
        seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        merged: dict = {"merge": self.merge}
        if self.merge == "masked":
            merged.update(self._merge_masked(wrapped, model, sparsity_before))
        else:
            merged.update(self._keep_separate(wrapped, adapter_dir))
        merge_seconds = time.perf_counter() - t0
        for n, p in model.named_parameters():  # PEFT froze the base: give the model back as it came
            p.requires_grad_(grad_flags.get(n, False))

        t0 = time.perf_counter()
        after = self.validate(model, kd_teacher, val)
        val_seconds += time.perf_counter() - t0
        metrics = {}
        if after:
            metrics.update({"lm_val_before": before["lm"], "lm_val_after": after["lm"]})
        if "kd" in after:
            metrics.update({"kd_val_before": before["kd"], "kd_val_after": after["kd"]})
        if self.merge == "masked":
            metrics["sparsity_after_merge"] = merged["sparsity"]["after_merge"]
        short = sorted({t.rsplit(".", 1)[-1] for t in targets})
        return {
            "name": self.name,
            "objective": self.objective,
            **({"kd": self.kd, "teacher": "unpruned model (copied before pruning)"} if self.objective == "kd" else {}),
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": short,
            "adapted_linears": len(targets),
            "trainable_params": trainable,
            "source": self.source,
            "source_digest": corpus.digest(self.source),
            "overlap": corpus.overlap_of(self.source),
            "val": {"source": self.val_source, "windows": len(val), "seqlen": self.seqlen},
            "lm_val_loss": {"before": before.get("lm"), "after": after.get("lm")},
            "loss_first": curve[0][1],
            "loss_last": curve[-1][1],
            "loss_curve": curve,
            "steps": self.steps,
            "tokens": self.steps * per_step * self.seqlen,
            **describe(engine, self.batch_size, self.grad_accum),
            "resumed_from_step": saver.resumed_from,
            "gradient_checkpointing": self.gradient_checkpointing,
            "seconds": round(seconds, 2),
            "merge_seconds": round(merge_seconds, 3),
            "val_seconds": round(val_seconds, 2),
            **merged,
            "metrics": metrics,
        }

    # -- after training ------------------------------------------------------------------------
    @torch.no_grad()
    def _merge_masked(self, wrapped, model: nn.Module, sparsity_before: float) -> dict:
        """Merge W + (α/r)·BA into every adapted weight, then zero the weights that were zero before.
        The base stayed frozen, so its zero pattern now is the one before training; it is read one
        layer at a time (no model-sized mask kept in memory)."""
        from peft.tuners.lora import LoraLayer

        dropped = total = 0.0
        for layer in [m for m in wrapped.modules() if isinstance(m, LoraLayer)]:
            weight = layer.get_base_layer().weight
            mask = weight == 0
            delta = layer.get_delta_weight("default").float().pow(2)
            dropped, total = dropped + float(delta[mask].sum()), total + float(delta.sum())
            layer.merge(adapter_names=["default"])
            weight[mask] = 0
        wrapped.unload()  # in place: the original Linear modules are back, holding the merged weights
        return {
            "sparsity": {"before": sparsity_before, "after_merge": _sparsity(model)},
            "masked_delta_share": round(dropped / total, 5) if total else 0.0,
        }

    def _keep_separate(self, wrapped, adapter_dir: Path | None) -> dict:
        """Save the adapter (PEFT folder), then take the PEFT layers out of the model and run the same
        low-rank path as forward hooks: the model's state dict (what save_model writes) stays the
        pruned base, while evaluation sees base + adapter."""
        from peft.tuners.lora import LoraLayer

        if adapter_dir is not None:
            wrapped.save_pretrained(str(adapter_dir))
        layers = [m for m in wrapped.modules() if isinstance(m, LoraLayer)]
        wrapped.unload()  # in place, no merge: the pruned Linear modules are back untouched
        for layer in layers:
            layer.requires_grad_(False).eval()
            layer.get_base_layer().register_forward_hook(_adapter_hook(layer))
        note = (
            f"adapter saved to {adapter_dir}"
            if adapter_dir is not None
            else "adapter not saved (save_model is false and recovery.adapter_dir is null); it stays unmerged in the"
            " evaluated model only"
        )
        return {"adapter_dir": str(adapter_dir) if adapter_dir is not None else None, "adapter_note": note}

    def _adapter_dir(self, cfg) -> Path | None:
        """recovery.adapter_dir (absolute, or relative to the run dir), else <run dir>/adapter when
        save_model is set (Hydra's run dir); metrics.json records the absolute folder."""
        if self.merge != "separate":
            return None
        folder = output_folder(self.adapter_dir, "recovery.adapter_dir") if self.adapter_dir else Path("adapter")
        if folder.is_absolute():
            return folder
        if not self.adapter_dir and (cfg is None or not OmegaConf.select(cfg, "save_model")):
            return None
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise PrunebenchError(
                f"recovery.adapter_dir={folder} is relative to the run directory, which only a Hydra run has;"
                " give an absolute path"
                if self.adapter_dir
                else "recovery.merge=separate with save_model outside a Hydra run: set recovery.adapter_dir"
            )
        return (Path(HydraConfig.get().runtime.output_dir) / folder).resolve()


def _adapter_hook(layer):
    """forward hook on a base Linear adding PEFT's LoRA path (α/r)·B A x (dropout is off in eval)."""
    a, b, scale = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]

    def hook(module, args, out):
        x = args[0]
        return out + (b(a(x.to(a.weight.dtype))) * scale).to(out.dtype)

    return hook


def _sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over every block linear (as PruneStats.achieved_sparsity)."""
    linears = prunable_linears(model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    return round(zeros / total, 6) if total else 0.0
