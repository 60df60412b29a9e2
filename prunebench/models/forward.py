"""Forward passes over the transformer blocks, written once: what every pruner and evaluator uses
to see a block's input and output, to walk the model block by block, and to stop a forward early
(llm-compressor's sequential pipeline, in one small module).

- `watch_blocks`: call `fn(i, x_in, x_out)` after block i runs during ordinary whole-model
  forwards (Block Influence, bridge fits, hidden-state losses).
- `capture_inputs` + `Layerwise`: the layer-wise driver of Wanda and SparseGPT (lib/prune.py):
  capture what enters block 0 for every calibration batch, then run block after block, each
  block's outputs feeding the next, so only one block's activations (and, with placement=offload
  or stream, one block's weights) are on the device at a time. Used by the statistics pass of the
  mask pruners (`pruners/stats.py`) and by layer-wise perplexity (`evals/perplexity.py`).
- `block_influence`: ShortGPT's Block Influence (Men et al., arXiv 2403.03853, eq. 1),
      BI_i = 1 − E_tokens[ <x_in, x_out> / (‖x_in‖·‖x_out‖) ],
  per token here (the caller averages); Minitron (arXiv 2407.14679, §2) ranks depth by it too.
- `Stop`: raised by a hook to end a forward once it has seen what it needs; `forward_windows`
  suppresses it per batch.

Nothing here knows a pruner or an evaluator: models/ looks down only (placement, progress).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prunebench.models.blocks import find_blocks
from prunebench.models.stream import streamed
from prunebench.placement import compute_device, ends, visit
from prunebench.progress import progress

BlockFn = Callable[[int, torch.Tensor, torch.Tensor], None]  # (block index, its input, its output)


class Stop(Exception):
    """Raised inside a hook to end the current forward: the rest of the model is not needed."""


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden states in what a block (or norm) returned: a tensor, or the first item of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def block_input(args: tuple, kwargs: Mapping) -> torch.Tensor:
    """The hidden states a block was called with (positionally, or as `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


# --------------------------------------------------------------------------------------------------
# Watching blocks during whole-model forwards.


@contextlib.contextmanager
def watch_blocks(
    blocks: Mapping[int, nn.Module] | nn.ModuleList, fn: Callable[[int, torch.Tensor, torch.Tensor], None]
):
    """For the body, call `fn(i, x_in, x_out)` after each block `blocks[i]` runs (a ModuleList: every
    block; a mapping index -> block: those only). The hooks are removed on exit, also on an error."""
    items = blocks.items() if isinstance(blocks, Mapping) else enumerate(blocks)

    def hook(i: int):
        return lambda _module, args, kwargs, out: fn(i, block_input(args, kwargs), hidden_of(out))

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in items]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward_windows(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, handles: Iterable = (), lm: bool = True
) -> int:
    """One whole-model forward over the windows, batch by batch on the compute device, for hooks to
    observe; a `Stop` raised by a hook ends that batch's forward. The hooks in `handles` are removed
    afterwards, also on an error. `lm=False` (encoders) passes no `use_cache`. Returns the number of
    tokens seen."""
    device, tokens = compute_device(model), 0
    extra = {"use_cache": False} if lm else {}
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(Stop):
                model(input_ids=batch.to(device), **extra)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return tokens


# --------------------------------------------------------------------------------------------------
# The layer-wise driver.


class BlockCall(dict):
    """The arguments a block receives besides its hidden states: keyword arguments, and positional
    ones in `args` (BERT passes its attention mask positionally)."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__({k: v for k, v in kwargs.items() if k != "hidden_states"})
        self.args = tuple(args)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden_of(block(hidden, *self.args, **self))


def block_input_hook(sink: list, hidden: list | None = None, stop: bool = False):
    """A forward pre-hook (with_kwargs) that records each call's BlockCall (and hidden states);
    `stop` ends the forward there (nothing after the block is needed)."""

    def grab(_module, args, kwargs):
        h = block_input(args, kwargs)
        sink.append(BlockCall(args[1:], kwargs))
        if hidden is not None:
            hidden.append(h)
        if stop:
            raise Stop

    return grab


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[list, list[BlockCall]]:
    """Hidden states and the other block arguments (masks, rotary embeddings) entering block 0,
    per batch, on the compute device. The forward stops at block 0."""
    block0 = find_blocks(model)[0]
    hidden: list[torch.Tensor] = []
    calls: list[BlockCall] = []
    handle = block0.register_forward_pre_hook(block_input_hook(calls, hidden, stop=True), with_kwargs=True)
    with ends(model):  # stream: the embeddings are read for this forward only
        forward_windows(model, input_ids, batch_size, [handle])
    return hidden, calls


class Layerwise:
    """Walk the blocks with their calibration inputs (module docstring); `forward_s` is the time
    spent in block forwards, so a pruner can split it from its own work."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int, desc: str = "prune"):
        self.model, self.input_ids, self.batch_size, self.desc = model, input_ids, batch_size, desc
        self.forward_s = 0.0

    def forward(self, block: nn.Module, hidden: list, calls: list, keep: bool) -> None:
        """Run `block` over every calibration batch. With keep=True each batch's output replaces its
        input in `hidden` (in place: one set of activations alive, plus one batch); without, the
        outputs are dropped (the statistics pass needs only the hooks)."""
        t = time.perf_counter()
        with torch.no_grad():
            for j, call in enumerate(calls):
                out = call(block, hidden[j])
                if keep:
                    hidden[j] = out
        self.forward_s += time.perf_counter() - t

    def run(self, edit: Callable[[int, nn.Module, Callable[[], None]], None] | None = None, outputs: bool = False):
        """For each block i: `edit(i, block, collect)` where collect() runs the block over the
        calibration batches (hooks see the inputs); then the edited block's outputs become the
        inputs of block i+1. Without `edit` the blocks only transform the batches (evaluation).
        `outputs`: the last block runs too and the final hidden states are returned, one tensor per
        batch (what the final norm and the head read)."""
        t = time.perf_counter()
        hidden, calls = capture_inputs(self.model, self.input_ids, self.batch_size)
        self.forward_s += time.perf_counter() - t
        blocks = find_blocks(self.model)
        stream = streamed(self.model)
        done = stream.done if stream is not None else 0  # a streamed run resumed: blocks < done are on disk
        for i, block in enumerate(progress(blocks, desc=self.desc, unit="block")):
            todo = edit is not None and i >= done
            # offload: one block on the device; stream: one block read from disk, written back once edited
            with visit(self.model, i, block, write=todo):
                if todo:
                    edit(i, block, lambda b=block: self.forward(b, hidden, calls, keep=False))
                if outputs or i + 1 < len(blocks):  # pruning: the last block's outputs feed nothing
                    self.forward(block, hidden, calls, keep=True)  # resumed blocks: replayed, as they were
        return hidden if outputs else None


# --------------------------------------------------------------------------------------------------
# Block Influence (pure).


def token_norms(h: torch.Tensor) -> torch.Tensor:
    """‖h‖₂ of every token (last dim the hidden size), in fp32."""
    return torch.linalg.vector_norm(h.float(), dim=-1)


def block_influence(
    h_in: torch.Tensor, h_out: torch.Tensor, n_in: torch.Tensor | None = None, n_out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token Block Influence 1 − <h_in, h_out> / (‖h_in‖·‖h_out‖), in fp32; a NaN (a zero vector)
    counts as 0.5, as ShortGPT's public implementation. The token norms may be passed in
    (`token_norms`): a block's input norms are the previous block's output norms, so a walk over
    every block computes each once."""
    a, b = h_in.float(), h_out.float()
    n_in = token_norms(a) if n_in is None else n_in
    n_out = token_norms(b) if n_out is None else n_out
    return torch.nan_to_num(1 - (a * b).sum(-1) / (n_in * n_out), nan=0.5)
