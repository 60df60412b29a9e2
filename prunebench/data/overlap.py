"""Training text against evaluation text: word n-gram overlap, the decontamination test of GPT-3
(Brown et al., arXiv 2005.14165, App. C: 13-grams) and of lm-evaluation-harness (`decontamination/`,
13-grams over normalised words), hashed and streamed: a 1 GB JSON-lines corpus took 19 s of CPU (33 s
wall on a shared 2-core machine) and 140 MB above the process's own, once; later runs read the result back.

Normalisation (both sides alike): ASCII letters folded to lower case; every run of characters that are
neither letters nor digits is one word break (ASCII punctuation, spaces, and the common Unicode
punctuation and spaces: U+00A0–U+00BF, U+2000–U+207F, U+3000–U+303F). So WikiText's tokenized forms
(" @-@ ", " @,@ ", "don 't", spaces before punctuation) and a detokenized copy of the same text give
the same words: "state @-@ of @-@ the @-@ art" = "State-of-the-art" = [state, of, the, art]; "1 @,@ 000"
= "1,000" = [1, 000]. WikiText's "<unk>" becomes the word "unk" (the word it replaced is lost), which is
why an evaluation set lists each of its forms (raw and tokenized) and the overlap is taken per form.

Hashing: a word w of bytes b_0..b_{L-1} hashes to mix(L · K + Σ_j b_j · P^j mod 2^64); an n-gram of
words w_k..w_{k+n-1} to h = mix(Σ_i h(w_{k+i}) · Q^i mod 2^64) (mix: splitmix64's finaliser; P, Q odd
constants). Everything is numpy over ~2 MB blocks, no Python per word; with 64 bits, the expected
number of false matches of 1.7·10^8 training 13-grams (1 GB) against WikiText-2's 8·10^5 is ~10^-5.

With E the distinct n-grams of one evaluation form and T the training source's n-gram stream:
    overlap      = |E ∩ set(T)| / |E|            the share of the evaluation text seen in training (gates)
    contaminated = #{t ∈ T : t ∈ E} / |T|       the share of the training text that is evaluation text
Training n-grams run across document boundaries (the model sees the documents joined); an evaluation
form's files are one stream each.

The evaluation side is built once per file digest and cached (prunebench.cache, `<cache>/overlap/`);
the training side is streamed (memory bounded by one block plus the evaluation index), and its result
cached by the digests of both sides. The run stops at MAX_OVERLAP (0.1%, justified below) of an
evaluation form's 13-grams. Sentence-pair sets (the encoder recipe's NLI / STS) are compared pair by
pair instead (data/pairs.py): most of their sentences are shorter than 13 words.
Used by recovery/corpus.py (kd, lm_finetune, lora) and recovery/sbert_nli_sts.py:

    recovery: {_target_: prunebench.recovery.kd.KD, source: /data/mine.jsonl, allow_overlap: false}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from prunebench import cache

log = logging.getLogger(__name__)

N = 13  # words per n-gram (GPT-3, lm-eval)
VERSION = "overlap-v1"  # part of every cache key: a change of normalisation or hashing invalidates entries
BLOCK = 1 << 21  # bytes of text hashed at once: bounds the memory of a scan (~25 bytes of numpy per byte)
_P, _Q, _K = 0x100000001B3, 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F  # odd: invertible multipliers mod 2^64
_QPOW = [np.uint64(pow(_Q, i, 1 << 64)) for i in range(64)]
_PREFILTER_BITS = 24  # a 16 MB table of the evaluation hashes' top bits: most training n-grams miss it at once

_CODE = np.zeros(256, dtype=np.uint8)  # byte -> itself ASCII-lowered inside a word, 0 for a word break
for _lo, _hi in (("0", "9"), ("a", "z")):
    _CODE[ord(_lo) : ord(_hi) + 1] = np.arange(ord(_lo), ord(_hi) + 1)
_CODE[ord("A") : ord("Z") + 1] = np.arange(ord("a"), ord("z") + 1)
_CODE[0x80:] = np.arange(0x80, 0x100)  # bytes of multi-byte UTF-8 characters: letters, unless punctuation (below)


def words(text: str) -> list[str]:
    """The normalised words of a text (what is hashed), for tests and messages."""
    code = _classify(np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8))
    starts, ends = _bounds(code != 0)
    data = code.tobytes()
    return [data[s:e].decode("utf-8", "replace") for s, e in zip(starts, ends, strict=True)]


def _classify(b: np.ndarray) -> np.ndarray:
    """Each UTF-8 byte's code: the byte ASCII-lowered inside words, 0 for a word break. Unicode
    punctuation and spaces (whole multi-byte sequences) break words too."""
    code = _CODE[b]
    lead = np.flatnonzero(b[: len(b) - 1] >= 0xC2)  # lead bytes of multi-byte characters: few in most text
    if len(lead):
        first, second = b[lead], b[lead + 1]
        for width, hit in (
            (2, (first == 0xC2) & (second >= 0xA0)),  # U+00A0–U+00BF: no-break space, « », ¡ ¿, §, ...
            (3, ((first == 0xE2) & (second <= 0x81)) | ((first == 0xE3) & (second == 0x80))),  # U+2000–, U+3000–
        ):
            at = lead[hit]
            for k in range(width):
                code[np.minimum(at + k, len(b) - 1)] = 0
    return code


def _bounds(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of word bytes."""
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1
    if len(word) and word[0]:
        edges = np.concatenate(([0], edges))
    if len(word) and word[-1]:
        edges = np.concatenate((edges, [len(word)]))
    return edges[0::2], edges[1::2]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps mod 2^64): every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(base: int, count: int) -> np.ndarray:
    """base^0 .. base^(count-1) mod 2^64, by doubling (numpy's uint64 products wrap mod 2^64)."""
    out = np.ones(count, dtype=np.uint64)
    done = 1
    with np.errstate(over="ignore"):
        while done < count:
            step = min(done, count - done)
            out[done : done + step] = out[:step] * np.uint64(pow(base, done, 1 << 64))
            done += step
    return out


_TABLES: list[np.ndarray] = []  # P^j and P^-j for j ≤ BLOCK (2 × 16 MB), made on first use


def word_hashes(data: bytes, with_starts: bool = False):
    """64-bit hashes of the normalised words of UTF-8 `data` (at most BLOCK bytes), in order (the
    edges are word breaks); with their byte offsets when `with_starts`. A word's Σ b_j P^j is a
    difference of prefix sums over the block, moved to its own start by P^-start, so it does not
    depend on where the word stands."""
    if len(data) > BLOCK:
        raise ValueError(f"word_hashes takes at most {BLOCK} bytes; cut longer text with blocks()")
    if not _TABLES:
        _TABLES.extend((_powers(_P, BLOCK + 1), _powers(pow(_P, -1, 1 << 64), BLOCK + 1)))
    pw, inv = _TABLES
    code = _classify(np.frombuffer(data, dtype=np.uint8))
    starts, ends = _bounds(code != 0)
    with np.errstate(over="ignore"):
        prefix = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(code.astype(np.uint64) * pw[: len(code)])))
        h = _mix((prefix[ends] - prefix[starts]) * inv[starts] + (ends - starts).astype(np.uint64) * np.uint64(_K))
    return (h, starts) if with_starts else h


def ngrams(w: np.ndarray, n: int = N) -> np.ndarray:
    """Hashes of every run of n consecutive word hashes (none when there are fewer than n words)."""
    count = len(w) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = w[:count].copy()
        for i in range(1, n):
            h += w[i : i + count] * _QPOW[i]
        return _mix(h)


class Stream:
    """n-gram hashes of text fed in pieces; the last n − 1 words carry over, so n-grams run across
    pieces (documents joined, as training sees them). Each piece's edges are word breaks: cut pieces
    at whitespace."""

    def __init__(self, n: int = N, block: int = BLOCK):
        self.n, self.block, self.tail = n, min(block, BLOCK), np.zeros(0, dtype=np.uint64)

    def feed(self, data: bytes) -> np.ndarray:
        out = []
        for block in blocks(data, self.block):
            w = np.concatenate((self.tail, word_hashes(block)))
            out.append(ngrams(w, self.n))
            self.tail = w[len(w) - min(len(w), self.n - 1) :]
        return np.concatenate(out) if len(out) > 1 else out[0] if out else np.zeros(0, dtype=np.uint64)


def blocks(data: bytes, size: int = BLOCK) -> Iterator[bytes]:
    """`data` in pieces of about `size` bytes cut after a space or newline, so no word is cut (a word
    longer than a block is: it only ever meets itself)."""
    pos = 0
    while pos < len(data):
        end = min(len(data), pos + size)
        if end < len(data):
            cut = max(data.rfind(b" ", pos, end), data.rfind(b"\n", pos, end))
            end = cut + 1 if cut > pos else end
        yield data[pos:end]
        pos = end


def ngram_set(pieces: Iterable[bytes], n: int = N) -> np.ndarray:
    """The sorted distinct n-gram hashes of one text (an evaluation form), pieces joined."""
    stream, parts = Stream(n), []
    for piece in pieces:
        parts.append(distinct(stream.feed(piece)))
    return distinct(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def distinct(h: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique, without its slower paths)."""
    h = np.sort(h)
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


class Index:
    """The evaluation forms' n-gram sets, merged and sorted, for streaming lookups: each distinct hash
    with a bit per form that holds it, and a prefilter table of their top bits."""

    def __init__(self, forms: dict[str, np.ndarray]):
        self.names = list(forms)
        if len(self.names) > 63:
            raise ValueError("at most 63 evaluation forms per index")
        empty = [np.zeros(0, dtype=np.uint64)]
        keys = np.concatenate([forms[k] for k in self.names] + empty)
        bits = [np.full(len(forms[k]), 1 << j, dtype=np.uint64) for j, k in enumerate(self.names)]
        bits = np.concatenate(bits + empty)
        order = np.argsort(keys, kind="stable")
        keys, bits = keys[order], bits[order]
        first = np.concatenate(([True], keys[1:] != keys[:-1])) if len(keys) else np.zeros(0, dtype=bool)
        self.keys = keys[first]
        self.labels = np.bitwise_or.reduceat(bits, np.flatnonzero(first)) if len(keys) else bits
        self.sizes = np.array([len(forms[k]) for k in self.names], dtype=np.int64)
        self.table = np.zeros(1 << _PREFILTER_BITS, dtype=bool)
        self.table[(self.keys >> np.uint64(64 - _PREFILTER_BITS)).astype(np.int64)] = True
        self.seen = np.zeros(len(self.keys), dtype=bool)
        self.matched = np.zeros(len(self.names), dtype=np.int64)
        self.total = 0

    def scan(self, g: np.ndarray) -> int:
        """Look up training n-grams; returns how many of them are evaluation n-grams (any form)."""
        self.total += len(g)
        cand = g[self.table[(g >> np.uint64(64 - _PREFILTER_BITS)).astype(np.int64)]]
        if not len(cand) or not len(self.keys):
            return 0
        pos = np.minimum(np.searchsorted(self.keys, cand), len(self.keys) - 1)
        pos = pos[self.keys[pos] == cand]
        self.seen[pos] = True
        labels = self.labels[pos]
        for j in range(len(self.names)):
            self.matched[j] += int(np.count_nonzero(labels & np.uint64(1 << j)))
        return len(pos)

    def report(self) -> dict[str, dict]:
        """Per form: its distinct n-grams, how many were seen, overlap and contaminated (see the module)."""
        seen = self.labels[self.seen]
        out = {}
        for j, name in enumerate(self.names):
            hit = int(np.count_nonzero(seen & np.uint64(1 << j)))
            size = int(self.sizes[j])
            out[name] = {
                "ngrams": size,
                "seen": hit,
                "overlap": hit / size if size else 0.0,
                "contaminated": int(self.matched[j]) / self.total if self.total else 0.0,
            }
        return out


def scan(sources: Iterable[tuple[str, Iterator[bytes]]], index: Index, n: int = N) -> dict:
    """Stream the training text (named pieces of bytes: file by file) through the index: the report per
    evaluation form, the training n-gram count, and the training part holding the most evaluation n-grams."""
    stream, per_part = Stream(n), {}
    for name, pieces in sources:
        for piece in pieces:
            per_part[name] = per_part.get(name, 0) + index.scan(stream.feed(piece))
    worst = max(per_part, key=per_part.get) if per_part and max(per_part.values()) else None
    return {"forms": index.report(), "train_ngrams": index.total, "worst_part": worst}


# --- cached by digests ---------------------------------------------------------------------------------

# One text to hash: (label, key, pieces). `key` names its content (its files' SHA-256s and how they are
# read); `pieces()` yields its UTF-8 text in pieces cut at whitespace (read only when not cached).
Part = tuple[str, str, Callable[[], Iterable[bytes]]]


def measure(train: list[Part], sets: dict[str, list[Part]], n: int = N) -> dict:
    """The overlap of a training source (its parts, streamed in order) with evaluation sets (each a
    list of forms): per set the form with the largest overlap, and every form's numbers. Each form's
    n-gram set is built once per key and each result computed once per key of both sides."""
    forms, keys = {}, {}
    for parts in sets.values():
        for label, key, pieces in parts:
            keys[label] = cache.fingerprint(VERSION, n, key)
            forms[label] = cached_set(label, keys[label], lambda p=pieces: ngram_set(p(), n))
    train_key = cache.fingerprint(VERSION, n, [(label, key) for label, key, _ in train], keys)
    result = cached_result(train_key, lambda: scan([(lb, p()) for lb, _, p in train], Index(forms), n))
    out = {}
    for name, parts in sets.items():
        found = {label: result["forms"][label] for label, _, _ in parts}
        worst = max(found, key=lambda label: found[label]["overlap"], default=None)
        out[name] = {
            "overlap": found[worst]["overlap"] if worst else None,
            "contaminated": max((f["contaminated"] for f in found.values()), default=None),
            "form": worst,
            "forms": found,
        }
    return {"n": n, "train_ngrams": result["train_ngrams"], "worst_part": result["worst_part"], "sets": out}


def cache_dir() -> Path:
    """Where n-gram sets and scan results are kept: beside the file digests (data.verify's cache)."""
    from prunebench.data import verify

    return verify.digest_dir().parent / "overlap"


def cached_set(label: str, key: str, build) -> np.ndarray:
    """An evaluation form's n-gram set, built by `build()` once per key (its files' digests)."""

    def write(tmp: Path) -> np.ndarray:
        arr = build()
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        return arr

    path = cache_dir() / f"ngrams-{cache.safe_name(label)}-{key}.npy"
    return _entry(path, key, write, lambda p: np.load(p, allow_pickle=False), "n-gram set")


def cached_result(key: str, compute) -> dict:
    """A scan's report, computed by `compute()` once per key (both sides' digests)."""

    def write(tmp: Path) -> dict:
        out = compute()
        tmp.write_text(json.dumps(out))
        return out

    path = cache_dir() / f"scan-{key}.json"
    return _entry(path, key, write, lambda p: json.loads(p.read_text()), "overlap result")


def _entry(path: Path, key: str, write, load, what: str):
    """cache.entry, or the value computed without a cache where the cache folder is unusable (the check
    is a guard: an unwritable cache must not stop it, nor turn it into an error of its own)."""
    try:
        return cache.entry(path, key, write, load, what)[0]
    except OSError:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return write(Path(tmp) / path.name)


def file_blocks(path: str | os.PathLike, size: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of a file in blocks ending at whitespace (the last one at the file's end)."""
    with open(path, "rb") as f:
        offset, rest = 0, b""
        while chunk := f.read(size):
            data = rest + chunk
            cut = max(data.rfind(b" "), data.rfind(b"\n"))
            if cut < 0:
                cut = len(data) - 1  # no whitespace in a whole block: cut anyway
            yield offset, data[: cut + 1]
            offset += cut + 1
            rest = data[cut + 1 :]
        if rest:
            yield offset, rest


# --- the data root's evaluation sets ------------------------------------------------------------------

# Every form of an evaluation set in a data root (perplexity reads the first; the tokenized one has <unk>).
FORMS = {
    "wikitext2_test": ("wikitext2/wikitext-2-raw/wiki.test.raw", "wikitext2/wikitext-2-v1-tokenized/test.txt"),
    "wikitext2_valid": ("wikitext2/wikitext-2-raw/wiki.valid.raw", "wikitext2/wikitext-2-v1-tokenized/valid.txt"),
}
# The gate: training text holding this share of an evaluation form's distinct 13-grams stops the run. 0.1%
# of WikiText-2 test is ~200 13-grams, one paragraph (a 20 kB slice is 1.4%); the data root's 12 other
# sets (4.5M 13-grams, Wikipedia's BoolQ passages among them) and the C4 sample share none with WikiText-2
# test or validation, so clean text reads 0 and a few shared quotations stay far below it.
MAX_OVERLAP = 0.001


def located(name: str) -> list[tuple[str, Path]]:
    """(label: path under its data root, file) of each form of a data-root dataset (FORMS, or
    prunebench.data.text's built-in names) that a data root holds."""
    from prunebench.data import text

    rels = FORMS.get(name) or ((text.LOCAL[name],) if name in text.LOCAL else ())
    found = [hit for rel in rels if (hit := text.locate(rel)) is not None and hit[1] is not None]
    return [(path.relative_to(root).as_posix(), path) for root, path in found]


def builtin_parts(name: str) -> list[Part]:
    """A data-root dataset's forms as parts: WikiText-2 files as plain text, C4 as its JSON lines' text."""
    from prunebench.data import verify

    fmt = "jsonl" if name == "c4" else "plain"
    return [(label, f"{verify.sha256(path)}:{fmt}", jsonl_text(path) if fmt == "jsonl" else plain(path, "data file"))
            for label, path in located(name)]  # fmt: skip


def plain(path: Path, what: str) -> Callable[[], Iterator[bytes]]:
    """pieces() of a plain UTF-8 text file, in blocks; bytes that are not UTF-8 end in one line."""

    def pieces() -> Iterator[bytes]:
        for offset, data in file_blocks(path):
            utf8(data, path, what, offset)
            yield data

    return pieces


def utf8(data: bytes, path: Path, what: str, offset: int = 0) -> str:
    """`data` decoded; a file that is not UTF-8 (latin-1, binary) is one line naming the byte."""
    from prunebench import PrunebenchError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrunebenchError(
            f"{what}: {path} is not UTF-8 text (byte {offset + err.start:,}: {data[err.start : err.start + 1]!r});"
            " convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def decoded(tokenizer, ids) -> Iterator[bytes]:
    """Token ids as text, decoded a million at a time (a word cut at a seam costs a few 13-grams)."""
    for start in range(0, len(ids), 1 << 20):
        yield tokenizer.decode(ids[start : start + (1 << 20)].tolist()).encode("utf-8", "replace")


def gate(train: list[Part], sets: dict[str, tuple[str, list[Part]]], what: str, allow: bool) -> dict:
    """`measure` against evaluation sets {name: (role, forms)}; a set with MAX_OVERLAP or more of its
    13-grams in the training text stops the run in one line naming the training file, the set and the
    overlap (`allow`: a warning instead). Returns the report for metrics.json."""
    from prunebench import PrunebenchError

    report = measure(train, {name: forms for name, (_, forms) in sets.items() if forms})
    report.update(gate="overlap", limit=MAX_OVERLAP, allowed=allow, roles={k: r for k, (r, _) in sets.items()},
                  unavailable=[name for name, (_, forms) in sets.items() if not forms])  # fmt: skip
    over = [(r["overlap"], name) for name, r in report["sets"].items() if r["overlap"] >= MAX_OVERLAP]
    if not over:
        return report
    share, name = max(over)
    r, part = report["sets"][name], report["worst_part"]
    where = what if part in (None, what.split("=", 1)[-1]) else f"{what}: {part}"  # the file, when a folder
    line = (
        f"{where} holds {_pct(share)} of the word 13-grams of the {sets[name][0]} set {name} ({r['form']};"
        f" limit {_pct(MAX_OVERLAP)}; {_pct(r['contaminated'])} of the training text's 13-grams are from it)"
    )
    if not allow:
        raise PrunebenchError(
            f"{line}: it would train on what the run evaluates; use other text, or recovery.allow_overlap=true to"
            " train on it knowingly (metrics.json records the overlap)"
        )
    log.warning("%s; training on it anyway (recovery.allow_overlap=true)", line)
    return report


def jsonl_text(path: Path) -> Callable[[], Iterator[bytes]]:
    """pieces() of a JSON-lines file's "text" rows (prunebench's C4 files), joined with blank lines."""
    from prunebench.data import verify

    def pieces() -> Iterator[bytes]:
        with verify.parsing(path), open(path, "rb") as lines:
            yield from joined(json.loads(line)["text"] for line in lines if line.strip())

    return pieces


def joined(texts: Iterable[str]) -> Iterator[bytes]:
    """Documents as UTF-8, joined with blank lines (as training joins them), in pieces of about BLOCK."""
    block, size = [], 0
    for t in texts:
        block.append(t.encode("utf-8", "replace"))
        size += len(block[-1])
        if size >= BLOCK:
            yield b"\n\n".join(block)
            block, size = [], 0
    if block:
        yield b"\n\n".join(block)
