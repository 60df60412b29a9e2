"""SliceGPT: "Compress Large Language Models by Deleting Rows and Columns" (Ashkboos et al., ICLR 2024,
arXiv 2401.15024), as the authors' code runs it (microsoft/TransformerCompression,
`rotate_and_slice_sequential`).

Computational invariance: once every norm is a weightless RMSN (gains folded into the next linears,
prunebench/models/sliced.py), the residual stream may be rotated by any orthogonal Q: RMSN(x·Q) =
RMSN(x)·Q. SliceGPT picks Q per position from PCA of the calibration stream and keeps its leading d
directions, deleting rows and columns of every matrix that touches the stream:

    H = Σ_tokens xᵀx  (float64, uncentred)  + λ·mean(diag H)·I   (λ = `damping`, the authors' 0.01)
    Q = eigenvectors of H by decreasing eigenvalue;  kept width d = ⌊(1 − s)·D⌋ rounded down to a
        multiple of `round_interval` (s = `sparsity`, the authors' `--sparsity`)

2L + 1 PCAs, sequential and interleaved: Q₀ of the embeddings' output (embedding ← W·Q₀[:, :d]); then
per layer ℓ, on the inputs computed by the already-sliced layers < ℓ: q/k/v ← W·Q_in[:, :d]; run the
layer to the input of post_attention_layernorm → Q_mid; o_proj ← Q_midᵀ·W (bias too), gate/up (MoE:
router and every expert) ← W·Q_mid; run the layer again to its output → Q_out; down_proj ← Q_outᵀ·W;
shortcuts attn = Q_inᵀ·Q_mid, mlp = Q_midᵀ·Q_out, cut to the kept rows and columns. The LM head ←
W·Q_out, not sliced by default (`slice_head: false`, the authors' default): the last down_proj and mlp
shortcut keep all D outputs (a MoE layer then keeps D from its attention on: fused experts write as many
columns as they read). In the output pass the MLP's readers still hold all D rotated columns and read
the sliced stream zero-padded to D (equal to cutting them first), so that fused experts too can write
the D original directions the output PCA needs; they are cut afterwards. H accumulates and every
rotation runs in float64 on the compute device (the CPU for MPS), weights in pieces of `sliced.CHUNK`
rows; the stream between layers stays in the model's dtype, one set of calibration activations.

Slicing % is not parameter %: the shortcuts (2 per layer, ~2d² each) are parameters, a tied head is
untied (the embedding is rotated, the head gets the final norm's gain) and, by default, not sliced.
`params_removed_share` in metrics.json is the true share of the whole model, shortcuts counted. On the
embedded SmolLM2 (tied, vocabulary 49152 × 576 = 21% of its parameters) a 25% slice ADDS parameters
(the untied head); see docs for the fraction that removes ~27-30%.

Protocol knobs and their defaults:
- `final_orientation: pca` (the paper, deterministic). The authors' script defaults to `random` (added
  after arXiv v2): the kept d×d block of each Q is turned by a random orthogonal matrix, unseeded in
  their code, seeded here from `seed` (the run seed); the kept subspace is the same, so the model is
  equal in exact arithmetic.
- `embedding_mean: true` (the authors subtract every embedding row's mean for every family; for an
  RMSNorm model it is not function-preserving; a LayerNorm family (Nemotron) needs it and refuses false).
- Calibration: the run's `calib` windows (no padding: every token enters H). Paper (Table 1): 1024 ×
  2048 WikiText-2 *train* windows; the authors' script: 128 × 2048, batch 16. WikiText-2 train is not in
  /work/shared/data, so C4 (`calib=c4`) stands in: `calib.nsamples=1024 calib.seqlen=2048` (paper) or
  `calib.nsamples=128 calib.seqlen=2048 calib.batch_size=16` (script); the quick profile's 32 × 512 is
  the default.
- Supported: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Phi-3 (fused qkv_proj,
  gate_up_proj), Mixtral and Qwen3-MoE (router + fused experts), Nemotron (LayerNorm1P: the mean is
  baked into o_proj/down_proj as the authors do for OPT). Refused before loading: Gemma 2/3 and OLMo-2
  (a norm on the residual branch does not commute with the rotation) and encoders.

    pruner:
      _target_: prunebench.pruners.slicegpt.SliceGPT
      sparsity: 0.25            # slicing fraction of the hidden size (authors' --sparsity)
      round_interval: 8
      final_orientation: pca    # pca (paper) | random (authors' script)
      slice_head: false
      damping: 0.01
      embedding_mean: true
      seed: ${seed}
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from prunebench import PrunebenchError
from prunebench.knobs import Flag, Seed
from prunebench.models import count_params
from prunebench.models import sliced as S
from prunebench.models.blocks import find_blocks, prunable_weights
from prunebench.models.forward import Stop, capture_inputs
from prunebench.placement import compute_device, offloaded, on_device
from prunebench.pruners.base import PruneStats, capture_bytes

log = logging.getLogger(__name__)

ORIENTATIONS = ("pca", "random")

# --------------------------------------------------------------------------------------------------
# The math.


def kept_width(hidden: int, sparsity: float, round_interval: int) -> int:
    """d = ⌊(1 − sparsity)·D⌋ rounded down to a multiple of `round_interval` (the authors' script)."""
    d = int((1 - sparsity) * hidden)
    return d - d % round_interval


def max_sparsity(hidden: int, floor: int, round_interval: int) -> float:
    """The largest slicing fraction (4 decimals, rounded down) that keeps d ≥ `floor`."""
    smallest = math.ceil(floor / round_interval) * round_interval
    return math.floor((1 - smallest / hidden) * 1e4) / 1e4


def layer_widths(hidden: int, d: int, moe: list[bool], slice_head: bool) -> list[tuple[int, int, int]]:
    """(d_in, d_mid, d_out) per layer: d everywhere, except the last layer's output (D unless the head
    is sliced); a MoE layer's MLP reads what it writes (fused experts), so its d_mid = d_out."""
    out = []
    for i, m in enumerate(moe):
        d_out = d if (i < len(moe) - 1 or slice_head) else hidden
        out.append((d, d_out if m else d, d_out))
    return out


def accumulate(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += XᵀX over every token row of x (..., D), in H's dtype (float64) and on H's device."""
    x = x.detach().reshape(-1, x.shape[-1]).to(H.device, H.dtype)
    H.addmm_(x.T, x)


def pca(H: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(eigenvalues descending, eigenvectors as columns, the damping added) of H + λ·mean(diag H)·I;
    H is consumed. The damping shifts every eigenvalue alike and leaves the eigenvectors unchanged;
    it only steadies eigh on a rank-deficient H."""
    damp = float(damping * H.diagonal().mean())
    H.diagonal().add_(damp)
    vals, vecs = torch.linalg.eigh(H)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order], damp


def pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """x with zero columns appended up to `width`."""
    return x if x.shape[-1] == width else nn.functional.pad(x, (0, width - x.shape[-1]))


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random d×d orthogonal matrix (QR of a Gaussian, signs fixed), float64 on the CPU."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def orient(Q: torch.Tensor, d: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """`random`: the kept block turned by a random orthogonal matrix, Q·diag(R, I) (the authors'
    `random_orthogonal_upper_left`); `pca`: Q as is."""
    if mode == "pca":
        return Q
    Q = Q.clone()
    Q[:, :d] = Q[:, :d] @ random_orthogonal(d, generator).to(Q.device)
    return Q


def energy_kept(vals: torch.Tensor, damp: float, d: int) -> float:
    """Share of Σ‖x‖² along the d kept principal directions (the damping removed)."""
    v = (vals - damp).clamp_min(0)
    return float(v[:d].sum() / v.sum().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# The pruner.


class SliceGPT:
    """Rotate and slice the residual stream (module docstring). Real surgery: smaller matrices plus
    two shortcut matrices per layer; no masks."""

    needs_calibration = True
    supports_offload = True  # block by block: one layer at a time visits the device
    needs_lm = "SliceGPT rotates a decoder LM's residual stream"

    def __init__(
        self,
        name: str = "slicegpt",
        sparsity: Annotated[
            float, Field(ge=0.0, lt=1.0, description="the slicing fraction of the hidden size: 1 removes it all")
        ] = 0.25,
        round_interval: Annotated[
            int, Field(ge=1, le=1024, description="the kept width is a multiple of it; the authors use 8")
        ] = 8,
        final_orientation: Literal["pca", "random"] = "pca",
        slice_head: Flag = False,
        damping: Annotated[
            float, Field(ge=0.0, le=1.0, description="a multiple of the mean eigenvalue; the authors use 0.01")
        ] = 0.01,
        embedding_mean: Flag = True,
        seed: Seed = 0,
        pattern: str = "unstructured",
    ):
        self.name = name
        self.sparsity, self.round_interval = float(sparsity), int(round_interval)
        self.final_orientation, self.slice_head = final_orientation, bool(slice_head)
        self.damping, self.embedding_mean, self.seed = float(damping), bool(embedding_mean), int(seed)

    def memory_bytes(self, shape: Mapping, calib, elt: int) -> tuple[int, int]:
        """(activations, statistics) beside the weights: one set of stream activations plus one batch's
        float64 copy for H; H, its eigenvectors and two float64 rotation pieces; the new parameters
        (2L shortcuts d×d, an untied head counted as if the model were tied: an upper bound)."""
        hidden, layers, vocab = int(shape["hidden"]), int(shape["layers"]), int(shape["vocab"])
        d = kept_width(hidden, self.sparsity, self.round_interval)
        act = capture_bytes(shape, calib, elt) + calib.batch_size * calib.seqlen * hidden * 16
        stats = (4 * hidden * hidden + 2 * 4096 * hidden) * 8 + (2 * layers * d * d + vocab * hidden) * elt
        return act, stats

    @classmethod
    def check_knobs(cls, knobs: Mapping) -> None:
        """`pattern` belongs to the mask pruners: slicing removes whole rows and columns."""
        if (pattern := knobs.get("pattern", "unstructured")) != "unstructured":
            raise PrunebenchError(
                f"pruner.pattern={pattern} is ignored by pruner=slicegpt (it deletes rows and columns of the residual"
                " stream, no weight masks); drop it, and set the slicing fraction with pruner.sparsity"
            )

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """The family (post-norm branches refused), and a kept width of at least one head dimension."""
        if not dims:
            return
        model_type = dims.get("model_type")
        if problem := S.family_problem(model_type):
            raise PrunebenchError(f"pruner=slicegpt: {problem}")
        if model_type in S.LAYER_NORM_FAMILIES and not self.embedding_mean:
            raise PrunebenchError(
                f"pruner.embedding_mean=false: {model_type} uses LayerNorm, which becomes RMSN only on a mean-free"
                " stream (embedding rows centred); drop the override"
            )
        hidden, heads = dims.get("hidden_size"), dims.get("num_attention_heads")
        if not hidden:
            return
        head_dim = int(dims.get("head_dim") or (hidden // heads if heads else 1))
        d = kept_width(int(hidden), self.sparsity, self.round_interval)
        if d <= 0 or d < head_dim:
            top = max_sparsity(int(hidden), head_dim, self.round_interval)
            raise PrunebenchError(
                f"pruner.sparsity={self.sparsity:g} keeps d={d} of the hidden size {hidden} (rounded down to a multiple"
                f" of pruner.round_interval={self.round_interval}), less than one head dimension ({head_dim}); use"
                f" pruner.sparsity <= {top:g}"
            )

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        if calib is None:
            raise PrunebenchError("slicegpt needs calibration data")
        problem = S.family_problem(getattr(model.config, "model_type", None))
        if problem:
            raise PrunebenchError(f"pruner=slicegpt: {problem}")
        hidden = int(model.config.hidden_size)
        head_dim = int(getattr(model.config, "head_dim", None) or hidden // model.config.num_attention_heads)
        d = kept_width(hidden, self.sparsity, self.round_interval)
        if d <= 0 or d < head_dim:
            raise PrunebenchError(f"pruner.sparsity={self.sparsity:g} keeps d={d} < one head dimension ({head_dim})")
        timings = dict.fromkeys(("fuse", "forward", "pca", "rotate"), 0.0)
        params_before = count_params(model)[0]
        numel_before = {n: w.weight.numel() for n, w in prunable_weights(model).items()}

        t = time.perf_counter()
        fused = S.fuse(model, self.embedding_mean)
        timings["fuse"] = time.perf_counter() - t
        blocks = find_blocks(model)
        widths = layer_widths(hidden, d, [S.is_moe(b) for b in blocks], self.slice_head)
        energy = self._rotate_and_slice(model, calib, widths, timings)
        S.mark_no_split(model)

        params_after = count_params(model)[0]
        shortcuts = sum(b.attn_shortcut.numel() + b.mlp_shortcut.numel() for b in blocks)
        per_matrix = {n: 1 - w.weight.numel() / numel_before[n] for n, w in prunable_weights(model).items()}
        model.prunebench_slicing = {
            "sparsity": self.sparsity,
            "d": d,
            "round_interval": self.round_interval,
            "final_orientation": self.final_orientation,
            "seed": self.seed if self.final_orientation == "random" else None,
            "slice_head": self.slice_head,
            "damping": self.damping,
            "embedding_mean": fused["embedding_mean"],
            "calibration": {"source": calib.source, "shape": list(calib.shape)},
        }
        info = {
            "slicing_fraction": self.sparsity,
            "d": d,
            "D": hidden,
            "hidden_kept": d / hidden,
            "round_interval": self.round_interval,
            "layer_widths": [list(w) for w in widths],
            "pcas": 2 * len(blocks) + 1,
            "final_orientation": self.final_orientation,
            "slice_head": self.slice_head,
            "head_untied": fused["tied"],
            "embedding_mean": fused["embedding_mean"],
            "mean_baked_into_writers": fused["layer_norm"],
            "damping": self.damping,
            "pca_energy_kept": {
                "min": round(min(energy), 6),
                "mean": round(sum(energy) / len(energy), 6),
                "per_pca": [round(e, 6) for e in energy],
            },
            "params_before": params_before,
            "params_after": params_after,
            "shortcut_params": shortcuts,
            "params_removed_share": round(1 - params_after / params_before, 6),
        }
        timings["total"] = sum(timings.values())
        # achieved: the slicing fraction after rounding (what the knob asked for, as realised); the
        # share of parameters is params_removed_share, and no weight is zero (no masks).
        return PruneStats(self.sparsity, 1 - d / hidden, per_matrix, timings, info)

    def _basis(self, H: torch.Tensor, width: int, generator: torch.Generator, energy: list, timings: dict):
        t = time.perf_counter()
        vals, Q, damp = pca(H, self.damping)
        energy.append(energy_kept(vals, damp, width))
        Q = orient(Q, width, self.final_orientation, generator)
        timings["pca"] += time.perf_counter() - t
        return Q

    @torch.no_grad()
    def _rotate_and_slice(self, model: nn.Module, calib, widths: list, timings: dict) -> list[float]:
        """The 2L + 1 PCAs and the surgery, interleaved (module docstring). Returns the energy kept per PCA."""
        device = compute_device(model)
        f64 = S.f64_device(device)
        hidden = int(model.config.hidden_size)
        generator = torch.Generator().manual_seed(self.seed)
        energy: list[float] = []
        clock = time.perf_counter

        def new_H() -> torch.Tensor:
            return torch.zeros(hidden, hidden, dtype=torch.float64, device=f64)

        t = clock()
        states, calls = capture_inputs(model, calib.input_ids, calib.batch_size)
        H = new_H()
        for x in states:
            accumulate(H, x)
        timings["forward"] += clock() - t
        Q = self._basis(H, widths[0][0], generator, energy, timings)
        t = clock()
        S.rotate_port(S.Port(model.get_input_embeddings(), "weight", -1), Q[:, : widths[0][0]])
        timings["rotate"] += clock() - t

        blocks = find_blocks(model)
        visit = device if offloaded(model) else None  # offload: one layer on the device at a time
        for i, block in enumerate(tqdm(blocks, desc=self.name, unit="block", leave=False)):
            d_in, d_mid, d_out = widths[i]
            with on_device(block, visit):
                t = clock()
                q_in = Q[:, :d_in]
                for j, x in enumerate(states):  # the stream in this layer's basis, first d_in directions
                    states[j] = (x.float() @ q_in.to(x.device, torch.float32)).to(x.dtype)
                attn_in, attn_out = S.attention_ports(block)
                for port in attn_in:
                    S.rotate_port(port, q_in)
                S.make_sliced(block, q_in.T, torch.eye(hidden, dtype=torch.float64))
                timings["rotate"] += clock() - t

                t = clock()
                H = new_H()

                def grab(_module, args, H=H):
                    accumulate(H, args[0])
                    raise Stop  # the MLP is not needed for this PCA

                handle = block.post_attention_layernorm.register_forward_pre_hook(grab)
                try:
                    for x, call in zip(states, calls, strict=True):
                        with contextlib.suppress(Stop):
                            call(block, x)
                finally:
                    handle.remove()
                timings["forward"] += clock() - t
                Q = self._basis(H, d_mid, generator, energy, timings)
                q_mid = Q[:, :d_mid]

                t = clock()
                S.set_shortcut(block, "attn_shortcut", q_in.T @ q_mid)
                for port in attn_out:
                    S.rotate_port(port, q_mid)
                readers = S.mlp_readers(block)
                for port in readers:  # all D columns until the output pass is done (see below)
                    S.rotate_port(port, Q)
                S.set_shortcut(block, "mlp_shortcut", q_mid.T)
                timings["rotate"] += clock() - t

                # The output pass: the MLP reads the sliced stream zero-padded to D, which equals reading
                # it with the readers cut to d_mid; the MLP then writes all D original directions for the
                # output PCA (fused experts write as many columns as they read, so they need the padding).
                t = clock()
                H = new_H()
                last = i == len(blocks) - 1
                handle = block.mlp.register_forward_pre_hook(lambda _m, args: (pad(args[0], hidden), *args[1:]))
                try:
                    for j, (x, call) in enumerate(zip(states, calls, strict=True)):
                        out = call(block, x)
                        accumulate(H, out)
                        states[j] = None if last else out  # the last layer's outputs feed nothing
                finally:
                    handle.remove()
                timings["forward"] += clock() - t
                Q = self._basis(H, d_out, generator, energy, timings)

                t = clock()
                for port in readers:
                    S.slice_port(port, d_mid)
                S.set_shortcut(block, "mlp_shortcut", q_mid.T @ Q[:, :d_out])
                for port in S.mlp_writers(block):
                    S.rotate_port(port, Q[:, :d_out])
                timings["rotate"] += clock() - t
        t = clock()
        S.rotate_port(S.Port(model.get_output_embeddings(), "weight", -1), Q[:, : widths[-1][2]])
        timings["rotate"] += clock() - t
        return energy
