"""`prunebench data fetch` writes the Hub's rows in the local layout, and they read back unchanged."""

import datasets

from prunebench.data import text


def test_fetch_round_trips(tmp_path, monkeypatch):
    wiki = ["", " = Title = \n", "", " Some text , with @-@ marks . \n"]
    c4 = ["first document", "second\nwith a newline"]

    def fake(hub, config=None, split=None, data_files=None):
        return {"text": wiki if hub == "wikitext" else c4}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr("prunebench.models.hub_reachable", lambda: True)  # the faked Hub answers
    written = text.fetch("wikitext2", tmp_path) + text.fetch("c4", tmp_path)
    assert [p.name for p in written] == ["wiki.test.raw", "wiki.valid.raw", "c4-train.00000-of-01024.json"]
    monkeypatch.setenv("PRUNEBENCH_DATA", str(tmp_path))
    assert text.load_texts("wikitext2_test") == wiki
    assert text.load_texts("c4") == c4  # the whole shard wins over the sample
    assert text.where("c4").startswith(str(tmp_path))
