"""Two-stage SBERT recovery of a (layer-pruned) encoder: NLI, then STS — the fine-tuning of
"Towards Building Efficient Sentence BERT Models using Layer Pruning" (arXiv 2409.14168) and of
the L3Cube MahaSBERT models, run with sentence-transformers.

Stage 1, NLI: the SBERT softmax objective, softmax(W · [u; v; |u − v|]) over entailment / neutral /
contradiction (Reimers & Gurevych 2019), or MultipleNegativesRanking over (premise, entailed
hypothesis) pairs with in-batch negatives (`loss: mnrl`).
Stage 2, STS: cosine-similarity regression, MSE(cos(u, v), gold / 5).
After every `eval_every` steps and at the end of each stage the STS dev Spearman is measured and the
best weights so far are kept in memory; each stage ends on its best (SBERT's training scripts use
STS-B dev the same way in both stages).

Data: the paper trains on IndicXNLI (Marathi) and STS-B translated to Marathi. Offline only SNLI
dev (9,842 English pairs) exists for NLI; it stands in for IndicXNLI and the result says so.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.data.labelled import NLI_HUB, STS, nli, sts
from prunebench.data.pairs import recipe_overlap
from prunebench.evals.sts import sts_scores
from prunebench.knobs import Flag, Positions, Seed
from prunebench.models.encoders import sentence_transformer
from prunebench.placement import compute_device

log = logging.getLogger(__name__)


class SbertNliSts:
    needs_teacher = False

    def training_bytes(self, shape: dict, elt: int) -> int:
        """Gradients and AdamW's two moments of every weight (the memory plan; activations apart)."""
        return 3 * int(shape["params"]) * elt

    def __init__(
        self,
        name: str = "sbert_nli_sts",
        nli: dict | None = None,
        sts: dict | None = None,
        dev: dict | None = None,
        pooling: str = "mean",
        prompt: str | None = None,
        max_length: Positions = 128,
        eval_every: Annotated[int | None, Field(ge=1)] = None,
        log_every: Annotated[int, Field(ge=1)] = 10,
        freeze_word_embeddings: bool = False,
        seed: Seed = 0,
        allow_overlap: Flag = False,
    ):
        self.name = name
        self.nli = {"source": "snli", "split": "dev", "loss": "softmax", "epochs": 1, "batch_size": 16, "lr": 2e-5,
                    "warmup": 0.1, "max_samples": None, "max_steps": None, **(nli or {})}  # fmt: skip
        self.sts = {"set": "stsb_mr", "split": "train", "epochs": 4, "batch_size": 16, "lr": 2e-5, "warmup": 0.1,
                    "max_samples": None, "max_steps": None, **(sts or {})}  # fmt: skip
        self.dev = {"set": "stsb_mr", "split": "dev", "limit": None, **(dev or {})}
        for stage in ("nli", "sts"):
            cfg = getattr(self, stage)
            if cfg.get("epochs") is not None and cfg["epochs"] <= 0 and cfg.get("max_steps") is None:
                continue  # a stage can be switched off with epochs: 0
            if cfg["batch_size"] < 1 or cfg["lr"] <= 0:
                raise PrunebenchError(f"recovery.{stage}: batch_size must be ≥ 1 and lr > 0")
            if cfg.get("max_samples") is not None and cfg["max_samples"] < cfg["batch_size"]:
                raise PrunebenchError(f"recovery.{stage}.max_samples={cfg['max_samples']} is less than one batch")
        for part in ("sts", "dev"):
            c = getattr(self, part)
            if c["set"] not in STS or c["split"] not in STS[c["set"]]:
                known = ", ".join(f"{k}: {'/'.join(v)}" for k, v in STS.items())
                raise PrunebenchError(f"recovery.{part}: no STS split {c['set']}/{c['split']} here; known: {known}")
        if self.nli["source"] not in NLI_HUB:
            raise PrunebenchError(f"recovery.nli.source={self.nli['source']!r} must be one of {', '.join(NLI_HUB)}")
        if self.nli["loss"] not in ("softmax", "mnrl"):
            raise PrunebenchError(f"recovery.nli.loss={self.nli['loss']!r} must be softmax or mnrl")
        self.pooling, self.prompt, self.max_length = pooling, prompt, max_length
        self.eval_every, self.log_every, self.seed = eval_every, log_every, seed
        self.freeze_word_embeddings = freeze_word_embeddings
        self.tokenizer = None
        # before any model loads: the training pairs against every STS test split and the dev split
        self.overlap = recipe_overlap(self.nli, self.sts, self.dev, seed, allow_overlap)

    # -- data ----------------------------------------------------------------------------------
    def _nli_dataset(self):
        from datasets import Dataset

        pairs = nli(self.nli["source"], self.nli["split"]).sample(self.nli["max_samples"], self.seed)
        if self.nli["loss"] == "mnrl":  # (anchor, positive): entailed pairs only
            keep = [i for i, y in enumerate(pairs.labels) if y == 0]
            return Dataset.from_dict({"anchor": [pairs.first[i] for i in keep],
                                      "positive": [pairs.second[i] for i in keep]})  # fmt: skip
        return Dataset.from_dict({"sentence1": pairs.first, "sentence2": pairs.second, "label": pairs.labels})

    def _sts_dataset(self):
        from datasets import Dataset

        pairs = sts(self.sts["set"], self.sts["split"]).sample(self.sts["max_samples"], self.seed)
        return Dataset.from_dict({"sentence1": pairs.first, "sentence2": pairs.second,
                                  "score": [y / 5.0 for y in pairs.labels]})  # fmt: skip

    # -- training ------------------------------------------------------------------------------
    def _dev_spearman(self, st) -> float:
        pairs = self._dev_pairs
        kw = {"batch_size": 64, "convert_to_tensor": True, "show_progress_bar": False}
        if self.prompt:
            kw["prompt"] = self.prompt
        e1, e2 = st.encode(pairs.first, **kw), st.encode(pairs.second, **kw)
        return sts_scores(e1.cpu(), e2.cpu(), pairs.labels)["spearman"]

    def _stage(self, st, stage: str, dataset, loss: nn.Module) -> dict:
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from transformers import TrainerCallback

        cfg = getattr(self, stage)
        model = st[0].model
        outer = self

        class KeepBest(TrainerCallback):
            """Dev Spearman every `eval_every` steps and at each epoch end; best weights kept in memory."""

            def __init__(self):
                self.best, self.best_step, self.state, self.history = -float("inf"), 0, None, []

            def _check(self, step: int) -> None:
                score = outer._dev_spearman(st)
                st.train()
                self.history.append({"step": step, "dev_spearman": round(score, 3)})
                log.info("%s step %d: dev Spearman %.2f", stage, step, score)
                if score > self.best:
                    self.best, self.best_step = score, step
                    self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

            def on_step_end(self, args, state, control, **kw):
                if outer.eval_every and state.global_step % outer.eval_every == 0:
                    self._check(state.global_step)

            def on_epoch_end(self, args, state, control, **kw):
                if not self.history or self.history[-1]["step"] != state.global_step:
                    self._check(state.global_step)

        keep = KeepBest()
        with tempfile.TemporaryDirectory(prefix="prunebench-sbert-") as tmp:
            args = SentenceTransformerTrainingArguments(
                output_dir=tmp, num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"] or -1,
                per_device_train_batch_size=cfg["batch_size"], learning_rate=cfg["lr"], warmup_steps=cfg["warmup"],
                seed=self.seed, data_seed=self.seed, logging_steps=self.log_every, save_strategy="no", report_to="none",
                use_cpu=compute_device(model).type == "cpu", disable_tqdm=True, prompts=self.prompt or None,
                dataloader_drop_last=False,
            )  # fmt: skip
            trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss,
                                                 callbacks=[keep])  # fmt: skip
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        curve = [{"step": h["step"], "loss": round(h["loss"], 5)} for h in trainer.state.log_history if "loss" in h]
        if keep.state is not None:
            model.load_state_dict(keep.state)
        return {"examples": len(dataset), "steps": trainer.state.global_step, "seconds": round(seconds, 1),
                "loss_curve": curve, "dev": keep.history, "best_dev_spearman": keep.best,
                "best_step": keep.best_step}  # fmt: skip

    def __call__(self, model: nn.Module, teacher=None, data=None) -> dict:
        from sentence_transformers.sentence_transformer import losses

        if self.tokenizer is None:
            raise PrunebenchError("sbert_nli_sts needs the tokenizer (set by the pipeline)")
        torch.manual_seed(self.seed)
        if self.freeze_word_embeddings:  # a 250k-token table makes each AdamW step ~10x slower on a CPU
            model.get_input_embeddings().weight.requires_grad_(False)
        st = sentence_transformer(model, self.tokenizer, self.pooling, self.max_length)
        self._dev_pairs = sts(self.dev["set"], self.dev["split"]).sample(self.dev["limit"], self.seed)
        out = {"name": self.name, "dev_before": self._dev_spearman(st), "overlap": self.overlap}
        if self.nli["source"] == "snli":
            out["note"] = "NLI stage on English SNLI (offline stand-in for IndicXNLI Marathi)"
        if self.nli["epochs"] or self.nli["max_steps"]:
            if self.nli["loss"] == "mnrl":
                loss = losses.MultipleNegativesRankingLoss(st)
            else:
                loss = losses.SoftmaxLoss(st, embedding_dimension=model.config.hidden_size, num_labels=3)
            out["nli"] = {"source": self.nli["source"], "split": self.nli["split"], "loss": self.nli["loss"],
                          **self._stage(st, "nli", self._nli_dataset(), loss)}  # fmt: skip
        if self.sts["epochs"] or self.sts["max_steps"]:
            out["sts"] = {"set": self.sts["set"], "split": self.sts["split"],
                          **self._stage(st, "sts", self._sts_dataset(), losses.CosineSimilarityLoss(st))}  # fmt: skip
        out["metrics"] = {f"{stage}_dev_spearman": out[stage]["best_dev_spearman"] for stage in ("nli", "sts")
                          if stage in out}  # fmt: skip
        model.get_input_embeddings().weight.requires_grad_(True)
        model.eval()
        return out
