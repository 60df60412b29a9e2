"""Training text from the Hugging Face Hub: `recovery.source=hf:<id>`, with `recovery.source_config`,
`recovery.source_split` (train when unset) and `recovery.streaming`. The split is loaded with
`datasets.load_dataset`, or, streaming, read only up to the first documents whose tokens cover the
job's token budget; rows become one token stream as corpus.py makes it from files (rows with an
`input_ids` field are pre-tokenized). A split named `test`, and the test and validation splits of
WikiText (prunebench's perplexity set and its held-out set), are refused. Without the Hub
(HF_HUB_OFFLINE, or no connection within 3 s) the run stops in one line before any model loads.
What was read (id, config, split, documents, SHA-256) is what metrics.json records (corpus.digest).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from prunebench import PrunebenchError
from prunebench.data import overlap
from prunebench.recovery.corpus import IDS_COLUMN, measure_late, remember_hub_read, table_ids, table_texts, vocab_size

_WIKITEXT_IDS = ("wikitext", "salesforce/wikitext", "eleutherai/wikitext_document_level")
HUB_EVAL = dict.fromkeys(_WIKITEXT_IDS, ("test", "validation"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _split_names(split: str) -> list[str]:
    """The splits a `datasets` split expression reads: "train[:10%]+test" -> ["train", "test"]."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def check_hub(source: str, config: str | None, split: str | None, knob: str = "recovery.source") -> None:
    """Before any model loads: a well-formed id, no evaluation split, `datasets` installed, the Hub
    reachable (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, else one short connection attempt)."""
    import importlib.util

    name = source[3:]
    if not _HUB_ID.match(name):
        raise PrunebenchError(f"{knob}={source}: give a Hugging Face dataset id, e.g. hf:HuggingFaceFW/fineweb-edu")
    split = split or "train"
    for part in _split_names(split):
        if part.lower() == "test" or part.lower() in HUB_EVAL.get(name.lower(), ()):
            raise PrunebenchError(
                f"recovery.source_split={split}: the {part} split of {name} is evaluation data and must never be"
                " trained on; use recovery.source_split=train"
            )
    if importlib.util.find_spec("datasets") is None:
        raise PrunebenchError(f"{knob}={source} needs the datasets package (pip install datasets)")
    from prunebench.models import hub_reachable

    if not hub_reachable():
        raise PrunebenchError(
            f"{knob}={source}: the Hugging Face Hub is unreachable (offline); where it is reachable, save the split"
            " (datasets' save_to_disk, or to_parquet / to_json) and give that folder or file as recovery.source"
        )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def hub_token_ids(
    tokenizer,
    source: str,
    text_field: str = "text",
    config: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    tokens: int | None = None,
    knob: str = "recovery.source",
) -> torch.Tensor:
    """A Hub split as one stream of token ids, as `token_ids` makes it from files (rows with an
    `input_ids` field are pre-tokenized). Streaming reads rows in order until their tokens cover
    `tokens` (the job's budget), then stops; otherwise the whole split is loaded (and cached by datasets)."""
    import datasets
    import numpy as np

    from prunebench.data import tokenize, verify

    check_hub(source, config, split, knob)
    name, split = source[3:], split or "train"
    where = f"{knob}={source} (config {config}, split {split})"
    if streaming and not tokens:
        raise PrunebenchError(f"{where}: streaming needs the token budget (recovery.tokens)")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        if streaming:
            texts, ids, docs, done = _stream(ds, tokenizer, text_field, tokens, where)
        else:
            done = None
            table = ds.with_format("arrow")[:]
            docs = table.num_rows
            if IDS_COLUMN in table.column_names:
                texts, ids = [], [table_ids(table, Path(f"hf:{name}"), knob)]
            else:
                texts, ids = [t for t in table_texts(table, Path(f"hf:{name}"), text_field, knob) if t], []
    except PrunebenchError:
        raise
    except Exception as err:  # noqa: BLE001 - a missing config, split, repo or connection: one line
        why = f"{type(err).__name__}: {_first_line(err)}"
        raise PrunebenchError(f"{where}: datasets could not read it ({why})") from None
    verify.record_hub(source, name, config, split, ds)
    h = hashlib.sha256()
    if ids:
        stream = np.concatenate(ids).astype(np.int64)
        vocab = vocab_size(tokenizer)
        if stream.size and (int(stream.max()) >= vocab or int(stream.min()) < 0):
            raise PrunebenchError(f"{where}: its {IDS_COLUMN} hold ids outside the tokenizer's vocabulary of {vocab}")
        h.update(stream.tobytes())
        out = torch.from_numpy(stream)
    else:
        joined = "\n\n".join(texts)
        h.update(joined.encode("utf-8"))
        out = done if done is not None else tokenize(tokenizer, joined) if joined else torch.zeros(0, dtype=torch.long)
    remember_hub_read(source, {"hub": name, "config": config, "split": split, "streaming": streaming, "documents": docs,
                         "tokens": len(out), "sha256": h.hexdigest()})  # fmt: skip
    key = f"ids:{h.hexdigest()}:{getattr(tokenizer, 'name_or_path', '')}" if ids else f"text:{h.hexdigest()}"
    measure_late(source, key, (lambda: overlap.decoded(tokenizer, stream)) if ids else (lambda: overlap.joined(texts)))
    return out


def _stream(
    ds, tokenizer, text_field: str, tokens: int, where: str
) -> tuple[list[str], list, int, torch.Tensor | None]:
    """The first rows of a streamed split whose tokens cover `tokens`: (texts, id arrays, rows read,
    the texts' joined token ids when that check ran). Text rows are counted one by one (with their
    separator), then their joined tokenization is checked (tokens may merge across a boundary),
    reading on while it falls short."""
    import numpy as np

    from prunebench.data import tokenize

    texts, ids, docs, counted, done = [], [], 0, 0, None
    for row in ds:
        docs += 1
        if IDS_COLUMN in row:
            ids.append(np.asarray(row[IDS_COLUMN], dtype=np.int64).reshape(-1))
            counted += len(ids[-1])
        elif text_field in row and row[text_field] is not None and not isinstance(row[text_field], str):
            raise PrunebenchError(f"{where}: row {docs} has {text_field!r} = {row[text_field]!r:.40}, not text")
        elif text_field in row:
            if t := row[text_field]:  # null or "": no text
                piece = ("\n\n" if texts else "") + t  # as it appears in the joined text
                texts.append(t)
                counted += len(tokenizer(piece, add_special_tokens=False).input_ids)
        else:
            raise PrunebenchError(
                f"{where}: a row has no field {text_field!r} (fields: {', '.join(row)}); set recovery.text_field"
            )
        if counted >= tokens:
            if ids:
                break
            if len(done := tokenize(tokenizer, "\n\n".join(texts))) >= tokens:
                break
    else:
        done = None  # the split ended short of the budget: the caller tokenizes what there is
    if texts and ids:
        raise PrunebenchError(f"{where}: some rows hold text, others {IDS_COLUMN}; give one kind")
    return texts, ids, docs, done if texts and not ids else None
