"""Sentence pairs against evaluation splits: the contamination gate of the encoder recipes' NLI and STS
training sets (recovery=sbert_nli_sts) and the split overlap eval=cola / classification record. Most of
their sentences are shorter than the 13 words of data/overlap.py's n-grams, so a pair (or a sentence) is
compared whole: one 64-bit hash over its normalised words (the same normalisation and word hashes as
overlap.py), the two sentences of a pair in either order."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from prunebench.data.overlap import _K, _Q, BLOCK, _mix, _pct, _powers, distinct, word_hashes

log = logging.getLogger(__name__)

# STS pairs are short (most under 13 words), so the unit there is the whole pair, normalised as above and
# order-free: the official STS-B splits already share 0.87% (English) / 1.24% (Marathi) of their distinct test
# pairs and 0.53% / 0.74% of their dev pairs with train (and ~10% of sentences): the benchmark as published.
# The gate is 5% of an evaluation split's pairs, ~4x that; a test split given as training reads 100%.
MAX_PAIR_OVERLAP = 0.05


def sentence_hashes(texts: list[str]) -> np.ndarray:
    """One 64-bit hash per text over its normalised words: mix(Σ_i h(w_i) · Q^i + words · K)."""
    out, part, size = [], [], 0
    for t in texts:
        data = t.replace("\n", " ").encode("utf-8", "replace")[: BLOCK // 2]  # a text past 1 MB: its start
        if size + len(data) + 1 > BLOCK:
            out.append(_sentences(part))
            part, size = [], 0
        part.append(data)
        size += len(data) + 1
    return np.concatenate([*out, _sentences(part)])


def _sentences(part: list[bytes]) -> np.ndarray:
    data = b"\n".join(part)
    w, starts = word_hashes(data, with_starts=True)
    which = np.searchsorted(np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A), starts, side="right")
    first = np.searchsorted(which, np.arange(len(part)))  # index of each text's first word
    count = np.bincount(which, minlength=len(part))
    qpow = _powers(_Q, int(count.max(initial=0)) + 1)
    with np.errstate(over="ignore"):
        h = np.zeros(len(part), dtype=np.uint64)
        np.add.at(h, which, w * qpow[np.arange(len(w)) - first[which]])
        return _mix(h + count.astype(np.uint64) * np.uint64(_K))


def pair_keys(first: list[str], second: list[str]) -> np.ndarray:
    """Distinct keys of sentence pairs, the two sentences in either order."""
    a, b = sentence_hashes(first), sentence_hashes(second)
    with np.errstate(over="ignore"):
        return distinct(_mix(np.minimum(a, b) * np.uint64(_Q) + np.maximum(a, b)))


def pair_gate(train: dict, sets: dict[str, tuple], what: str, allow: bool) -> dict:
    """Training pairs {name: (first, second)} against evaluation splits {name: (role, (first, second))}:
    per split the share of its distinct pairs (and of its sentences) found among the training ones; at
    MAX_PAIR_OVERLAP or more the run stops in one line (`allow`: a warning). Returns the report."""
    from prunebench import PrunebenchError

    keys = distinct(np.concatenate([pair_keys(*p) for p in train.values()] + [np.zeros(0, dtype=np.uint64)]))
    said = distinct(np.concatenate([sentence_hashes(p[0] + p[1]) for p in train.values()] + [np.zeros(0, np.uint64)]))
    report = {"unit": "sentence pair", "gate": "overlap", "limit": MAX_PAIR_OVERLAP, "allowed": allow,
              "train": {name: len(p[0]) for name, p in train.items()}, "sets": {}}  # fmt: skip
    for name, (role, (a, b)) in sets.items():
        mine, sent = pair_keys(a, b), distinct(sentence_hashes(a + b))
        shares = [float(np.isin(x, y).mean()) if len(x) else 0.0 for x, y in ((mine, keys), (sent, said))]
        report["sets"][name] = {"role": role, "pairs": len(mine), "overlap": shares[0], "sentence_overlap": shares[1]}
    over = [(r["overlap"], name) for name, r in report["sets"].items() if r["overlap"] >= MAX_PAIR_OVERLAP]
    if over:
        share, name = max(over)
        line = (
            f"{what}: {_pct(share)} of the sentence pairs of the {sets[name][0]} split {name} are training pairs"
            f" (limit {_pct(MAX_PAIR_OVERLAP)}; training: {', '.join(train)})"
        )
        if not allow:
            raise PrunebenchError(
                f"{line}; it would train on what the run evaluates: train on another split, or set"
                " recovery.allow_overlap=true to train on it knowingly (metrics.json records the overlap)"
            )
        log.warning("%s; training on it anyway (recovery.allow_overlap=true)", line)
    return report


def recipe_overlap(nli: dict, sts: dict, dev: dict, seed: int, allow: bool) -> dict:
    """recovery=sbert_nli_sts's training pairs (NLI when local, STS; the seeded samples that train)
    against every STS test split here and its dev split, through `pair_gate`."""
    from prunebench import PrunebenchError
    from prunebench.data import labelled

    stages, train, found = [], {}, {}
    if (nli["epochs"] or nli["max_steps"]) and nli["source"] == "snli" and nli["split"] in ("dev", "test"):
        stages.append(("nli", nli, nli["source"], labelled.nli))  # other NLI data: the Hub, once training starts
    if sts["epochs"] or sts["max_steps"]:
        stages.append(("sts", sts, sts["set"], labelled.sts))
    for stage, cfg, name, read in stages:
        pairs = read(name, cfg["split"]).sample(cfg["max_samples"], seed)
        train[f"{stage} {name}/{cfg['split']}"] = (pairs.first, pairs.second)
    sets = {f"{dev['set']}/{dev['split']}": ("held-out", dev["set"], dev["split"])}
    sets.update(
        {f"{name}/test": ("evaluation", name, "test") for name, splits in labelled.STS.items() if "test" in splits}
    )
    for key, (role, name, split) in sets.items():
        with contextlib.suppress(PrunebenchError):  # no copy here: not what this run evaluates
            pairs = labelled.sts(name, split)
            found[key] = (role, (pairs.first, pairs.second))
    return pair_gate(train, found, "recovery.nli / recovery.sts", allow)
