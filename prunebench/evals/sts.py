"""Semantic textual similarity: Spearman (and Pearson) correlation × 100 between the cosine
similarity of the two sentence embeddings and the gold score, as MTEB's STS evaluator and the
SBERT papers report it (arXiv 2409.14168 scores Marathi STS-B this way).

Sets: English STS-B test, STS-B machine-translated to Marathi (test), L3Cube MahaSTS (test).
Keys: `<set>_spearman`, `<set>_pearson` (e.g. `sts/stsb_mr_spearman`).

    eval: {sts: {_target_: prunebench.evals.sts.STS, sets: [stsb_en, stsb_mr, mahasts], split: test}}
"""

from __future__ import annotations

import torch
from scipy.stats import pearsonr, spearmanr

from prunebench import PrunebenchError
from prunebench.data.labelled import STS as SETS
from prunebench.data.labelled import sts
from prunebench.knobs import Batch, Positions, Seed, Windows
from prunebench.models.encoders import embed


def sts_scores(e1: torch.Tensor, e2: torch.Tensor, gold: list[float]) -> dict[str, float]:
    """Spearman/Pearson ×100 of cosine(e1_i, e2_i) against gold (pure math: tested against MTEB)."""
    cos = torch.nn.functional.cosine_similarity(e1.double(), e2.double(), dim=-1).numpy()
    return {"spearman": 100 * float(spearmanr(gold, cos)[0]), "pearson": 100 * float(pearsonr(gold, cos)[0])}


class STS:
    def __init__(
        self,
        sets: list[str] | None = ("stsb_en", "stsb_mr", "mahasts"),  # null: every set here
        split: str = "test",
        limit: Windows | None = None,
        pooling: str = "mean",
        prompt: str | None = None,
        max_length: Positions = 128,
        batch_size: Batch | None = 64,
        seed: Seed = 0,
    ):
        self.sets = list(sets) if sets else list(SETS)
        if unknown := [s for s in self.sets if s not in SETS]:
            raise PrunebenchError(f"eval.sts.sets: unknown {unknown}; known: {', '.join(SETS)}")
        if missing := [s for s in self.sets if split not in SETS[s]]:
            raise PrunebenchError(f"eval.sts.split={split!r} does not exist for {missing}; use test or dev")
        if limit is not None and limit < 2:
            raise PrunebenchError(f"eval.sts.limit={limit} must be at least 2 pairs (or null for all)")
        self.split, self.limit, self.seed = split, limit, seed
        self.pooling, self.prompt, self.max_length, self.batch_size = pooling, prompt, max_length, batch_size

    def __call__(self, model, tokenizer) -> dict[str, float]:
        out = {}
        for name in self.sets:
            pairs = sts(name, self.split).sample(self.limit, self.seed)
            e1, e2 = (embed(model, tokenizer, texts, self.pooling, self.prompt, self.batch_size, self.max_length)
                      for texts in (pairs.first, pairs.second))  # fmt: skip
            out.update({f"{name}_{k}": v for k, v in sts_scores(e1, e2, pairs.labels).items()})
        return out
