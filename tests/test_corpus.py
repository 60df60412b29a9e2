"""recovery.source as the user's data (recovery/corpus.py): jsonl, json, parquet, arrow, txt and
pre-tokenized .npy / .bin / input_ids tables give identical windows; a Hub id (hf:) loads, streams up
to the token budget, refuses evaluation splits and ends in one line without the Hub; ranks read
disjoint windows (engine.Engine.index); missing files, absent fields, out-of-vocabulary ids and
evaluation files are refused."""

from __future__ import annotations

import json
import struct

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


def test_txt_bin_and_arrow_give_the_same_windows(tmp_path, tok):
    """The issue's "one corpus given as jsonl, parquet and pre-tokenized shards yields identical windows",
    for the formats added with it: .txt (one document per file), raw .bin ids (nanoGPT's uint16 for a
    vocabulary < 65,536; int32 named by a Megatron .idx), .arrow as datasets' save_to_disk writes it,
    and pre-tokenized input_ids tables (Arrow IPC file, Parquet)."""
    import datasets
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    ref = text_windows(tok, str(tmp_path / "c.jsonl"), 32)
    ids = tokenize(tok, "\n\n".join(DOCS)).numpy()
    assert corpus.vocab_size(tok) < 65536 and ids.max() < corpus.vocab_size(tok)
    (tmp_path / "t").mkdir()
    for i, d in enumerate(DOCS):  # sorted path order is document order
        (tmp_path / "t" / f"{i:03d}.txt").write_text(d)
    ids.astype("<u2").tofile(tmp_path / "c.bin")
    (tmp_path / "m").mkdir()  # Megatron: .bin beside an .idx whose header names int32 (code 4)
    ids.astype("<i4").tofile(tmp_path / "m" / "c.bin")
    header = corpus.MEGATRON_IDX + struct.pack("<Q", 1) + struct.pack("<B", 4)  # magic, version 1, dtype code
    (tmp_path / "m" / "c.idx").write_bytes(header + b"\0" * 16)
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "state.json").exists()  # save_to_disk's metadata: skipped, not read as text
    rows = [ids[i : i + 50].tolist() for i in range(0, len(ids), 50)]  # pre-tokenized, any row length
    feather.write_feather(pa.table({"input_ids": rows}), tmp_path / "ids.arrow")
    pq.write_table(pa.table({"input_ids": rows, "text": ["not this"] * len(rows)}), tmp_path / "ids.parquet")
    for source in ("t", "c.bin", "m", "m/c.bin", "saved", "saved/*.arrow", "ids.arrow", "ids.parquet"):
        assert text_windows(tok, str(tmp_path / source), 32).equal(ref), source
        check_source(str(tmp_path / source))  # and the pre-load check accepts each
    assert corpus.check(str(tmp_path / "ids.parquet")) == "ids" and corpus.check(str(tmp_path / "saved")) == "text"


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_file(tmp_path, tok):
    vocab = corpus.vocab_size(tok)
    bad = np.array([1, 2, vocab, 3], dtype="<u2")  # one id past the end: e.g. written by another tokenizer
    bad.tofile(tmp_path / "c.bin")
    with pytest.raises(PrunebenchError, match=rf"c\.bin holds token id {vocab}, outside the tokenizer's vocabulary"):
        text_windows(tok, str(tmp_path / "c.bin"), 2)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")  # not a whole number of uint16 ids
    with pytest.raises(PrunebenchError, match="odd.bin is 3 bytes, not a whole number of uint16"):
        text_windows(tok, str(tmp_path / "odd.bin"), 1)
    np.save(tmp_path / "neg.npy", np.array([5, -1, 6]))
    with pytest.raises(PrunebenchError, match="neg.npy holds token id -1"):
        text_windows(tok, str(tmp_path / "neg.npy"), 1)
    np.save(tmp_path / "f.npy", np.array([1.5, 2.0]))
    with pytest.raises(PrunebenchError, match="f.npy holds float64 values"):
        text_windows(tok, str(tmp_path / "f.npy"), 1)


def test_corpus_kinds_and_knobs_are_checked_before_loading(tmp_path):
    """Refusals that need no tokenizer: mixed kinds, a saved DatasetDict, a table without the text
    column, and knobs the source ignores (check_source runs in the recovery's constructor)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    np.save(tmp_path / "mix" / "b.npy", np.arange(4))
    with pytest.raises(PrunebenchError, match=r"mixes text \(a.jsonl\) and pre-tokenized token ids \(b.npy\)"):
        check_source(str(tmp_path / "mix"))
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": ["a"]}) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PrunebenchError, match=r"saved DatasetDict \(splits: test, train\); name one split"):
        check_source(str(tmp_path / "dd"))
    check_source(str(tmp_path / "dd" / "train"))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(PrunebenchError, match="c.parquet has no column 'text'.*columns: body.*recovery.text_field"):
        check_source(str(tmp_path / "c.parquet"))
    check_source(str(tmp_path / "c.parquet"), text_field="body")
    with pytest.raises(PrunebenchError, match="recovery.source_split=train is ignored"):
        check_source(str(tmp_path / "c.parquet"), text_field="body", source_split="train")
    with pytest.raises(PrunebenchError, match="recovery.streaming=True is ignored"):
        check_source("c4", streaming=True)
    with pytest.raises(PrunebenchError, match="recovery.text_field=body is ignored by the built-in"):
        check_source("c4", text_field="body")
    with pytest.raises(PrunebenchError, match="recovery.text_field=body is ignored.*holds token ids"):
        check_source(str(tmp_path / "mix" / "b.npy"), text_field="body")
    with pytest.raises(PrunebenchError, match="a Hub dataset can only be recovery.source"):
        check_source("hf:allenai/c4", "recovery.val_source")
    assert not corpus.is_path("hf:allenai/c4") and corpus.is_hub("hf:allenai/c4")


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


def test_kd_trains_on_a_jsonl_file_end_to_end(tmp_path, cli_inproc):
    """The issue's `recovery.source=<a .jsonl file>`: the run trains on it and names it with its digest."""
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    out = tmp_path / "run"
    args = ["experiment=smoke/tiny", "pruner=wanda", "recovery=kd", "recovery.tokens=256", "recovery.seqlen=64",
            f"recovery.source={src}", f"hydra.run.dir={out}"]  # fmt: skip
    r = cli_inproc("run", *args)
    assert r.exit_code == 0, r.stderr[-2000:]
    rec = json.loads((out / "metrics.json").read_text())["recovery"]
    assert rec["source"] == str(src) and rec["source_digest"]["files"] == [str(src)]
    assert rec["steps"] == 4 and rec["tokens"] == 256


# --- hf:<dataset id> -------------------------------------------------------------------------------------


def test_a_hub_dataset_without_the_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # what a cluster's compute node (or this machine) is
    with pytest.raises(PrunebenchError, match="hf:HuggingFaceFW/fineweb-edu: the Hugging Face Hub is unreachable"):
        check_source("hf:HuggingFaceFW/fineweb-edu", source_config="sample-10BT", streaming=True)
    for split in ("test", "validation", "train+test", "test[:10%]"):  # evaluation splits: refused even online
        with pytest.raises(PrunebenchError, match="evaluation data and must never be trained on"):
            check_source("hf:wikitext", source_config="wikitext-2-raw-v1", source_split=split)
    with pytest.raises(PrunebenchError, match="the test split of allenai/c4"):
        check_source("hf:allenai/c4", source_split="test")
    with pytest.raises(PrunebenchError, match="give a Hugging Face dataset id"):
        check_source("hf:not a/valid/id")


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub as `datasets` would serve it, from memory: `load_dataset` returns the registered rows
    (an IterableDataset when streaming), and counts the rows a stream handed out."""
    import datasets

    served, calls = {}, []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if (name, config, split) not in served:
            raise ValueError(f"Couldn't find split {split!r} of {name!r}")
        ds = datasets.Dataset.from_dict(served[name, config, split])
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr("prunebench.models.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served, calls


def test_a_hub_split_loads_or_streams_up_to_the_token_budget(tmp_path, tok, fake_hub):
    served, calls = fake_hub
    served["me/corpus", "en", "train"] = {"text": DOCS, "id": list(range(len(DOCS)))}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    ref = text_windows(tok, str(tmp_path / "c.jsonl"), 32)
    kw = {"source_config": "en"}
    check_source("hf:me/corpus", **kw)
    assert text_windows(tok, "hf:me/corpus", 32, **kw).equal(ref)  # the whole split, as the same file gives
    assert calls[-1] == ("me/corpus", "en", "train", False)
    full = corpus.digest("hf:me/corpus")
    assert full["documents"] == len(DOCS) and full["split"] == "train" and len(full["sha256"]) == 64
    budget = 4 * 32
    streamed = text_windows(tok, "hf:me/corpus", 32, **kw, streaming=True, tokens=budget)
    read = corpus.digest("hf:me/corpus")
    assert read["streaming"] and read["tokens"] >= budget and streamed.numel() >= budget
    assert 0 < read["documents"] < len(DOCS)  # stopped once the budget was covered ...
    needed = next(k for k in range(1, len(DOCS)) if len(tokenize(tok, "\n\n".join(DOCS[:k]))) >= budget)
    assert read["documents"] == needed  # ... by the first documents that cover it, and not one more
    assert streamed[:-1].equal(ref[: len(streamed) - 1])  # the same stream's beginning (the last window may differ)
    assert text_windows(tok, "hf:me/corpus", 32, **kw, streaming=True, tokens=10**9).equal(ref)  # a split too short
    assert corpus.digest("hf:me/corpus")["documents"] == len(DOCS)  # for the budget: all of it (windows recur)
    with pytest.raises(PrunebenchError, match=r"hf:me/corpus \(config en, split other\): datasets could not read it"):
        text_windows(tok, "hf:me/corpus", 32, **kw, source_split="other")
    with pytest.raises(PrunebenchError, match="no column 'body'"):
        text_windows(tok, "hf:me/corpus", 32, "body", **kw)


def test_a_pre_tokenized_hub_split_streams_its_input_ids(tok, fake_hub):
    served, _ = fake_hub
    ids = tokenize(tok, "\n\n".join(DOCS))
    rows = [ids[i : i + 20].tolist() for i in range(0, len(ids), 20)]
    served["me/ids", None, "train"] = {"input_ids": rows}
    whole = text_windows(tok, "hf:me/ids", 16)
    assert whole.equal(ids[: len(ids) // 16 * 16].view(-1, 16))
    streamed = text_windows(tok, "hf:me/ids", 16, streaming=True, tokens=64)
    assert corpus.digest("hf:me/ids")["documents"] == 4 and streamed.equal(whole[:5])  # 4 rows x 20 ids
    served["me/big", None, "train"] = {"input_ids": [[1, corpus.vocab_size(tok)]]}
    with pytest.raises(PrunebenchError, match="outside the tokenizer's vocabulary"):
        text_windows(tok, "hf:me/big", 1)


# --- ranks and the seeded window order --------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("micro,accum", [(1, 1), (2, 1), (1, 3), (3, 2)])
@pytest.mark.parametrize("extra", [0, 5])
def test_ranks_read_disjoint_windows_and_every_window_once_per_epoch(world, micro, accum, extra):
    """engine.Engine.index on every rank of a `world`-process job, without a process group: the ranks'
    micro-batches never overlap, each optimiser step reads exactly the global batch one process
    accumulating micro × accum × world windows reads, and every window comes once per epoch of the
    seeded order (`extra`: a corpus that is not a whole number of global batches)."""
    from prunebench.recovery.engine import Engine
    from prunebench.recovery.train import window_order

    g, steps = micro * accum * world, 12
    n = (steps // 2) * g + extra  # two epochs and a bit
    order = window_order(n, steps * g, seed=7)
    reader: dict[int, int] = {}  # position in the order -> the rank that read it
    for rank in range(world):
        e = object.__new__(Engine)  # the index arithmetic alone: no Accelerator, no process group
        e.rank, e.world, e.micro_batch, e.grad_accum = rank, world, micro, accum
        assert e.global_batch == g
        for step in range(steps):
            for m in range(accum):
                for pos in range(e.index(step, m), e.index(step, m) + micro):
                    assert pos not in reader, (pos, rank, reader.get(pos))
                    reader[pos] = rank
    for step in range(steps):  # one step over all ranks = one process's step of accum·world micro-batches
        assert {p for p in reader if step * g <= p < (step + 1) * g} == set(range(step * g, (step + 1) * g))
    assert sorted(reader) == list(range(steps * g))
    for epoch in range(steps * g // n):  # every complete epoch of the order: each window exactly once
        windows = order[epoch * n : (epoch + 1) * n].tolist()
        assert sorted(windows) == list(range(n))
        shares = [{w for p, w in enumerate(windows, epoch * n) if reader[p] == r} for r in range(world)]
        assert sum(map(len, shares)) == n
        assert all(a.isdisjoint(b) for i, a in enumerate(shares) for b in shares[i + 1 :])
