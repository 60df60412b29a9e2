"""Any lm-evaluation-harness task on the in-memory (pruned) model: lm-eval 0.4 (EleutherAI,
github.com/EleutherAI/lm-evaluation-harness) scores the model through its `HFLM` wrapper, with no
save and reload, on the device the model is on.

Every task metric and its standard error is returned as `<task>/<metric>` (`<metric>_<filter>` when
lm-eval applies a filter other than `none`), e.g. `lm_eval/arc_easy/acc`, `lm_eval/arc_easy/acc_stderr`.
Groups such as `mmlu` give their aggregate and one entry per subtask.

Eight tasks have a local copy (../shared/data; `local: true`, the default) and run offline under the
lm-eval task name: hellaswag, piqa, winogrande, boolq, openbookqa, arc_easy, arc_challenge, rte. Their
prompts are lm-eval's (`Question: ...\\nAnswer:` and so on); scores are `acc` (highest log-likelihood
option) and, where lm-eval's own task reports it, `acc_norm` (log-likelihood per byte). Every other
task reads its data through `datasets` (the Hub or its local cache); where neither has it, one line
names the task and the Hub. `local: false` sends the eight to the Hub too.

    eval: {lm_eval: {_target_: prunebench.evals.lm_eval.LMEval, tasks: [arc_easy, hellaswag], limit: 100}}
"""

from __future__ import annotations

import bz2
import functools
import json
import re
from pathlib import Path

from torch import nn

from prunebench import PrunebenchError
from prunebench.data import find
from prunebench.knobs import Batch, Windows

# Local copies of lm-eval tasks, relative to a data root (formats in ../shared/data/*/SOURCE.md).
FILES = {
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2", "piqa": "piqa/valid.jsonl",
    "winogrande": "winogrande/winogrande.jsonl", "boolq": "boolq/boolq.jsonl",
    "openbookqa": "openbookqa/openbook_qa.jsonl", "arc_easy": "arc_easy/arc_easy.jsonl",
    "arc_challenge": "arc_challenge/arc_challenge.jsonl", "rte": "rte/val.jsonl",
}  # fmt: skip
NORMALISED = {"hellaswag", "piqa", "openbookqa", "arc_easy", "arc_challenge"}  # lm-eval also reports acc_norm


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


def _row_text(name: str) -> list[str]:
    """Every string a task's rows show the model, one text a row."""
    texts = []
    for row in load_task(name):
        parts = [row.get("query", ""), *row.get("choices", []), *row.get("contexts", []), row.get("continuation", "")]
        texts.append("\n".join(p for p in parts if isinstance(p, str) and p))
    return texts


def local_file(name: str, cache_dir: Path) -> Path:
    """The task's rows normalised to one JSONL file under cache_dir (rewritten only when changed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in load_task(name))
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def task_config(name: str, path: Path, mode: str, metrics: tuple[str, ...] = ("acc",)) -> dict:
    """An lm-eval task definition over a normalised JSONL file. ppl: the option with the highest
    log-likelihood wins (`multiple_choice`); gen: greedy generation after lettered options, the
    first A–H letter is the answer (`exact_match`)."""
    base = {"task": f"prunebench_{name}_{mode}", "dataset_path": "json", "test_split": "train",
            "dataset_kwargs": {"data_files": str(path)}}  # fmt: skip
    if mode == "ppl":
        if name == "winogrande":  # lm-eval's multiple-input form: text = gold index, choices = contexts
            fields = {"doc_to_text": lambda d: d["gold"], "doc_to_choice": lambda d: d["contexts"],
                      "doc_to_target": lambda d: d["continuation"]}  # fmt: skip
        else:
            fields = {"doc_to_text": lambda d: d["query"], "doc_to_choice": lambda d: d["choices"],
                      "doc_to_target": lambda d: d["gold"]}  # fmt: skip
        return {**base, **fields, "output_type": "multiple_choice", "metric_list": [{"metric": m} for m in metrics]}
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the `tokenizers` ByteLevel step uses)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:  # control bytes and spaces map past 255
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def hf_tokenizer(tokenizer):
    """A Hugging Face fast tokenizer for HFLM, which accepts nothing else. The tiny models' byte
    tokenizer becomes an equivalent one: the same ids (byte + 3; pad 0, bos 1, eos 2)."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab = {**specials, **{c: b + 3 for b, c in _bytes_to_unicode().items()}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex("."), "isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@functools.cache
def task_manager(defaults: bool):
    """lm-eval's task index; indexing its ~15,000 built-in tasks takes seconds, so it is built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults)


def safe(name: str) -> str:
    """A metric-name fragment safe in metrics.json keys, file names and report columns."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _hub_failure(error: BaseException) -> bool:
    """Whether the error chain says the data could not be fetched (no network, offline mode, not cached)."""
    while error is not None:
        if isinstance(error, (ConnectionError, FileNotFoundError, TimeoutError)) or "Hub" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class LMEval:
    needs_lm = "lm-eval's log-likelihoods"
    supports_offload = False  # HFLM runs the whole model where it is
    key = "lm_eval"  # the eval config key, for messages

    def __init__(
        self,
        tasks: list[str] | None = ("arc_easy", "hellaswag"),
        num_fewshot: int | None = None,
        limit: Windows | None = None,
        batch_size: Batch | None = 8,
        local: bool = True,
        bootstrap_iters: int = 1000,
        cache_dir: str | None = None,
    ):
        if not tasks:
            raise PrunebenchError("eval.lm_eval.tasks is empty; name lm-eval tasks, e.g. eval.lm_eval.tasks=[arc_easy]")
        if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise PrunebenchError(f"eval.lm_eval.num_fewshot={num_fewshot} must be a non-negative integer or null")
        self.tasks, self.num_fewshot, self.limit, self.batch_size = list(tasks), num_fewshot, limit, batch_size
        self.local, self.bootstrap_iters, self.mode = local, bootstrap_iters, "ppl"
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "prunebench") / "lmeval"

    def check(self, num_layers: int, dims=None) -> None:
        """Before any model loads (config.validate): every task name lm-eval does not know."""
        self._check_tasks([name for name in self.tasks if not (self.local and name in FILES)])

    def evaluation_text(self) -> dict[str, list]:
        """The text of each local task (queries, choices, contexts, continuations) as one overlap form
        (data/overlap.py), for the contamination gate of a training source; Hub tasks are not read here."""
        from prunebench.data import overlap, verify

        out = {}
        for name in self.tasks:
            if self.local and name in FILES and (path := find(FILES[name])) is not None:
                label = f"lm_eval/{name}"
                rows = lambda n=name: overlap.joined(_row_text(n))  # noqa: E731 - read only when not cached
                out[label] = [(label, f"{verify.sha256(path)}:{name}:rows", rows)]
        return out

    def _check_tasks(self, hub: list[str]):
        manager = task_manager(bool(hub))  # built once per process: the run reuses the index
        if unknown := [t for t in hub if t not in set(manager.all_tasks)]:
            raise PrunebenchError(
                f"eval.{self.key}.tasks: unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`"
            )
        return manager

    def _specs(self) -> tuple[list, dict[str, str]]:
        """lm-eval task specs (a config dict for a local task, the name otherwise) and the lm-eval
        name -> our name of the local ones."""
        specs, names = [], {}
        for name in self.tasks:
            if self.local and name in FILES:
                metrics = ("acc", "acc_norm") if name in NORMALISED and self.mode == "ppl" else ("acc",)
                config = task_config(name, local_file(name, self.cache_dir), self.mode, metrics)
                specs.append(config)
                names[config["task"]] = name
            else:
                specs.append(name)
        return specs, names

    def results(self, model: nn.Module, tokenizer) -> dict[str, dict]:
        """lm-eval's `results` table ({task: {"<metric>,<filter>": value}}), local tasks under our names."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from prunebench.placement import compute_device

        if model.get_output_embeddings() is None:
            raise PrunebenchError(
                f"eval.{self.key} needs a causal language model (an LM head); for encoders: eval=mteb"
            )
        specs, names = self._specs()
        hub = [s for s in specs if isinstance(s, str)]
        manager = self._check_tasks(hub)
        try:
            loaded = manager.load(specs)  # builds the tasks: reads their data (local files, cache or Hub)
        except Exception as e:  # noqa: BLE001 - any failure to get a task's data becomes one line
            if hub and _hub_failure(e):
                raise PrunebenchError(
                    f"eval.{self.key}: task(s) {hub} need their data from the Hugging Face Hub, which is unreachable"
                    f" here ({_first_line(e)}); offline tasks: {', '.join(FILES)}"
                ) from None
            raise PrunebenchError(f"eval.{self.key}: could not build tasks {self.tasks}: {_first_line(e)}") from None
        children = {c for kids in loaded["group_map"].values() for c in kids}
        built = [t for n, t in {**loaded["groups"], **loaded["tasks"]}.items() if n not in children]

        lm = HFLM(pretrained=model, tokenizer=hf_tokenizer(tokenizer), batch_size=self.batch_size)
        lm._device = compute_device(model)  # inputs go where the embeddings are (device_map placement)
        out = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=manager, num_fewshot=self.num_fewshot,
                                      limit=self.limit, log_samples=False, bootstrap_iters=self.bootstrap_iters,
                                      verbosity="ERROR")  # fmt: skip
        return {names.get(t, t): r for t, r in out["results"].items()}

    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        metrics = {}
        for task, row in self.results(model, tokenizer).items():
            for key, value in row.items():
                metric, _, filt = key.partition(",")
                # "N/A": a standard error lm-eval did not compute; bools are not scores
                if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                name = metric if filt == "none" else f"{metric}_{filt}"
                metrics[f"{safe(task)}/{safe(name)}"] = float(value)
        return metrics
