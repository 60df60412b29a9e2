"""Training text beyond the built-in names: `recovery.source` = a file, a folder or a glob of the
user's own data, or a Hugging Face dataset id `hf:<id>`. Files are read in sorted path order, so one
corpus given in any of the formats below yields the same token stream and the same windows.

Text (joined with blank lines and tokenized once, as the built-in sources are):
  .jsonl / .json rows' `recovery.text_field` (default `text`); .txt, one document per file;
  .parquet / .arrow tables with a `text_field` column.
Pre-tokenized (token ids concatenated as they are; an id outside the tokenizer's vocabulary, or a
negative one, is refused naming the file):
  .npy integer arrays;
  .bin raw little-endian token ids, as nanoGPT-style packers write them: uint16 when the tokenizer's
    vocabulary has fewer than 65,536 entries, else uint32 (an int32 file of ids < 2^31, Megatron's
    choice for large vocabularies, reads the same). A sibling Megatron `.idx` (header `MMIDIDX`)
    names the dtype instead (its codes 1-5 and 8: uint8, int8, int16, int32, int64, uint16);
  .parquet / .arrow tables with an `input_ids` column (a list of ids per row, or one id per row):
    such a table is pre-tokenized whatever `text_field` says.
Arrow files are Arrow IPC streams as `datasets`' `save_to_disk` writes them (its state.json and
dataset_info.json are skipped) or IPC/Feather files. A saved DatasetDict (dataset_dict.json beside
one folder per split) is refused: name one split's folder, so a test split is never read by accident.
One corpus is one kind: text files and pre-tokenized files together are refused.

Hugging Face Hub ids (`hf:<id>`) are read by `hub.py`, which builds on the readers here.

An evaluation split stays refused also when given as a path: by resolved path and by SHA-256 against
its file in the data roots (WikiText-2's wiki.test.raw). `contamination` measures the word 13-gram
overlap (data/overlap.py) of the training text with WikiText-2 test in every form and the held-out set,
before any model loads (token ids and `hf:` text once read); above overlap.MAX_OVERLAP the run stops in one
line unless `recovery.allow_overlap=true`. metrics.json records the overlap, the files and their SHA-256
(one file: its own, as `sha256sum` prints; several: of their bytes in order; `hf:` sources: the id,
config, split, documents read and a SHA-256 of what was read).
"""

from __future__ import annotations

import glob
import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from prunebench import PrunebenchError
from prunebench.data import overlap

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow")
TOKEN_SUFFIXES = (".npy", ".bin")  # always token ids; .parquet / .arrow are when they hold `input_ids`
TABLES = (".parquet", ".arrow")
IDS_COLUMN = "input_ids"
EVAL_SPLITS = ("wikitext2_test",)  # evaluation data: never a training source
# Hub ids (compared in lower case, as the Hub resolves them) whose test and validation splits are WikiText's.
IGNORED = ("README", "LICENSE", "SHA256SUMS")  # beside corpus files in a folder: documentation, not text
SAVE_TO_DISK_META = ("state.json", "dataset_info.json")  # beside the .arrow files of a saved Dataset
MEGATRON_IDX = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}
_hub_read: dict[str, dict] = {}  # hf: source -> what the last read of it took (metrics.json's digest; hub.py)
_overlaps: dict[str, dict] = {}  # source -> the last overlap measured (metrics.json)
_deferred: dict[str, tuple] = {}  # source -> (held-out, allow, knob): measured once the text is read


def is_hub(source: str) -> bool:
    """A Hugging Face dataset id, `hf:<id>`."""
    return source.startswith("hf:")


def is_path(source: str) -> bool:
    """A source that names files rather than a built-in dataset or a Hub id."""
    if is_hub(source):
        return False
    return "/" in source or "*" in source or source.endswith(TEXT_SUFFIXES + TOKEN_SUFFIXES)


# --- files -----------------------------------------------------------------------------------------


def files(source: str, knob: str = "recovery.source") -> list[Path]:
    """The corpus files a file / folder / glob names, sorted; refuses none, unknown suffixes, a saved
    DatasetDict, or an evaluation file."""
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
    if dicts := sorted(f for f in found if f.name == "dataset_dict.json"):
        splits = sorted(d.name for d in dicts[0].parent.iterdir() if d.is_dir())
        raise PrunebenchError(
            f"{knob}={source}: {dicts[0].parent} is a saved DatasetDict (splits: {', '.join(splits)}); name one split's"
            f" folder, e.g. {knob}={dicts[0].parent / (splits[0] if splits else 'train')}"
        )
    arrow_dirs = {f.parent for f in found if f.suffix == ".arrow"}
    found = sorted(f for f in found if not _ignored(f, p if p.is_dir() else None, arrow_dirs))
    if other := [f for f in found if f.suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES]:  # never skipped in silence
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise PrunebenchError(
            f"{knob}={source}: {other[0]}{more} is not a corpus file ({other[0].suffix or 'no suffix'}; corpus files:"
            f" {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)}); convert it (e.g. a .csv to .jsonl) or move it out"
        )
    if not found:
        raise PrunebenchError(f"{knob}={source}: no {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files there")
    return found


def _ignored(f: Path, root: Path | None, arrow_dirs: set[Path]) -> bool:
    """What a corpus folder may hold beside its text: hidden files and folders (.git), documentation
    (README, LICENSE, *.md), checksums, save_to_disk's metadata, a Megatron .idx beside its .bin."""
    rel = f.relative_to(root).parts if root is not None and f.is_relative_to(root) else (f.name,)
    return (any(part.startswith(".") for part in rel) or f.suffix == ".md" or f.stem.upper() in IGNORED
            or (f.name in SAVE_TO_DISK_META and f.parent in arrow_dirs)
            or (f.suffix == ".idx" and f.with_suffix(".bin").is_file()))  # fmt: skip


def _refuse_eval(found: list[Path], knob: str) -> None:
    """An evaluation split given as a path (or a copy of it) is refused: by path, then by checksum.
    Its other forms (the tokenized file) and near copies (an edit, a slice) are `contamination`'s."""
    from prunebench.data import verify

    for name in EVAL_SPLITS:
        for _, held in overlap.located(name)[:1]:  # the form evaluated; the others are contamination's (named overlap)
            digest = verify.sha256(held)
            for f in found:
                if f.resolve() == held.resolve() or (
                    f.stat().st_size == held.stat().st_size and verify.sha256(f) == digest
                ):
                    raise PrunebenchError(f"{knob}: {f} is the evaluation split {name} and must never be trained on")


def _arrow(f: Path, knob: str, schema_only: bool = False):
    """An .arrow file's table (or schema): an IPC stream (`datasets`' save_to_disk), else an IPC file."""
    import pyarrow as pa

    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.OSFile(str(f), "rb") as src:
                reader = opener(src)
                return reader.schema if schema_only else reader.read_all()
        except pa.ArrowInvalid:
            continue
    raise PrunebenchError(f"{knob}: {f} is not an Arrow IPC stream or file (as datasets' save_to_disk writes)")


def _schema_names(f: Path, knob: str) -> list[str]:
    if f.suffix == ".arrow":
        return list(_arrow(f, knob, schema_only=True).names)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(f).names)
    except (pa.ArrowInvalid, OSError) as err:
        raise PrunebenchError(f"{knob}: {f} is not a readable Parquet file ({str(err).splitlines()[0]})") from None


def _no_field(f: Path, field: str, names: list[str], knob: str, what: str = "column") -> PrunebenchError:
    return PrunebenchError(
        f"{knob}: {f} has no {what} {field!r} (nor {IDS_COLUMN!r}; {what}s: {', '.join(map(str, names))});"
        " set recovery.text_field"
    )


def kind(f: Path, text_field: str, knob: str = "recovery.source") -> str:
    """'ids' (pre-tokenized) or 'text', read cheaply (a table's schema, a .jsonl's first row), so a
    missing text field stops the run before any model loads."""
    if f.suffix in TOKEN_SUFFIXES:
        return "ids"
    if f.suffix in TABLES:
        names = _schema_names(f, knob)
        if IDS_COLUMN in names:
            return "ids"
        if text_field not in names:
            raise _no_field(f, text_field, names, knob)
        return "text"
    if f.suffix == ".jsonl":
        with f.open(encoding="utf-8", errors="replace") as lines:
            first = next((line for line in lines if line.strip()), None)
        try:
            row = json.loads(first) if first is not None else {}
        except json.JSONDecodeError as err:
            raise PrunebenchError(f"{knob}: {f} is not valid JSON lines ({err.msg} in its first row)") from None
        if isinstance(row, dict) and row and text_field not in row:
            raise PrunebenchError(
                f"{knob}: a row of {f} has no field {text_field!r} (fields: {', '.join(row)}); set recovery.text_field"
            )
    return "text"


def check(source: str, text_field: str = "text", knob: str = "recovery.source") -> str:
    """Before any model loads: the files exist, are of known kinds, all text or all token ids, hold
    the text field; returns 'text' or 'ids'."""
    return checked(source, text_field, knob)[1]


def checked(source: str, text_field: str, knob: str) -> tuple[list[Path], str]:
    found = files(source, knob)
    kinds = {f: kind(f, text_field, knob) for f in found}
    if len(set(kinds.values())) > 1:
        t = next(f for f, k in kinds.items() if k == "text")
        i = next(f for f, k in kinds.items() if k == "ids")
        raise PrunebenchError(
            f"{knob}={source}: mixes text ({t.name}) and pre-tokenized token ids ({i.name}); give one kind"
        )
    return found, next(iter(kinds.values()))


# --- reading -----------------------------------------------------------------------------------------


def table_texts(table, f: Path, text_field: str, knob: str) -> list[str]:
    """A table's text column: strings only (a number is not text, a null is no text: both refused)."""
    import pyarrow as pa

    if text_field not in table.column_names:
        raise _no_field(f, text_field, table.column_names, knob)
    col = table.column(text_field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise PrunebenchError(f"{knob}: {f}'s column {text_field!r} holds {col.type}, not text; give a text column")
    rows = col.to_pylist()
    if col.null_count:
        first = next(i for i, t in enumerate(rows) if t is None)
        raise PrunebenchError(
            f"{knob}: {col.null_count} rows of {f} have a null {text_field!r} (the first: row {first + 1});"
            " drop them or fill them with text"
        )
    return rows


def table_ids(table, f: Path, knob: str):
    """The `input_ids` column flattened: lists of ids per row (offsets respected), or one id per row."""
    import numpy as np
    import pyarrow as pa

    col = table.column(IDS_COLUMN)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        chunks = [c.flatten() for c in col.chunks]
    else:
        chunks = list(col.chunks)
    if not all(pa.types.is_integer(c.type) for c in chunks) or any(c.null_count for c in chunks):
        raise PrunebenchError(f"{knob}: {f}'s {IDS_COLUMN} column holds {col.type}, not integer token ids")
    return np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.zeros(0, np.int64)


def _texts(f: Path, text_field: str, knob: str) -> Iterator[str]:
    """A text file's documents, checked row by row: valid UTF-8 and JSON (a bad row named by its line),
    objects holding `text_field` as a string (null and numbers are refused, never trained on as "None")."""
    if f.suffix == ".txt":  # newlines as read_text gives them (universal newlines)
        yield overlap.utf8(f.read_bytes(), f, knob).replace("\r\n", "\n").replace("\r", "\n")
    elif f.suffix == ".parquet":
        import pyarrow.parquet as pq

        if text_field not in (names := _schema_names(f, knob)):
            raise _no_field(f, text_field, names, knob)
        yield from table_texts(pq.read_table(f, columns=[text_field]), f, text_field, knob)
    elif f.suffix == ".arrow":
        yield from table_texts(_arrow(f, knob), f, text_field, knob)
    elif f.suffix == ".jsonl":
        with f.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _field(_json(line, f, knob, number), f, text_field, knob, f"line {number}")
    else:
        rows = _json(f.read_bytes(), f, knob)
        if not isinstance(rows, list):
            raise PrunebenchError(
                f"{knob}: {f} must hold a list of JSON objects (.json), or one object a line (.jsonl)"
            )
        for number, row in enumerate(rows, 1):
            yield _field(row, f, text_field, knob, f"row {number}")


def _json(data: bytes, f: Path, knob: str, line: int | None = None):
    try:
        return json.loads(overlap.utf8(data, f, knob))
    except json.JSONDecodeError as err:
        where = f"line {line}, column {err.colno}" if line else f"line {err.lineno}, column {err.colno}"
        raise PrunebenchError(f"{knob}: {f} is not valid JSON at {where} ({err.msg})") from None


def _field(row, f: Path, text_field: str, knob: str, where: str) -> str:
    if not isinstance(row, dict):
        raise PrunebenchError(f"{knob}: {where} of {f} is {type(row).__name__}, not a JSON object")
    if text_field not in row:
        fields = ", ".join(row) or "none"
        raise PrunebenchError(
            f"{knob}: {where} of {f} has no field {text_field!r} (fields: {fields}); set recovery.text_field"
        )
    value = row[text_field]
    if not isinstance(value, str):
        what = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise PrunebenchError(f"{knob}: {where} of {f} has {text_field!r} = {what}, not text; fix or drop the row")
    return value


def vocab_size(tokenizer) -> int:
    """The number of token ids a tokenizer can produce (added tokens included)."""
    try:
        return len(tokenizer)
    except TypeError:  # prunebench's ByteTokenizer (tiny models) has no len()
        return int(tokenizer.vocab_size)


def bin_dtype(f: Path, vocab: int) -> str:
    """The numpy dtype of a .bin shard: a Megatron .idx beside it names it; else uint16 below a
    vocabulary of 65,536, uint32 from there (little-endian)."""
    idx = f.with_suffix(".idx")
    if idx.is_file():
        with idx.open("rb") as h:
            head = h.read(len(MEGATRON_IDX) + 9)
        if head[: len(MEGATRON_IDX)] == MEGATRON_IDX and len(head) == len(MEGATRON_IDX) + 9:
            code = struct.unpack("<B", head[-1:])[0]
            if code not in MEGATRON_DTYPES:
                raise PrunebenchError(f"recovery.source: {idx} names dtype code {code}, not integer token ids")
            return MEGATRON_DTYPES[code]
    return "<u2" if vocab < 65536 else "<u4"


def _ids(f: Path, vocab: int, knob: str):
    """One pre-tokenized file's token ids (numpy, int64), checked against the vocabulary."""
    import numpy as np

    if f.suffix == ".npy":
        try:
            arr = np.load(f, allow_pickle=False).reshape(-1)
        except ValueError as err:
            raise PrunebenchError(f"{knob}: {f} is not a readable .npy array ({err})") from None
        if arr.dtype.kind not in "iu":
            raise PrunebenchError(f"{knob}: {f} holds {arr.dtype} values, not integer token ids")
    elif f.suffix == ".bin":
        dtype = np.dtype(bin_dtype(f, vocab))
        size = f.stat().st_size
        if size % dtype.itemsize:
            raise PrunebenchError(
                f"{knob}: {f} is {size} bytes, not a whole number of {dtype.name} token ids"
                f" ({dtype.itemsize} bytes each)"
            )
        arr = np.fromfile(f, dtype=dtype)
    else:  # a table with input_ids
        import pyarrow.parquet as pq

        arr = table_ids(_arrow(f, knob) if f.suffix == ".arrow" else pq.read_table(f, columns=[IDS_COLUMN]), f, knob)
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.max()) >= vocab or int(arr.min()) < 0):
        bad = int(arr.max()) if int(arr.max()) >= vocab else int(arr.min())
        how = f", read as {np.dtype(bin_dtype(f, vocab)).name} ids" if f.suffix == ".bin" else ""
        raise PrunebenchError(
            f"{knob}: {f} holds token id {bad}, outside the tokenizer's vocabulary of {vocab}{how}; was it written"
            " with another tokenizer (or dtype)?"
        )
    return arr


def token_ids(tokenizer, source: str, text_field: str = "text", knob: str = "recovery.source") -> torch.Tensor:
    """The corpus as one 1-D stream of token ids: text rows joined with blank lines and tokenized as
    the built-in sources are, or the pre-tokenized files' ids concatenated as they are."""
    import numpy as np

    from prunebench.data import tokenize

    found, what = checked(source, text_field, knob)
    if what == "ids":
        vocab = vocab_size(tokenizer)
        ids = np.concatenate([_ids(f, vocab, knob) for f in found])
        key = f"ids:{hashlib.sha256(ids.tobytes()).hexdigest()}:{getattr(tokenizer, 'name_or_path', '')}"
        measure_late(source, key, lambda: overlap.decoded(tokenizer, ids))  # the text of the ids: with the tokenizer
        return torch.from_numpy(ids)
    texts = [t for f in found for t in _texts(f, text_field, knob) if t]
    return tokenize(tokenizer, "\n\n".join(texts))


def digest(source: str, knob: str = "recovery.source") -> dict | None:
    """What metrics.json records: for files, the files, each one's SHA-256 and the SHA-256 of their
    contents in order (one file: its own); for `hf:` sources, what was read (`hub_token_ids`); None
    for a built-in name."""
    if is_hub(source):
        return _hub_read.get(source)
    if not is_path(source):
        return None
    from prunebench.data import verify

    found = files(source, knob)
    each = [verify.sha256(f) for f in found]
    if len(found) == 1:
        whole = each[0]  # the file's own SHA-256: what `sha256sum <file>` prints
    else:  # the files' bytes in order: what `cat <files> | sha256sum` prints
        h = hashlib.sha256()
        for f in found:
            with f.open("rb") as src:
                while block := src.read(1 << 24):
                    h.update(block)
        whole = h.hexdigest()
    return {"files": [str(f) for f in found], "sha256": whole, "file_sha256": each}


# --- overlap with the evaluation sets (data/overlap.py) --------------------------------------------------


def contamination(
    source: str, text_field: str = "text", held_out: str | None = None, allow: bool = False,
    knob: str = "recovery.source",
) -> dict:  # fmt: skip
    """Before any model loads: the word 13-gram overlap of the training text with WikiText-2 test (every
    form in the data root) and the held-out set (`val_source`). An evaluation set with MAX_OVERLAP or
    more of its 13-grams in the training text stops the run in one line, unless `allow`. Token ids and
    `hf:` rows are measured when they are read (`token_ids`, `hub_token_ids`): decoding ids needs the
    run's tokenizer, and Hub rows arrive only then. Returns what metrics.json records (`overlap_of`)."""
    if is_hub(source) or (is_path(source) and check(source, text_field, knob) == "ids"):
        _deferred[source] = (held_out, allow, knob)
        when = "its rows are read" if is_hub(source) else "the run's tokenizer decodes its token ids"
        _overlaps[source] = {"checked": f"when {when}"}
    elif not (train := _parts(source, text_field, knob) if is_path(source) else _forms(source)[:1]):  # what it reads
        _overlaps[source] = {"checked": False, "why": f"{source} has no local copy (read from the Hub)"}
    else:
        _overlaps[source] = _measure(source, train, held_out, allow, knob)
    return _overlaps[source]


def against_evaluations(
    source: str, sets: dict[str, list], text_field: str = "text", allow: bool = False, knob: str = "recovery.source"
) -> None:  # fmt: skip
    """The training text against the run's other evaluation sets (`evaluation_text()` of its evaluators:
    lm-eval's local tasks, a perplexity set besides WikiText-2 test), gated as `contamination` gates and
    added to the same record. Sources measured only once read (token ids, `hf:`) are named unchecked here."""
    sets = {name: forms for name, forms in sets.items() if name != "wikitext2_test" and forms}  # gated already
    if not sets or source not in _overlaps or source in _deferred:
        if sets and source in _deferred:
            _overlaps[source]["unchecked"] = sorted(sets)  # read after loading: the evaluators' sets not measured
        return
    train = _parts(source, text_field, knob) if is_path(source) else _forms(source)[:1]
    if not train:
        return
    roles = {name: ("evaluation", forms) for name, forms in sets.items()}
    report = overlap.gate(train, roles, f"{knob}={source}", allow)
    record = _overlaps[source]
    record.setdefault("sets", {}).update(report["sets"])
    record.setdefault("roles", {}).update(report["roles"])


def overlap_of(source: str) -> dict | None:
    """The overlap last measured for a source (metrics.json)."""
    return _overlaps.get(source)


def _measure(source: str, train: list, held_out: str | None, allow: bool, knob: str) -> dict:
    roles = {"wikitext2_test": "evaluation", **({held_out: "held-out"} if held_out else {})}
    return overlap.gate(train, {name: (role, _forms(name)) for name, role in roles.items()}, f"{knob}={source}", allow)


def _forms(name: str) -> list:
    """An evaluation set's forms as overlap parts: a data-root dataset's files (WikiText-2: raw and
    tokenized), or the text files a held-out path names (token ids cannot be read without a tokenizer)."""
    if not is_path(name):
        return overlap.builtin_parts(name)
    return [] if check(name, knob="recovery.val_source") == "ids" else _parts(name, "text", "recovery.val_source")


def _parts(source: str, text_field: str, knob: str) -> list:
    """The files of a path source as overlap parts: .txt as plain text, other files' rows joined."""
    from prunebench.data import verify

    return [(str(f), f"{verify.sha256(f)}:{text_field}", overlap.plain(f, knob) if f.suffix == ".txt"
             else lambda f=f: overlap.joined(_texts(f, text_field, knob))) for f in files(source, knob)]  # fmt: skip


def measure_late(source: str, key: str, pieces) -> None:
    """The overlap of text read after loading (token ids decoded, Hub rows): measured and gated now."""
    if source in _deferred:
        held_out, allow, knob = _deferred[source]
        _overlaps[source] = _measure(source, [(source, key, pieces)], held_out, allow, knob)


def remember_hub_read(source: str, record: dict) -> None:
    """What hub.py read of an `hf:` source: `digest` reports it."""
    _hub_read[source] = record
