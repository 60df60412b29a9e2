"""MiniBridgeBERT: stepwise block pruning with Low Rank Bridges and progressive knowledge
distillation (CUAI winter conference 2024; no arXiv id, no public code; ../shared/papers/minibridgebert.md).

Compress a *fine-tuned* encoder without any pre-training, distilling only while fine-tuning on CoLA:
0. the teacher: the encoder plus a classification head (dropout + linear on the pooled last hidden
   state, pooling from the model config), fine-tuned on CoLA in_domain_train with cross-entropy
   (or loaded: `teacher_path`, or reused from the teacher cache); its dev MCC is the "BERT-base" row;
1. for each block b in `blocks` (1-based; default the even-numbered 2, 4, …, 12), one at a time:
   replace b by a Low Rank Bridge (prunebench.models.bridges: x + U·V·x + c, rank r) initialised
   by least squares from the current student's activations at b on training sentences (`init: fit`),
   then fine-tune the student with
       L = ce_weight · CE(student, labels) + alpha_kd · τ² · KL(p_teacher^τ ‖ p_student^τ)
           [+ hidden_loss · mean over this step's bridges of the state loss at the bridge's output]
   where the teacher is the previous step's student (progressive KD; step 1's teacher = the
   fine-tuned model). The loss is `prunebench.recovery.distill.DistillLoss` with
   clm_weight = ce_weight / alpha_kd, scaled by alpha_kd; the state term is `distill.state_loss`.
2. score dev MCC (CoLA in_domain_dev: never trained on) after every step.
The pipeline's model ends as the bridged encoder (efficiency and save_model see the real thing;
save_model also writes the trained CoLA head beside it, `bridges.classifier_logits` applies it);
`PruneStats.info["steps"]` holds one row per step (params, bridges, encoder blocks left, dev MCC,
seconds, which teacher) and `info["metrics"]` the MCCs by name (teacher_cola_mcc, step<k>_cola_mcc,
cola_mcc). The fine-tuned teacher is cached under <cache_dir>/teachers/ (keyed by the weights, the
data subset and the fine-tuning knobs), so the ablations of one table fine-tune it once.

Ablations: `kd: false` (CE only, no teacher; paper 38.3); `progressive: false` (paper 52.1, "without
progressive KD (one-shot)") with `one_shot: all_at_once` (default: every listed block replaced at
once, one fine-tune of `epochs_one_shot` epochs (default epochs_step × len(blocks), the same
training budget) distilled from the fine-tuned model) or `one_shot: original_teacher` (stepwise,
but the fine-tuned model teaches every step); `drop_instead: true` (remove the block, no bridge).
`blocks: []` only fine-tunes the teacher (the DistilBERT row's stand-in).

Defaults and why: rank 256 (one bridge = 2·768·256 + 768 = 393,984 parameters, so each step removes
≈ 6.69M from BERT-base: the paper's 109.5 → 102.8 → … → 69.3M exactly); form residual (the block's
output is dominated by its input, and a rank-256 plain map cannot carry the identity); init fit with
reduced-rank regression (the best rank-r map on the activations; `fit_svd` truncates the
least-squares map instead, `identity` starts as the identity, `random` at nn.Linear's init);
temperature 2, alpha_kd 1, ce_weight 1, no hidden-state term (the paper gives none of these).

    pruner:
      _target_: prunebench.pruners.minibridge.MiniBridge
      blocks: [2, 4, 6, 8, 10, 12]   # 1-based
      order: listed                  # listed | reverse
      rank: 256
      form: residual                 # residual | plain
      init: fit                      # fit | fit_svd | identity | random
      kd: true
      progressive: true
      one_shot: all_at_once          # all_at_once | original_teacher (progressive: false)
      temperature: 2.0
      epochs_teacher: 3
      epochs_step: 1
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
from omegaconf import ListConfig
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, placement
from prunebench.cache import fingerprint
from prunebench.data.labelled import classification
from prunebench.knobs import LR, Batch, Fraction, Positions, Seed
from prunebench.models.blocks import find_blocks
from prunebench.models.bridges import BridgeFit, LowRankBridge, bridge_count, replace_block
from prunebench.models.encoders import Classifier, batches, classifier_logits, mcc
from prunebench.models.forward import watch_blocks
from prunebench.models.loading import count_params
from prunebench.models.surgery import remove_layers
from prunebench.placement import compute_device
from prunebench.pruners.base import PruneStats, ShapePruner
from prunebench.pruners.stats import model_digest
from prunebench.recovery.distill import DistillLoss, clm_loss, state_loss
from prunebench.recovery.train import adamw, fit
from prunebench.results import peak_rss_mb, proc_status_mb, reset_peak_rss

log = logging.getLogger(__name__)

ORDERS = ("listed", "reverse")
FORMS = ("residual", "plain")
INITS = ("fit", "fit_svd", "identity", "random")
ONE_SHOT = ("all_at_once", "original_teacher")
HIDDEN_LOSSES = ("mse", "cosine")
TEACHER_FILE, TEACHER_INFO = "classifier.safetensors", "classifier.json"


def plan_steps(blocks: list[int], order: str, progressive: bool, one_shot: str) -> list[list[int]]:
    """The blocks (0-based) replaced at each step: one per step, or all at once."""
    seq = [b - 1 for b in (reversed(blocks) if order == "reverse" else blocks)]
    if not seq:
        return []
    if not progressive and one_shot == "all_at_once":
        return [seq]
    return [[b] for b in seq]


class MiniBridge(ShapePruner):
    needs_calibration = False  # reads CoLA itself
    needs_encoder = "minibridge compresses an encoder classifier"
    supports_offload = False  # fine-tunes the whole encoder on the device

    def __init__(
        self,
        name: str = "minibridge",
        blocks: list[int] | None = (2, 4, 6, 8, 10, 12),
        order: str = "listed",
        rank: Annotated[int, Field(ge=1)] = 256,
        form: str = "residual",
        bias: bool = True,
        init: str = "fit",
        fit_samples: Annotated[int, Field(ge=1, le=10**6)] = 512,
        kd: bool = True,
        progressive: bool = True,
        one_shot: str = "all_at_once",
        temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0,
        alpha_kd: Annotated[float, Field(ge=0.0)] = 1.0,
        ce_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        hidden_loss: Annotated[float, Field(ge=0.0)] = 0.0,
        hidden_loss_kind: str = "mse",
        drop_instead: bool = False,
        epochs_teacher: Annotated[int, Field(ge=0, le=1000)] = 3,
        epochs_step: Annotated[int, Field(ge=0, le=1000)] = 1,
        epochs_one_shot: Annotated[int | None, Field(ge=0, le=1000)] = None,
        lr: LR = 2e-5,
        warmup: Fraction = 0.1,
        weight_decay: Annotated[float, Field(ge=0.0)] = 0.01,
        batch_size: Batch = 32,
        max_length: Positions = 64,
        train_limit: Annotated[int | None, Field(ge=1)] = None,
        dev_limit: Annotated[int | None, Field(ge=1)] = None,
        pooling: str = "cls",
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
        teacher_path: str | None = None,
        teacher_cache: bool = True,
        cache_dir: str | None = None,
        seed: Seed = 0,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        blocks = [] if blocks is None else list(blocks) if isinstance(blocks, list | tuple | ListConfig) else blocks
        if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            raise PrunebenchError(f"pruner.blocks={blocks} must be a list of 1-based block numbers, e.g. [2,4,6]")
        if bad := [b for b in blocks if b < 1]:
            raise PrunebenchError(f"pruner.blocks={blocks}: block {bad[0]} does not exist; blocks count from 1")
        if len(set(blocks)) != len(blocks):
            dup = next(b for b in blocks if blocks.count(b) > 1)
            raise PrunebenchError(f"pruner.blocks={blocks} lists block {dup} twice")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise PrunebenchError(f"pruner.rank={rank} must be a positive integer (256: a ~0.4M bridge at hidden 768)")
        for knob, value, allowed in (
            ("order", order, ORDERS),
            ("form", form, FORMS),
            ("init", init, INITS),
            ("one_shot", one_shot, ONE_SHOT),
            ("hidden_loss_kind", hidden_loss_kind, HIDDEN_LOSSES),
            ("pooling", pooling, ("cls", "mean")),
        ):
            if value not in allowed:
                raise PrunebenchError(f"pruner.{knob}={value!r} must be one of {', '.join(allowed)}")
        if not isinstance(temperature, int | float) or temperature <= 0:
            raise PrunebenchError(f"pruner.temperature={temperature} must be > 0 (the KD softmax temperature)")
        if not isinstance(ce_weight, int | float) or ce_weight < 0:
            raise PrunebenchError(f"pruner.ce_weight={ce_weight} must be ≥ 0 (the weight of the labels' cross-entropy)")
        if kd and (not isinstance(alpha_kd, int | float) or alpha_kd <= 0):
            raise PrunebenchError(f"pruner.alpha_kd={alpha_kd} must be > 0 (pruner.kd=false turns distillation off)")
        if not kd and ce_weight <= 0:
            raise PrunebenchError("pruner.kd=false trains on the labels alone: pruner.ce_weight must be > 0")
        if not isinstance(hidden_loss, int | float) or hidden_loss < 0:
            raise PrunebenchError(f"pruner.hidden_loss={hidden_loss} must be ≥ 0 (0: no hidden-state term)")
        for knob, value in (("epochs_teacher", epochs_teacher), ("epochs_step", epochs_step), ("lr", lr)):
            if not isinstance(value, int | float) or value <= 0:
                raise PrunebenchError(f"pruner.{knob}={value} must be > 0")
        if epochs_one_shot is not None and (not isinstance(epochs_one_shot, int | float) or epochs_one_shot <= 0):
            raise PrunebenchError(f"pruner.epochs_one_shot={epochs_one_shot} must be > 0 or null")
        for knob, value in (("batch_size", batch_size), ("max_length", max_length), ("fit_samples", fit_samples)):
            if not isinstance(value, int) or value < 1:
                raise PrunebenchError(f"pruner.{knob}={value} must be a positive integer")
        for knob, value in (("train_limit", train_limit), ("dev_limit", dev_limit)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PrunebenchError(f"pruner.{knob}={value} must be a positive integer or null (all)")
        if not 0 <= warmup < 1 or weight_decay < 0 or not 0 <= dropout < 1:
            raise PrunebenchError(f"pruner.warmup={warmup} and dropout={dropout} must be in [0, 1), weight_decay ≥ 0")
        if teacher_path is not None and not Path(str(teacher_path)).expanduser().is_dir():
            raise PrunebenchError(
                f"pruner.teacher_path={teacher_path} is not a folder; point it at a saved teacher ({TEACHER_FILE})"
            )
        self.name, self.blocks, self.order, self.rank, self.form, self.bias = name, blocks, order, rank, form, bias
        self.init, self.fit_samples = init, fit_samples
        self.kd, self.progressive, self.one_shot = bool(kd), bool(progressive), one_shot
        self.temperature, self.alpha_kd, self.ce_weight = float(temperature), float(alpha_kd), float(ce_weight)
        self.hidden_loss, self.hidden_loss_kind, self.drop_instead = float(hidden_loss), hidden_loss_kind, drop_instead
        self.epochs_teacher, self.epochs_step, self.epochs_one_shot = epochs_teacher, epochs_step, epochs_one_shot
        self.lr, self.warmup, self.weight_decay = float(lr), float(warmup), float(weight_decay)
        self.batch_size, self.max_length = batch_size, max_length
        self.train_limit, self.dev_limit, self.pooling, self.dropout = train_limit, dev_limit, pooling, dropout
        self.teacher_path = str(Path(str(teacher_path)).expanduser()) if teacher_path else None
        self.teacher_cache, self.cache_dir, self.seed = teacher_cache, cache_dir, seed
        self.tokenizer = None  # set by the pipeline

    # ------------------------------------------------------------------ checks
    def check(self, num_layers: int, dims: dict | None = None) -> None:
        """Validate the blocks (and the rank, when the model's config is known) before loading."""
        if bad := [b for b in self.blocks if not 1 <= b <= num_layers]:
            raise PrunebenchError(
                f"pruner.blocks={self.blocks}: block {bad[0]} is outside the model's {num_layers} blocks (1-based)"
            )
        if self.drop_instead and len(self.blocks) >= num_layers:
            raise PrunebenchError(f"pruner.drop_instead=true with {len(self.blocks)} blocks would leave no block")
        hidden = (dims or {}).get("hidden_size")
        if hidden and not self.drop_instead and self.rank > hidden:
            raise PrunebenchError(f"pruner.rank={self.rank} is larger than the model's hidden size {hidden}")

    def _check_model(self, model: nn.Module) -> None:
        decoder = getattr(model.config, "is_decoder", False) or model.can_generate()
        if decoder or model.get_output_embeddings() is not None:
            raise PrunebenchError(
                f"minibridge compresses an encoder classifier (BERT, MPNet, ...); {type(model).__name__} is a"
                " decoder / language model: use model=tiny-bert, mpnet-base, bert-base-uncased, ..."
            )
        self.check(len(find_blocks(model)))
        hidden = model.config.hidden_size
        if not self.drop_instead and self.rank > hidden:
            raise PrunebenchError(f"pruner.rank={self.rank} is larger than the model's hidden size {hidden}")
        if self.init == "identity" and self.form == "plain" and self.rank < hidden and not self.drop_instead:
            raise PrunebenchError(
                f"pruner.init=identity with form=plain needs rank = hidden ({hidden}); a rank-{self.rank} plain"
                " bridge cannot be the identity: use form=residual or init=fit"
            )
        if self.tokenizer is None:
            raise PrunebenchError("minibridge needs the model's tokenizer (the pipeline sets pruner.tokenizer)")

    # ------------------------------------------------------------------ data and scoring
    def _logits(self, clf: Classifier, enc) -> torch.Tensor:
        return classifier_logits(clf.encoder, clf.head, enc, self.pooling)

    def _batches(self, texts: list[str], labels: list[int], order: list[int]):
        return batches(self.tokenizer, texts, labels, order, self.batch_size, self.max_length)

    def _stream(self, texts: list[str], labels: list[int], seed: int):
        """Batches forever: a fresh seeded shuffle per epoch."""
        rng = random.Random(seed)
        while True:
            order = list(range(len(texts)))
            rng.shuffle(order)
            yield from self._batches(texts, labels, order)

    @torch.no_grad()
    def _score(self, clf: Classifier, dev) -> float:
        clf.eval()
        pred: list[int] = []
        for enc, _ in self._batches(dev.texts, dev.labels, list(range(len(dev.texts)))):
            pred += self._logits(clf, enc).argmax(-1).tolist()
        return 100 * mcc(pred, dev.labels, len(dev.classes))

    # ------------------------------------------------------------------ training
    def _train(
        self, student: Classifier, teacher: Classifier | None, train, epochs: float, bridges: list[int], tag: str
    ) -> list:
        """`epochs` over the training subset: CE alone without a teacher, else DistillLoss (+ the
        state loss at this step's bridges). Returns the loss curve."""
        device = compute_device(student.encoder)
        steps = max(1, round(epochs * math.ceil(len(train.texts) / self.batch_size)))
        params = [p for p in student.parameters() if p.requires_grad]
        opt, sched = adamw(params, self.lr, self.weight_decay, steps, self.warmup)
        stream = self._stream(train.texts, train.labels, self.seed + 1000 * len(self._trained))
        self._trained.append(tag)
        distill = None
        if teacher is not None:
            teacher.eval()
            distill = DistillLoss("kld", self.temperature, None, self.ce_weight / self.alpha_kd)
        use_states = teacher is not None and self.hidden_loss > 0 and bool(bridges)
        grabbed: dict[str, list] = {"s": [], "t": []}
        watch = contextlib.ExitStack()  # the outputs of this step's bridges, student and teacher
        if use_states:
            for key, clf in (("s", student), ("t", teacher)):
                blocks = find_blocks(clf.encoder)
                watch.enter_context(
                    watch_blocks({i: blocks[i] for i in bridges}, lambda _i, _x, y, k=key: grabbed[k].append(y))
                )

        def loss_fn(_step: int, _micro: int) -> torch.Tensor:
            enc, y = next(stream)
            y = y.to(device)
            grabbed["s"].clear(), grabbed["t"].clear()
            logits = self._logits(student, enc)
            if distill is None:
                return self.ce_weight * clm_loss(logits, y)
            with torch.no_grad():
                t_logits = self._logits(teacher, enc)
            loss = self.alpha_kd * distill({"logits": logits}, {"logits": t_logits}, labels=y)["loss"]
            if use_states:
                mask = enc["attention_mask"].to(device)
                loss = loss + self.hidden_loss * state_loss(grabbed["s"], grabbed["t"], self.hidden_loss_kind, mask)
            return loss

        with watch:
            return fit(student, steps, loss_fn, opt, sched, clip=1.0, log_every=max(1, steps // 10), desc=tag)

    # ------------------------------------------------------------------ bridges
    @torch.no_grad()
    def _fit_stats(self, clf: Classifier, indices: list[int], train) -> dict[int, BridgeFit]:
        """Input and output token rows of blocks `indices` of the current student, on the first
        `fit_samples` training sentences (padding excluded)."""
        encoder = clf.encoder
        device = compute_device(encoder)
        hidden = encoder.config.hidden_size
        stats = {i: BridgeFit(hidden, self.form, device) for i in indices}
        blocks = find_blocks(encoder)
        current: dict = {}
        clf.eval()
        n = min(self.fit_samples, len(train.texts))
        with watch_blocks({i: blocks[i] for i in indices}, lambda i, x, y: stats[i].add(x, y, current["mask"])):
            for enc, _ in self._batches(train.texts[:n], train.labels[:n], list(range(n))):
                current["mask"] = enc["attention_mask"]
                self._logits(clf, enc)
        return stats

    def _bridge(self, hidden: int, stats: BridgeFit | None) -> tuple[LowRankBridge, float | None]:
        bridge = LowRankBridge(hidden, self.rank, self.form, self.bias)
        if self.init in ("fit", "fit_svd"):
            A, b, err = stats.solve(self.rank, "rrr" if self.init == "fit" else "svd", self.bias)
            bridge.set_map(A, b)
            return bridge, round(err, 6)
        if self.init == "identity":
            bridge.set_identity()
        return bridge, None  # random: nn.Linear's own initialisation

    # ------------------------------------------------------------------ the teacher
    def _teacher_key(self, model: nn.Module) -> str:
        knobs = {k: getattr(self, k) for k in ("epochs_teacher", "lr", "warmup", "weight_decay", "batch_size",
                                               "max_length", "train_limit", "pooling", "dropout", "seed")}  # fmt: skip
        dtype = str(next(model.parameters()).dtype)
        return fingerprint(model_digest(model), knobs, dtype, type(model).__name__)

    def _load_teacher(self, clf: Classifier, folder: Path) -> None:
        from safetensors.torch import load_model

        try:
            load_model(clf, str(folder / TEACHER_FILE), strict=True, device=str(compute_device(clf.encoder)))
        except (OSError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PrunebenchError(f"the teacher in {folder} does not fit this model: {first}") from None

    def _save_teacher(self, clf: Classifier, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_model

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        save_model(clf, str(tmp / TEACHER_FILE))
        (tmp / TEACHER_INFO).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a sweep's other jobs never see half a teacher

    def _teacher(self, clf: Classifier, train) -> dict:
        """Fine-tune the teacher (CE), or load it from teacher_path or the teacher cache."""
        if self.teacher_path:
            self._load_teacher(clf, Path(self.teacher_path))
            return {"source": "teacher_path", "path": self.teacher_path}
        folder = None
        if self.teacher_cache and self.cache_dir:
            folder = Path(self.cache_dir) / "teachers" / f"cola-{self._teacher_key(clf.encoder)}"
            if (folder / TEACHER_FILE).exists():
                log.info("reusing the fine-tuned teacher from %s", folder)
                self._load_teacher(clf, folder)
                return {"source": "cache", "path": str(folder)}
        curve = self._train(clf, None, train, self.epochs_teacher, [], "teacher")
        out = {"source": "fine-tuned", "curve": curve}
        if folder is not None:
            self._save_teacher(clf, folder, {"task": "cola", "epochs": self.epochs_teacher, "train": len(train.texts)})
            out["path"] = str(folder)
        return out

    # ------------------------------------------------------------------ the procedure
    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        self._check_model(model)
        t_all = time.perf_counter()
        torch.manual_seed(self.seed)
        self._trained: list[str] = []
        train = classification("cola", "in_domain_train").sample(self.train_limit, self.seed)
        dev = classification("cola", "in_domain_dev").sample(self.dev_limit, self.seed)
        n_layers, hidden = len(find_blocks(model)), model.config.hidden_size
        student = Classifier(model, len(train.classes), self.dropout)

        def row(name: str, step: int, change: str, teacher_step, t0: float, **extra) -> dict:
            bridges = bridge_count(model)
            r = {
                "name": name,
                "step": step,
                "change": change,
                "params": count_params(model)[0],
                "bridges": bridges,
                "blocks": len(find_blocks(model)) - bridges,
                "dev_mcc": round(self._score(student, dev), 4),
                "teacher_step": teacher_step,
                "seconds": round(time.perf_counter() - t0, 3),  # a fast step (a tiny model) still shows > 0
                # this step's peak (reset when it began): RSS on the CPU, allocator peaks on a GPU
                "peak_rss_mb": proc_status_mb("VmHWM") or peak_rss_mb(),  # off Linux: the process's peak
                **placement.peak_memory(device),
                **extra,
            }
            log.info("minibridge %s: %s", name, {k: v for k, v in r.items() if k != "curve"})
            return r

        device = compute_device(model)

        def begin() -> float:
            reset_peak_rss()
            placement.reset_peak(device)
            return time.perf_counter()

        t0 = begin()
        source = self._teacher(student, train)
        rows = [row("teacher", 0, "fine-tuned", None, t0, teacher=source.pop("source"), **source)]
        plan = plan_steps(self.blocks, self.order, self.progressive, self.one_shot)
        original = copy.deepcopy(student).eval() if self.kd and not self.progressive else None
        alive = list(range(n_layers))  # original indices of the blocks still present (drop_instead)
        epochs = self.epochs_step
        if len(plan) == 1 and len(plan[0]) > 1:  # all at once: the stepwise run's training budget by default
            epochs = self.epochs_one_shot or self.epochs_step * len(plan[0])
        for k, group in enumerate(plan, 1):
            t0 = begin()
            if not self.kd:
                teacher, teacher_step = None, None
            elif self.progressive:
                teacher, teacher_step = copy.deepcopy(student).eval(), k - 1
            else:
                teacher, teacher_step = original, 0
            errors = None
            if self.drop_instead:
                remove_layers(model, [alive.index(b) for b in group])
                alive = [a for a in alive if a not in group]
                bridged = []
            else:
                stats = self._fit_stats(student, group, train) if self.init.startswith("fit") else {}
                errors = {}
                for b in group:
                    bridge, errors[b + 1] = self._bridge(hidden, stats.get(b))
                    replace_block(model, b, bridge)
                bridged = group
            curve = self._train(student, teacher, train, epochs, bridged, f"step {k}")
            verb = "drop" if self.drop_instead else "bridge"
            change = f"{verb} block{'s' if len(group) > 1 else ''} {','.join(str(b + 1) for b in group)}"
            name = f"({chr(ord('a') + k - 1)})" if k <= 26 else f"step {k}"
            extra = {"fit_error": errors} if errors and self.init.startswith("fit") else {}
            rows.append(row(name, k, change, teacher_step, t0, curve=curve, **extra))
            del teacher
        model.eval()
        model.prunebench_head = (student.head, self.pooling)  # saved beside bridged weights (save_model)
        kept = [a for a in alive if a not in {b for g in plan for b in g}]  # real blocks left (0-based, original)
        metrics = {"teacher_cola_mcc": rows[0]["dev_mcc"], "cola_mcc": rows[-1]["dev_mcc"]}
        metrics.update({f"step{r['step']}_cola_mcc": r["dev_mcc"] for r in rows[1:]})
        metrics.update(params=rows[-1]["params"], bridges=rows[-1]["bridges"], blocks=rows[-1]["blocks"])
        when = "all blocks at once" if len(plan) == 1 and len(plan[0]) > 1 else "stepwise"
        how = "progressive KD" if self.progressive else "KD from the fine-tuned model at every step"
        how = "KD from the fine-tuned model" if when != "stepwise" else how
        what = "block removal" if self.drop_instead else "low-rank bridges"
        protocol = f"{when} {what}, {how if self.kd else 'CE only (no KD)'}" if plan else "teacher only (no blocks)"
        info = {
            "protocol": protocol,
            "task": "cola (train in_domain_train, score in_domain_dev)",
            "train_sentences": len(train.texts),
            "dev_sentences": len(dev.texts),
            "teacher_mcc": rows[0]["dev_mcc"],
            "head_params": sum(p.numel() for p in student.head.parameters()),
            "bridge_params": 0 if self.drop_instead else LowRankBridge.cost(hidden, self.rank, self.bias),
            "blocks_replaced": [b + 1 for g in plan for b in g],
            "layers_before": n_layers,  # the report's depth column: real blocks left (bridges excluded)
            "layers_kept": kept,
            "layer_ratio": 1 - len(kept) / n_layers,
            "steps": rows,
            "metrics": metrics,
        }
        if self.hidden_loss > 0 and self.drop_instead:
            info["note"] = "hidden_loss ignored: drop_instead leaves no bridge to match"
        timings = {"total": time.perf_counter() - t_all, "teacher": rows[0]["seconds"]}
        timings.update({f"step{r['step']}": r["seconds"] for r in rows[1:]})
        return PruneStats(0.0, 0.0, {}, timings, info)
