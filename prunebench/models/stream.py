"""Streaming: a model larger than memory, visited one transformer block at a time (issue 31).

The model is a skeleton on the meta device whose embeddings, final norm and head are real; block i's
weights are read from the safetensors shards only when a stage visits it (memory-mapped, only that
block's tensors, copied out and the file closed), edited, written to the output folder as its own
shard, and freed back to meta. So the memory a layer-wise stage holds is one block plus the
calibration activations, whatever the depth: the pattern of llm-compressor's layer-wise pipeline
(its RFC #3126, PR #2748) and of the Wanda/SparseGPT reference codes' one-block-on-the-GPU loop,
with the disk in place of CPU memory.

    source shards ──read block i──▶ device ──edit──▶ out/model-0000{i+1}-of-N.safetensors (+ SHA-256)

`Stream` is attached to the skeleton (`model.prunebench_stream`): it knows where each block's latest
weights are (the source, or the shard this run wrote), so a later walk (measuring sparsity, the final
evaluation) reads the pruned blocks back. `progress.json` in the output folder records each finished
block's file and SHA-256 (written atomically after the shard itself): a rerun into the same folder
verifies them and goes on from the first block not finished, and the calibration activations at
that point are recomputed through the finished blocks, so the result is bit-identical to a run that
was never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"
META = torch.device("meta")


class Shards:
    """The safetensors files of a model folder: which file holds each tensor (the index, or the one
    `model.safetensors`), and the tensors under a name prefix read on demand."""

    def __init__(self, folder: str | os.PathLike, file: str | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if file is not None:  # one shard alone (a block this run wrote)
            with safe_open(self.folder / file, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), file)
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (single := self.folder / "model.safetensors").exists():
            with safe_open(single, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), single.name)
        else:
            raise PrunebenchError(
                f"placement=stream reads safetensors weights, and {self.folder} has neither {INDEX} nor"
                " model.safetensors; save the model as safetensors first (save_model=true), or use placement=offload"
            )
        self.files: dict[str, str] = weight_map

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def read(self, names: list[str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """{name: tensor} on `device`; floating-point tensors in `dtype` (others as stored). Each file is
        opened for these names only and closed, so no mapping outlives the read."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for name in group:
                    t = f.get_tensor(name)  # an owned copy (safetensors reads it out of the mapping)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Stream:
    """A skeleton's weights on disk: block i from `source` until this run writes it to `out`."""

    def __init__(self, model: nn.Module, source: Shards, dtype: torch.dtype, out: Path | None = None):
        self.model, self.source, self.dtype = model, source, dtype
        blocks = find_blocks(model)
        self.prefix = _block_prefix(model, blocks)
        self.num_blocks = len(blocks)
        self.out: Path | None = None
        self.written: dict[int, dict] = {}  # block -> {"file", "sha256"} of the shard this run wrote
        self.done = 0  # blocks an earlier, interrupted run of the same job finished (resumed after)
        self._ends_held = False
        self.writer = True
        self.key: str | None = None
        if out is not None:
            self.write_to(out)

    # --- where block i is ----------------------------------------------------------------------------

    def names(self, i: int) -> list[str]:
        return self.source.names(f"{self.prefix}{i}.")

    def load(self, i: int, block: nn.Module, device: torch.device) -> None:
        """Block i's latest weights onto `device` (the shard this run wrote, else the source)."""
        prefix = f"{self.prefix}{i}."
        if i in self.written:
            shard = Shards(self.out, self.written[i]["file"])
            tensors = shard.read(shard.names(prefix), device, self.dtype)
        else:
            tensors = self.source.read(self.names(i), device, self.dtype)
        state = {name[len(prefix) :]: t for name, t in tensors.items()}
        block.load_state_dict(state, strict=True, assign=True)

    @contextlib.contextmanager
    def ends(self, device: torch.device) -> Iterator[None]:
        """The weights outside the blocks (embeddings, final norm, head; tied ones once) real on `device`
        for the body, then freed: the forward up to block 0 and the head after the last block."""
        if self._ends_held:  # already real (nested use)
            yield
            return
        rest = [n for n in self.source.files if not n.startswith(self.prefix)]
        self.model.load_state_dict(self.source.read(rest, device, self.dtype), strict=False, assign=True)
        self.model.tie_weights()  # the head shares the (now real) embedding matrix where the config ties them
        self._ends_held = True
        try:
            yield
        finally:
            self._ends_held = False
            for name in rest:
                owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
                module = self.model.get_submodule(owner)
                if (p := module._parameters.get(leaf)) is not None:
                    module._parameters[leaf] = nn.Parameter(p.to(META), requires_grad=p.requires_grad)
            self.model.tie_weights()

    @staticmethod
    def free(block: nn.Module) -> None:
        """The block's parameters back to meta (their memory released); its few buffers stay."""
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.to(META), requires_grad=p.requires_grad)
        return_freed_memory()

    @contextlib.contextmanager
    def visit(self, i: int, block: nn.Module, device: torch.device, write: bool = False) -> Iterator[nn.Module]:
        """Block i real on `device` for the body; then (write=True) its shard written, and freed."""
        self.load(i, block, device)
        try:
            yield block
            if write:
                self.write_block(i, block)
        finally:
            self.free(block)

    # --- writing ---------------------------------------------------------------------------------------

    def write_to(self, out: Path, key: str, writer: bool = True) -> int:
        """Write blocks into `out` from now on; returns the number of blocks already finished there by
        an earlier, interrupted run of the same job (`key`: its fingerprint; the shards verified by
        SHA-256), which this run resumes after. Another job's blocks are refused, never mixed. Of several
        processes only one is the `writer` (rank 0); the others read what it wrote."""
        self.out, self.key, self.writer = Path(out), key, writer
        if writer:
            self.out.mkdir(parents=True, exist_ok=True)
        done = 0
        progress = self.out / PROGRESS
        if progress.exists():
            record = json.loads(progress.read_text())
            if record.get("key") != key:
                raise PrunebenchError(
                    f"{self.out} holds the blocks of a streamed run with another configuration; delete it, or"
                    " choose a new hydra.run.dir"
                )
            for key_, entry in sorted(record.get("blocks", {}).items(), key=lambda kv: int(kv[0])):
                i = int(key_)
                path = self.out / entry["file"]
                if i != done or not path.exists() or sha256(path) != entry["sha256"]:
                    break  # a block written but not recorded, or torn: redone from here
                self.written[i] = entry
                done += 1
        self.done = done
        if writer:
            self._record()
        return done

    def _record(self) -> None:
        blocks = {str(k): v for k, v in sorted(self.written.items())}
        _write_json(self.out / PROGRESS, {"key": self.key, "blocks": blocks})

    def _shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.num_blocks + 1:05d}.safetensors"

    def write_block(self, i: int, block: nn.Module) -> None:
        """Block i's shard (atomically: a temporary file renamed), then its line in progress.json."""
        from safetensors.torch import save_file

        if not self.writer:  # another process of the job writes the same block
            return

        prefix = f"{self.prefix}{i}."
        tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        if bad := next((k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())), None):
            raise PrunebenchError(f"prune: {bad} holds NaN or inf after editing; nothing of block {i} was written")
        name = self._shard_name(i)
        tmp = self.out / (name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.out / name)
        self.written[i] = {"file": name, "sha256": sha256(self.out / name)}
        self._record()

    def finish(self, tokenizer=None) -> Path:
        """The rest of the model (embeddings, final norm, head: everything outside the blocks, tied
        weights once), the index over every shard, the config and the tokenizer: the folder
        `save_pretrained` would have written. progress.json goes last: the folder is whole."""
        from safetensors.torch import save_file

        if missing := [i for i in range(self.num_blocks) if i not in self.written]:
            raise PrunebenchError(f"stream: blocks {missing[:4]} were never written; the model folder is incomplete")
        names = [n for n in self.source.files if not n.startswith(self.prefix)]  # unchanged by a block pruner
        rest = {n: t.contiguous() for n, t in self.source.read(names, torch.device("cpu"), self.dtype).items()}
        last = self._shard_name(self.num_blocks)
        save_file(rest, self.out / last, metadata={"format": "pt"})
        weight_map = {name: last for name in rest}
        for entry in self.written.values():
            weight_map.update(Shards(self.out, entry["file"]).files)
        _write_json(self.out / INDEX, {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
        self.model.config.save_pretrained(self.out)
        for extra in ("generation_config.json", "chat_template.jinja"):  # beside the weights, as read
            if (found := self.source.folder / extra).exists():
                shutil.copyfile(found, self.out / extra)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(self.out)
        (self.out / PROGRESS).unlink(missing_ok=True)
        return self.out


def _block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The state-dict prefix of the blocks' ModuleList ('model.layers.')."""
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}."
    raise PrunebenchError(f"stream: the blocks of {type(model).__name__} are not a named submodule")


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). glibc
    raises its mmap threshold (up to 32 MB) each time a large chunk is freed, after which block-sized
    tensors come from the heap and their memory stays with the process when freed: without this a
    streamed run's memory grew by ~2 MB per block visited (512-wide blocks, measured). Trimming after each
    block keeps it flat; pinning the threshold instead (every tensor its own mapping) did too, but made
    the pruning stage 1.4x slower (fresh pages for every activation)."""
    libc = _libc()
    with contextlib.suppress(AttributeError, TypeError):
        if libc is not None:
            libc.malloc_trim(0)


def skeleton(folder: str | os.PathLike, auto, dtype: torch.dtype, device: torch.device, trust: bool = False):
    """The model of `folder` on the meta device but for its computed buffers (rotary tables, on
    `device`), with its `Stream` attached as `model.prunebench_stream`: blocks are read when visited,
    the rest (embeddings, final norm, head) inside `Stream.ends`. No weight stays in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) computed, not read
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust)
    model.eval()
    for module in model.modules():  # computed buffers (rotary tables) where the compute happens
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != META:
                module._buffers[name] = buf.to(device)
    stream = Stream(model, Shards(folder), dtype)
    with stream.ends(device):  # read once: every weight outside the blocks must be in the folder
        if unread := [n for n, p in model.named_parameters() if p.device == META and not n.startswith(stream.prefix)]:
            raise PrunebenchError(f"stream: {folder} has no weights for {unread[:3]}; is it a whole model folder?")
    model.prunebench_stream = stream
    return model


def streamed(model: nn.Module) -> Stream | None:
    return getattr(model, "prunebench_stream", None)
