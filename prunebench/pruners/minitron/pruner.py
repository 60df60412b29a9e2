"""Minitron: "Compact Language Models via Pruning and Knowledge Distillation" (Muralidharan et al.,
arXiv 2407.14679). Activation-based importance from forward passes only (no gradients), computed
once on the dense model; then depth, then width trimmed for real (smaller matrices, not masks).

`hidden_norm_rescale` (not in the paper, off): after trimming hidden channels, scale every norm's
gain by sqrt(d/d'), since RMS statistics over d' < d channels grow by d/d' when the removed
channels are weak (SmolLM2, hidden 576 → 512: ppl 92.3 → 76.4; dense 30.6).

Order: compute every importance on the dense model (once: `compute_importance` returns all
scores, and `plan` + `apply_plan` can trim many candidate shapes from one pass, as a search
needs), then remove layers, then trim heads, MLP neurons and hidden channels.

Architecture search (`target_params`, search.py): instead of a fixed `target`, a parameter
budget (a count, or a fraction in (0, 1) of the loaded model's); every shape over `axes` (depth, mlp,
att, emb; the other axes stay at `target.*`) within ±`search.tolerance` is pruned from one importance
pass, the `search.max_candidates` closest are each distilled from the dense model for `search.tokens`
and ranked by LM validation loss at `search.checkpoints`; the best is applied (from the dense
weights) and recorded with every candidate in PruneStats.info['search'].

Stages (`stages`, the paper's 15B -> 8B -> 4B in one run): each listed stage prunes (its `target` or
`target_params` and `axes`), then distils `tokens` from the dense model (`search.kd` knobs), and
importance is scored afresh on the result; the pruner's own target is the last stage, after which
the pipeline's recovery runs. The same chain as separate commands: a run with `save_model=true`,
then `model.path=<run>/model` (fractions are then of the loaded, already pruned model).

    pruner:
      _target_: prunebench.pruners.minitron.Minitron
      target: {layers: null, heads: 6, kv_heads: null, ffn: 1024, hidden: null}
      agg: {batch: l2, seq: mean}
      depth: {metric: bi, contiguous: false}
      head_merge: false
      hidden_norm_rescale: false
      target_params: null   # or e.g. 0.67: search the shape instead (target.* of searched axes unused)
      axes: [mlp, att, emb]
      search: {tolerance: 0.05, max_candidates: 8, tokens: 8192, checkpoints: null, kd: {seqlen: 256}}
      stages: null          # or [{target_params: 0.67, tokens: 16384}]
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import prunebench.pruners.minitron.experts as mexperts
import prunebench.pruners.minitron.importance as importance
import prunebench.pruners.minitron.search as msearch
from prunebench import PrunebenchError
from prunebench.models import count_params
from prunebench.models import trim as trim_ops
from prunebench.models.blocks import find_blocks
from prunebench.pruners.base import PruneStats, ShapePruner
from prunebench.pruners.minitron.importance import AGGS, DEPTH_METRICS, NEURON_SCORES, Importance
from prunebench.pruners.minitron.plan import (
    Arch,
    Dims,
    apply_plan,
    heads_must_divide_hidden,
    param_count,
    plan,
    ranking,
    resolve_groups,
    top_k,
)

TARGET_KEYS = ("layers", "heads", "kv_heads", "ffn", "hidden", "experts")  # experts: experts.py

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The pruner.


def _summary(scores: Sequence[torch.Tensor] | torch.Tensor, rank: bool = True) -> dict:
    t = torch.stack(list(scores)) if isinstance(scores, (list, tuple)) else torch.as_tensor(scores)
    t = t.float()
    out = {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}
    if rank:
        out["ranking"] = [ranking(s) for s in scores] if isinstance(scores, (list, tuple)) else ranking(t)
    return out


def _positive_int(value, knob: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunebenchError(f"{knob}={value!r} must be a positive integer or null (keep)")
    return value


class Minitron(ShapePruner):
    needs_calibration = True
    needs_lm = "Minitron trims Llama-family and Nemotron decoders"

    def __init__(
        self,
        name: str = "minitron",
        target: Mapping | None = None,
        agg: Mapping | None = None,
        depth: Mapping | None = None,
        head_merge: bool = False,
        hidden_norm_rescale: bool = False,
        neuron_score: str = "down_input",
        target_params: float | int | None = None,
        axes: Sequence[str] = ("mlp", "att", "emb"),
        search: Mapping | None = None,
        stages: Sequence[Mapping] | None = None,
        sparsity: float = 0.0,
        pattern: str = "unstructured",
    ):
        self.name = name
        target = dict(target or {})
        if unknown := sorted(set(target) - set(TARGET_KEYS)):
            raise PrunebenchError(f"pruner.target.{unknown[0]} is not a Minitron axis; use {', '.join(TARGET_KEYS)}")
        self.target = {k: _positive_int(target.get(k), f"pruner.target.{k}") for k in TARGET_KEYS}
        agg = dict(agg or {})
        if unknown := sorted(set(agg) - {"batch", "seq"}):
            raise PrunebenchError(f"pruner.agg.{unknown[0]} is unknown; set pruner.agg.batch and pruner.agg.seq")
        self.batch, self.seq = agg.get("batch", "l2"), agg.get("seq", "mean")
        for key, value in (("batch", self.batch), ("seq", self.seq)):
            if value not in AGGS:
                raise PrunebenchError(f"pruner.agg.{key}={value!r} must be one of {', '.join(AGGS)} (paper: l2, mean)")
        depth = dict(depth or {})
        if unknown := sorted(set(depth) - {"metric", "contiguous"}):
            raise PrunebenchError(f"pruner.depth.{unknown[0]} is unknown; set pruner.depth.metric / .contiguous")
        self.metric, self.contiguous = depth.get("metric", "bi"), depth.get("contiguous", False)
        if self.metric not in DEPTH_METRICS:
            raise PrunebenchError(f"pruner.depth.metric={self.metric!r} must be bi (Block Importance) or ppl")
        if not isinstance(self.contiguous, bool):
            raise PrunebenchError(f"pruner.depth.contiguous={self.contiguous!r} must be true or false")
        if not isinstance(head_merge, bool):
            raise PrunebenchError(f"pruner.head_merge={head_merge!r} must be true or false")
        self.head_merge = head_merge
        if not isinstance(hidden_norm_rescale, bool):
            raise PrunebenchError(f"pruner.hidden_norm_rescale={hidden_norm_rescale!r} must be true or false")
        self.hidden_norm_rescale = hidden_norm_rescale
        if neuron_score not in NEURON_SCORES:
            raise PrunebenchError(
                f"pruner.neuron_score={neuron_score!r} must be down_input (reference code, default) or pre_act (paper)"
            )
        self.neuron_score = neuron_score
        self.target_params = msearch.parse_target_params(target_params)
        self.axes = msearch.parse_axes(axes)
        self.search = msearch.SearchKnobs.parse(search)
        if self.target["experts"] is not None and self.target_params is not None:
            raise PrunebenchError(
                "pruner.target.experts is not an axis the target_params search varies; set pruner.target_params=null"
            )
        h, g = self._fixed()["heads"], self.target["kv_heads"]
        if h is not None and g is not None and h % g:
            raise PrunebenchError(
                f"pruner.target.heads={h} is not divisible by pruner.target.kv_heads={g}; heads must be k × kv_heads"
            )
        if sparsity:
            raise PrunebenchError("pruner.sparsity must be 0 for minitron: it trims shapes (set pruner.target.*)")
        if pattern != "unstructured":
            raise PrunebenchError(
                "pruner.pattern must be unstructured for minitron: it trims shapes (set pruner.target.*)"
            )
        shared = dict(name=name, agg=agg, depth=depth, head_merge=head_merge, hidden_norm_rescale=hidden_norm_rescale,
                      neuron_score=neuron_score)  # fmt: skip
        self.stages = self._parse_stages(stages, shared, search, self.axes)
        self.importance: Importance | None = None  # the last pass, for reuse (e.g. an architecture search)
        self.tokenizer = None  # set by the pipeline: the search and the stages distil on text

    def _fixed(self) -> dict:
        """pruner.target without the axes the search varies (those come from the search)."""
        if self.target_params is None:
            return dict(self.target)
        searched = {msearch.AXIS_KEY[a] for a in self.axes}
        return {k: (None if k in searched else v) for k, v in self.target.items()}

    @staticmethod
    def _parse_stages(stages, shared: dict, search, axes: Sequence[str]) -> list[tuple[Minitron, int]]:
        """pruner.stages: the intermediate prunes of a multi-stage run, each then distilled from the
        dense model for `tokens`; the pruner's own target / target_params is the last stage. A stage
        without `axes` searches the pruner's."""
        out = []
        for k, stage in enumerate(stages or []):
            stage = dict(stage or {})
            if unknown := sorted(set(stage) - {"target", "target_params", "axes", "tokens"}):
                raise PrunebenchError(
                    f"pruner.stages[{k}].{unknown[0]} is unknown; a stage takes target or target_params, axes, tokens"
                )
            tokens = stage.get("tokens", 0)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise PrunebenchError(f"pruner.stages[{k}].tokens={tokens} must be ≥ 0 (KD tokens after this stage)")
            if stage.get("target_params") is None and not any((stage.get("target") or {}).values()):
                raise PrunebenchError(f"pruner.stages[{k}] needs target_params or target.* (the stage's shape)")
            try:
                sub = Minitron(
                    **shared,
                    target=stage.get("target"),
                    target_params=stage.get("target_params"),
                    axes=stage.get("axes") or axes,
                    search=search,
                )
            except PrunebenchError as err:
                raise PrunebenchError(f"pruner.stages[{k}]: {err}") from None
            out.append((sub, tokens))
        return out

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """Validate the target against the model's shape known before loading: its layer count, and
        (if given, HF config names) hidden_size, num_attention_heads, num_key_value_heads,
        intermediate_size; with target_params, that some shape lies within the tolerance."""
        if dims and dims.get("num_hidden_layers"):
            num_layers = int(dims["num_hidden_layers"])  # a saved, already trimmed model.path
        t = self._fixed()
        if (n := t["layers"]) is not None and n > num_layers:
            raise PrunebenchError(f"pruner.target.layers={n} is more than the model's {num_layers} layers")
        if dims and dims.get("model_type"):  # a mixture of experts is known from its config
            moe = any(dims.get(k) for k in mexperts.CONFIG_KEYS)
            if moe and t["ffn"] is not None:
                raise PrunebenchError(
                    f"pruner.target.ffn: {dims['model_type']} is a mixture of experts (its MLPs are fused 3-D experts);"
                    " trim whole experts with pruner.target.experts, or set pruner.target.ffn=null"
                )
            if not moe and t["experts"] is not None:
                raise PrunebenchError(
                    f"pruner.target.experts: {dims['model_type']} has no experts; drop pruner.target.experts"
                )
            if moe and (keep := t["experts"]) is not None:  # the counts too, before the model loads
                have = next(int(dims[k]) for k in mexperts.CONFIG_KEYS if dims.get(k))
                top_k = int(dims.get("num_experts_per_tok") or 1)
                if keep > have:
                    raise PrunebenchError(
                        f"pruner.target.experts={keep} is more than the model's {have} experts per layer"
                    )
                if keep < top_k:
                    raise PrunebenchError(
                        f"pruner.target.experts={keep} is below num_experts_per_tok={top_k}: every token is routed"
                        f" to {top_k} experts; keep at least {top_k}"
                    )
        if dims and all(dims.get(k) for k in ("hidden_size", "num_attention_heads", "intermediate_size")):
            heads = dims["num_attention_heads"]
            d = Dims(
                num_layers,
                heads,
                dims.get("num_key_value_heads") or heads,
                dims["intermediate_size"],
                dims["hidden_size"],
            )
            self._check_dims(d)
            if dims.get("vocab_size"):
                self._check_search(d, Arch.of_config(dims), enumerate_shapes=not self.stages)
                for k, (sub, _) in enumerate(self.stages):
                    try:
                        sub._check_dims(d)
                        sub._check_search(d, Arch.of_config(dims), enumerate_shapes=k == 0)
                    except PrunebenchError as err:
                        raise PrunebenchError(f"pruner.stages[{k}]: {err}") from None

    def _check_search(self, d: Dims, arch, enumerate_shapes: bool) -> None:
        if self.target_params is None:
            return
        dense = param_count(d, arch)
        target = msearch.resolve_target(self.target_params, dense)
        if enumerate_shapes:
            cands, _, closest = msearch.enumerate_candidates(d, arch, target, self.axes, self._fixed(), self.search)
            if not cands:
                message = msearch.no_candidate_message(target, self.axes, self.search, closest, dense, arch)
                raise PrunebenchError(message)

    def _check_dims(self, d: Dims) -> None:
        t = self._fixed()
        for key, have, what in (
            ("layers", d.layers, "layers"),
            ("heads", d.heads, "attention heads"),
            ("kv_heads", d.kv_heads, "KV heads"),
            ("ffn", d.ffn, "MLP channels (intermediate_size)"),
            ("hidden", d.hidden, "hidden channels"),
        ):
            if t[key] is not None and t[key] > have:
                raise PrunebenchError(f"pruner.target.{key}={t[key]} is more than the model's {have} {what}")
        if d.heads % d.kv_heads:
            raise PrunebenchError(f"the model's {d.heads} heads are not divisible by its {d.kv_heads} KV heads")
        h, g = resolve_groups(d, t["heads"], t["kv_heads"])
        if h % g:
            raise PrunebenchError(
                f"pruner.target.heads={h} is not a multiple of the {g} KV heads kept; set pruner.target.heads to a"
                f" multiple of {g} or pruner.target.kv_heads to a divisor of {h}"
            )
        if h // g > d.heads // d.kv_heads:
            raise PrunebenchError(
                f"pruner.target.heads={h} with {g} KV heads needs {h // g} heads per group but the model has"
                f" {d.heads // d.kv_heads}; keep more KV heads (pruner.target.kv_heads) or fewer heads"
            )

    def _check_model(self, model: nn.Module) -> Dims:
        blocks = find_blocks(model)
        t = self._fixed()
        wants = {k for k in ("heads", "kv_heads", "ffn", "hidden") if t[k] is not None}
        searching = self.target_params is not None
        if searching:  # the parameter count reads attention and MLP modules whatever the axes
            wants |= {"heads", "ffn"} | ({"hidden"} if "emb" in self.axes else set())
        needs = {"heads": trim_ops._attn, "kv_heads": trim_ops._attn, "ffn": trim_ops._mlp}
        for key in sorted(wants):
            knob = f"pruner.target.{key}" if t[key] is not None else "pruner.target_params"
            for check in [needs[key]] if key in needs else [trim_ops._attn, trim_ops._mlp]:
                try:
                    check(blocks[0])
                except ValueError as err:
                    raise PrunebenchError(
                        f"{knob}: {err}; minitron trims Llama-family and Nemotron decoders (set {knob}=null)"
                    ) from None
        if t["experts"] is not None:
            mexperts.check(model, t["experts"])
        if "hidden" in wants and model.get_output_embeddings() is None:
            knob = "pruner.target.hidden" if t["hidden"] is not None else "pruner.axes with emb"
            raise PrunebenchError(f"{knob} needs a causal LM (embedding and LM head); drop it")
        depth = t["layers"] is not None or (searching and "depth" in self.axes)
        if self.metric == "ppl" and depth and model.get_output_embeddings() is None:
            raise PrunebenchError("pruner.depth.metric=ppl needs a language-model head; use pruner.depth.metric=bi")
        if wants:
            d = Dims.of(model)
        else:
            c = model.config
            d = Dims(len(blocks), 1, 1, getattr(c, "intermediate_size", 1), c.hidden_size)
        self._check_dims(d)
        return d

    def __call__(self, model: nn.Module, calib) -> PruneStats:
        if calib is None:
            raise PrunebenchError(f"{self.name} needs calibration data")
        params_before = count_params(model)[0]
        frozen = msearch.frozen_names(model)
        stages, timings, teacher = [], {}, None
        try:
            if self.stages:
                if self.tokenizer is None and any(tokens for _, tokens in self.stages):
                    raise PrunebenchError("pruner.stages distil between stages and need the tokenizer (the pipeline)")
                teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the dense model teaches every stage
                for k, (sub, tokens) in enumerate(self.stages):
                    sub.tokenizer = self.tokenizer
                    t0 = time.perf_counter()
                    info, _ = sub._prune(model, calib, params_before, teacher, frozen)
                    entry = {
                        "stage": k,
                        "target": info["target"],
                        "target_params": info.get("search", {}).get("target_params"),
                        "shape_before": info["shape_before"],
                        "shape": info["shape_after"],
                        "params": info["params_after"],
                        "param_ratio": round(info["params_after"] / params_before, 5),
                        "layers_kept": info["layers_kept"],
                    }
                    if "search" in info:
                        entry["search"] = info["search"]
                    if tokens:
                        entry["kd"] = msearch.distil(model, teacher, self.tokenizer, tokens, self.search.kd)
                        msearch.thaw(model, frozen)
                    stages.append(entry)
                    timings[f"stage_{k}"] = time.perf_counter() - t0
            info, final = self._prune(model, calib, params_before, teacher, frozen)
        finally:
            msearch.thaw(model, frozen)
            del teacher
        timings.update(final)
        if stages:
            info.update(
                shape_before=stages[0]["shape_before"],
                stages=stages,
                params_before=params_before,
                param_ratio=info["params_after"] / params_before,
            )
        return PruneStats(0.0, 0.0, {}, timings, info)

    def _prune(
        self, model: nn.Module, calib, dense_params: int, teacher: nn.Module | None, frozen: set[str]
    ) -> tuple[dict, dict]:
        """One prune of `model` in place: to `target`, or to the best shape a search finds."""
        t0 = time.perf_counter()
        dims = self._check_model(model)
        params_before = count_params(model)[0]
        search = None
        if self.target_params is not None:
            p, imp, search = msearch.run_search(self, model, calib, dims, dense_params, teacher, frozen)
            t = {k: search["best"]["shape"][k] for k in TARGET_KEYS if k in search["best"]["shape"]}
            timings = {"importance": search["importance_seconds"]}
            timings["search"] = time.perf_counter() - t0 - timings["importance"]
        else:
            t = self.target
            axes = [
                a
                for a, keys in (("heads", ("heads", "kv_heads")), ("ffn", ("ffn",)), ("hidden", ("hidden",)))
                if any(t[k] is not None for k in keys)
            ]
            remove = dims.layers - t["layers"] if t["layers"] is not None else 0
            imp = self.score(model, calib, axes, [remove] if remove else [])
            timings = {"importance": time.perf_counter() - t0}
            p = plan(imp, dims, t, self.contiguous, self.head_merge)
        experts = None  # scored on the model as loaded, like every other axis
        if t.get("experts") is not None:
            experts = mexperts.expert_scores(model, calib.input_ids, calib.batch_size)
            p.experts = {i: top_k(s, t["experts"]) for i, s in experts.items() if i in set(p.layers)}
        self.importance = imp
        t1 = time.perf_counter()
        apply_plan(model, p, self.hidden_norm_rescale)
        for new, old in enumerate(p.layers):
            if experts is not None and old in p.experts:
                mexperts.trim_experts(model, new, p.experts[old])
        timings["trim"] = time.perf_counter() - t1
        params_after = count_params(model)[0]
        c = model.config
        saveable = not (
            getattr(c, "num_attention_heads", 0)
            and c.hidden_size % c.num_attention_heads
            and heads_must_divide_hidden(c)
        )
        if not saveable:
            log.warning(
                "the trimmed shape (hidden %d, %d heads) runs but cannot be saved or reloaded: %s requires hidden_size"
                " to be a multiple of num_attention_heads; choose pruner.target.hidden as a multiple of the heads kept",
                c.hidden_size, c.num_attention_heads, type(c).__name__,
            )  # fmt: skip
        if search is not None and params_after != search["best"]["params"]:
            raise PrunebenchError(
                f"the pruned model has {params_after:,} parameters, the search counted {search['best']['params']:,}"
            )
        info = {
            "target": dict(t),
            "agg": {"batch": self.batch, "seq": self.seq},
            "depth": {"metric": self.metric, "contiguous": self.contiguous},
            "head_merge": self.head_merge,
            "hidden_norm_rescale": self.hidden_norm_rescale,
            "neuron_score": self.neuron_score,
            "shape_before": vars(dims),
            "shape_after": vars(Dims.of(model)),
            "layers_before": dims.layers,
            "layers_kept": p.layers,
            "layers_removed": [i for i in range(dims.layers) if i not in set(p.layers)],
            "layer_ratio": 1 - len(p.layers) / dims.layers,
            "heads_kept": {str(i): v for i, v in p.heads.items()},
            "kv_groups_kept": {str(i): v for i, v in p.kv_groups.items()},
            "heads_merged": {str(i): [list(x) for x in v] for i, v in p.merges.items()},
            "neurons_kept": {str(i): v for i, v in p.neurons.items()},
            "channels_kept": p.channels,
            **({"experts_kept": {str(i): v for i, v in p.experts.items()}} if experts is not None else {}),
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": params_after / params_before,
            "scores": self._scores(imp, p.layers)
            | ({"experts": _summary([experts[i] for i in sorted(experts)])} if experts else {}),
            "saveable": bool(saveable),
        }
        if search is not None:
            info["target_params"] = search["target_params"]
            info["search"] = search
        return info, timings

    def score(self, model: nn.Module, calib, axes: Sequence[str], removes: Sequence[int]) -> Importance:
        """One importance pass (`importance.compute_importance`) with this pruner's knobs: the width
        `axes` to score, and depth when some layer count in `removes` is to be removed (each count
        also ranks contiguous runs of that length with `depth.contiguous`)."""
        return importance.compute_importance(
            model,
            calib.input_ids,
            calib.batch_size,
            batch=self.batch,
            seq=self.seq,
            axes=axes,
            depth=self.metric if removes else None,
            run_lengths=removes if self.contiguous else (),
            neuron=self.neuron_score,
        )

    @staticmethod
    def _scores(imp: Importance, kept: list[int]) -> dict:
        """min/mean/max of each axis and its ranking (best first); MLP neurons: per-layer min/mean/max only."""
        out = {}
        if imp.layers is not None:
            out["layers"] = {"metric": imp.depth_metric, "values": [round(v, 6) for v in imp.layers]}
            out["layers"].update(_summary(torch.tensor(imp.layers)))
            if imp.dense_ppl is not None:
                out["layers"]["dense_ppl"] = imp.dense_ppl
            if imp.runs:
                out["layers"]["runs"] = {str(n): [round(v, 6) for v in r] for n, r in imp.runs.items()}
        if imp.heads is not None:
            out["heads"] = _summary(imp.heads)
            out["kv_groups"] = _summary([imp.groups(i) for i in range(imp.num_layers)])
        if imp.neurons is not None:
            out["ffn"] = _summary(imp.neurons, rank=False)
            out["ffn"]["per_layer"] = [[float(s.min()), float(s.mean()), float(s.max())] for s in imp.neurons]
        if imp.norms is not None:
            out["hidden"] = _summary(imp.hidden(kept))
        return out
