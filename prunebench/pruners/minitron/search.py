"""Minitron's lightweight architecture search (Muralidharan et al., arXiv 2407.14679, §3.3 and
best practice 9): enumerate every shape (layers, heads, MLP size, embedding size) whose parameter
count is within ±5% of the target, prune each from ONE importance pass on the dense model, give each
a short distillation from the dense model, rank them by LM validation loss at several checkpoints
of that short training (rankings flip during the first steps, then stabilise), keep the best.

Parameter count: plan.py (`Arch`, `param_count`).

Knob grids (`pruner.search.grid.*`, null = derived from the model's dims):
    layers  ceil(L/2) .. L                          (axis `depth`)
    heads   every multiple of the KV heads kept      (axis `att`; KV heads stay, as in Minitron-4B)
    ffn     multiples of `step` in [F/4, F], and F   (axis `mlp`)
    hidden  multiples of `step` in [h/2, h], and h   (axis `emb`)
An axis not in `pruner.axes` stays at `pruner.target.*` (null = the model's). `step` is 64, or
dim/16 for a dimension under 256 (tiny test models). Of the shapes within ±tolerance, the
`max_candidates` closest to the target are trained.

    pruner: {_target_: prunebench.pruners.minitron.Minitron, target_params: 0.67, axes: [mlp, att, emb],
             search: {tokens: 2048, max_candidates: 4, checkpoints: [2, 4, 8]}}
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models import count_params
from prunebench.models.blocks import find_blocks
from prunebench.pruners.minitron.plan import Arch, Dims, apply_plan, count, layer_params, plan
from prunebench.recovery.engine import world

log = logging.getLogger(__name__)

AXES = ("depth", "mlp", "att", "emb")
AXIS_KEY = {"depth": "layers", "att": "heads", "mlp": "ffn", "emb": "hidden"}  # axis -> Dims field / grid key
GRID_KEYS = ("layers", "heads", "ffn", "hidden")
SEARCH_KEYS = ("tolerance", "max_candidates", "tokens", "checkpoints", "grid", "step", "kd")


# --------------------------------------------------------------------------------------------------
# Knobs.


@dataclass
class SearchKnobs:
    tolerance: float = 0.05
    max_candidates: int = 8
    tokens: int = 8192
    checkpoints: list[int] | None = None
    grid: dict = field(default_factory=dict)
    step: int = 64
    kd: dict = field(default_factory=dict)
    steps: int = 0  # optimiser steps of the short KD (from tokens and the KD knobs)

    @classmethod
    def parse(cls, search: Mapping | None) -> SearchKnobs:
        s = dict(search or {})
        if unknown := sorted(set(s) - set(SEARCH_KEYS)):
            raise PrunebenchError(f"pruner.search.{unknown[0]} is unknown; the search takes {', '.join(SEARCH_KEYS)}")
        k = cls(**{key: s[key] for key in SEARCH_KEYS if key in s and s[key] is not None})
        k.grid, k.kd = dict(k.grid or {}), dict(k.kd or {})
        tol = k.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise PrunebenchError(f"pruner.search.tolerance={tol} must be a fraction in (0, 1) (paper: 0.05)")
        for knob in ("max_candidates", "step"):
            v = getattr(k, knob)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PrunebenchError(f"pruner.search.{knob}={v} must be a positive integer")
        if isinstance(k.tokens, bool) or not isinstance(k.tokens, int) or k.tokens < 0:
            raise PrunebenchError(f"pruner.search.tokens={k.tokens} must be ≥ 0 (0: rank the untrained candidates)")
        if unknown := sorted(set(k.grid) - set(GRID_KEYS)):
            raise PrunebenchError(f"pruner.search.grid.{unknown[0]} is unknown; grids: {', '.join(GRID_KEYS)}")
        for key, values in k.grid.items():
            if values is None:
                continue
            values = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise PrunebenchError(f"pruner.search.grid.{key}={values} must be a list of positive integers or null")
            k.grid[key] = sorted(set(values))
        ignored = [f"{n}={k.kd[n]!r}" for n in ("checkpoint_every", "keep_checkpoints") if k.kd.get(n) is not None]
        ignored += [f"resume={k.kd['resume']!r}"] if k.kd.get("resume", "auto") != "auto" else []
        if ignored:  # the short KD has no run dir: nothing to save or resume (a knob it would ignore)
            raise PrunebenchError(
                f"pruner.search.kd.{ignored[0]}: the search's short KD never checkpoints or resumes (no run dir);"
                " remove it (recovery.checkpoint_every applies to the final recovery)"
            )
        probe = _kd(tokens=2**40, knobs=k.kd)  # the KD knobs' own checks, once (the token count is ours)
        one = probe.seqlen * probe.batch_size * probe.grad_accum * world()[1]  # tokens a step, all processes
        k.steps = k.tokens // one
        if k.tokens and k.steps < 1:
            raise PrunebenchError(
                f"pruner.search.tokens={k.tokens} is less than one KD step of {one} tokens; raise it or set 0"
            )
        if k.checkpoints is not None and k.tokens:  # no short KD (tokens 0): no checkpoints to take
            cps = list(k.checkpoints) if isinstance(k.checkpoints, Sequence) else [k.checkpoints]
            if not cps or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= k.steps for c in cps):
                raise PrunebenchError(
                    f"pruner.search.checkpoints={cps} must be optimiser steps in 1..{k.steps}"
                    f" (pruner.search.tokens={k.tokens} gives {k.steps} steps); or null for four even ones"
                )
            k.checkpoints = sorted(set(cps))
        if not k.tokens:
            k.checkpoints = None
        return k

    def marks(self) -> list[int]:
        """Checkpoints (optimiser steps) of the short KD; the last step always included."""
        if not self.steps:
            return []
        if self.checkpoints:
            return sorted({*self.checkpoints, self.steps})
        return sorted({max(1, round(self.steps * q / 4)) for q in (1, 2, 3, 4)})


def _kd(tokens: int, knobs: Mapping):
    """A recovery.kd.KD for the search / stage distillation; its knob errors name pruner.search.kd."""
    from prunebench.recovery.kd import KD

    try:
        return KD(tokens=tokens, **dict(knobs))
    except PrunebenchError as err:
        raise PrunebenchError(str(err).replace("recovery.", "pruner.search.kd.")) from None
    except TypeError as err:
        raise PrunebenchError(f"pruner.search.kd: {err}; it takes recovery=kd's knobs (seqlen, lr, ...)") from None


def parse_axes(axes) -> list[str]:
    values = [axes] if isinstance(axes, str) else list(axes or [])
    if not values:
        raise PrunebenchError(f"pruner.axes is empty; choose from {', '.join(AXES)} (paper's best: [mlp, att, emb])")
    if bad := [a for a in values if a not in AXES]:
        raise PrunebenchError(f"pruner.axes: unknown axis {bad[0]!r}; choose from {', '.join(AXES)}")
    return [a for a in AXES if a in values]


def parse_target_params(value) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PrunebenchError(
            f"pruner.target_params={value!r} must be a parameter count or a fraction in (0, 1) of the model's"
        )
    if value >= 1 and float(value) != int(value):
        raise PrunebenchError(f"pruner.target_params={value} must be a whole count or a fraction in (0, 1)")
    return int(value) if value >= 1 else float(value)


def resolve_target(target_params, dense: int) -> int:
    """An absolute count from a count or a fraction of `dense` (the loaded model's parameters)."""
    n = round(target_params * dense) if isinstance(target_params, float) else int(target_params)
    if n > dense:
        raise PrunebenchError(
            f"pruner.target_params={target_params} is more than the model's {dense:,} parameters;"
            f" use a smaller count or a fraction in (0, 1)"
        )
    return n


# --------------------------------------------------------------------------------------------------
# Enumeration (pure).


@dataclass
class Candidate:
    id: int
    shape: dict  # layers, heads, kv_heads, ffn, hidden
    params: int
    deviation: float  # params / target − 1
    points: list[dict] = field(default_factory=list)  # {step, tokens, kd, lm} of the short KD
    rank: int | None = None
    seconds: float = 0.0

    def target(self) -> dict:
        return {k: self.shape[k] for k in ("layers", "heads", "kv_heads", "ffn", "hidden")}

    def label(self) -> str:
        s = self.shape
        return f"L{s['layers']} H{s['heads']}/{s['kv_heads']} F{s['ffn']} D{s['hidden']}"


def _channels(dim: int, low: float, step: int) -> list[int]:
    step = step if dim >= 256 else max(1, dim // 16)
    lo = max(step, math.ceil(dim * low / step) * step)
    return sorted({*range(lo, dim, step), dim})


def grids(dims, axes: Sequence[str], fixed: Mapping, grid: Mapping, step: int = 64) -> dict[str, list[int]]:
    """The values each knob takes: a searched axis its grid (given or derived), the others one value
    (`fixed`, i.e. pruner.target.*, or the model's)."""
    kv = fixed.get("kv_heads") or (None if dims.kv_heads == dims.heads else dims.kv_heads)
    per_group = dims.heads // dims.kv_heads
    derived = {
        "layers": list(range(max(1, math.ceil(dims.layers / 2)), dims.layers + 1)),
        "heads": list(range(1, dims.heads + 1)) if kv is None else [kv * r for r in range(1, per_group + 1)],
        "ffn": _channels(dims.ffn, 0.25, step),
        "hidden": _channels(dims.hidden, 0.5, step),
    }
    out = {}
    for axis, key in AXIS_KEY.items():
        if axis in axes:
            values = grid.get(key) or derived[key]
            have = getattr(dims, key)
            if bad := [v for v in values if v > have]:
                raise PrunebenchError(
                    f"pruner.search.grid.{key} has {bad[0]} > the model's {have}; use values ≤ {have}"
                )
            bad = [v for v in values if v % kv or v // kv > per_group] if key == "heads" and kv else []
            if bad:
                raise PrunebenchError(
                    f"pruner.search.grid.heads has {bad[0]}: heads must be multiples of the {kv} KV heads"
                    f" kept, at most {per_group * kv}"
                )
            out[key] = list(values)
        else:
            out[key] = [fixed.get(key) or getattr(dims, key)]
    return out


def enumerate_candidates(
    dims, arch: Arch, target: int, axes: Sequence[str], fixed: Mapping, knobs: SearchKnobs
) -> tuple[list[Candidate], int, dict]:
    """(the `max_candidates` shapes closest to `target` among those within ±tolerance, how many
    were within, the closest shape of the whole grid)."""
    g = grids(dims, axes, fixed, knobs.grid, knobs.step)
    mesh = np.meshgrid(*(np.asarray(g[k], dtype=np.int64) for k in GRID_KEYS), indexing="ij")
    layers, heads, ffn, hidden = (m.ravel() for m in mesh)
    kv_fixed = fixed.get("kv_heads")
    mha = dims.kv_heads == dims.heads and kv_fixed is None
    kv = heads if mha else np.full_like(heads, kv_fixed or dims.kv_heads)
    params = count(layers, heads, kv, ffn, hidden, arch)
    gap = np.abs(params - target)
    if arch.heads_divide_hidden:  # shapes the model's config class would refuse to save or load
        gap = np.where(hidden % heads == 0, gap, np.iinfo(np.int64).max)
    inside = np.flatnonzero(gap <= knobs.tolerance * target)
    order = inside[np.lexsort((-hidden[inside], -ffn[inside], -heads[inside], -layers[inside], gap[inside]))]
    best = int(np.argmin(gap))

    def shape(i: int) -> dict:
        return {"layers": int(layers[i]), "heads": int(heads[i]), "kv_heads": int(kv[i]),
                "ffn": int(ffn[i]), "hidden": int(hidden[i])}  # fmt: skip

    cands = [
        Candidate(n, shape(int(i)), int(params[i]), round(float(params[i]) / target - 1, 5))
        for n, i in enumerate(order[: knobs.max_candidates])
    ]
    closest = {**shape(best), "params": int(params[best])}
    return cands, int(inside.size), closest


def no_candidate_message(
    target: int, axes: Sequence[str], knobs: SearchKnobs, closest: Mapping, dense: int, arch: Arch | None = None
) -> str:
    shape = " ".join(f"{k}={closest[k]}" for k in GRID_KEYS)
    more = [a for a in AXES if a not in axes]
    add = f", add axes (pruner.axes=[{','.join(AXES)}])" if more else ""
    strict = arch is not None and arch.heads_divide_hidden and "emb" in axes
    rule = " (hidden must be a multiple of heads here)" if strict else ""
    return (
        f"no candidate shape within ±{knobs.tolerance:.0%} of pruner.target_params={target:,} ({target / dense:.1%} of"
        f" {dense:,}) over axes {','.join(axes)}{rule}; the closest is {closest['params']:,} ({shape}); widen"
        f" pruner.search.grid{add} or raise pruner.search.tolerance"
    )


# --------------------------------------------------------------------------------------------------
# Ranking (pure).


def rankings(cands: Sequence[Candidate]) -> list[dict]:
    """The candidates' order by LM validation loss at every checkpoint (best first), with the number
    of candidate pairs ordered differently from the final ranking (Kendall distance)."""
    steps = [p["step"] for p in cands[0].points] if cands and cands[0].points else []
    out = []
    for j, step in enumerate(steps):
        order = sorted(cands, key=lambda c: (c.points[j]["lm"], c.id))
        out.append({"step": step, "tokens": cands[0].points[j]["tokens"], "order": [c.id for c in order]})
    if out:
        final = {cid: r for r, cid in enumerate(out[-1]["order"])}
        for entry in out:
            pos = {cid: r for r, cid in enumerate(entry["order"])}
            ids = list(pos)
            entry["discordant_pairs"] = sum(
                (pos[a] - pos[b]) * (final[a] - final[b]) < 0 for i, a in enumerate(ids) for b in ids[i + 1 :]
            )
    return out


def stable_from(ranks: Sequence[dict]) -> int | None:
    """The first checkpoint step from which every later ranking equals the final one."""
    if not ranks:
        return None
    step = ranks[-1]["step"]
    for entry in reversed(ranks):
        if entry["order"] != ranks[-1]["order"]:
            break
        step = entry["step"]
    return step


# --------------------------------------------------------------------------------------------------
# The search on a model.


def frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def thaw(model: nn.Module, frozen: set[str]) -> None:
    """Gradients back on (KD turns its teacher's off) except for parameters frozen on entry."""
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def check_formula(model: nn.Module, arch: Arch) -> None:
    """Every layer must hold what the per-layer formula says (one HF config: uniform layers)."""
    dims = Dims.of(model)
    want = layer_params(dims.heads, dims.kv_heads, dims.ffn, dims.hidden, arch)
    for i, block in enumerate(find_blocks(model)):
        have = sum(p.numel() for p in block.parameters())
        if have != want:
            raise PrunebenchError(
                f"layer {i} has {have:,} parameters, the search's count says {want:,}; pruner.target_params needs"
                " uniform Llama-family or Nemotron layers (set pruner.target.* instead)"
            )


def run_search(
    pruner,
    model: nn.Module,
    calib,
    dims,
    dense_params: int,
    teacher: nn.Module | None = None,
    frozen: set[str] | None = None,
):
    """Enumerate, prune every candidate from one importance pass, distil each briefly from `teacher`
    (default: `model`, still dense), rank. Returns (the best candidate's Plan, the importance, the
    search record for PruneStats.info['search']). `model` is left unchanged."""
    t_start = time.perf_counter()
    knobs: SearchKnobs = pruner.search
    arch = Arch.of_model(model)
    check_formula(model, arch)
    target = resolve_target(pruner.target_params, dense_params)
    fixed = {k: v for k, v in pruner._fixed().items() if v is not None}  # the axes the search does not vary
    overridden = sorted(AXIS_KEY[a] for a in pruner.axes if pruner.target.get(AXIS_KEY[a]) is not None)
    if overridden:
        log.info("minitron search varies %s: pruner.target.%s are not used", ", ".join(pruner.axes), overridden)
    cands, inside, closest = enumerate_candidates(dims, arch, target, pruner.axes, fixed, knobs)
    if not cands:
        raise PrunebenchError(no_candidate_message(target, pruner.axes, knobs, closest, dense_params, arch))
    log.info(
        "minitron search: %d shapes within ±%.0f%% of %s parameters, training %d: %s",
        inside, 100 * knobs.tolerance, f"{target:,}", len(cands), "; ".join(c.label() for c in cands),
    )  # fmt: skip

    # one importance pass over everything any candidate trims
    removes = sorted({dims.layers - c.shape["layers"] for c in cands} - {0})
    width = [
        axis
        for axis, key in (("heads", "heads"), ("heads", "kv_heads"), ("ffn", "ffn"), ("hidden", "hidden"))
        if any(c.shape[key] != getattr(dims, key) for c in cands)
    ]
    t0 = time.perf_counter()
    imp = pruner.score(model, calib, sorted(set(width)), removes)
    importance_s = time.perf_counter() - t0
    plans = {c.id: plan(imp, dims, c.target(), pruner.contiguous, pruner.head_merge) for c in cands}

    ranked = len(cands) > 1
    marks = knobs.marks()
    teacher = model if teacher is None else teacher
    frozen = frozen_names(model) if frozen is None else frozen
    if ranked:
        if pruner.tokenizer is None:
            raise PrunebenchError("the minitron search needs the tokenizer (set by the pipeline) to distil candidates")
        for c in cands:
            t1 = time.perf_counter()
            student = copy.deepcopy(model)
            thaw(student, frozen)
            apply_plan(student, plans[c.id], pruner.hidden_norm_rescale)
            real = count_params(student)[0]
            if real != c.params:
                raise PrunebenchError(f"candidate {c.label()}: {real:,} parameters, the count said {c.params:,}")
            if marks:
                from prunebench.recovery.kd import kd_checkpoints

                c.points = kd_checkpoints(student, teacher, pruner.tokenizer, knobs.tokens, marks, **knobs.kd)
            else:
                c.points = [validate_only(student, teacher, pruner.tokenizer, knobs.kd)]
            c.seconds = round(time.perf_counter() - t1, 2)
            log.info("candidate %d %s: LM val loss %s", c.id, c.label(), [p["lm"] for p in c.points])
            del student
        thaw(model, frozen)
        if teacher is not model:
            teacher.requires_grad_(False)
    ranks = rankings(cands) if ranked else []
    final = ranks[-1]["order"] if ranks else [c.id for c in cands]
    for r, cid in enumerate(final):
        cands[cid].rank = r + 1
    best = cands[final[0]]
    record = {
        "target_params": target,
        "target_fraction": round(target / dense_params, 5),
        "dense_params": dense_params,
        "tolerance": knobs.tolerance,
        "axes": list(pruner.axes),
        "fixed": fixed,
        "grid": grids(dims, pruner.axes, fixed, knobs.grid, knobs.step),
        "within_tolerance": inside,
        "evaluated": len(cands),
        "ranked": ranked,
        "trained": ranked and bool(marks),
        "tokens": knobs.tokens if ranked and marks else 0,
        "checkpoints": [p["step"] for p in cands[0].points] if ranked else [],
        "kd": dict(knobs.kd),
        "ranked_by": (
            ("LM validation loss at the last checkpoint" if marks else "LM validation loss, untrained")
            if ranked
            else "the only candidate (closest to the target)"
        ),
        "candidates": [
            {
                "id": c.id,
                "shape": c.shape,
                "params": c.params,
                "deviation": c.deviation,
                "val": [{k: p[k] for k in ("step", "tokens", "lm", "kd")} for p in c.points],
                "rank": c.rank,
                "seconds": c.seconds,
            }
            for c in cands
        ],
        "rankings": ranks,
        "stable_from_step": stable_from(ranks),
        "best": {"id": best.id, "shape": best.shape, "params": best.params, "deviation": best.deviation},
        "importance_passes": 1,
        "importance_seconds": round(importance_s, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return plans[best.id], imp, record


@torch.no_grad()
def validate_only(student: nn.Module, teacher: nn.Module, tokenizer, kd_knobs: Mapping) -> dict:
    """Held-out losses of an untrained candidate (pruner.search.tokens=0)."""
    from prunebench.recovery.train import text_windows

    kd = _kd(tokens=2**40, knobs=kd_knobs)
    windows = text_windows(tokenizer, kd.val_source, kd.seqlen)[: kd.val_windows]
    return {"step": 0, "tokens": 0, **kd.validate(student, teacher, windows)}


def distil(model: nn.Module, teacher: nn.Module, tokenizer, tokens: int, kd_knobs: Mapping) -> dict:
    """A stage's distillation (pruner.stages): `tokens` of KD from `teacher`, in place."""
    from prunebench.recovery.kd import kd_checkpoints

    probe = _kd(tokens=tokens, knobs=kd_knobs)
    t0 = time.perf_counter()
    before, after = kd_checkpoints(model, teacher, tokenizer, tokens, [probe.steps], **kd_knobs)
    return {
        "tokens": after["tokens"],
        "steps": probe.steps,
        "distillation_loss": {"before": before["kd"], "after": after["kd"]},
        "lm_val_loss": {"before": before["lm"], "after": after["lm"]},
        "seconds": round(time.perf_counter() - t0, 2),
    }
