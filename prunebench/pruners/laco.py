"""LaCo: "Large Language Model Pruning via Layer Collapse" (arXiv 2402.11187).

RDSC layer merge, folding the m = C−1 layers after l into l (linear weights only; norms are kept):
    paper:      θ_l* = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l)
    reference:  the authors' notebook updates θ_l in place, θ_l += θ_{l+k} − θ_l for k = 1..m,
                which leaves θ_l* = θ_{l+m} (repository issues #4, #5)
    drop:       θ_l unchanged; layers l+1..l+m removed (the merge-vs-drop ablation)
Iterative collapse (Algorithm 1): start at l = H − C; merge; keep the merge when the mean over the
few-shot sentences D of cos(flatten(h_orig), flatten(h_merged)) of the final hidden states
(seq × hidden, hidden_states[-1] of the model) exceeds T and move l ← l − I (reset to
len − 1 − C if l is past the end); otherwise undo and move l ← l − 1; stop when l < L.
`rule_based: true` accepts every merge without the similarity test (the rule-based ablation).

A trial never copies the model: it saves the linear weights of layer l, merges in place, detaches
layers l+1..l+m from the ModuleList, and on rejection restores both.

    pruner: {_target_: prunebench.pruners.laco.LaCo, C: 4, L: 1, H: null, I: 2, T: 0.65, merge: paper}

Default merge: `paper` (the published equation); `reference` reproduces the released notebook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.data import load_texts
from prunebench.knobs import Flag
from prunebench.models import max_context
from prunebench.models.blocks import block_linears, find_blocks
from prunebench.models.forward import block_input_hook
from prunebench.models.surgery import keep_layers, set_blocks, snapshot
from prunebench.placement import compute_device
from prunebench.pruners.base import PruneStats, ShapePruner

MERGES = ("paper", "reference", "drop")


def merge_weights(base: torch.Tensor, others: list[torch.Tensor], rule: str) -> torch.Tensor:
    """RDSC merge of one parameter: pure math, see the module docstring."""
    if rule == "paper":
        return base + sum(o - base for o in others)
    if rule == "reference":
        return others[-1].clone() if others else base
    if rule == "drop":
        return base
    raise ValueError(f"unknown merge rule {rule!r}")


def merge_into(base: nn.Module, followers: list[nn.Module], rule: str) -> dict:
    """Merge the linear weights and biases of `followers` into block `base` in place; returns the
    original tensors of `base` so a rejected trial can restore them."""
    saved = {}
    others = [block_linears(f) for f in followers]
    with torch.no_grad():
        for key, lin in block_linears(base).items():
            for attr in ("weight", "bias"):
                p = getattr(lin, attr)
                if p is not None:
                    saved[(key, attr)] = p.detach().clone()
                    p.copy_(merge_weights(p, [getattr(o[key], attr) for o in others], rule))
    return saved


def restore_weights(base: nn.Module, saved: dict) -> None:
    linears = block_linears(base)
    with torch.no_grad():
        for (key, attr), value in saved.items():
            getattr(linears[key], attr).copy_(value)


def collapse(n_layers: int, C: int, L: int, H: int, I: int, try_merge: Callable[[int, int], bool]) -> list[dict]:
    """Algorithm 1's pointer walk. `try_merge(l, m)` merges layers l+1..l+m into l, returns whether
    the merge was kept; the layer count shrinks by m on each kept merge. Returns the decisions."""
    decisions, n, l = [], n_layers, H - C
    while l >= L:
        m = min(C - 1, n - 1 - l)
        kept = m > 0 and try_merge(l, m)
        decisions.append({"l": l, "m": m, "kept": kept})
        if kept:
            n -= m
            l -= I
            if l >= n:
                l = n - 1 - C
        else:
            l -= 1
    return decisions


def few_shot_sentences(source: str, n: int, chars: int) -> list[str]:
    """D: the first n paragraphs (not headings) of a text source, each cut to `chars` characters."""
    rows = [r.strip() for r in load_texts(source) if r.strip() and not r.strip().startswith("=")]
    if len(rows) < n:
        raise PrunebenchError(f"{source} has only {len(rows)} paragraphs for pruner.calib_n={n}")
    return [r[:chars] for r in rows[:n]]


class FinalHidden:
    """Final hidden states of the current model on the few-shot sentences D, flattened per sentence.

    D runs in length-sorted groups, right-padded within a group, a group growing only while its
    padding stays under `PAD_WASTE` of its tokens (one padded batch of D's 10 WikiText paragraphs,
    28–137 tokens, ran 1,370 positions for 731 tokens). A token never attends to the padding after
    it, and BERT masks it, so each sentence's valid positions are what it gets alone. Only the base
    model runs: the final state is its last_hidden_state (= hidden_states[-1], normed), and the LM
    head is never needed.

    Merges only touch layers ≥ l and the pointer walks downwards, so for a trial at l whose layers
    below l are still the original ones, the input of layer l is the dense model's: the dense
    forward records, per block, its input and the other arguments it received (masks, rotary
    embeddings: per block, since Gemma-style models give sliding-window and global layers different
    ones), and a trial runs only layers l..end and the final norm. Anything else, or a model whose
    final norm is not found, gets a full forward. The shortcut is checked once: from the last layer on
    every group (the final norm) and through every layer on the shortest group (that each block's
    output is the next one's input: no operation between blocks that the suffix would miss)."""

    PAD_WASTE = 0.1

    def __init__(self, model: nn.Module, inputs: list[torch.Tensor]):
        self.model, self.lengths = model, [x.shape[-1] for x in inputs]
        self.base = getattr(model, "base_model", model)  # skips the LM head: only hidden states are compared
        device = inputs[0].device
        self.groups = []  # (sentence indices, ids, mask)
        for idx in self._group(self.lengths):
            width = max(self.lengths[i] for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : self.lengths[i]], mask[row, : self.lengths[i]] = inputs[i][0], 1
            self.groups.append((idx, ids, mask))
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.norm = next(
            (getattr(decoder, a) for a in ("norm", "final_layernorm", "ln_f") if hasattr(decoder, a)), None
        )
        if self.norm is None and model.get_output_embeddings() is None:
            self.norm = nn.Identity()  # encoders (BERT): the last layer's output is the final state
        # per block (keyed by the module: merges detach blocks, they never replace one): per group,
        # the block's dense input and its other arguments
        self.recorded: dict[int, tuple[list, list]] = {}
        hooks = []
        for block in find_blocks(model):
            calls, hidden = [], []
            self.recorded[id(block)] = (calls, hidden)
            hooks.append(block.register_forward_pre_hook(block_input_hook(calls, hidden), with_kwargs=True))
        try:
            self.reference = self._forward()
        finally:
            for h in hooks:
                h.remove()
        last = len(find_blocks(model)) - 1
        self.shortcut = self.norm is not None and all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-4)
            for l, groups in ((last, None), (0, [0]))  # the final norm on every group; the whole chain on the shortest
            for a, b in zip(self._suffix(l, groups), self.reference, strict=False)
            if a is not None
        )

    @classmethod
    def _group(cls, lengths: list[int]) -> list[list[int]]:
        """Sentence indices in length order, cut into groups whose right padding stays ≤ PAD_WASTE."""
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            g = groups[-1] if groups else None
            if g and (len(g) + 1) * lengths[i] <= (1 + cls.PAD_WASTE) * (sum(lengths[j] for j in g) + lengths[i]):
                g.append(i)
            else:
                groups.append([i])
        return groups

    @torch.no_grad()
    def _forward(self) -> list[torch.Tensor]:
        finals = [self.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                  for _, ids, mask in self.groups]  # fmt: skip
        return self._split(finals)

    def _split(self, per_group: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-group final states → one flattened tensor per sentence, in D's order."""
        out: list = [None] * len(self.lengths)
        for (idx, _, _), h in zip(self.groups, per_group, strict=True):
            for row, i in enumerate(idx):
                out[i] = None if h is None else h[row, : self.lengths[i]].flatten()
        return out

    @torch.no_grad()
    def _suffix(self, l: int, groups: list[int] | None = None) -> list[torch.Tensor | None]:
        """Layers l..end and the final norm from the dense input of layer l, for `groups` (default all;
        the sentences of the others are None)."""
        blocks = find_blocks(self.model)[l:]
        finals = []
        for g in range(len(self.groups)):
            if groups is not None and g not in groups:
                finals.append(None)
                continue
            h = self.recorded[id(blocks[0])][1][g]
            for block in blocks:
                h = self.recorded[id(block)][0][g](block, h)
            finals.append(self.norm(h))
        return self._split(finals)

    def __call__(self, lowest_changed: int, l: int) -> list[torch.Tensor]:
        if self.shortcut and l <= lowest_changed:
            return self._suffix(l)
        return self._forward()


class LaCo(ShapePruner):
    needs_calibration = False  # D is its own few-shot set, not the pruners' calibration windows

    def __init__(
        self,
        name: str = "laco",
        C: Annotated[int, Field(ge=2)] = 4,
        L: Annotated[int, Field(ge=0)] = 1,
        H: Annotated[int | None, Field(ge=1)] = None,
        I: Annotated[int, Field(ge=1)] = 2,
        T: Annotated[float, Field(gt=0.0, le=1.0)] = 0.65,
        merge: str = "paper",
        rule_based: Flag = False,
        calib_source: str = "wikitext2_valid",
        calib_n: Annotated[int, Field(ge=1, le=1000, description="LaCo's few-shot sentences D; the paper uses 5")] = 10,
        calib_chars: Annotated[int, Field(ge=1, le=100000)] = 400,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        if not isinstance(C, int) or C < 2:
            raise PrunebenchError(f"pruner.C={C} must be an integer ≥ 2 (C−1 layers are merged into one)")
        if not 0 < float(T) <= 1:
            raise PrunebenchError(f"pruner.T={T} must be in (0, 1]")
        if not isinstance(I, int) or I < 1:
            raise PrunebenchError(f"pruner.I={I} must be a positive integer")
        if merge not in MERGES:
            raise PrunebenchError(f"pruner.merge={merge!r} must be one of {', '.join(MERGES)}")
        if H is not None and L >= H:
            raise PrunebenchError(f"pruner.L={L} must be below pruner.H={H}")
        for knob, value in (("calib_n", calib_n), ("calib_chars", calib_chars)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrunebenchError(f"pruner.{knob}={value} must be a positive integer (D needs a sentence)")
        self.name, self.C, self.L, self.H, self.I, self.T = name, C, L, H, I, float(T)
        self.merge, self.rule_based = merge, rule_based
        from prunebench.data.text import check_dataset

        check_dataset(calib_source, "pruner.calib_source")
        self.calib_source, self.calib_n, self.calib_chars = calib_source, calib_n, calib_chars
        self.tokenizer = None

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        H = num_layers - 1 if self.H is None else self.H
        if num_layers < 3:  # the smallest merge (C=2, two layers into one) needs H − L ≥ 2, so L=0, H=2
            raise PrunebenchError(
                f"pruner=laco merges at least 2 layers (pruner.C ≥ 2) between pruner.L and pruner.H: the model has"
                f" {num_layers} layers, LaCo needs at least 3"
            )
        if not 0 <= self.L < H < num_layers:
            raise PrunebenchError(f"pruner.L={self.L}, pruner.H={H} must satisfy 0 ≤ L < H < {num_layers} layers")
        if H - self.C < self.L:  # Algorithm 1 starts at l = H − C and stops below L: not one merge would be tried
            raise PrunebenchError(
                f"pruner.C={self.C} leaves nothing to merge on {num_layers} layers (the first merge starts at"
                f" H−C={H - self.C}, below L={self.L}); use 2 ≤ pruner.C ≤ {H - self.L}"
                + ("" if H - self.L >= 2 else f" with pruner.L ≤ {H - 2}")
            )

    def __call__(self, model: nn.Module, calib=None) -> PruneStats:
        if self.tokenizer is None:
            raise PrunebenchError("LaCo needs the tokenizer for its few-shot sentences (set by the pipeline)")
        start = time.perf_counter()
        blocks = find_blocks(model)
        n0 = len(blocks)
        self.check(n0)
        device = compute_device(model)
        sentences = few_shot_sentences(self.calib_source, self.calib_n, self.calib_chars)
        ctx = max_context(model)  # a sentence longer than the context is cut, not an error
        inputs = [self.tokenizer(s, return_tensors="pt").input_ids[:, :ctx].to(device) for s in sentences]
        final = FinalHidden(model, inputs)
        origin = list(range(n0))  # original index of each current block
        sims: list[float] = []
        lowest = [n0]  # lowest base index of an accepted merge: layers below it are untouched

        def try_merge(l: int, m: int) -> bool:
            before = snapshot(model)  # references only: a trial copies one layer's weights, not the model
            saved = merge_into(before[0][l], [before[0][l + k] for k in range(1, m + 1)], self.merge)
            keep_layers(model, [i for i in range(len(before[0])) if not l < i <= l + m])
            if self.rule_based:
                ok = True
            else:
                merged = final(lowest[0], l)
                pairs = zip(final.reference, merged, strict=True)
                sim = float(sum(F.cosine_similarity(a, b, dim=0) for a, b in pairs)) / len(inputs)
                if not math.isfinite(sim):  # NaN > T is False: every merge would be refused without a word
                    raise PrunebenchError(
                        f"prune: LaCo's similarity for merging layers {l}..{l + m} is {sim}: the merged model's hidden"
                        " states are not finite (overflow in the model's dtype?); no result written"
                    )
                sims.append(round(sim, 6))
                ok = sim > self.T
            if ok:
                del origin[l + 1 : l + m + 1]
                lowest[0] = min(lowest[0], l)
            else:  # undo: layer l's weights back, the detached layers back
                restore_weights(before[0][l], saved)
                set_blocks(model, *before)
            return ok

        H = n0 - 1 if self.H is None else self.H
        decisions = collapse(n0, self.C, self.L, H, self.I, try_merge)
        for d, s in zip([d for d in decisions if d["m"] > 0], sims, strict=False):
            d["similarity"] = s
        kept = origin
        info = {
            "layers_before": n0,
            "layers_kept": kept,
            "layers_after": len(kept),
            "layer_ratio": 1 - len(kept) / n0,
            "decisions": decisions,
            "merge": self.merge,
            "similarity": "cosine of flattened final hidden states (seq x hidden), mean over D",
            "suffix_shortcut": final.shortcut,
            "D": {"source": self.calib_source, "n": self.calib_n, "chars": self.calib_chars},
        }
        return PruneStats(0.0, 0.0, {}, {"collapse_loop": time.perf_counter() - start}, info)
