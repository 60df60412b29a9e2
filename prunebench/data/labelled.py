"""Labelled sentence and sentence-pair sets for encoders: STS, NLI and classification.

Read in place from a data root (see `prunebench.data.data_roots`; layouts in
../shared/data/*/SOURCE.md), else from the Hugging Face Hub where a copy exists there. Offline,
only some splits exist (no SNLI/IndicXNLI train, no MahaNews train, no MahaSTS train): asking
for one gives one line naming what is missing and what stands in.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from prunebench import PrunebenchError
from prunebench.data import data_roots, find, verify

NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}  # the HF `snli` convention


@dataclass
class Pairs:
    """Sentence pairs with a gold score (STS: 0–5) or a class id (NLI)."""

    first: list[str]
    second: list[str]
    labels: list[float]

    def sample(self, n: int | None, seed: int = 0) -> Pairs:
        """A seeded random subset of n pairs (the files are ordered by genre or class)."""
        return _sample(self, ("first", "second", "labels"), n, seed)


@dataclass
class Sentences:
    texts: list[str]
    labels: list[int]
    classes: list[str]

    def sample(self, n: int | None, seed: int = 0) -> Sentences:
        return _sample(self, ("texts", "labels"), n, seed)


def _sample(rows, columns: tuple[str, ...], n: int | None, seed: int):
    """The same seeded subset of rows from every per-row column (in file order); all rows when
    n is None or at least the row count."""
    total = len(rows.labels)
    if n is None or n >= total:
        return rows
    import random

    idx = sorted(random.Random(seed).sample(range(total), n))
    return replace(rows, **{c: [getattr(rows, c)[i] for i in idx] for c in columns})


def _stsb_tsv(path: Path) -> Pairs:
    # Tab-separated, literal quotes, sometimes two extra provenance columns (SOURCE.md).
    with verify.parsing(path):
        rows = [line.split("\t") for line in verify.read_text(path).splitlines() if line.strip()]
        return Pairs([r[5] for r in rows], [r[6] for r in rows], [float(r[4]) for r in rows])


def _mahasts_csv(path: Path) -> Pairs:
    with verify.parsing(path), path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
        return Pairs([r["Sentence1"] for r in rows], [r["Sentence2"] for r in rows], [float(r["Label"]) for r in rows])


def _snli(split: str) -> Pairs:
    paths = {k: find(f"snli/{k}.{split}") for k in ("s1", "s2", "labels")}  # each file verified
    with verify.parsing(paths["labels"]):
        lines = {k: verify.read_text(p).splitlines() for k, p in paths.items()}
        # InferSent-style tokenized text: trailing space, spaces before punctuation (SOURCE.md).
        return Pairs([s.strip() for s in lines["s1"]], [s.strip() for s in lines["s2"]],
                     [NLI_LABELS[x.strip()] for x in lines["labels"]])  # fmt: skip


# name -> split -> (local path relative to a data root, reader); Hub fallbacks below.
STS = {
    "stsb_en": {s: (f"stsb/sts-{s}.csv", _stsb_tsv) for s in ("train", "dev", "test")},
    "stsb_mr": {s: (f"marathi/stsb_mr_translated/sts-{s}-mr.tsv", _stsb_tsv) for s in ("train", "dev", "test")},
    "mahasts": {"dev": ("marathi/mahasts/val.csv", _mahasts_csv), "test": ("marathi/mahasts/test.csv", _mahasts_csv)},
}
STS_HUB = {"stsb_en": ("sentence-transformers/stsb", {"train": "train", "dev": "validation", "test": "test"})}
NLI_HUB = {
    "snli": ("stanfordnlp/snli", None),
    "indicxnli_mr": ("Divyanshu/indicxnli", "mr"),  # IndicXNLI Marathi, the paper's NLI data
}


def _missing(what: str, tried: list[str], hint: str) -> PrunebenchError:
    return PrunebenchError(f"{what} not found (tried {', '.join(tried)}); {hint}")


def sts(name: str, split: str) -> Pairs:
    if name not in STS:
        raise PrunebenchError(f"unknown STS set {name!r}; known: {', '.join(STS)}")
    if split not in STS[name]:
        raise PrunebenchError(f"STS set {name} has no {split!r} split here; available: {', '.join(STS[name])}")
    rel, reader = STS[name][split]
    if (path := find(rel)) is not None:
        return reader(path)
    if name in STS_HUB:
        hub, splits = STS_HUB[name]
        ds = _hub(hub, None, splits[split], f"{name}/{split}")
        if ds is not None:  # scores there are 0–1; ours are 0–5 like the release
            return Pairs(list(ds["sentence1"]), list(ds["sentence2"]), [5.0 * float(x) for x in ds["score"]])
    raise _missing(f"STS set {name}/{split}", [str(r / rel) for r in data_roots()], "set PRUNEBENCH_DATA")


def nli(source: str, split: str) -> Pairs:
    """NLI pairs with labels 0 entailment, 1 neutral, 2 contradiction."""
    if source == "snli" and split in ("dev", "test") and find(f"snli/s1.{split}") is not None:
        return _snli(split)
    if source not in NLI_HUB:
        raise PrunebenchError(f"unknown NLI source {source!r}; known: {', '.join(NLI_HUB)}")
    hub, config = NLI_HUB[source]
    ds = _hub(hub, config, {"dev": "validation"}.get(split, split), f"{source}/{split}")
    if ds is None:
        raise PrunebenchError(
            f"NLI data {source}/{split} needs the Hugging Face Hub ({hub}); offline only SNLI dev and test"
            " exist: use recovery.nli.source=snli recovery.nli.split=dev"
        )
    ds = ds.filter(lambda r: r["label"] in (0, 1, 2))  # SNLI marks no-consensus pairs -1
    return Pairs(list(ds["premise"]), list(ds["hypothesis"]), [int(x) for x in ds["label"]])


MAHANEWS = {"valid": "marathi/mahanews_shc/SHC_Valid.csv", "test": "marathi/mahanews_shc/SHC_Test.csv"}
MAHANEWS_CLASSES = ["Auto", "Bhakti", "Crime", "Education", "Fashion", "Health", "International", "Manoranjan",
                    "Politics", "Sports", "Tech", "Travel"]  # fmt: skip
COLA = {s: f"cola/raw/{s}.tsv" for s in ("in_domain_train", "in_domain_dev", "out_of_domain_dev")}


def classification(name: str, split: str) -> Sentences:
    """MahaNews SHC (12 classes; offline: valid and test) or CoLA (acceptable 1 / unacceptable 0)."""
    if name == "mahanews_shc":
        if split not in MAHANEWS:
            raise PrunebenchError(
                f"MahaNews SHC has no {split!r} split here (SHC_Train.csv is not in ../shared/data);"
                " available: valid, test — train on valid with eval.train_split=valid"
            )
        path = find(MAHANEWS[split])
        if path is None:
            tried = [str(r / MAHANEWS[split]) for r in data_roots()]
            raise _missing(f"MahaNews SHC {split}", tried, "set PRUNEBENCH_DATA")
        with verify.parsing(path), path.open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["Label"] != "Label"]  # 11 in-body header rows
            labels = [MAHANEWS_CLASSES.index(r["Label"]) for r in rows]
            return Sentences([r["Text"] for r in rows], labels, MAHANEWS_CLASSES)
    if name == "cola":
        if split not in COLA:
            raise PrunebenchError(f"CoLA has no {split!r} split; available: {', '.join(COLA)}")
        path = find(COLA[split])
        if path is not None:
            with verify.parsing(path):
                rows = [line.split("\t") for line in verify.read_text(path).splitlines() if line.strip()]
                return Sentences([r[3] for r in rows], [int(r[1]) for r in rows], ["unacceptable", "acceptable"])
        hub_split = {"in_domain_train": "train", "in_domain_dev": "validation"}.get(split, split)
        ds = _hub("nyu-mll/glue", "cola", hub_split, f"cola/{split}")
        if ds is not None:
            return Sentences(list(ds["sentence"]), [int(x) for x in ds["label"]], ["unacceptable", "acceptable"])
        raise _missing(f"CoLA {split}", [str(r / COLA[split]) for r in data_roots()], "set PRUNEBENCH_DATA")
    raise PrunebenchError(f"unknown classification set {name!r}; known: mahanews_shc, cola")


def _hub(name: str, config: str | None, split: str, record: str):
    from prunebench.models import hub_reachable

    if not hub_reachable():
        return None
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception:  # noqa: BLE001 - every Hub failure ends in the same advice
        return None
    verify.record_hub(record, name, config, split, ds)  # metrics.json says which Hub data was read
    return ds


# Every local file read here, for `prunebench data`: name -> path relative to a data root.
FILES = {
    **{f"{n}/{s}": rel for n, splits in STS.items() for s, (rel, _) in splits.items()},
    **{f"snli/{k}.{s}": f"snli/{k}.{s}" for s in ("dev", "test") for k in ("s1", "s2", "labels")},
    **{f"mahanews_shc/{s}": rel for s, rel in MAHANEWS.items()},
    **{f"cola/{s}": rel for s, rel in COLA.items()},
}
