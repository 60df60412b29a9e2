"""Data integrity: files are checked against their SOURCE.md SHA-256 before they are read, hashed
once (digest cache), recorded, and a missing file is named instead of read from another root.
Every test works on a temporary copy of WikiText-2 test; ../shared/data is only read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import datasets
import pytest

from prunebench import PrunebenchError, cache
from prunebench.data import text, verify

SHARED = text.CONF_DIR.parent.parent / "shared" / "data"
WIKI = "wikitext2/wikitext-2-raw/wiki.test.raw"
WIKI_SHA = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"  # wikitext2/SOURCE.md

pytestmark = pytest.mark.skipif(not (SHARED / WIKI).is_file(), reason="needs ../shared/data")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root holding a copy of wiki.test.raw and its SOURCE.md; a fresh digest cache."""
    data = tmp_path / "data"
    (data / WIKI).parent.mkdir(parents=True)
    shutil.copy(SHARED / "wikitext2/SOURCE.md", data / "wikitext2/SOURCE.md")
    shutil.copy(SHARED / WIKI, data / WIKI)
    monkeypatch.setenv("PRUNEBENCH_DATA", str(data))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_MEMO", {})
    verify.configure(verify=True, cache_dir=tmp_path / "cache")
    yield data
    verify.configure()


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_intact_copy_verifies_and_is_recorded(root):
    rows = text.load_texts("wikitext2_test")
    assert len(rows) == 4358 and rows[1] == " = Robert Boulter = \n"
    [rec] = verify.used()
    assert rec == {"name": WIKI, "path": str((root / WIKI).resolve()), "sha256": WIKI_SHA,
                   "verified": True, "status": "ok"}  # fmt: skip
    assert text.digest("wikitext2_test") == f"sha256:{WIKI_SHA}"


def test_truncated_file_stops_with_one_line(root):
    truncate(root / WIKI)
    with pytest.raises(PrunebenchError) as err:
        text.load_texts("wikitext2_test")
    msg = str(err.value)
    assert "\n" not in msg and str(root / WIKI) in msg and str(root / "wikitext2/SOURCE.md") in msg
    assert f"expected {WIKI_SHA[:12]}" in msg and "found " in msg and "data.verify=false" in msg
    assert verify.used() == []  # nothing was read


def test_verify_false_reads_it_with_a_warning(root, caplog):
    truncate(root / WIKI)
    verify.configure(verify=False)
    with caplog.at_level(logging.WARNING, logger="prunebench.data.verify"):
        rows = text.load_texts("wikitext2_test")
    assert 0 < len(rows) < 4358
    assert any("does not match" in r.message and "data.verify=false" in r.message for r in caplog.records)
    [rec] = verify.used()
    assert rec["status"] == "mismatch" and not rec["verified"] and rec["sha256"] != WIKI_SHA


def test_verify_knob_is_a_bool():
    with pytest.raises(PrunebenchError, match="data.verify must be true or false"):
        verify.configure(verify="maybe")


def test_deleted_file_is_named_not_read_from_another_root(root):
    (root / WIKI).unlink()
    with pytest.raises(PrunebenchError, match="is missing") as err:
        text.load_texts("wikitext2_test")
    assert str(root / WIKI) in str(err.value) and "\n" not in str(err.value)
    assert text.where("wikitext2_test") == f"{root / WIKI} (missing)"


def test_no_digest_known_is_read_and_recorded_unverified(root):
    (root / "wikitext2/SOURCE.md").unlink()
    assert len(text.load_texts("wikitext2_test")) == 4358
    assert verify.used()[0]["status"] == "unverified" and verify.used()[0]["sha256"] == WIKI_SHA


def test_binary_file_is_one_line(root):
    (root / "wikitext2/SOURCE.md").unlink()  # no digest: only the decoder can notice
    (root / WIKI).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 100)
    with pytest.raises(PrunebenchError, match="not UTF-8 text"):
        text.load_texts("wikitext2_test")


def test_digest_cache_hashes_each_file_once(root, monkeypatch):
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, algo: calls.append(f.name) or real(f, algo))
    path = root / WIKI
    assert verify.sha256(path) == WIKI_SHA and len(calls) == 1
    assert verify.sha256(path) == WIKI_SHA and len(calls) == 1  # same process: memo
    monkeypatch.setattr(cache, "_MEMO", {})  # a new process: the digest cache answers
    assert verify.sha256(path) == WIKI_SHA and len(calls) == 1
    [memo] = verify.digest_dir().iterdir()  # one small JSON, no temporary left
    assert json.loads(memo.read_text())["sha256"] == WIKI_SHA
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert verify.sha256(path) == WIKI_SHA and len(calls) == 2
    with path.open("ab") as f:  # grown: hashed again, new digest
        f.write(b"x")
    assert verify.sha256(path) != WIKI_SHA and len(calls) == 3
    memo.write_text('{"truncated')  # an unreadable memo: hashed again, rewritten
    monkeypatch.setattr(cache, "_MEMO", {})
    assert verify.sha256(path) != WIKI_SHA and len(calls) == 4
    assert json.loads(memo.read_text())["sha256"] == verify.sha256(path)


def test_source_md_layouts():
    """Digests found through subfolder tables (cola raw/...), section headings (marathi, wikitext2)
    and annotated file cells (snli "s1.dev (premise)")."""
    cases = {
        "cola/raw/in_domain_dev.tsv": "77176f6a03fa",
        "marathi/stsb_mr_translated/sts-dev-mr.tsv": "e089871acd6a",
        "marathi/mahanews_shc/SHC_Test.csv": "c7e2e3894554",
        "snli/s1.dev": "28a398b5478b",
        "wikitext2/wikitext-2-v1-tokenized/test.txt": "d790b833ef8c",
    }
    for rel, prefix in cases.items():
        digest, source = verify.expected(SHARED / rel, SHARED)
        assert digest and digest.startswith(prefix), rel
        assert source.endswith("SOURCE.md")


def test_fetched_files_verify(tmp_path, monkeypatch):
    """`prunebench data fetch` writes SHA256SUMS, so a fetched copy verifies (and a damaged one stops)."""
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": ["", " = T = \n", " body \n"]})
    monkeypatch.setattr("prunebench.models.hub_reachable", lambda: True)  # the faked Hub answers
    verify.configure(verify=True, cache_dir=tmp_path / "cache")
    text.fetch("wikitext2", tmp_path)
    monkeypatch.setenv("PRUNEBENCH_DATA", str(tmp_path))
    assert text.load_texts("wikitext2_valid") == ["", " = T = \n", " body \n"]
    assert verify.used()[0]["status"] == "ok"
    truncate(tmp_path / "wikitext2/wikitext-2-raw/wiki.test.raw")
    with pytest.raises(PrunebenchError, match="SHA256SUMS"):
        text.load_texts("wikitext2_test")
    verify.configure()


def test_cli_data_lists_and_verifies(root, tmp_path, cli_inproc):
    cli = cli_inproc
    valid = "wikitext2/wikitext-2-raw/wiki.valid.raw"
    shutil.copy(SHARED / valid, root / valid)  # the folder is here, so both splits must be
    r = cli("data")
    assert r.exit_code == 0, r.stderr
    lines = {line.split()[0]: line.split() for line in r.stdout.splitlines()}
    assert lines["wikitext2_test"][1:] == ["ok", str(root / WIKI)]
    assert lines["c4"][1] == "ok" and lines["stsb_en/dev"][1] == "ok"  # other datasets: the next root
    truncate(root / WIKI)
    (root / valid).unlink()
    r = cli("data")
    lines = {line.split()[0]: line.split() for line in r.stdout.splitlines()}
    assert lines["wikitext2_test"][1] == "mismatch" and lines["wikitext2_valid"][1] == "missing"
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "wikitext2_test" in r.stderr


def test_run_stops_on_a_truncated_file_unless_verify_is_off(root, tmp_path, cli_inproc):
    cli = cli_inproc
    truncate(root / WIKI)
    r = cli("run", "experiment=smoke/tiny", f"hydra.run.dir={tmp_path / 'r1'}")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert str(root / WIKI) in line and "data.verify=false" in line
    assert not (tmp_path / "r1" / "metrics.json").exists()
    r = cli("run", "experiment=smoke/tiny", "data.verify=false", f"hydra.run.dir={tmp_path / 'r2'}")
    assert r.exit_code == 0, r.stderr
    assert "does not match" in r.stdout + r.stderr  # the warning line, through Hydra's log
    m = json.loads((tmp_path / "r2" / "metrics.json").read_text())  # needs pipeline.py's verify.configure/used
    [wiki] = [d for d in m["data"] if d["name"] == WIKI]
    assert wiki["status"] == "mismatch" and not wiki["verified"] and wiki["path"] == str((root / WIKI).resolve())
