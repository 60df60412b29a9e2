"""Training text from the user's own files: `recovery.source` = a file, a folder or a glob of
.jsonl / .json / .parquet / .txt (rows' `recovery.text_field`, default `text`; a .txt file is one
document), or pre-tokenized .npy arrays of token ids. Files are read in sorted path order, so one
corpus given in any of these formats yields the same token stream and the same windows.

An evaluation split stays refused also when given as a path: by resolved path and by SHA-256
against the evaluation files found in the data roots. metrics.json names the files and a digest.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

from prunebench import PrunebenchError

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
TOKEN_SUFFIXES = (".npy",)
EVAL_SPLITS = ("wikitext2_test",)  # evaluation data: never a training source


def is_path(source: str) -> bool:
    """A source that names files rather than a built-in dataset."""
    return "/" in source or "*" in source or source.endswith(TEXT_SUFFIXES + TOKEN_SUFFIXES)


def files(source: str, knob: str = "recovery.source") -> list[Path]:
    """The corpus files a file / folder / glob names, sorted; refuses none, mixed kinds, or unknown suffixes."""
    p = Path(source).expanduser()
    if "*" in source:
        found = [Path(f) for f in glob.glob(str(p), recursive=True)]
    elif p.is_dir():
        found = [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        found = [p]
    else:
        raise PrunebenchError(f"{knob}={source}: no such file or folder")
    _refuse_eval(found, knob)  # before the suffix filter: wiki.test.raw named directly is refused as what it is
    found = sorted(f for f in found if f.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES)
    if not found:
        raise PrunebenchError(f"{knob}={source}: no {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files there")
    if len({f.suffix in TOKEN_SUFFIXES for f in found}) > 1:
        raise PrunebenchError(f"{knob}={source}: mixes text files and pre-tokenized .npy shards; give one kind")
    return found


def _refuse_eval(found: list[Path], knob: str) -> None:
    """An evaluation split given as a path (or a copy of it) is refused: by path, then by checksum."""
    from prunebench.data import text, verify

    for name in EVAL_SPLITS:
        held = text.find(text.LOCAL[name]) if name in text.LOCAL else None
        if held is None:
            continue
        digest = verify.sha256(held)
        for f in found:
            if f.resolve() == held.resolve() or (
                f.stat().st_size == held.stat().st_size and verify.sha256(f) == digest
            ):
                raise PrunebenchError(f"{knob}: {f} is the evaluation split {name} and must never be trained on")


def _rows(f: Path, text_field: str, knob: str) -> list[str]:
    if f.suffix == ".txt":
        return [f.read_text(encoding="utf-8")]
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(f)
        if text_field not in table.column_names:
            raise PrunebenchError(
                f"{knob}: {f} has no column {text_field!r} (columns: {', '.join(table.column_names)});"
                " set recovery.text_field"
            )
        return [str(t) for t in table.column(text_field).to_pylist()]
    raw = f.read_text(encoding="utf-8")
    try:
        rows = (
            [json.loads(line) for line in raw.splitlines() if line.strip()] if f.suffix == ".jsonl" else json.loads(raw)
        )
    except json.JSONDecodeError as err:
        raise PrunebenchError(f"{knob}: {f} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PrunebenchError(f"{knob}: {f} must hold JSON objects (one per line for .jsonl, a list for .json)")
    if missing := next((r for r in rows if text_field not in r), None):
        raise PrunebenchError(
            f"{knob}: a row of {f} has no field {text_field!r} (fields: {', '.join(missing)}); set recovery.text_field"
        )
    return [str(r[text_field]) for r in rows]


def token_ids(tokenizer, source: str, text_field: str = "text", knob: str = "recovery.source") -> torch.Tensor:
    """The corpus as one 1-D stream of token ids: text rows joined with blank lines and tokenized as
    the built-in sources are, or the .npy shards' ids concatenated as they are."""
    import numpy as np

    from prunebench.data import tokenize

    found = files(source, knob)
    if found[0].suffix in TOKEN_SUFFIXES:
        return torch.from_numpy(np.concatenate([np.load(f, allow_pickle=False).reshape(-1) for f in found])).long()
    texts = [t for f in found for t in _rows(f, text_field, knob) if t]
    return tokenize(tokenizer, "\n\n".join(texts))


def digest(source: str, knob: str = "recovery.source") -> dict:
    """What metrics.json records: the files and one SHA-256 over their contents, in order."""
    import hashlib

    from prunebench.data import verify

    found = files(source, knob)
    h = hashlib.sha256()
    for f in found:
        h.update(verify.sha256(f).encode())
    return {"files": [str(f) for f in found], "sha256": h.hexdigest()}
