"""LoRA recovery of a pruned causal LM through PEFT: LLM-Pruner's cheap post-training (Ma et al., arXiv
2305.11627, §3.3) with low-rank adapters (Hu et al., arXiv 2106.09685). Usable after any pruner.

Each target linear W (frozen) gains a trainable low-rank path:  y = W x + (α / r) · B A dropout(x),
A ∈ R^{r×in} (random init), B ∈ R^{out×r} (zero init, so training starts from the pruned model).
Targets: every nn.Linear of the transformer blocks (`target_modules: null`; embeddings and the LM
head excluded), or the block linears whose name ends with one of `target_modules` (q_proj, ...).
Adapters are fp32 (PEFT upcasts them when the base is bf16/fp16) and live on each layer's device.

Objective: `clm` (next-token cross-entropy) or `kd` (the logit distillation loss of `distill.py`, from
the unpruned model the pipeline copies before pruning, as recovery=kd). The rest is the training recipe
of `recipe.py`, trained parameters the adapters: the budget is `tokens` tokens of `source` (never an
evaluation split) in `seqlen` windows, seeded order, AdamW with linear warm-up and decay, `batch_size` ×
`grad_accum` windows per step on each process (or `global_batch` over all of them). Under several
processes (torchrun, accelerate launch, SLURM) the adapters train data-parallel (recovery/engine.py's
DDP: each rank its own micro-batches of the same seeded order, the adapters' gradients averaged; the
frozen base is replicated and never all-reduced); each rank draws its own dropout masks (seed + rank),
so with dropout 0 two processes × 1 window equal one process × 2 accumulated windows up to float
summation order. FSDP is not offered: the adapters are small and the frozen base needs no sharded
optimiser state. Checkpoints hold the adapters (the frozen base is rebuilt by the rerun), the optimiser,
scheduler and every rank's RNG (dropout); resume and SIGTERM as kd (recovery/resume.py).

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
from typing import Annotated, ClassVar, Literal

import torch
from omegaconf import OmegaConf
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, knobs
from prunebench.cache import output_folder
from prunebench.models.blocks import prunable_linears
from prunebench.recovery.distill import DistillLoss, check_knobs, distill_step
from prunebench.recovery.recipe import Recipe

log = logging.getLogger(__name__)

KD_KEYS = ("loss", "temperature", "topk", "clm_weight")


class LoRA(Recipe):
    needs_lm = "LoRA trains on next-token logits"  # an encoder is refused before loading (config.validate)
    adapters: ClassVar[bool] = True  # only the adapters train: checkpoints hold them, the base stays as pruned

    def __init__(
        self,
        name: str = "lora",
        r: Annotated[int, Field(ge=1, le=65536)] = 8,
        alpha: Annotated[float, Field(gt=0.0, description="the update is scaled by alpha / r")] = 16.0,
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05,
        target_modules: list[str] | None = None,
        objective: Literal["clm", "kd"] = "clm",
        kd: dict | None = None,
        merge: Literal["masked", "separate"] = "masked",
        adapter_dir: str | None = None,
        **train,
    ):
        knobs.check_args(LoRA, "recovery", {"r": r, "alpha": alpha, "dropout": dropout, "objective": objective,
                                            "merge": merge})  # fmt: skip
        super().__init__(name=name, **train)
        if self.engine != "ddp":
            raise PrunebenchError(
                f"recovery=lora trains data-parallel only (recovery.engine=ddp): the adapters are small and the"
                f" frozen base needs no sharded optimiser state; drop recovery.engine={self.engine}"
            )
        if not self.keep_masks:
            raise PrunebenchError(
                "recovery.keep_masks=false means nothing to LoRA: the pruned base stays frozen; recovery.merge"
                " decides whether the merged update keeps the sparsity (masked) or the adapter stays apart (separate)"
            )
        if target_modules is not None and (isinstance(target_modules, str) or not len(target_modules)):
            raise PrunebenchError(
                f"recovery.target_modules={target_modules!r} must be null (all block linears)"
                " or a list of names, e.g. [q_proj,v_proj]"
            )
        if adapter_dir and merge != "separate":  # merge=masked folds the adapter in: no folder to write
            raise PrunebenchError(
                f"recovery.adapter_dir={adapter_dir} is only used by recovery.merge=separate (merge={merge} folds"
                " the adapter into the weights); add recovery.merge=separate or drop recovery.adapter_dir"
            )
        if adapter_dir:  # relative: inside the run directory (never climbing out of it)
            output_folder(adapter_dir, "recovery.adapter_dir")
        kd = dict(kd or {})
        if extra := sorted(set(kd) - set(KD_KEYS)):
            raise PrunebenchError(
                f"recovery.kd has unknown keys ({', '.join(extra)}); it takes loss, temperature, topk, clm_weight"
            )
        kd = {"loss": "kld", "temperature": 1.0, "topk": None, "clm_weight": 0.0, **kd}
        check_knobs(kd["loss"], kd["temperature"], kd["topk"], kd["clm_weight"], None, prefix="recovery.kd.")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.objective, self.kd, self.merge, self.adapter_dir = objective, kd, merge, adapter_dir
        self.loss = DistillLoss(kd["loss"], kd["temperature"], kd["topk"], kd["clm_weight"])
        self._wrapped = None

    @property
    def desc(self) -> str:
        return f"lora ({self.objective})"

    @property
    def needs_teacher(self) -> bool:
        """The pipeline copies the unpruned model only for the kd objective."""
        return self.objective == "kd"

    def own_fingerprint(self) -> dict:
        keys = ("r", "alpha", "dropout", "target_modules", "objective", "kd")
        return {k: getattr(self, k) for k in keys}

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

    # -- the recipe's parts --------------------------------------------------------------------
    def held_out_teacher(self, teacher):
        return teacher if self.objective == "kd" else None

    def compute_loss(self, student, teacher, batch, ctx) -> dict:
        if self.objective == "kd":
            return {"loss": distill_step(student, teacher, {"input_ids": batch}, self.loss, ctx)["loss"]}
        return super().compute_loss(student, teacher, batch, ctx)

    def trained(self, model, teacher, device):
        """PEFT injects the adapters into `model` in place and freezes everything else."""
        import peft

        self._sparsity_before = _sparsity(model)
        self._targets = self.targets(model)
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                 target_modules=self._targets)  # fmt: skip
        self._wrapped = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        self._trainable = sum(p.numel() for p in params)
        return params, None

    def after(self, model: nn.Module) -> dict:
        """Merge (under the masks) or keep the adapter apart; give the model back as it came."""
        t0 = time.perf_counter()
        merged: dict = {"merge": self.merge}
        if self.merge == "masked":
            merged.update(self._merge_masked(self._wrapped, model, self._sparsity_before))
        else:
            merged.update(self._keep_separate(self._wrapped, self._adapter_folder))
        for n, p in model.named_parameters():  # PEFT froze the base: give the model back as it came
            p.requires_grad_(self._grad_flags.get(n, False))
        self._wrapped, self._merged = None, merged
        return {**merged, "merge_seconds": round(time.perf_counter() - t0, 3)}

    def report(self, before: dict, after: dict) -> dict:
        metrics = {}
        if after:
            metrics.update({"lm_val_before": before["lm"], "lm_val_after": after["lm"]})
        if "kd" in after:
            metrics.update({"kd_val_before": before["kd"], "kd_val_after": after["kd"]})
        if self.merge == "masked":
            metrics["sparsity_after_merge"] = self._merged["sparsity"]["after_merge"]
        return {
            "objective": self.objective,
            **({"kd": self.kd, "teacher": "unpruned model (copied before pruning)"} if self.objective == "kd" else {}),
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in self._targets}),
            "adapted_linears": len(self._targets),
            "trainable_params": self._trainable,
            "lm_val_loss": {"before": before.get("lm"), "after": after.get("lm")},
            "metrics": metrics,
        }

    def __call__(self, model: nn.Module, teacher: nn.Module | None = None, data=None) -> dict:
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise PrunebenchError(
                f"recovery=lora trains a causal LM (objective clm or kd on next-token logits); {type(model).__name__}"
                " is an encoder: use recovery=sbert_nli_sts or recovery=none"
            )
        if self.objective == "kd" and teacher is None:
            raise PrunebenchError("recovery.objective=kd needs the unpruned teacher: run it through the pipeline")
        self._adapter_folder = self._adapter_dir(data)
        return self.train(model, teacher)

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
        save_model is set (the run dir the pipeline gives); metrics.json records the absolute folder."""
        if self.merge != "separate":
            return None
        folder = output_folder(self.adapter_dir, "recovery.adapter_dir") if self.adapter_dir else Path("adapter")
        if folder.is_absolute():
            return folder
        if not self.adapter_dir and (cfg is None or not OmegaConf.select(cfg, "save_model")):
            return None
        if self.run_dir is None:  # the pipeline gives every run's folder; a recovery built in code has none
            raise PrunebenchError(
                f"recovery.adapter_dir={folder} is relative to the run directory, which this recovery was not"
                " given; give an absolute path"
                if self.adapter_dir
                else "recovery.merge=separate with save_model outside a run: set recovery.adapter_dir"
            )
        return (Path(self.run_dir) / folder).resolve()


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
