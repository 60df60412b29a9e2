"""Knowledge-distillation losses shared by every KD user: Minitron's logit + intermediate-state KD
after pruning (arXiv 2407.14679, §3.4 and Tables 15–18) and MiniBridgeBERT's progressive KD while
fine-tuning a classifier (CUAI 2024). Pure tensor math plus one small training step; no data, no
optimiser (those are in `train.py` and the recoveries that use them).

Logit losses, per token t over the vocabulary (or per example over the classes), with s = student
logits / τ, z = teacher logits / τ, p = softmax(z), q = softmax(s):
- `kld`          forward KL(p_teacher ‖ q_student) = Σ_v p_v (log p_v − log q_v), × τ² when τ ≠ 1
                 (Hinton et al. 2015: keeps gradient magnitudes comparable across temperatures);
                 Minitron's choice (τ = 1, no truncation);
- `reverse_kld`  KL(q_student ‖ p_teacher) = Σ_v q_v (log q_v − log p_v), × τ² likewise;
- `mse`          mean_v (s_v − z_v)² on the raw logits (τ not applied);
- `cosine`       1 − cos(s, z) on the raw logits (τ not applied);
- `none`         no teacher term (and no teacher forward while training): L = clm_weight · L_CLM, the
                 conventional-training baseline of Minitron's Table 11 in the same loop, optimiser
                 and schedule as the distillation it is compared with.
Top-K truncation (`topk=K`, off by default): both distributions are restricted to the teacher's K
largest logits of that token and renormalised there. Every loss is computed in fp32 whatever the
model dtype, averaged over the non-padding tokens (`mask`), and can be chunked over tokens
(`chunk`: each chunk is recomputed in the backward pass, so the fp32 (tokens × vocab)
intermediates of only one chunk are alive at a time).

Intermediate states (Minitron): L_is = mean over mapped layer pairs (i_s, i_t) of
mean_tokens (1 − cos(h_s[i_s], h_t[i_t])) (or the MSE). `layers: k` maps the last k hidden states
of the student to the last k of the teacher (Minitron's "last-2 : last-2"); indices count in
`output_hidden_states` (0 = embeddings, −1 = last, after the final norm in Llama). When the hidden
sizes differ (embedding-channel pruning) a shared bias-free linear map student → teacher is
trained with the student (Minitron: a shared linear transformation; from recollection).
Dynamic weight: α = L_logit / L_is, detached, so the total

    L = clm_weight · L_CLM + L_logit + α · L_is

gives both terms the same magnitude while each keeps its own gradient direction. L_CLM is the
next-token cross-entropy for causal LMs, or the cross-entropy on the labels for a classifier
(logits of shape (batch, classes); MSE for one output). Minitron recommends logit-only KLD
(clm_weight 0, no intermediate term) unless depth is cut substantially.

    loss = DistillLoss("kld", temperature=1.0, clm_weight=0.0, intermediate={"loss": "cosine", "layers": 2})
    parts = loss(student(x, output_hidden_states=True), teacher(x, output_hidden_states=True), mask=attention_mask)
    parts["loss"].backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunebench import PrunebenchError

LOGIT_LOSSES = ("kld", "reverse_kld", "mse", "cosine")
STATE_LOSSES = ("cosine", "mse")


def _per_token(s: torch.Tensor, z: torch.Tensor, kind: str, temperature: float, topk: int | None) -> torch.Tensor:
    """Loss per row of (rows, vocab) logits, in fp32."""
    s, z = s.float(), z.float()
    if topk:
        idx = z.topk(min(topk, z.shape[-1]), dim=-1).indices
        s, z = s.gather(-1, idx), z.gather(-1, idx)
    if kind == "mse":
        return (s - z).pow(2).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, z, dim=-1, eps=1e-8)
    if temperature != 1:
        s, z = s / temperature, z / temperature
    log_q = F.log_softmax(s, -1)
    with torch.no_grad():
        log_p = F.log_softmax(z, -1)
    if kind == "kld":  # Σ p log p − Σ p log q: the teacher's term needs no graph, so only p and log q are saved
        with torch.no_grad():
            p = log_p.exp()
            neg_entropy = (p * log_p).nan_to_num_(nan=0.0).sum(-1)  # 0 · log 0 = 0 (-inf logits)
        kl = neg_entropy - (p * log_q).sum(-1)
    else:
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl * temperature**2 if temperature != 1 else kl


def logit_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "kld",
    temperature: float = 1.0,
    topk: int | None = None,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean over the non-masked tokens of the per-token logit loss. Logits (..., vocab): (batch, seq,
    vocab) for causal LMs, (batch, classes) for classifiers; `mask` has the leading shape (1 = real
    token). `chunk` tokens at a time under activation checkpointing when given."""
    if kind not in LOGIT_LOSSES:
        raise PrunebenchError(f"distillation loss {kind!r} is not one of {', '.join(LOGIT_LOSSES)}")
    if student.shape != teacher.shape:
        raise PrunebenchError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ;"
            " distillation needs the same vocabulary (tokenizer)"
        )
    s, z = student.reshape(-1, student.shape[-1]), teacher.detach().reshape(-1, teacher.shape[-1])
    if chunk and chunk < len(s):
        parts = []
        for i in range(0, len(s), chunk):
            args = (s[i : i + chunk], z[i : i + chunk], kind, temperature, topk)
            parts.append(checkpoint(_per_token, *args, use_reentrant=False) if s.requires_grad else _per_token(*args))
        per = torch.cat(parts)
    else:
        per = _per_token(s, z, kind, temperature, topk)
    if mask is None:
        return per.mean()
    w = mask.reshape(-1).to(per.dtype)
    return (per * w).sum() / w.sum().clamp_min(1)


def map_layers(layers: int | Sequence, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) into `hidden_states`: an int k maps the last k to the
    last k; a list of [student, teacher] pairs is used as given (negative indices count from the
    end). n_* are the lengths of the hidden_states tuples (layers + 1)."""
    if isinstance(layers, int):
        if not 1 <= layers <= min(n_student, n_teacher):
            raise PrunebenchError(f"intermediate.layers={layers} must be between 1 and {min(n_student, n_teacher)}")
        return [(n_student - layers + i, n_teacher - layers + i) for i in range(layers)]
    pairs = []
    for pair in layers:
        if len(pair) != 2:
            raise PrunebenchError(f"intermediate.layers entry {list(pair)} must be a [student, teacher] pair")
        i, j = int(pair[0]), int(pair[1])
        if not (-n_student <= i < n_student and -n_teacher <= j < n_teacher):
            raise PrunebenchError(f"intermediate.layers pair [{i}, {j}] is outside {n_student} / {n_teacher} states")
        pairs.append((i % n_student, j % n_teacher))
    return pairs


def state_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    kind: str = "cosine",
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """Mean over pairs of already-mapped hidden states (batch, seq, hidden) of 1 − cos per token (or
    the per-token MSE), over the non-masked tokens, in fp32."""
    if kind not in STATE_LOSSES:
        raise PrunebenchError(f"intermediate.loss={kind!r} must be one of {', '.join(STATE_LOSSES)}")
    total = 0.0
    for hs, ht in zip(student, teacher, strict=True):
        if projection is not None:
            hs = projection(hs.to(projection.weight.dtype))
        hs, ht = hs.float(), ht.detach().float()
        per = 1 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8) if kind == "cosine" else (hs - ht).pow(2).mean(-1)
        if mask is None:
            total = total + per.mean()
        else:
            w = mask.to(per.dtype)
            total = total + (per * w).sum() / w.sum().clamp_min(1)
    return total / len(student)


def dynamic_alpha(l_logit: torch.Tensor, l_is: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Minitron's α = L_logit / L_is, detached (a weight, not a path for gradients)."""
    return (l_logit.detach() / l_is.detach().clamp_min(eps)).detach()


def clm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy for (batch, seq, vocab) logits and (batch, seq) labels (-100 and
    mask = 0 ignored); cross-entropy on class labels for (batch, classes) logits; MSE for (batch, 1)."""
    if logits.dim() == 2:
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)
    labels = labels if mask is None else labels.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class DistillLoss:
    """L = clm_weight · L_CLM + L_logit + α · L_is from (student outputs, teacher outputs), for
    causal LMs ((batch, seq, vocab) logits) and sequence classifiers ((batch, classes) logits).
    Outputs are Hugging Face model outputs (or dicts) with `logits` and, for the intermediate term,
    `hidden_states`. Returns a dict: loss (the tensor to backpropagate), logit, is, alpha, clm
    (floats, for logging)."""

    def __init__(
        self,
        loss: str = "kld",
        temperature: float = 1.0,
        topk: int | None = None,
        clm_weight: float = 0.0,
        intermediate: dict | None = None,
        chunk: int | None = None,
    ):
        check_knobs(loss, temperature, topk, clm_weight, intermediate)
        self.kind, self.temperature, self.topk, self.clm_weight, self.chunk = loss, temperature, topk, clm_weight, chunk
        self.intermediate = {"loss": "cosine", "layers": 2, **intermediate} if intermediate else None
        self.projection: nn.Module | None = None

    @property
    def wants_hidden_states(self) -> bool:
        return self.intermediate is not None

    def setup_projection(self, student_hidden: int, teacher_hidden: int, device, dtype=torch.float32) -> list:
        """A shared student → teacher linear map when the hidden sizes differ; returns its parameters
        (train them with the student)."""
        if self.intermediate is None or student_hidden == teacher_hidden:
            self.projection = None
            return []
        self.projection = nn.Linear(student_hidden, teacher_hidden, bias=False).to(device=device, dtype=dtype)
        return list(self.projection.parameters())

    def __call__(
        self, student_out, teacher_out, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict:
        s_logits = _get(student_out, "logits")
        token_mask = mask if s_logits.dim() == 3 else None
        if self.kind == "none":  # no teacher term: L = clm_weight · L_CLM (check_knobs: no intermediate)
            total, out = 0.0, {}
        else:
            t_logits = _get(teacher_out, "logits")
            l_logit = logit_loss(s_logits, t_logits, self.kind, self.temperature, self.topk, token_mask, self.chunk)
            total, out = l_logit, {"logit": float(l_logit.detach())}
        if self.intermediate is not None:
            hs, ht = _get(student_out, "hidden_states"), _get(teacher_out, "hidden_states")
            if hs is None or ht is None:
                raise PrunebenchError("the intermediate-state loss needs output_hidden_states=True on both models")
            pairs = map_layers(self.intermediate["layers"], len(hs), len(ht))
            l_is = state_loss(
                [hs[i] for i, _ in pairs], [ht[j] for _, j in pairs], self.intermediate["loss"], mask, self.projection
            )
            alpha = dynamic_alpha(l_logit, l_is)
            total = total + alpha * l_is
            out.update({"is": float(l_is.detach()), "alpha": float(alpha)})
        if self.clm_weight:
            if labels is None:
                raise PrunebenchError("clm_weight > 0 needs labels (token ids or class labels)")
            l_clm = clm_loss(s_logits, labels, token_mask)
            total = total + self.clm_weight * l_clm
            out["clm"] = float(l_clm.detach())
        out["loss"] = total
        return out


def _get(out, key: str):
    return out.get(key) if isinstance(out, dict) else getattr(out, key, None)


def check_knobs(
    loss: str,
    temperature: float,
    topk: int | None,
    clm_weight: float,
    intermediate: dict | None,
    prefix: str = "recovery.",
) -> None:
    """One clear PrunebenchError per bad knob (called by DistillLoss and by every KD recovery's __init__)."""
    if loss == "none":  # conventional training through the same loop (Minitron's Table 11 baseline)
        if not isinstance(clm_weight, (int, float)) or clm_weight <= 0 or intermediate:
            raise PrunebenchError(
                f"{prefix}loss=none trains on the next-token loss alone: set {prefix}clm_weight > 0 (e.g. 1.0)"
                f" and no {prefix}intermediate"
            )
    elif loss not in LOGIT_LOSSES:
        raise PrunebenchError(
            f"{prefix}loss={loss!r} is unknown; use one of {', '.join(LOGIT_LOSSES)} (kld: Minitron) or none"
        )
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise PrunebenchError(f"{prefix}temperature={temperature} must be > 0 (Minitron uses 1.0)")
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise PrunebenchError(f"{prefix}topk={topk} must be a positive integer or null (null: no truncation)")
    if not isinstance(clm_weight, (int, float)) or clm_weight < 0:
        raise PrunebenchError(f"{prefix}clm_weight={clm_weight} must be ≥ 0 (0: logit-only KD)")
    if intermediate:
        if set(intermediate) - {"loss", "layers"}:
            extra = ", ".join(sorted(set(intermediate) - {"loss", "layers"}))
            raise PrunebenchError(f"{prefix}intermediate has unknown keys ({extra}); it takes loss and layers")
        if intermediate.get("loss", "cosine") not in STATE_LOSSES:
            raise PrunebenchError(f"{prefix}intermediate.loss={intermediate['loss']!r} must be cosine or mse")
        layers = intermediate.get("layers", 2)
        if isinstance(layers, int) and layers < 1:
            raise PrunebenchError(f"{prefix}intermediate.layers={layers} must be ≥ 1 (or a list of [student, teacher])")


def distill_step(student: nn.Module, teacher: nn.Module, batch: dict, loss: DistillLoss, autocast=None) -> dict:
    """Forward the teacher (no grad) and the student on one batch (input_ids, attention_mask,
    labels as available) and return `loss`'s dict; the caller backpropagates dict["loss"]. For a
    causal LM without `labels`, the CLM labels are the input ids."""
    import contextlib

    ctx = autocast if autocast is not None else contextlib.nullcontext()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = {"output_hidden_states": True} if loss.wants_hidden_states else {}
    bare = getattr(student, "module", student)  # a DDP-wrapped student forwards, but has no can_generate
    extra = {"use_cache": False} if bare.can_generate() else {}
    with ctx:
        t_out = None
        if loss.kind != "none":  # loss=none (conventional training) never runs the teacher
            with torch.no_grad():
                t_out = teacher(**inputs, **hidden, **extra)
        s_out = student(**inputs, **hidden, **extra)
    labels = batch.get("labels", batch.get("input_ids") if s_out.logits.dim() == 3 else None)
    return loss(s_out, t_out, labels, batch.get("attention_mask"))
