"""OpenCompass-style benchmark subsets, run through lm-eval (lm-evaluation-harness) with task
definitions over the local files of ../shared/data and the model passed in memory.

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

import bz2
import json
import statistics
from pathlib import Path

from torch import nn

from prunebench import PrunebenchError
from prunebench.data import find

CATEGORIES = {
    "hellaswag": "reasoning", "piqa": "reasoning", "winogrande": "reasoning",
    "boolq": "knowledge", "openbookqa": "knowledge",
    "arc_easy": "examination", "arc_challenge": "examination",
    "rte": "understanding",
}  # fmt: skip
FILES = {
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2", "piqa": "piqa/valid.jsonl",
    "winogrande": "winogrande/winogrande.jsonl", "boolq": "boolq/boolq.jsonl",
    "openbookqa": "openbookqa/openbook_qa.jsonl", "arc_easy": "arc_easy/arc_easy.jsonl",
    "arc_challenge": "arc_challenge/arc_challenge.jsonl", "rte": "rte/val.jsonl",
}  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_task(name: str) -> list[dict]:
    """Rows as {query, choices, gold} (WinoGrande: {contexts, continuation, gold}), from the local
    copies' formats (../shared/data/*/SOURCE.md)."""
    path = find(FILES[name])
    if path is None:
        raise PrunebenchError(f"{FILES[name]} not found in any data root; set PRUNEBENCH_DATA (see README, Data)")
    if name == "hellaswag":  # 6 lines per item: context, gold, four endings
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        return [{"query": lines[i], "choices": lines[i + 2 : i + 6], "gold": int(lines[i + 1])}
                for i in range(0, len(lines) - 5, 6)]  # fmt: skip
    if name == "piqa":
        labels = (path.parent / "valid-labels.lst").read_text().split()
        return [{"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": int(g)}
                for d, g in zip(_jsonl(path), labels, strict=True)]  # fmt: skip
    if name == "winogrande":
        return [{"contexts": d["context_options"], "continuation": d["continuation"], "gold": d["gold"]}
                for d in _jsonl(path)]  # fmt: skip
    if name == "rte":
        return [{"query": f"{d['premise']}\nQuestion: {d['hypothesis']} True or False?\nAnswer:",
                 "choices": ["True", "False"], "gold": 0 if d["label"] == "entailment" else 1}
                for d in _jsonl(path)]  # fmt: skip
    rows = _jsonl(path)  # MosaicML ICL schema: {query, choices, gold}
    suffix = "\nAnswer:" if name in ("boolq", "arc_easy", "arc_challenge") else ""
    return [{"query": d["query"] + suffix, "choices": d["choices"], "gold": d["gold"]} for d in rows]


def task_config(name: str, path: Path, mode: str) -> dict:
    """An lm-eval task definition over a normalised JSONL file."""
    base = {"task": f"prunebench_{name}_{mode}", "dataset_path": "json", "test_split": "train",
            "dataset_kwargs": {"data_files": str(path)}}  # fmt: skip
    if mode == "ppl":
        if name == "winogrande":  # lm-eval's multiple-input form: text = gold index, choices = contexts
            fields = {"doc_to_text": lambda d: d["gold"], "doc_to_choice": lambda d: d["contexts"],
                      "doc_to_target": lambda d: d["continuation"]}  # fmt: skip
        else:
            fields = {"doc_to_text": lambda d: d["query"], "doc_to_choice": lambda d: d["choices"],
                      "doc_to_target": lambda d: d["gold"]}  # fmt: skip
        return {**base, **fields, "output_type": "multiple_choice", "metric_list": [{"metric": "acc"}]}
    letters = "ABCDEFGH"

    def prompt(d: dict) -> str:
        options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(d["choices"]))
        return f"{d['query']}\n{options}\nAnswer:"

    return {**base, "output_type": "generate_until", "doc_to_text": prompt,
            "doc_to_target": lambda d: letters[d["gold"]],
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            "filter_list": [{"name": "letter", "filter": [
                {"function": "regex", "regex_pattern": r"\b([A-H])\b"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match"}]}  # fmt: skip


class OpenCompass:
    def __init__(
        self,
        tasks: list[str] | None = None,
        mode: str = "ppl",
        limit: int | None = None,
        batch_size: int = 1,
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
        self.tasks, self.mode, self.limit, self.batch_size = tasks, mode, limit, batch_size
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "prunebench") / "lmeval"

    def _files(self) -> dict[str, Path]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in self.tasks:
            rows = load_task(name)
            path = self.cache_dir / f"{name}.jsonl"
            text = "".join(json.dumps(r) + "\n" for r in rows)
            if not path.exists() or path.read_text() != text:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(path)
            files[name] = path
        return files

    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if model.get_output_embeddings() is None:
            raise PrunebenchError("eval=opencompass needs a causal language model (an LM head)")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        configs = [task_config(n, p, self.mode) for n, p in self._files().items()]
        out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=self.limit, log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")  # fmt: skip
        metric = "acc,none" if self.mode == "ppl" else "exact_match,letter"
        scores = {n: float(out["results"][f"prunebench_{n}_{self.mode}"][metric]) for n in self.tasks}
        result = {f"{n}": s for n, s in scores.items()}
        for cat in sorted(set(CATEGORIES[n] for n in self.tasks)):
            result[f"cat_{cat}"] = statistics.mean(s for n, s in scores.items() if CATEGORIES[n] == cat)
        result["avg"] = statistics.mean(scores.values())
        return result

    def relative(self, metrics: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
        """LaCo's Per.: mean over tasks of the pruned score / the dense score."""
        ratios = [metrics[t] / dense[t] for t in self.tasks if dense.get(t)]
        return {"per": statistics.mean(ratios)} if ratios else {}
