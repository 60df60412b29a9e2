"""Perplexity on WikiText-2 raw test, the protocol of Wanda and SparseGPT (lib/eval.py).

The split's rows are joined with "\\n\\n" and tokenized once; the tokens are cut into
non-overlapping windows of `seqlen` (the tail is dropped); each window is scored on its own;
perplexity = exp(mean over windows of the window's mean next-token NLL), which equals the
reference's exp(Σ NLL·seqlen / (n·seqlen)). `seqlen: null` uses the model's context
(max_position_embeddings) capped at `max_seqlen`; `max_windows` caps the windows for quick runs.
With `placement=offload` the windows go through the model block by block (each block visits the
device once for all windows, as SparseGPT's llama_eval), then the final norm and the LM head.

    eval: {wikitext2: {_target_: prunebench.evals.perplexity.Perplexity, seqlen: null, max_windows: null}}
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.data import load_texts, tokenize
from prunebench.data.text import check_dataset
from prunebench.knobs import Batch, Positions, Windows
from prunebench.models import max_context
from prunebench.models.blocks import final_norm
from prunebench.models.forward import Layerwise
from prunebench.placement import compute_device, ends, offloaded
from prunebench.progress import progress


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """-log softmax(logits)[target] per position, in fp32, as logsumexp − target logit over chunks
    of positions: the same value as F.cross_entropy without writing a (tokens × vocab) log-softmax."""
    lse = torch.cat([torch.logsumexp(part.float(), dim=-1) for part in logits.split(chunk)])
    return lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Σ over the batch's windows of each window's mean next-token NLL."""
    return float(sum(token_nll(lg[:-1], ids[1:]).mean() for lg, ids in zip(logits, batch, strict=True)))


@torch.no_grad()
def blockwise_logits(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """(batch, logits) per batch of an offloaded model: block inputs of every window are captured
    once, each block visits the device once and transforms all of them, then the final norm and
    the head (already on the device) give the logits, one batch at a time."""
    # offload: each block moved to the device; stream: read from disk (models.forward.Layerwise)
    hidden = Layerwise(model, windows, batch_size, desc="ppl (layer-wise)").run(outputs=True)
    with ends(model):  # stream: the final norm and head are read for this only
        norm, head = final_norm(model), model.get_output_embeddings()
        for batch, h in zip(windows.split(batch_size), hidden, strict=True):
            yield batch, head(norm(h))


class Perplexity:
    needs_lm = "perplexity"
    supports_offload = True
    supports_stream = True  # layer-wise perplexity reads one block at a time

    def __init__(
        self,
        dataset: str = "wikitext2_test",
        seqlen: Positions | None = 512,  # the quick profile's; null: the model's context (the papers')
        max_seqlen: Annotated[int, Field(ge=1, le=131072)] = 4096,
        max_windows: Windows | None = 16,  # the quick profile's; null: the whole split (the papers')
        batch_size: Batch | None = 1,
    ):
        check_dataset(dataset, "eval.wikitext2.dataset")  # before loading, not after the model is up
        self.dataset, self.seqlen, self.max_seqlen = dataset, seqlen, max_seqlen
        self.max_windows, self.batch_size = max_windows, batch_size
        self._tokens: tuple[object, torch.Tensor] | None = None

    def evaluation_text(self) -> dict[str, list]:
        """The evaluated text in every form a data root holds (data/overlap.py), for the contamination gate."""
        from prunebench.data import overlap

        return {self.dataset: overlap.builtin_parts(self.dataset)}

    def tokens(self, tokenizer) -> torch.Tensor:
        if self._tokens is None or self._tokens[0] is not tokenizer:  # tokenize once per tokenizer
            self._tokens = (tokenizer, tokenize(tokenizer, "\n\n".join(load_texts(self.dataset))))
        return self._tokens[1]

    def windows(self, model: nn.Module, tokenizer) -> torch.Tensor:
        seqlen = self.seqlen or min(max_context(model), self.max_seqlen)
        ids = self.tokens(tokenizer)
        n = len(ids) // seqlen
        if self.max_windows:
            n = min(n, self.max_windows)
        if n == 0:
            raise PrunebenchError(f"{self.dataset} has {len(ids)} tokens, fewer than one window of {seqlen}")
        return ids[: n * seqlen].view(n, seqlen)

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise PrunebenchError(
                f"perplexity needs a causal language model; {type(model).__name__} has no LM head"
                " (drop eval=wikitext2 for encoders)"
            )
        windows = self.windows(model, tokenizer)
        device = compute_device(model)
        nll_sum = 0.0
        if offloaded(model):
            for batch, logits in blockwise_logits(model, windows, self.batch_size):
                nll_sum += window_nll(logits, batch.to(device))
        else:
            for batch in progress(windows.split(self.batch_size), desc=f"ppl {self.dataset}", unit="batch"):
                batch = batch.to(device)
                nll_sum += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
        n, seqlen = windows.shape
        return {"ppl": math.exp(nll_sum / n), "windows": n, "tokens": n * seqlen, "seqlen": seqlen}
