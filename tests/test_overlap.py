"""Never train on what you evaluate (data/overlap.py, recovery/corpus.py `contamination`): WikiText's
tokenized and detokenized forms normalise to the raw form's words (on the real files); hashed 13-gram
overlap equals a plain-Python count; the tokenized test file, the test file plus a newline, a folder
holding a 20 kB slice of it and a copy of the held-out file stop the run in one line naming the file,
the set and the overlap, before any model loads, and so does training text holding an lm-eval task's rows
(the evaluators' own text: `evaluation_text()`); a clean C4-derived corpus trains with its overlap
(0) and its `sha256sum` recorded; `recovery.allow_overlap=true` trains knowingly. Also the corpus rows
of issue 29's weak list (exit 2, one `error:` line, no traceback): a bad JSON row named by its line,
latin-1 text, null and numeric text fields, a .csv in a source folder, `hf:WikiText` in another case."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from prunebench import PrunebenchError
from prunebench.data import overlap, pairs, text
from prunebench.recovery import corpus, hub
from prunebench.recovery.train import check_source

RAW = "wikitext2/wikitext-2-raw/wiki.test.raw"
TOKENIZED = "wikitext2/wikitext-2-v1-tokenized/test.txt"
VALID = "wikitext2/wikitext-2-raw/wiki.valid.raw"
TINY = ["experiment=smoke/tiny", "pruner=magnitude", "baseline=false"]


def data_file(rel: str) -> Path:
    found = text.locate(rel)
    if found is None or found[1] is None:
        pytest.skip(f"{rel} is not in a data root here")
    return found[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh overlap / digest cache for each test (an in-process run before may have configured one)."""
    from prunebench.data import verify

    monkeypatch.setitem(verify._settings, "cache_dir", str(tmp_path / "cache"))
    return tmp_path / "cache"


def c4_jsonl(path: Path) -> Path:
    """A clean C4-derived corpus: the data root's C4 sample as JSON lines."""
    rows = [json.loads(line)["text"] for line in data_file("c4/c4_sample.json").read_text().splitlines() if line]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


# --- normalisation and hashing ------------------------------------------------------------------------


def detokenize(s: str) -> str:
    """WikiText's spacing undone (as lm-eval's wikitext detokenizer does): what a "clean" copy looks like."""
    pairs = [
        (" @-@ ", "-"),
        (" @,@ ", ","),
        (" @.@ ", "."),
        (" 's", "'s"),
        (" n't", "n't"),
        (" ,", ","),
        (" .", "."),
        (" ;", ";"),
        (" :", ":"),
        ("( ", "("),
        (" )", ")"),
        ("= = ", "== "),
        (" = =", " =="),
    ]
    for a, b in pairs:
        s = s.replace(a, b)
    return re.sub(r'" ([^"]*?) "', r'"\1"', s)


def test_wikitext_forms_normalise_to_the_same_words():
    """On the real files: raw and tokenized WikiText-2 test have the same 241,211 whitespace tokens
    position for position, and every token the tokenized file did not replace by <unk> normalises to
    the raw token's words; the detokenized raw text gives exactly the raw words and 13-grams."""
    raw, tok = (data_file(rel).read_text(encoding="utf-8") for rel in (RAW, TOKENIZED))
    a, b = raw.split(), tok.split()
    assert len(a) == len(b) == 241211
    unk = [i for i, t in enumerate(b) if t == "<unk>"]
    assert len(unk) == 15218  # the vocabulary cap's replacements: the only difference between the forms
    assert [
        i for i, (x, y) in enumerate(zip(a, b, strict=True)) if y != "<unk>" and overlap.words(x) != overlap.words(y)
    ] == []
    assert overlap.words("state @-@ of @-@ the @-@ art 1 @,@ 000 don 't") == overlap.words(
        "State-of-the-art 1,000 don't"
    )
    clean = detokenize(raw)
    assert clean != raw and " @-@ " not in clean and "," in clean
    assert overlap.words(clean) == overlap.words(raw)
    assert np.array_equal(overlap.ngram_set([clean.encode()]), overlap.ngram_set([raw.encode()]))


def test_words_and_their_hashes():
    assert overlap.words("“Hello”—World… x\u00a0y «z» Ünï_CAFÉ <unk> 3.5") == [
        "hello", "world", "x", "y", "z", "Ünï", "cafÉ", "unk", "3", "5"]  # fmt: skip
    text_ = "the cat sat on the mat while the other cat watched the mat and the cat"
    w = overlap.word_hashes(text_.encode())
    names = overlap.words(text_)
    assert len(w) == len(names) and len(set(w.tolist())) == len(set(names))  # one hash per distinct word
    for x, y in zip(names, w.tolist(), strict=True):
        assert overlap.word_hashes(x.upper().encode())[0] == y  # wherever it stands, in either case
    same = pairs.sentence_hashes(["The cat sat.", "the  CAT sat", "the cat sat"]).tolist()
    assert same[0] == same[1] == same[2]
    assert len(set(pairs.sentence_hashes(["the cat sat", "cat the sat", "the cat", ""]).tolist())) == 4
    first, second = ["a man plays", "a dog runs"], ["a man is playing", "a cat sleeps"]
    assert np.array_equal(pairs.pair_keys(first, second), pairs.pair_keys(second, first))  # order-free


def reference(train: str, evaluation: str, n: int = overlap.N) -> tuple[float, float]:
    """(overlap, contaminated) counted on word tuples in plain Python."""
    ev, tr = overlap.words(evaluation), overlap.words(train)
    e = {tuple(ev[i : i + n]) for i in range(len(ev) - n + 1)}
    t = [tuple(tr[i : i + n]) for i in range(len(tr) - n + 1)]
    return len(e & set(t)) / len(e), sum(g in e for g in t) / len(t)


def test_hashed_overlap_equals_the_word_tuple_count():
    """Random text with a vocabulary small enough for shared 13-grams to arise, streamed in pieces cut
    at whitespace: the same numbers as tuples of words; and a stream cut in small blocks gives the same
    n-grams as one block (no word cut, n-grams carried across pieces)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(6)] + ["The", "cat,", "@-@", "«x»"]
    evaluation = " ".join(rng.choice(vocab) for _ in range(3000))
    train = " ".join(rng.choice(vocab) for _ in range(2000)) + "\n\n" + evaluation[5000:9000] + " tail"
    forms = {"eval": overlap.ngram_set([evaluation.encode()])}
    pieces = list(overlap.blocks(train.encode(), 700))
    assert len(pieces) > 10 and b"".join(pieces) == train.encode()
    report = overlap.scan([("t", iter(pieces))], overlap.Index(forms))
    got, want = report["forms"]["eval"], reference(train, evaluation)
    assert got["overlap"] == pytest.approx(want[0]) and got["contaminated"] == pytest.approx(want[1])
    assert 0 < want[0] < 1 and 0 < want[1] < 1 and report["worst_part"] == "t"
    assert report["train_ngrams"] == len(overlap.words(train)) - overlap.N + 1
    whole = overlap.Stream().feed(train.encode())
    small = overlap.Stream(block=64)
    assert np.array_equal(np.concatenate([small.feed(p) for p in pieces]), whole)


# --- the training sources of the causal-LM recoveries -------------------------------------------------------


def test_the_issues_cases_stop_naming_file_set_and_overlap(tmp_path, cache):
    """The Done-when cases, through the check the recoveries' constructors run before any model loads."""
    raw, tok, valid = data_file(RAW), data_file(TOKENIZED), data_file(VALID)
    (tmp_path / "plus.txt").write_bytes(raw.read_bytes() + b"\n")
    (tmp_path / "slice").mkdir()
    (tmp_path / "slice" / "part.txt").write_bytes(raw.read_bytes()[500000:520000])
    (tmp_path / "slice" / "README.md").write_text("a slice")  # documentation beside it: skipped
    (tmp_path / "valid.txt").write_bytes(valid.read_bytes())
    cases = [
        (str(tok), None, rf"{re.escape(str(tok))} holds 100% {WORDS} evaluation set wikitext2_test \({TOKENIZED}"),
        (str(tmp_path / "plus.txt"), None, rf"plus.txt holds 100% {WORDS} evaluation set wikitext2_test \({RAW}"),
        (str(tmp_path / "slice"), None, rf"slice: .*part.txt holds 1.42% {WORDS} evaluation set wikitext2_test"),
        (str(tmp_path / "valid.txt"), "wikitext2_valid", f"valid.txt holds 100% {WORDS} held-out set wikitext2_valid"),
    ]
    for source, held_out, needle in cases:
        with pytest.raises(PrunebenchError, match=needle) as err:
            corpus.contamination(source, held_out=held_out)
        assert "limit 0.1%" in str(err.value) and "recovery.allow_overlap=true" in str(err.value)
        assert "\n" not in str(err.value)
    clean = corpus.contamination(str(c4_jsonl(tmp_path / "c4.jsonl")), held_out="wikitext2_valid")
    assert clean["sets"]["wikitext2_test"]["overlap"] == 0 and clean["sets"]["wikitext2_valid"]["overlap"] == 0
    assert set(clean["sets"]["wikitext2_test"]["forms"]) == {RAW, TOKENIZED} and clean["train_ngrams"] > 100000
    assert clean["limit"] == overlap.MAX_OVERLAP and clean["gate"] == "overlap" and not clean["unavailable"]
    allowed = corpus.contamination(str(tmp_path / "slice"), allow=True)  # knowingly: recorded, no stop
    assert allowed["allowed"] and allowed["sets"]["wikitext2_test"]["overlap"] == pytest.approx(0.01424, abs=1e-4)
    assert corpus.overlap_of(str(tmp_path / "slice")) is allowed


def test_results_are_cached_by_digests(tmp_path, cache, monkeypatch):
    source = c4_jsonl(tmp_path / "c4.jsonl")
    first = corpus.contamination(str(source))
    assert list((cache / "overlap").glob("ngrams-*.npy")) and list((cache / "overlap").glob("scan-*.json"))

    def boom(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(overlap, "scan", boom)
    assert corpus.contamination(str(source)) == first  # same digests: read back, not rescanned
    edited = source.read_bytes().replace(b" the ", b" THE ", 1)
    source.write_bytes(edited)
    with pytest.raises(AssertionError, match="scanned again"):  # edited, the same size: measured again
        corpus.contamination(str(source))


def test_token_ids_and_hub_rows_are_measured_when_read(tmp_path, cache, tiny, monkeypatch):
    """Pre-tokenized text needs the run's tokenizer to be read as words, and Hub rows arrive when
    training starts: the check runs there, with the same one line."""
    import datasets

    tok = tiny[1]
    raw = data_file(RAW).read_text(encoding="utf-8")[:60000]
    np.save(tmp_path / "ids.npy", np.asarray(tok.encode(raw), dtype=np.int32))
    record = corpus.contamination(str(tmp_path / "ids.npy"))
    assert "tokenizer decodes" in record["checked"]
    with pytest.raises(PrunebenchError, match=r"ids.npy holds \d.*% of the word 13-grams of the evaluation set"):
        corpus.token_ids(tok, str(tmp_path / "ids.npy"))
    monkeypatch.setattr("prunebench.models.hub_reachable", lambda *a, **k: True)
    rows = {"text": raw.split("\n")}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    assert "rows are read" in corpus.contamination("hf:someone/mirror")["checked"]
    with pytest.raises(PrunebenchError, match="recovery.source=hf:someone/mirror holds .* set wikitext2_test"):
        hub.hub_token_ids(tok, "hf:someone/mirror")


def test_sentence_pair_recipes_measure_pairs():
    """recovery=sbert_nli_sts: its default (the official STS-B train split) passes with the split's own
    ~1% shared pairs recorded; training on a test split stops."""
    from prunebench.recovery.sbert_nli_sts import SbertNliSts

    data_file("marathi/stsb_mr_translated/sts-train-mr.tsv")
    rec = SbertNliSts(nli={"epochs": 0}).overlap
    assert 0.005 < rec["sets"]["stsb_mr/test"]["overlap"] < pairs.MAX_PAIR_OVERLAP
    assert rec["sets"]["stsb_en/test"]["overlap"] == 0 and rec["sets"]["stsb_mr/dev"]["role"] == "held-out"
    with pytest.raises(PrunebenchError, match="100% of the sentence pairs of the evaluation split stsb_mr/test"):
        SbertNliSts(nli={"epochs": 0}, sts={"split": "test"})
    assert SbertNliSts(nli={"epochs": 0}, sts={"split": "test"}, allow_overlap=True).overlap["allowed"]


def test_bad_rows_are_one_line_naming_the_row(tmp_path):
    rows = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    rows[25] = '{"text": "row 26", }'
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(PrunebenchError, match=r"bad.jsonl is not valid JSON at line 26, column \d+ \("):
        corpus.contamination(str(tmp_path / "bad.jsonl"))
    for value, what in ((None, "null"), (12345, "int 12345"), (["a"], 'list \\["a"\\]')):
        (tmp_path / "v.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
        with pytest.raises(PrunebenchError, match=f"line 2 of .*v.jsonl has 'text' = {what}, not text"):
            corpus.contamination(str(tmp_path / "v.jsonl"))
    (tmp_path / "l.txt").write_bytes("café au lait ".encode("latin-1") * 3)
    with pytest.raises(PrunebenchError, match=r"l.txt is not UTF-8 text \(byte 3: b'\\xe9'\); convert it"):
        corpus.contamination(str(tmp_path / "l.txt"))
    with pytest.raises(PrunebenchError, match="l.txt is not UTF-8 text"):
        list(corpus._texts(tmp_path / "l.txt", "text", "recovery.source"))  # the reading path too
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "n.parquet")
    with pytest.raises(PrunebenchError, match=r"1 rows of .*n.parquet have a null 'text' \(the first: row 2\)"):
        corpus.contamination(str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(PrunebenchError, match="i.parquet's column 'text' holds int64, not text"):
        corpus.contamination(str(tmp_path / "i.parquet"))


def test_files_a_folder_cannot_read_are_named(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "c" / "LICENSE").write_text("CC")
    (tmp_path / "c" / ".hidden").write_text("?")
    check_source(str(tmp_path / "c"))  # documentation and hidden files are not corpus files
    (tmp_path / "c" / "more.csv").write_text("text\nx\n")
    with pytest.raises(PrunebenchError, match=r"more.csv is not a corpus file \(.csv; corpus files: .jsonl"):
        check_source(str(tmp_path / "c"))
    with pytest.raises(PrunebenchError, match=r"more.csv is not a corpus file"):
        check_source(str(tmp_path / "c" / "*"))


def test_hub_wikitext_in_any_case_is_refused(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name, split in (("WikiText", "validation"), ("Salesforce/WikiText", "Validation"), ("wikitext", "TEST"),
                        ("EleutherAI/wikitext_document_level", "test")):  # fmt: skip
        with pytest.raises(PrunebenchError, match="is evaluation data and must never be trained on"):
            check_source(f"hf:{name}", source_config="wikitext-2-raw-v1", source_split=split)


def test_digest_is_the_files_sha256(tmp_path):
    (tmp_path / "c").mkdir()
    one = c4_jsonl(tmp_path / "c" / "a.jsonl")
    d = corpus.digest(str(one))
    assert d["sha256"] == hashlib.sha256(one.read_bytes()).hexdigest() == d["file_sha256"][0]  # = sha256sum
    (tmp_path / "c" / "b.txt").write_text("another document")
    d = corpus.digest(str(tmp_path / "c"))
    both = one.read_bytes() + (tmp_path / "c" / "b.txt").read_bytes()
    assert d["sha256"] == hashlib.sha256(both).hexdigest() and len(d["file_sha256"]) == 2  # = cat a b | sha256sum


# --- through the command line: exit 2, one `error:` line, before any model loads --------------------------


@pytest.fixture
def no_loading(monkeypatch):
    def load(*_a, **_k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("prunebench.models.load", load)


def one_line(r, needle: str) -> None:
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(needle, errors[0]), r.stderr[-2000:]


def boolq_rows(path: Path, n: int = 60) -> bytes:
    """A training corpus holding the passages and questions of BoolQ's first rows (an evaluation task)."""
    rows = [json.loads(line)["query"] for line in path.read_text().splitlines()[:n]]
    return "".join(json.dumps({"text": t}) + "\n" for t in rows).encode()


KD = ["recovery=kd"]
HUB = ["recovery.source=hf:WikiText", "recovery.source_config=wikitext-2-raw-v1", "recovery.source_split=validation"]
SBERT = ["model=tiny-bert", "eval=[]", "calib.seqlen=16", "calib.nsamples=2", "recovery=sbert_nli_sts"]
BAD_ROW = b"".join(b'{"text": "ok"}\n' if i != 25 else b'{"text": "x" "y"}\n' for i in range(40))  # row 26 of 40
WORDS = "of the word 13-grams of the"
ROWS = [  # (id, files to write: name -> bytes, or a function of the data root; arguments; the error line)
    ("tokenized-test", {}, ["recovery=lm_finetune", f"recovery.source={{data}}/{TOKENIZED}"],
     f"test.txt holds 100% {WORDS} evaluation set wikitext2_test"),
    ("test-plus-newline", {"p.txt": lambda d: (d / RAW).read_bytes() + b"\n"}, [*KD, "recovery.source={tmp}/p.txt"],
     f"p.txt holds 100% {WORDS} evaluation set wikitext2_test"),
    ("slice-in-folder", {"s/a.txt": lambda d: (d / RAW).read_bytes()[500000:520000]},
     ["recovery=lora", "recovery.source={tmp}/s"], f"s/a.txt holds 1.42% {WORDS} evaluation set"),
    ("held-out-copy", {"v.txt": lambda d: (d / VALID).read_bytes()}, [*KD, "recovery.source={tmp}/v.txt"],
     f"v.txt holds 100% {WORDS} held-out set wikitext2_valid"),
    ("bad-json-row", {"r.jsonl": BAD_ROW}, [*KD, "recovery.source={tmp}/r.jsonl"],
     "r.jsonl is not valid JSON at line 26, column 14"),
    ("latin1-txt", {"l.txt": "déjà vu ".encode("latin-1")}, [*KD, "recovery.source={tmp}/l.txt"],
     r"l.txt is not UTF-8 text \(byte 1: b'\\xe9'\)"),
    ("null-text", {"n.jsonl": b'{"text": "a"}\n{"text": null}\n'}, [*KD, "recovery.source={tmp}/n.jsonl"],
     "line 2 of .*n.jsonl has 'text' = null, not text"),
    ("number-text", {"n.jsonl": b'{"text": 12345}\n'}, [*KD, "recovery.source={tmp}/n.jsonl"],
     "line 1 of .*n.jsonl has 'text' = int 12345, not text"),
    ("csv-in-folder", {"f/a.jsonl": b'{"text": "a"}\n', "f/b.csv": b"text\nb\n"}, [*KD, "recovery.source={tmp}/f"],
     "f/b.csv is not a corpus file"),
    ("hub-wikitext-case", {}, [*KD, *HUB], "the validation split of WikiText is evaluation data"),
    ("lm-eval-task-text", {"q.jsonl": lambda d: boolq_rows(d / "boolq" / "boolq.jsonl")},
     [*KD, "recovery.source={tmp}/q.jsonl", "eval=lm_eval", "eval.lm_eval.tasks=[boolq]"],
     f"q.jsonl holds 1.91% {WORDS} evaluation set lm_eval/boolq"),
    ("sbert-on-test", {}, [*SBERT, "recovery.sts.split=test", "recovery.nli.epochs=0"],
     "100% of the sentence pairs of the evaluation split stsb_mr/test"),
]  # fmt: skip


@pytest.mark.parametrize("files,args,needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_refused_before_loading(tmp_path, cli_inproc, no_loading, files, args, needle):
    root = data_file(RAW).parents[2]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content(root) if callable(content) else content)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(root)) for a in args]
    base = [] if args[: len(SBERT)] == SBERT else TINY
    r = cli_inproc("run", *base, *args, f"hydra.run.dir={tmp_path / 'o'}", env={"HF_DATASETS_OFFLINE": "1"})
    one_line(r, needle)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_clean_corpus_trains_and_records_overlap_and_sha256sum(tmp_path, cli_inproc):
    """The issue's clean C4-derived jsonl passes with the overlap recorded (0); the digest metrics.json
    records is `sha256sum`'s; with allow_overlap a contaminated folder trains and says how much."""
    src = c4_jsonl(tmp_path / "c4.jsonl")
    common = [*TINY, "recovery=lm_finetune", "recovery.tokens=256", "recovery.seqlen=64"]
    r = cli_inproc("run", *common, f"recovery.source={src}", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.exit_code == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "a" / "metrics.json").read_text())["recovery"]
    assert rec["source_digest"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert rec["overlap"]["sets"]["wikitext2_test"]["overlap"] == 0 and rec["overlap"]["train_ngrams"] > 100000
    r = cli_inproc("run", *common, f"recovery.source={src}", "eval=opencompass", "eval.opencompass.limit=2",
                   "eval.opencompass.tasks=[boolq,rte]", f"hydra.run.dir={tmp_path / 'o'}")  # fmt: skip
    assert r.exit_code == 0, r.stderr[-2000:]
    sets = json.loads((tmp_path / "o" / "metrics.json").read_text())["recovery"]["overlap"]["sets"]
    assert sets["lm_eval/boolq"]["overlap"] == sets["lm_eval/rte"]["overlap"] == 0  # the run's lm-eval tasks too
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "a.jsonl").write_bytes(src.read_bytes())
    (tmp_path / "mix" / "b.txt").write_bytes(data_file(RAW).read_bytes()[:30000])
    args = [f"recovery.source={tmp_path / 'mix'}", "recovery.allow_overlap=true", f"hydra.run.dir={tmp_path / 'b'}"]
    r = cli_inproc("run", *common, *args)
    assert r.exit_code == 0, r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("training on it anyway (recovery.allow_overlap=true)") >= 1
    rec = json.loads((tmp_path / "b" / "metrics.json").read_text())["recovery"]["overlap"]
    assert rec["allowed"] and rec["worst_part"].endswith("b.txt") and rec["sets"]["wikitext2_test"]["overlap"] > 0.02


def test_the_classification_splits_overlap_is_recorded():
    """eval=cola / classification train on one split and score another; the share of scored sentences
    the training split holds (normalised words) is recorded: 2/3 here, 1.33% for CoLA's real splits."""
    from prunebench.data.labelled import classification
    from prunebench.evals.finetune import split_overlap

    assert split_overlap(["The cat sat.", "A dog ran"], ["the CAT sat", "birds fly", "a  dog ran!"]) == 2 / 3
    assert split_overlap(["x"], []) == 0.0
    try:
        train, dev = classification("cola", "in_domain_train"), classification("cola", "in_domain_dev")
    except PrunebenchError:
        pytest.skip("CoLA is not in a data root here")
    assert split_overlap(train.texts, dev.texts) == pytest.approx(0.01328, abs=1e-4)
