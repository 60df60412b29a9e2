"""Fine-tune-and-score evaluations for encoders: a classification head on a copy of the (pruned)
encoder, trained on one split and scored on another.

- `eval=classification`: L3Cube-MahaNews SHC (12 classes, arXiv 2404.18216), the task of the
  sibling layer-pruning study (arXiv 2501.00733). Offline only its valid and test files exist, so
  the default trains on valid (2,750) and scores test (2,761); with the Hub train on train.
- `eval=cola`: CoLA, trained on in_domain_train and scored on in_domain_dev with Matthews
  correlation (GLUE's metric; MiniBridgeBERT's table).

Reported ×100: accuracy, macro-F1 (mean of per-class F1) and MCC
= (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)), its multi-class form (Gorodkin's R_K) for K > 2.
The copy is fine-tuned; the model handed to the next evaluator is untouched. `test_in_train` records the
share of the scored sentences that the training split holds too (`split_overlap`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.data.labelled import COLA, MAHANEWS, classification
from prunebench.knobs import LR, Batch, Flag, Fraction, Positions, Seed, Windows
from prunebench.models.encoders import batches, classifier_logits, macro_f1, mcc
from prunebench.placement import compute_device
from prunebench.recovery.train import adamw

log = logging.getLogger(__name__)


class FineTuneClassifier:
    cacheable = True

    def __init__(
        self,
        task: str = "mahanews_shc",
        train_split: str = "valid",
        test_split: str = "test",
        epochs: Annotated[float, Field(gt=0.0, le=1000.0)] = 3,
        lr: LR = 3e-5,
        batch_size: Batch | None = 32,
        warmup: Fraction = 0.1,
        max_length: Positions = 64,
        train_limit: Windows | None = None,
        test_limit: Windows | None = None,
        pooling: str = "cls",
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
        freeze_word_embeddings: Flag = False,
        seed: Seed = 0,
    ):
        if task not in ("mahanews_shc", "cola"):
            raise PrunebenchError(f"eval task {task!r} must be mahanews_shc or cola")
        if epochs <= 0 or lr <= 0 or batch_size < 1:
            raise PrunebenchError(
                f"fine-tuning needs epochs > 0, lr > 0, batch_size ≥ 1 (got {epochs}, {lr}, {batch_size})"
            )
        splits = {"mahanews_shc": MAHANEWS, "cola": COLA}[task]
        if missing := [sp for sp in (train_split, test_split) if sp not in splits]:
            raise PrunebenchError(
                f"{task} has no split {missing[0]!r} here; available: {', '.join(splits)}"
                + (" (SHC_Train.csv is not in ../shared/data: train on valid)" if task == "mahanews_shc" else "")
            )
        if pooling not in ("cls", "mean"):
            raise PrunebenchError(f"pooling={pooling!r} must be cls or mean")
        self.task, self.train_split, self.test_split = task, train_split, test_split
        self.epochs, self.lr, self.batch_size, self.warmup = epochs, lr, batch_size, warmup
        self.max_length, self.train_limit, self.test_limit = max_length, train_limit, test_limit
        self.pooling, self.dropout, self.seed = pooling, dropout, seed
        self.freeze_word_embeddings = freeze_word_embeddings

    def _batches(self, tokenizer, texts: list[str], labels: list[int], order: list[int]):
        return batches(tokenizer, texts, labels, order, self.batch_size, self.max_length)

    def _logits(self, encoder: nn.Module, head: nn.Module, enc) -> torch.Tensor:
        return classifier_logits(encoder, head, enc, self.pooling)

    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        train = classification(self.task, self.train_split).sample(self.train_limit, self.seed)
        test = classification(self.task, self.test_split).sample(self.test_limit, self.seed)
        k = len(train.classes)
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        encoder = copy.deepcopy(model).train()  # the caller's model stays as it was
        device = compute_device(model)
        head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(model.config.hidden_size, k)).to(device)
        if self.freeze_word_embeddings:  # large multilingual vocabularies: AdamW over them dominates a CPU step
            encoder.get_input_embeddings().weight.requires_grad_(False)
        params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
        steps_per_epoch = math.ceil(len(train.texts) / self.batch_size)
        total = max(1, round(self.epochs * steps_per_epoch))
        # the recoveries' AdamW and schedule (linear warm-up, linear decay to 0); the loop stays its own:
        # epochs of padded labelled batches through a classification head, not token windows of a corpus
        opt, sched = adamw(params, self.lr, 0.01, total, self.warmup)
        step, losses = 0, []
        while step < total:
            order = list(range(len(train.texts)))
            rng.shuffle(order)
            for enc, y in self._batches(tokenizer, train.texts, train.labels, order):
                loss = nn.functional.cross_entropy(self._logits(encoder, head, enc).float(), y.to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step(), sched.step(), opt.zero_grad()
                losses.append(float(loss))
                step += 1
                if step % 50 == 0 or step == total:
                    log.info(
                        "%s fine-tuning step %d/%d loss %.4f",
                        self.task,
                        step,
                        total,
                        sum(losses[-50:]) / len(losses[-50:]),
                    )
                if step >= total:
                    break
        encoder.eval(), head.eval()
        pred: list[int] = []
        with torch.no_grad():
            for enc, _ in self._batches(tokenizer, test.texts, test.labels, list(range(len(test.texts)))):
                pred += self._logits(encoder, head, enc).argmax(-1).tolist()
        gold = test.labels
        return {
            "accuracy": 100 * sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold),
            "macro_f1": 100 * macro_f1(pred, gold, k),
            "mcc": 100 * mcc(pred, gold, k),
            "train_loss_first": losses[0],
            "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "test_in_train": split_overlap(train.texts, test.texts),
        }


def split_overlap(train: list[str], test: list[str]) -> float:
    """The share of the scored split's distinct sentences (normalised words, data/pairs.py) that the
    training split holds too: the protocol's own splits overlap (CoLA in_domain_train vs in_domain_dev,
    MahaNews valid vs test: 1–3% here), so it is recorded beside the score, not refused."""
    import numpy as np

    from prunebench.data import pairs

    seen, scored = (pairs.distinct(pairs.sentence_hashes(t)) for t in (train, test))
    return float(np.isin(scored, seen).mean()) if len(scored) else 0.0
