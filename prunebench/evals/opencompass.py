"""OpenCompass-style benchmark subsets: a preset of `eval=lm_eval` (lm-evaluation-harness on the
local task files of ../shared/data, the model passed in memory) with LaCo's categories and averages.

Categories as LaCo (arXiv 2402.11187) groups its OpenCompass tasks, restricted to what exists
offline: reasoning (HellaSwag, PIQA, WinoGrande), knowledge (BoolQ, OpenBookQA), examination
(ARC-Easy, ARC-Challenge), understanding (RTE).
- PPL mode: the option with the highest log-likelihood wins (lm-eval `multiple_choice`, `acc`);
  WinoGrande scores the shared continuation after each filled-in context, as lm-eval does.
- GEN mode: greedy generation after lettered options; the first A–D letter is the answer
  (`exact_match`). WinoGrande has no GEN form here (two contexts, no question).
Scores are in [0, 1]; `avg` is the mean over tasks, `<category>` the mean over its tasks. LaCo's
"Per." (mean over tasks of pruned / dense) is added by the pipeline from the dense baseline.

    eval: {opencompass: {_target_: prunebench.evals.opencompass.OpenCompass, mode: ppl, limit: 200}}
"""

from __future__ import annotations

import statistics

from torch import nn

from prunebench import PrunebenchError
from prunebench.evals.lm_eval import FILES, LMEval, load_task, task_config

__all__ = ["CATEGORIES", "FILES", "OpenCompass", "load_task", "task_config"]

CATEGORIES = {
    "hellaswag": "reasoning", "piqa": "reasoning", "winogrande": "reasoning",
    "boolq": "knowledge", "openbookqa": "knowledge",
    "arc_easy": "examination", "arc_challenge": "examination",
    "rte": "understanding",
}  # fmt: skip


class OpenCompass(LMEval):
    key = "opencompass"

    def __init__(
        self,
        tasks: list[str] | None = None,
        mode: str = "ppl",
        limit: int | None = None,
        batch_size: int = 8,
        cache_dir: str | None = None,
    ):
        tasks = list(tasks or CATEGORIES)
        unknown = [t for t in tasks if t not in CATEGORIES]
        if unknown:
            raise PrunebenchError(f"eval.opencompass.tasks: unknown {unknown}; known: {', '.join(CATEGORIES)}")
        if mode not in ("ppl", "gen"):
            raise PrunebenchError(f"eval.opencompass.mode={mode!r} must be 'ppl' or 'gen'")
        if mode == "gen":
            tasks = [t for t in tasks if t != "winogrande"]
        # bootstrap_iters=0: no standard errors (only the accuracies are kept)
        super().__init__(tasks, limit=limit, batch_size=batch_size, local=True, bootstrap_iters=0, cache_dir=cache_dir)
        self.mode = mode

    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        rows = self.results(model, tokenizer)
        metric = "acc,none" if self.mode == "ppl" else "exact_match,letter"
        scores = {n: float(rows[n][metric]) for n in self.tasks}
        result = dict(scores)
        for cat in sorted(set(CATEGORIES[n] for n in self.tasks)):
            result[f"cat_{cat}"] = statistics.mean(s for n, s in scores.items() if CATEGORIES[n] == cat)
        result["avg"] = statistics.mean(scores.values())
        return result

    def relative(self, metrics: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
        """LaCo's Per.: mean over tasks of the pruned score / the dense score."""
        ratios = [metrics[t] / dense[t] for t in self.tasks if dense.get(t)]
        return {"per": statistics.mean(ratios)} if ratios else {}
