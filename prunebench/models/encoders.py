"""Sentence embeddings from a (possibly pruned) Hugging Face encoder, the bridge to
sentence-transformers for SBERT training, and the classifier pieces that eval=cola / classification
and MiniBridge share (tokenized batches, the head on the pooled state, MCC and macro-F1).

The pipeline keeps the bare encoder (BertModel, MPNetModel, ...) so every pruner works on encoders
and decoders alike; how a sentence vector is read from it (mean or CLS pooling, an instruction
prefix such as e5's "query: ") comes from the model config.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, seq, dim] → [batch, dim]: mean over non-padding tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r} must be 'mean' or 'cls'")
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
@torch.no_grad()  # evaluation only: no autograd graph kept alive by the stored embeddings
def embed(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    pooling: str = "mean",
    prompt: str | None = None,
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """Pooled last hidden states, fp32 [len(texts), dim]. Texts are sorted by length so batches
    carry little padding (the order of the result is the input order)."""
    texts = [(prompt or "") + t for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    out: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        hidden = model(**model_inputs(model, enc)).last_hidden_state
        mask = enc["attention_mask"].to(hidden.device)
        for i, v in zip(idx, pool(hidden, mask, pooling).float().cpu(), strict=True):
            out[i] = v
    model.train(was_training)
    return torch.stack(out) if out else torch.empty(0)


def model_inputs(model: nn.Module, enc) -> dict:
    """The tokenizer's outputs that the model's forward accepts (MPNet has no token_type_ids), on
    the model's device."""
    import inspect

    from prunebench.placement import compute_device

    accepted = inspect.signature(model.forward).parameters
    device = compute_device(model)
    return {k: v.to(device) for k, v in enc.items() if k in accepted}


def sentence_transformer(model: nn.Module, tokenizer, pooling: str = "mean", max_length: int = 128):
    """A SentenceTransformer whose Transformer module *is* `model` (trained in place, no copy).

    sentence-transformers builds its modules from a folder, so the config and tokenizer (and,
    once, the weights) go through a temporary folder; the loaded copy is then swapped for `model`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    with tempfile.TemporaryDirectory(prefix="prunebench-st-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        first = Transformer(tmp, max_seq_length=max_length)
    first.model = model
    second = Pooling(model.config.hidden_size, pooling_mode=pooling)
    from prunebench.placement import compute_device

    return SentenceTransformer(modules=[first, second], device=str(compute_device(model)))


def save_sentence_transformer(model: nn.Module, tokenizer, folder: Path, pooling: str = "mean") -> None:
    """Save a (pruned) encoder so that both `AutoModel.from_pretrained` and
    `SentenceTransformer(folder)` load it."""
    sentence_transformer(model, tokenizer, pooling).save(str(folder))


def batches(tokenizer, texts: list[str], labels: list[int], order: list[int], batch_size: int, max_length: int):
    """(tokenized batch, labels) in `order`, padded per batch, truncated to max_length tokens."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        yield enc, torch.tensor([labels[i] for i in idx])


class Classifier(nn.Module):
    """An encoder (MiniBridge: the pipeline's model, edited in place) and a head: dropout + linear on
    the pooled last hidden state, as `eval=cola` builds it; `classifier_logits` applies it."""

    def __init__(self, encoder: nn.Module, classes: int, dropout: float):
        from prunebench.placement import compute_device

        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, classes)).to(compute_device(encoder))


def classifier_logits(encoder: nn.Module, head: nn.Module, enc, pooling: str) -> torch.Tensor:
    """The head (dropout, linear) on the pooled last hidden state: eval=cola's classifier, MiniBridge's too."""
    hidden = encoder(**model_inputs(encoder, enc)).last_hidden_state
    return head(pool(hidden, enc["attention_mask"].to(hidden.device), pooling).to(head[1].weight.dtype))


# --------------------------------------------------------------------------------------------------
# Agreement of predicted with gold class ids (pure): the scores of eval=cola / classification and of
# MiniBridge's dev set.


def confusion(pred: list[int], gold: list[int], k: int) -> torch.Tensor:
    c = torch.zeros(k, k, dtype=torch.float64)
    for p, g in zip(pred, gold, strict=True):
        c[g, p] += 1
    return c


def macro_f1(pred: list[int], gold: list[int], k: int) -> float:
    """Mean over the k classes of 2·TP / (2·TP + FP + FN); a class never seen nor predicted scores 0."""
    c = confusion(pred, gold, k)
    tp = c.diag()
    denom = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return float(f1.mean())


def mcc(pred: list[int], gold: list[int], k: int) -> float:
    """Matthews correlation (multi-class R_K; the binary formula when k = 2); 0 when undefined."""
    c = confusion(pred, gold, k)
    n, correct = c.sum(), c.diag().sum()
    p, t = c.sum(0), c.sum(1)  # predicted / true counts per class
    denom = math.sqrt(float(n**2 - (p * p).sum())) * math.sqrt(float(n**2 - (t * t).sum()))
    return 0.0 if denom == 0 else float(correct * n - (p * t).sum()) / denom
