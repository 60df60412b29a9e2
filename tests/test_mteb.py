"""eval=mteb: any MTEB task on the in-memory tiny BERT through MTEB's own evaluator, STS-B offline."""

from __future__ import annotations

import pytest

from prunebench import PrunebenchError
from prunebench.config import instantiate
from prunebench.evals.mteb import MTEB
from prunebench.evals.sts import STS
from tests.conftest import compose_cfg


@pytest.mark.parametrize("tiny", ["tiny-bert"], indirect=True)
def test_stsbenchmark_from_local_data_equals_eval_sts(tiny):
    model, tok = tiny
    ev = instantiate(compose_cfg("model=tiny-bert", "eval=[mteb]", "eval.mteb.limit=300").eval.mteb)
    out = ev(model, tok)
    assert list(out) == ["STSBenchmark/cosine_spearman"]
    # MTEB's STS evaluator on the same 300 pairs, embedded the same way: our Spearman x100 (float64
    # cosines against MTEB's float32 ones)
    ours = STS(sets=["stsb_en"], limit=300, pooling=ev.pooling, max_length=ev.max_length, seed=ev.seed)(model, tok)
    assert -1.0 <= out["STSBenchmark/cosine_spearman"] <= 1.0
    assert 100 * out["STSBenchmark/cosine_spearman"] == pytest.approx(ours["stsb_en_spearman"], abs=1e-3)


def test_bad_input_is_one_line(tiny, monkeypatch):
    model, tok = tiny  # tiny-llama: a causal LM
    with pytest.raises(PrunebenchError, match="needs an encoder"):
        MTEB(tasks=["STSBenchmark"])(model, tok)
    with pytest.raises(PrunebenchError, match="tasks is empty"):
        MTEB(tasks=[])
    with pytest.raises(PrunebenchError, match="unknown MTEB task 'Nope'"):
        MTEB(tasks=["Nope"])._load()
    with pytest.raises(PrunebenchError, match="subsamples local tasks only"):
        MTEB(tasks=["SICK-R"], limit=10)._load()
    # A task without local data, the Hub unreachable (offline mode): one line naming the task and the Hub.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrunebenchError, match="'SICK-R' needs its data from the Hugging Face Hub") as err:
        MTEB(tasks=["SICK-R"])._load()
    assert "\n" not in str(err.value)
