"""recovery.source as the user's files (recovery/corpus.py): jsonl, json, parquet, txt and .npy token
ids give identical windows; missing files, absent fields and evaluation files are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunebench import PrunebenchError
from prunebench.data import tokenize
from prunebench.recovery import corpus
from prunebench.recovery.train import check_source, text_windows

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(40)]


@pytest.fixture
def tok(tiny):
    return tiny[1]


def test_one_corpus_in_every_format_gives_the_same_windows(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "c.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    ids = tokenize(tok, "\n\n".join(DOCS))
    np.save(tmp_path / "c.npy", ids.numpy().astype(np.int32))
    ref = text_windows(tok, str(tmp_path / "c.jsonl"), 32)
    assert ref.shape[0] == len(ids) // 32 > 4
    for source, field in ((tmp_path / "j", "body"), (tmp_path / "c.parquet", "text"), (tmp_path / "c.npy", "text")):
        assert text_windows(tok, str(source), 32, field).equal(ref), source
    # A glob over shards: the same stream in sorted path order.
    (tmp_path / "s").mkdir()
    for k in range(2):
        chunk = ids[k * (len(ids) // 2) : (k + 1) * (len(ids) // 2) if k == 0 else None]
        np.save(tmp_path / "s" / f"shard{k}.npy", chunk.numpy())
    assert text_windows(tok, str(tmp_path / "s" / "*.npy"), 32).equal(ref)
    d = corpus.digest(str(tmp_path / "c.jsonl"))
    assert len(d["sha256"]) == 64 and d["files"] == [str(tmp_path / "c.jsonl")]


def test_bad_sources_are_one_line(tmp_path, tok):
    with pytest.raises(PrunebenchError, match="no such file or folder"):
        check_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(PrunebenchError, match="no field 'text'.*content.*recovery.text_field"):
        text_windows(tok, str(tmp_path / "c.jsonl"), 8)
    (tmp_path / "e").mkdir()
    with pytest.raises(PrunebenchError, match="no .jsonl"):
        check_source(str(tmp_path / "e"))


def test_an_evaluation_file_is_refused_by_path_and_by_checksum(tmp_path):
    from prunebench.data import text

    held = text.find(text.LOCAL["wikitext2_test"])
    if held is None:
        pytest.skip("wikitext2_test is not in a data root here")
    with pytest.raises(PrunebenchError, match="evaluation split wikitext2_test"):
        check_source(str(held))
    copy = tmp_path / "renamed.txt"  # a copy under another name and suffix: caught by its SHA-256
    copy.write_bytes(held.read_bytes())
    with pytest.raises(PrunebenchError, match="evaluation split wikitext2_test"):
        check_source(str(tmp_path))


def test_kd_trains_on_a_jsonl_file_end_to_end(tmp_path):
    """The issue's `recovery.source=<a .jsonl file>`: the run trains on it and names it with its digest."""
    import os
    import subprocess
    import sys

    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    out = tmp_path / "run"
    env = {**os.environ, "PRUNEBENCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = ["experiment=smoke/tiny", "pruner=wanda", "recovery=kd", "recovery.tokens=256", "recovery.seqlen=64",
            f"recovery.source={src}", f"hydra.run.dir={out}"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "prunebench", "run", *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "metrics.json").read_text())["recovery"]
    assert rec["source"] == str(src) and rec["source_digest"]["files"] == [str(src)]
    assert rec["steps"] == 4 and rec["tokens"] == 256
