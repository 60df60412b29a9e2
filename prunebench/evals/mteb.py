"""Any MTEB task on the in-memory (pruned) encoder, scored by MTEB's own evaluators: MTEB 2
(Muennighoff et al., arXiv 2210.07316; MMTEB, Enevoldsen et al., arXiv 2502.13595).

The encoder is wrapped as MTEB's `EncoderProtocol`; sentences are embedded as `eval=sts` embeds them
(`prunebench.models.encoders.embed`: the model config's pooling, instruction prefix and max length)
and compared by cosine similarity. Each task gives its main score on MTEB's scale (e.g.
STSBenchmark's `cosine_spearman` in [-1, 1], where `eval=sts` reports x100) as
`<task>/<main score>`; tasks with several splits or language subsets add them:
`<task>/<subset>/<split>/<main score>`.

STSBenchmark reads the local STS-B test split (../shared/data/stsb, the same 1,379 pairs as
`mteb/stsbenchmark-sts`), so it runs offline; `limit` takes a seeded subset of its pairs. Every
other task reads its data through `datasets` (the Hub or its local cache); where neither has it,
one line names the task and the Hub.

    eval: {mteb: {_target_: prunebench.evals.mteb.MTEB, tasks: [STSBenchmark], pooling: mean}}
"""

from __future__ import annotations

import numpy as np
from torch import nn

from prunebench import PrunebenchError
from prunebench.evals.lm_eval import _first_line, _hub_failure, safe
from prunebench.knobs import Batch, Positions, Seed, Windows
from prunebench.models.encoders import embed

# MTEB task -> {MTEB split: (prunebench STS set, its split)} read from a data root instead of the Hub.
LOCAL = {"STSBenchmark": {"test": ("stsb_en", "test")}}


class Encoder:
    """MTEB's `EncoderProtocol` over a (model, tokenizer) pair in memory (no save and reload)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, pooling: str, prompt: str | None, max_length: int,
                 batch_size: int):  # fmt: skip
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.prompt, self.max_length, self.batch_size = pooling, prompt, max_length, batch_size
        self.mteb_model_meta = ModelMeta.create_empty(
            {"name": f"prunebench/{name}", "revision": "in-memory", "similarity_fn_name": ScoringFunction.COSINE}
        )

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        return embed(self.model, self.tokenizer, texts, self.pooling, self.prompt, self.batch_size,
                     self.max_length).numpy()  # fmt: skip

    def similarity(self, e1, e2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(e1, e2)

    def similarity_pairwise(self, e1, e2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(e1, e2)


def load_local(task, limit: int | None = None, seed: int = 0) -> None:
    """Give an MTEB task its data from the local files (the columns MTEB's STS tasks read); `limit`:
    a seeded random subset of that many pairs per split."""
    from datasets import Dataset, DatasetDict

    from prunebench.data.labelled import sts

    splits = {}
    for split, (name, ours) in LOCAL[task.metadata.name].items():
        pairs = sts(name, ours).sample(limit, seed)
        splits[split] = Dataset.from_dict({"sentence1": pairs.first, "sentence2": pairs.second, "score": pairs.labels})
    task.dataset, task.data_loaded = DatasetDict(splits), True


class MTEB:
    def __init__(
        self,
        tasks: list[str] | None = ("STSBenchmark",),
        local: bool = True,
        pooling: str = "mean",
        prompt: str | None = None,
        max_length: Positions = 128,
        batch_size: Batch | None = 64,
        limit: Windows | None = None,
        seed: Seed = 0,
        name: str = "model",
    ):
        if not tasks:
            raise PrunebenchError("eval.mteb.tasks is empty; name MTEB tasks, e.g. eval.mteb.tasks=[STSBenchmark]")
        if limit is not None and limit < 2:
            raise PrunebenchError(f"eval.mteb.limit={limit} must be at least 2 pairs (or null for all)")
        self.tasks, self.local, self.limit, self.seed, self.name = list(tasks), local, limit, seed, name
        self.pooling, self.prompt, self.max_length, self.batch_size = pooling, prompt, max_length, batch_size

    def _load(self) -> list:
        """MTEB task objects with their data (local files, the datasets cache or the Hub)."""
        import mteb

        tasks = []
        for name in self.tasks:
            try:
                task = mteb.get_task(name)
            except KeyError:
                raise PrunebenchError(
                    f"eval.mteb.tasks: unknown MTEB task {name!r}; list them with `mteb.get_tasks()`"
                ) from None
            if self.local and name in LOCAL:
                load_local(task, self.limit, self.seed)
            elif self.limit is not None:
                raise PrunebenchError(
                    f"eval.mteb.limit subsamples local tasks only ({', '.join(LOCAL)}); {name!r} runs in full:"
                    " set eval.mteb.limit=null"
                )
            else:
                try:
                    task.load_data()
                except Exception as e:  # noqa: BLE001 - any failure to get a task's data becomes one line
                    where = "from the Hugging Face Hub, which is unreachable here" if _hub_failure(e) else "loaded"
                    raise PrunebenchError(
                        f"eval.mteb: task {name!r} needs its data {where} ({_first_line(e)});"
                        f" offline tasks: {', '.join(LOCAL)}"
                    ) from None
            tasks.append(task)
        return tasks

    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        import mteb

        if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            raise PrunebenchError("eval.mteb needs an encoder (model.kind=encoder); for causal LMs: eval=lm_eval")
        encoder = Encoder(model, tokenizer, self.name, self.pooling, self.prompt, self.max_length, self.batch_size)
        # cache=None: never reuse results MTEB stored for another model under the same name
        tasks = self._load()
        mains = {t.metadata.name: t.metadata.main_score for t in tasks}
        out = mteb.evaluate(encoder, tasks, cache=None, co2_tracker=False, show_progress_bar=False,
                            encode_kwargs={"batch_size": self.batch_size})  # fmt: skip
        metrics = {}
        for result in out.task_results:
            for split, rows in result.scores.items():
                for row in rows:
                    parts = [result.task_name]
                    parts += [row["hf_subset"]] if len(rows) > 1 or row["hf_subset"] != "default" else []
                    parts += [split] if len(result.scores) > 1 else []
                    metrics["/".join(map(safe, [*parts, mains[result.task_name]]))] = float(
                        np.asarray(row["main_score"])
                    )
        return metrics
