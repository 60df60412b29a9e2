"""LLM-Pruner: "On the Structural Pruning of Large Language Models" (Ma, Fang, Wang; NeurIPS 2023;
arXiv 2305.11627), block-wise mode (the authors' `hf_prune.py --block_wise`, `llama3.py` for GQA).

Coupled groups, per layer inside a layer range (0-based, end exclusive; the authors'
`block_attention_layer_start/end`, `block_mlp_layer_start/end`):
- attention: one KV group = its k/v rows, the q rows of the r = heads / kv_heads query heads that
  share it (HF's repeat_kv order: query head h reads group h // r) and the matching o_proj columns
  (MHA: r = 1, one head); OLMo-2's q/k norms over the whole projection are members too (DepGraph
  couples them); per-head q/k norms (Qwen3, Gemma 3) are shared by every head and stay;
- MLP: one intermediate channel = its gate and up rows and its down_proj column (Nemotron: up/down).
Fused projections (Phi-3 qkv_proj, gate_up_proj) are split into their parts. Biases are not scored
(the authors score weights only) and are cut with their rows.

Importance (`pruner_type: taylor`, the authors' `--taylor`; estimator per element, W a member's weight,
g the gradient of the mean next-token cross-entropy over the calibration examples, F the Fisher
diagonal (1/N)·Σⱼ gⱼ² from per-example gradients):

    param_first  (code default, ours):  |W·g|                  (the README calls param_mix the default)
    param_second:                       |W²·F|
    param_mix:                          |W·g − ½·W²·F|
    vectorize    (the paper's Vector):  |Σ W·g| over the row / column (sign kept inside the sum)

summed over each member's row (rows it owns) or column (columns it owns) → one value per channel;
query-side members (q rows, o columns) are folded onto their KV group's channels by summing the r
heads; the members are then reduced per channel with `grouping` (sum: the authors' default | mean |
max | prod) and a KV group sums its head_dim channels. Baselines (`pruner_type`): l1 / l2, Σ|W|ᵖ per
row / column reduced with mean (the authors' MagnitudeImportance), and random.

Selection, local (the authors' default): per layer, in channel units (KV channels kv·head_dim for
attention, intermediate channels for the MLP), n = current − int(initial·(1 − ratio)); attention
removes the n // head_dim lowest KV groups (rounded down, as the code: ratio 0.25 of 3 groups removes
0), the MLP the n lowest channels. `ratio` is the authors' `--pruning_ratio`: the share of groups
removed in each selected layer, not of the model's parameters (metrics.json reports
`params_removed_share`, of the whole model). `iterative_steps` k > 1: ratio·s/k at step s, gradients
afresh on the pruned model with the next calibration examples. Global ranking (`--global_pruning`,
slightly worse in the paper's T14) is refused.

Layer ranges: null = the authors' LLaMA-7B proportions for any depth: start = round(L/8), end =
L − round(L/16) (4..30 of 32, 4..28 of SmolLM2's 30, 0..2 of a 2-layer model: every layer); an integer
is a 0-based index, a negative one counts from the end (end = -2: L − 2).

Calibration examples: the authors draw 10 random 64-token windows from BookCorpus (the paper says
128 tokens; BookCorpus is not available offline here). Here they are cut from the run's calibration
windows (`calib.*`, C4 by default, never an evaluation split): piece j of every window before piece
j + 1 of any, so `num_examples` ≤ calib.nsamples gives one example per document; fewer pieces than
asked are all used, with a warning and `info.examples`. Gradients: one backward per example (batch 1)
accumulated in fp32 (the mean of per-example mean losses is the authors' batch mean, the examples
having equal length; their fp32 CPU run), F from the same backwards; only the scored weights require
grad; the whole model must be on the device (no offload).

Trimming is real (prunebench.models.trim: trim_heads with whole KV groups, trim_mlp). Layers then
have different widths: `prunebench.models.widths` saves them (safetensors + prunebench_widths.json,
reloaded with `model.path=`); when every layer ends with the same widths (a range over all layers)
the config describes the model and plain `from_pretrained` reloads it. Mixtures of experts: the
attention groups are pruned; fused experts keep one intermediate size for all experts and are not
trimmed (info['mlp_skipped'] names the layers): heads only.

    pruner:
      _target_: prunebench.pruners.llm_pruner.LLMPruner
      ratio: 0.25                # share of groups removed per selected layer (authors' --pruning_ratio)
      pruner_type: taylor        # taylor | l1 | l2 | random
      estimator: param_first     # param_first | param_second | param_mix | vectorize
      grouping: null             # null: sum (taylor) / mean (l1, l2), as the authors; or sum | mean | max | prod
      attention_layer_start: null  # null: round(L/8); negative: from the end
      attention_layer_end: null    # null: L - round(L/16) (exclusive)
      mlp_layer_start: null
      mlp_layer_end: null
      num_examples: 10           # calibration examples for the gradients (authors: 10)
      seqlen: 64                 # tokens per example (authors' code: 64; paper: 128)
      iterative_steps: 1
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError, knobs
from prunebench.knobs import Flag, Positions, Seed
from prunebench.models import count_params
from prunebench.models import trim as trim_ops
from prunebench.models.blocks import find_blocks, fused_experts
from prunebench.models.widths import layer_widths, needs_widths, pin_layer_shapes
from prunebench.placement import offloaded
from prunebench.pruners.base import PruneStats, ShapePruner
from prunebench.pruners.llm_pruner_scores import (
    Estimator,
    Grouping,
    Member,
    PrunerType,
    attention_members,
    calibration_examples,
    fold_query,
    lowest,
    magnitude_channels,
    mlp_members,
    reduce_members,
    removal_count,
    resolve_range,
    taylor_channels,
    taylor_gradients,
    unit_sums,
)

log = logging.getLogger(__name__)

MOE_KEYS = ("num_local_experts", "num_experts")  # a mixture of experts, known from its config

# The knobs' types and ranges (knobs.py reads them from the constructor's annotations).
Ratio = Annotated[float, Field(ge=0.0, lt=1.0, description="the share of groups removed in each selected layer")]
Layer = Annotated[
    int | None, Field(ge=-100000, le=100000, description="a 0-based layer index; negative counts from the end")
]
Examples = Annotated[int, Field(ge=1, le=4096, description="one backward per example; the authors use 10")]
Steps = Annotated[int, Field(ge=1, le=1000, description="each step recomputes gradients on the whole model")]

# --------------------------------------------------------------------------------------------------
# The pruner.


class LLMPruner(ShapePruner):
    needs_calibration = True  # per instance: only pruner_type=taylor reads calibration text
    supports_offload = False  # the gradient pass backpropagates through the whole model
    needs_lm = "LLM-Pruner prunes decoder attention / MLP groups with the language-model loss"

    def memory_bytes(self, shape, calib, elt: int) -> tuple[int, int]:
        """No block inputs are captured: one example's backward at a time, and fp32 accumulators of the
        block weights (the mean gradient, plus the Fisher diagonal for param_second / param_mix)."""
        if self.pruner_type != "taylor":
            return 0, 0
        hidden, ffn, layers, vocab = (int(shape[k]) for k in ("hidden", "ffn", "layers", "vocab"))
        k = 2 if self.estimator in ("param_second", "param_mix") else 1
        stats = int(shape["params"] - 2 * vocab * hidden) * (4 * k + elt)
        s = min(self.seqlen, calib.seqlen)
        return s * layers * (6 * hidden + 3 * ffn) * elt + 3 * s * vocab * 4, stats

    def __init__(
        self,
        name: str = "llm_pruner",
        ratio: Ratio = 0.25,
        pruner_type: PrunerType = "taylor",
        estimator: Estimator = "param_first",
        grouping: Grouping | None = None,
        attention_layer_start: Layer = None,
        attention_layer_end: Layer = None,
        mlp_layer_start: Layer = None,
        mlp_layer_end: Layer = None,
        num_examples: Examples = 10,
        seqlen: Positions = 64,
        iterative_steps: Steps = 1,
        global_pruning: Flag = False,
        seed: Seed = 0,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        knobs.check_args(LLMPruner, "pruner", args)
        self.check_knobs(args)
        self.name, self.ratio = name, float(ratio)
        self.pruner_type, self.estimator = pruner_type, estimator
        self.grouping = grouping or ("sum" if pruner_type in ("taylor", "random") else "mean")
        self.bounds = {
            "attention": (attention_layer_start, attention_layer_end),
            "mlp": (mlp_layer_start, mlp_layer_end),
        }
        self.num_examples, self.seqlen, self.iterative_steps = num_examples, seqlen, iterative_steps
        self.seed = seed
        self.needs_calibration = pruner_type == "taylor"

    @classmethod
    def check_knobs(cls, knobs: Mapping) -> None:
        """sparsity / pattern refused (ShapePruner); global pruning refused; an estimator given to a
        pruner_type that has no gradients refused."""
        super().check_knobs(knobs)
        if knobs.get("global_pruning", False) is True:
            raise PrunebenchError(
                "pruner.global_pruning=true is not implemented (the authors' --global_pruning ranks groups across"
                " layers; the paper's T14 finds it slightly worse); use local pruning (false)"
            )
        kind, estimator = knobs.get("pruner_type", "taylor"), knobs.get("estimator", "param_first")
        if kind != "taylor" and estimator != "param_first":
            raise PrunebenchError(
                f"pruner.estimator={estimator} is a Taylor estimator, unused by pruner.pruner_type={kind}; drop it or"
                " set pruner.pruner_type=taylor"
            )

    def ranges(self, num_layers: int) -> dict[str, tuple[int, int]]:
        return {kind: resolve_range(*self.bounds[kind], num_layers, kind) for kind in ("attention", "mlp")}

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """The layer ranges against the depth; a ratio that would remove every KV group or every MLP
        channel of a selected layer (from the config's widths)."""
        if dims and dims.get("num_hidden_layers"):
            num_layers = int(dims["num_hidden_layers"])  # a saved, already pruned model.path
        ranges = self.ranges(num_layers)
        if not dims:
            return
        heads = dims.get("num_attention_heads")
        if heads and ranges["attention"][0] < ranges["attention"][1]:
            groups = int(dims.get("num_key_value_heads") or heads)
            d = int(dims.get("head_dim") or int(dims.get("hidden_size", 0)) // int(heads) or 1)
            if removal_count(groups * d, groups * d, self.ratio) // d >= groups:
                raise PrunebenchError(
                    f"pruner.ratio={self.ratio:g} would remove all {groups} KV groups (head_dim {d}) of every selected"
                    f" layer; use a smaller ratio (the kept channels are int({groups * d}·(1 − ratio)))"
                )
        ffn = dims.get("intermediate_size")
        moe = any(dims.get(k) for k in MOE_KEYS)
        selected = ranges["mlp"][0] < ranges["mlp"][1]
        if ffn and not moe and selected and removal_count(int(ffn), int(ffn), self.ratio) >= int(ffn):
            raise PrunebenchError(
                f"pruner.ratio={self.ratio:g} would remove all {ffn} MLP channels of every selected layer; use a"
                " smaller ratio"
            )

    # ---- one step: score every selected layer on the model as it is, then trim -----------------------

    def _examples(self, calib) -> torch.Tensor:
        if calib is None:
            raise PrunebenchError("llm_pruner (pruner_type=taylor) needs calibration windows")
        pieces = calibration_examples(calib.input_ids, self.seqlen)
        want = self.num_examples * self.iterative_steps
        if len(pieces) < want or pieces.shape[1] < self.seqlen:
            log.warning(
                "llm_pruner: %d examples of %d tokens asked for (%d steps), the calibration windows give %d of %d;"
                " using those (raise calib.nsamples / calib.seqlen for the full count)",
                self.num_examples, self.seqlen, self.iterative_steps, len(pieces), pieces.shape[1],
            )  # fmt: skip
        return pieces

    def _step_examples(self, pieces: torch.Tensor, step: int) -> torch.Tensor:
        n = min(self.num_examples, len(pieces))
        return pieces[[(step * self.num_examples + j) % len(pieces) for j in range(n)]]

    def _member_scores(self, m: Member, grads, fisher) -> torch.Tensor:
        w = m.param.detach()[m.part].float()
        if self.pruner_type in ("l1", "l2"):
            return magnitude_channels(w, 1 if self.pruner_type == "l1" else 2, m.dim)
        g = grads[id(m.param)][m.part]
        f = fisher[id(m.param)][m.part] if fisher is not None else None
        return taylor_channels(w, g.to(w.device), None if f is None else f.to(w.device), self.estimator, m.dim)

    def _attention_scores(self, block, heads, groups, d, grads, fisher, rng) -> torch.Tensor:
        if self.pruner_type == "random":
            return unit_sums(torch.rand(groups * d, generator=rng), d)
        members = []
        for m in attention_members(block, heads, groups, d):
            s = self._member_scores(m, grads, fisher)
            members.append(fold_query(s, groups, d) if m.query else s)
        return unit_sums(reduce_members(members, self.grouping), d)

    def _mlp_scores(self, block, grads, fisher, rng) -> torch.Tensor:
        if self.pruner_type == "random":
            return torch.rand(trim_ops.ffn_size(trim_ops._mlp(block)), generator=rng)
        return reduce_members([self._member_scores(m, grads, fisher) for m in mlp_members(block)], self.grouping)

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        t_start = time.perf_counter()
        blocks = find_blocks(model)
        num_layers = len(blocks)
        ranges = self.ranges(num_layers)
        attn_layers = list(range(*ranges["attention"]))
        mlp_layers, skipped = [], []
        for i in attn_layers:
            try:
                trim_ops._attn(blocks[i])
            except ValueError as err:
                raise PrunebenchError(f"llm_pruner: layer {i}: {err}; it prunes decoder attention groups") from None
        for i in range(*ranges["mlp"]):
            try:
                trim_ops._mlp(blocks[i])
                mlp_layers.append(i)
            except ValueError as err:
                if not fused_experts(blocks[i]) and not _is_moe_block(blocks[i]):
                    raise PrunebenchError(f"llm_pruner: layer {i}: {err}") from None
                skipped.append(i)  # fused experts: one intermediate size for every expert, not a per-layer MLP
        taylor = self.pruner_type == "taylor"
        if taylor and model.get_output_embeddings() is None:
            raise PrunebenchError(f"llm_pruner needs a language-model loss; {type(model).__name__} has no LM head")
        if taylor and offloaded(model):
            raise PrunebenchError(
                "llm_pruner's gradient pass needs the whole model on the device: use placement=device or device_map"
            )
        d = trim_ops.head_dim(model)
        initial_heads = {i: trim_ops.layer_heads(model, i)[0] for i in attn_layers}
        initial_groups = {i: trim_ops.layer_heads(model, i)[1] for i in attn_layers}
        initial_ffn = {i: trim_ops.ffn_size(trim_ops._mlp(blocks[i])) for i in mlp_layers}
        groups_left = {i: list(range(n)) for i, n in initial_groups.items()}  # dense indices, for the record
        params_before = count_params(model)[0]
        timings = {"examples": 0.0, "gradients": 0.0, "score": 0.0, "trim": 0.0}
        rng = torch.Generator().manual_seed(self.seed)
        t = time.perf_counter()
        pieces = self._examples(calib) if taylor else None
        timings["examples"] = time.perf_counter() - t
        losses, used = [], None
        for step in range(self.iterative_steps):
            target = self.ratio * (step + 1) / self.iterative_steps
            blocks = find_blocks(model)
            grads = fisher = None
            if taylor:
                t = time.perf_counter()
                examples = self._step_examples(pieces, step)
                used = list(examples.shape)
                params = [m.param for i in mlp_layers for m in mlp_members(blocks[i])]
                for i in attn_layers:
                    params += [m.param for m in attention_members(blocks[i], *trim_ops.layer_heads(model, i), d)]
                was_training = model.training
                model.eval()  # no dropout in the gradient pass (the authors' model comes from from_pretrained: eval)
                try:
                    grads, fisher, step_losses = taylor_gradients(
                        model, examples, params, fisher=self.estimator in ("param_second", "param_mix")
                    )
                finally:
                    model.train(was_training)
                losses.append(round(sum(step_losses) / len(step_losses), 6))
                timings["gradients"] += time.perf_counter() - t
            t = time.perf_counter()
            heads_plan, mlp_plan = {}, {}
            with torch.no_grad():
                for i in attn_layers:
                    heads, groups = trim_ops.layer_heads(model, i)
                    n = removal_count(groups * d, initial_groups[i] * d, target) // d
                    if n >= groups:
                        raise PrunebenchError(
                            f"llm_pruner: pruner.ratio={self.ratio:g} would remove all {groups} KV groups of layer {i}"
                        )
                    if n == 0:
                        continue
                    scores = self._attention_scores(blocks[i], heads, groups, d, grads, fisher, rng)
                    heads_plan[i] = lowest(scores, n)
                for i in mlp_layers:
                    size = trim_ops.ffn_size(trim_ops._mlp(blocks[i]))
                    n = removal_count(size, initial_ffn[i], target)
                    if n >= size:
                        raise PrunebenchError(
                            f"llm_pruner: pruner.ratio={self.ratio:g} would remove all {size} MLP channels of layer {i}"
                        )
                    if n == 0:
                        continue
                    mlp_plan[i] = lowest(self._mlp_scores(blocks[i], grads, fisher, rng), n)
            del grads, fisher
            timings["score"] += time.perf_counter() - t
            t = time.perf_counter()
            for i, removed in heads_plan.items():
                heads, groups = trim_ops.layer_heads(model, i)
                r = heads // groups
                kept = [g for g in range(groups) if g not in set(removed)]
                trim_ops.trim_heads(model, i, [g * r + j for g in kept for j in range(r)], kept)
                groups_left[i] = [groups_left[i][g] for g in kept]
            for i, removed in mlp_plan.items():
                size = trim_ops.ffn_size(trim_ops._mlp(find_blocks(model)[i]))
                trim_ops.trim_mlp(model, i, [c for c in range(size) if c not in set(removed)])
            pin_layer_shapes(model)  # Phi-3 reads head counts from the config: the next step's forward needs them
            timings["trim"] += time.perf_counter() - t
            log.info(
                "llm_pruner step %d/%d: ratio %.4g, %d KV groups and %d MLP channels removed, %s parameters",
                step + 1, self.iterative_steps, target, sum(map(len, heads_plan.values())),
                sum(map(len, mlp_plan.values())), f"{count_params(model)[0]:,}",
            )  # fmt: skip
        params_after = count_params(model)[0]
        widths = layer_widths(model)
        info = {
            "ratio": self.ratio,
            "pruner_type": self.pruner_type,
            "estimator": self.estimator if taylor else None,
            "grouping": self.grouping if self.pruner_type != "random" else None,
            "iterative_steps": self.iterative_steps,
            "global_pruning": False,
            "attention_layers": list(ranges["attention"]),
            "mlp_layers": list(ranges["mlp"]),
            "head_dim": d,
            "kv_groups_removed": {
                str(i): [g for g in range(initial_groups[i]) if g not in set(groups_left[i])] for i in attn_layers
            },
            "query_heads_removed": {  # whole groups go: r query heads each
                str(i): initial_heads[i] // initial_groups[i] * (initial_groups[i] - len(groups_left[i]))
                for i in attn_layers
            },
            "mlp_channels_removed": {str(i): initial_ffn[i] - widths[i]["intermediate"] for i in mlp_layers},
            "widths": [[w["heads"], w["kv_heads"], w["intermediate"]] for w in widths],
            "uniform": not needs_widths(model),
            "params_before": params_before,
            "params_after": params_after,
            "params_removed_share": round((params_before - params_after) / params_before, 6),
        }
        if taylor:
            info["examples"] = {"shape": used, "asked": [self.num_examples, self.seqlen], "source": "calibration"}
            info["calibration_loss"] = losses  # mean next-token loss of each step's examples
            info["gradient_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        if skipped:
            info["mlp_skipped"] = {
                "layers": skipped,
                "why": "fused experts keep one intermediate size for every expert: attention groups only",
            }
            log.warning("llm_pruner: layers %s are mixtures of experts: their MLPs are not pruned", skipped)
        timings["total"] = time.perf_counter() - t_start
        return PruneStats(0.0, 0.0, {}, {k: round(v, 4) for k, v in timings.items()}, info)


def _is_moe_block(block: nn.Module) -> bool:
    mlp = getattr(block, "mlp", None)
    return mlp is not None and hasattr(mlp, "experts")
