"""Datasets, read in place from a local data root first, then from the Hugging Face Hub.

Data roots, in order: $PRUNEBENCH_DATA, ./data, ../shared/data beside the project root; a file is
read from the first root that holds its folder (never from a later root when it is missing there).
File layouts and SHA-256 digests follow ../shared/data/*/SOURCE.md; every file is verified against
them before it is read (`verify`, knob `data.verify`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import prunebench.data.verify as verify  # the module, not the package: data/__init__ imports this file
from prunebench import CONF_DIR, PrunebenchError

log = logging.getLogger(__name__)

# name -> relative paths under a data root, first found wins (C4: the whole first shard that
# `prunebench data fetch c4` writes, else the 200-document sample); Hub fallback below.
LOCAL = {
    "wikitext2_test": ("wikitext2/wikitext-2-raw/wiki.test.raw",),
    "wikitext2_valid": ("wikitext2/wikitext-2-raw/wiki.valid.raw",),
    "c4": ("c4/c4-train.00000-of-01024.json", "c4/c4_sample.json"),
}
HUB = {
    "wikitext2_test": ("wikitext", "wikitext-2-raw-v1", "test", None),
    "wikitext2_valid": ("wikitext", "wikitext-2-raw-v1", "validation", None),
    "c4": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
}


def data_roots() -> list[Path]:
    """$PRUNEBENCH_DATA, ./data, ../shared/data. A root the user names must be a folder: a misspelt
    PRUNEBENCH_DATA never silently falls back to another root's copy."""
    named = os.environ.get("PRUNEBENCH_DATA")
    if named and not Path(named).expanduser().is_dir():
        what = "is not a folder" if Path(named).expanduser().exists() else "does not exist"
        raise PrunebenchError(f"PRUNEBENCH_DATA={named} {what}; point it at a data root (../shared/data) or unset it")
    roots = [Path(named).expanduser()] if named else []
    return roots + [Path.cwd() / "data", CONF_DIR.parent.parent / "shared" / "data"]


def locate(relpath: str | tuple[str, ...]) -> tuple[Path, Path | None] | None:
    """(root, file) from the first data root that holds the file's folder: the first of `relpath`
    present there, or (root, None) when that folder lacks them all; None when no root holds it.
    Reads nothing and records nothing (`where`, `prunebench data`)."""
    rels = (relpath,) if isinstance(relpath, str) else relpath
    for root in data_roots():
        if any((root / rel).parent.is_dir() for rel in rels):
            return root, next((root / rel for rel in rels if (root / rel).is_file()), None)
    return None


def find(relpath: str | tuple[str, ...]) -> Path | None:
    """The data file to read, verified against its SOURCE.md digest and recorded for metrics.json
    (`verify.check`); None when no data root holds its folder (callers then try the Hub). A root
    whose folder lacks the file is an error naming it: other roots are not tried, so a deleted
    file never silently reads another copy."""
    found = locate(relpath)
    if found is None:
        return None
    root, path = found
    if path is None:
        rels = (relpath,) if isinstance(relpath, str) else relpath
        raise PrunebenchError(
            f"data file {' or '.join(str(root / r) for r in rels)} is missing (data root {root} holds its folder,"
            " so no other root is tried); restore it (see its SOURCE.md), or set PRUNEBENCH_DATA to a root that has it"
        )
    return verify.check(path, root)


def check_dataset(name: str, knob: str) -> None:
    """An unknown dataset name, or one that is neither in a data root nor reachable on the Hub, ends
    in one line naming the knob, before any model loads (not after the model is up)."""
    if name not in LOCAL:
        raise PrunebenchError(f"{knob}={name!r} is not a known dataset; known: {', '.join(sorted(LOCAL))}")
    found = locate(LOCAL[name])
    if found is not None and found[1] is None:
        find(LOCAL[name])  # a root holds the folder but not the file: its own line
    if found is None:
        from prunebench.models import hub_reachable

        if not hub_reachable():  # offline: say so now, in seconds
            raise PrunebenchError(f"{knob}: " + _not_found(name, "unreachable"))


def _not_found(name: str, why: str) -> str:
    tried = ", ".join(str(r / LOCAL[name][-1]) for r in data_roots())
    shared = CONF_DIR.parent.parent / "shared" / "data"
    fetchable = next((f for f, names in FETCH.items() if name in names), None)
    fix = f"prunebench data fetch {fetchable} (where the Hub is reachable)" if fetchable else "copy it there"
    return (
        f"dataset {name} not found: tried {tried} and the Hub {HUB[name][0]} ({why}); the default data root is"
        f" {shared} (the shared/data folder beside the clone): put {LOCAL[name][-1]} there or under"
        f" PRUNEBENCH_DATA, or run: {fix}"
    )


def load_texts(name: str) -> list[str]:
    """The dataset's rows as strings (WikiText-2: the Hugging Face rows, "" for blank lines)."""
    if name not in LOCAL:
        raise PrunebenchError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOCAL))}")
    path = find(LOCAL[name])
    if path is not None:
        with verify.parsing(path):
            if name.startswith("wikitext2"):
                return _wikitext_rows(path)
            return [json.loads(line)["text"] for line in verify.read_text(path).splitlines() if line]
    hub, config, split, files = HUB[name]
    from prunebench.models import hub_reachable

    try:
        if not hub_reachable():  # offline: one short check instead of the Hub client's minute of retries
            raise ConnectionError("offline")
        import datasets

        ds = datasets.load_dataset(hub, config, split=split, data_files=files)
        verify.record_hub(name, hub, config, split, ds)
        return list(ds["text"])
    except Exception as err:  # noqa: BLE001 - any Hub failure ends in the same advice
        why = "unreachable" if str(err) == "offline" else type(err).__name__
        raise PrunebenchError(_not_found(name, why)) from None


def _wikitext_rows(path: Path) -> list[str]:
    # The .raw file is the HF rows concatenated, each "" row written as " \n" (SOURCE.md).
    lines = verify.read_text(path).split("\n")[:-1]
    return ["" if line == " " else line + "\n" for line in lines]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids, with the tokenizer's own special tokens (as the reference code does)."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


@dataclass
class Calibration:
    """`nsamples` windows of `seqlen` token ids, shape (nsamples, seqlen), and how they were drawn."""

    input_ids: torch.Tensor
    source: str
    method: str  # "documents" (Wanda's protocol) or "concatenated" (fallback)
    seed: int
    batch_size: int = 1  # windows per forward in layer-wise passes (statistics do not depend on it)
    cache_dir: str | None = None  # where reusable statistics (gradient norms, dense norms) are kept

    @property
    def key(self) -> str:
        """Hash of the exact token windows: any change of data, tokenizer, seed, nsamples or seqlen
        gives a new key, so cached statistics can never be stale with respect to the data."""
        import hashlib

        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, batch_size: int = 1
) -> Calibration:
    """Wanda's draw: a random document longer than seqlen, then a random window in it (seeded with
    `random.seed(seed)`, as lib/data.py). Falls back to random windows over the concatenated text
    when fewer than nsamples/4 documents are long enough (the 200-document C4 sample at 2048)."""
    texts = [t for t in load_texts(source) if t]
    rng = random.Random(seed)
    if source == "c4":
        docs = [tokenize(tokenizer, t) for t in texts]
        long_docs = sum(len(d) > seqlen for d in docs)
        if long_docs >= max(1, nsamples // 4):
            windows = []
            for _ in range(nsamples):
                while True:
                    doc = docs[rng.randint(0, len(docs) - 1)]
                    if len(doc) > seqlen:
                        break
                start = rng.randint(0, len(doc) - seqlen - 1)
                windows.append(doc[start : start + seqlen])
            return Calibration(torch.stack(windows), source, "documents", seed, batch_size)
        log.warning(
            "only %d of %d %s documents exceed %d tokens: drawing windows over the concatenated text instead",
            long_docs,
            len(docs),
            source,
            seqlen,
        )
    ids = tokenize(tokenizer, "\n\n".join(texts))
    if len(ids) <= seqlen:
        raise PrunebenchError(f"calibration source {source} has only {len(ids)} tokens; lower calib.seqlen")
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[s : s + seqlen] for s in starts])
    return Calibration(windows, source, "concatenated", seed, batch_size)


FETCH = {"wikitext2": ("wikitext2_test", "wikitext2_valid"), "c4": ("c4",)}


def fetch(name: str, root: Path) -> list[Path]:
    """Download a dataset once from the Hub into `root`, in the local layout, so machines without
    internet (a cluster's compute nodes) read it in place: WikiText-2 = `wikitext`
    `wikitext-2-raw-v1` test and validation (each row as in the .raw files); C4 = `allenai/c4`
    `en/c4-train.00000-of-01024.json.gz`, the Wanda/SparseGPT calibration shard, as JSON lines."""
    if name not in FETCH:
        raise PrunebenchError(f"prunebench data fetch {name!r}: choose one of {', '.join(FETCH)}")
    from prunebench.models import hub_reachable

    if not hub_reachable():  # offline (HF_HUB_OFFLINE or no connection): one line now, not minutes of retries
        raise PrunebenchError(f"could not download {name}: the Hugging Face Hub is unreachable; run this where it is")
    import datasets

    written = []
    for part in FETCH[name]:
        hub, config, split, files = HUB[part]
        try:
            rows = datasets.load_dataset(hub, config, split=split, data_files=files)["text"]
        except Exception as err:  # noqa: BLE001 - any Hub failure ends in the same advice
            raise PrunebenchError(
                f"could not download {hub} ({type(err).__name__}); run this where the Hub is reachable"
            ) from None
        target = root / LOCAL[part][0]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:  # .raw: blank rows are written " \n" (SOURCE.md), so reading gives the rows back
                f.write((row or " \n") if part.startswith("wikitext2") else json.dumps({"text": row}) + "\n")
        tmp.replace(target)
        written.append(target)
    verify.write_sums(root / name, written)  # so the fetched copy verifies like ../shared/data does
    return written


def digest(name: str) -> str:
    """What `load_texts(name)` reads, as a cache-key part: "sha256:<hex>" of the verified local file
    (hashed once, see `verify`), else "hub:<id>/<config>/<split>"."""
    path = find(LOCAL[name])
    if path is not None:
        return "sha256:" + verify.sha256(path)
    hub, config, split, _ = HUB[name]
    return f"hub:{hub}/{config}/{split}"


def where(name: str) -> str:
    """Where `load_texts(name)` would read from: a local file, or the Hub."""
    found = locate(LOCAL[name])
    if found is None:
        return f"Hub {HUB[name][0]} (no local copy)"
    root, path = found
    return str(path) if path else f"{root / LOCAL[name][-1]} (missing)"


# --- `prunebench data` ---------------------------------------------------------------------------


def survey(files: dict[str, str | tuple[str, ...]]) -> list[dict]:
    """Where each named file resolves and whether it verifies, for `prunebench data`: rows of
    {name, status (ok | mismatch | missing | unverified | hub), where, expected, actual}."""
    rows = []
    for name, rels in files.items():
        found = locate(rels)
        if found is None:
            rows.append({"name": name, "status": "hub", "where": "no local copy (Hub, where one exists)"})
            continue
        root, path = found
        if path is None:
            last = rels if isinstance(rels, str) else rels[-1]
            rows.append({"name": name, "status": "missing", "where": str(root / last)})
            continue
        state, want, got = verify.status(path, root)
        rows.append({"name": name, "status": state, "where": str(path), "expected": want, "actual": got})
    return rows
