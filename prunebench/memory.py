"""The memory plan: what a run needs, in bytes, and where, before any weight loads (placement.py
knows the devices; this module estimates whether the run fits and stops with one line if it cannot,
then puts the loaded weights where the plan says). The model's shape comes from its config
(`model_shape`, `hf_config`) without loading it; each stage states its own need (a pruner's
`memory_bytes`, a recovery's `training_bytes`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError
from prunebench.cache import safe_name
from prunebench.placement import PLACEMENTS, GiB, free_bytes, launch, resolve_device, resolve_dtype

SHARDING = ("fsdp",)  # recovery engines that split weights, gradients and optimizer state over ranks

# ---------------------------------------------------------------------------------------------
# Shapes and the memory plan (from the config: no weights are read)


def model_shape(model_cfg: DictConfig, cache_dir: str | None = None) -> dict | None:
    """params, hidden, layers, ffn, vocab and the checkpoint dtype, from (in order) the YAML's
    `hf_config` (random models), a local config.json (model.path, a converted cache, the Hugging Face
    cache) or the YAML's `shape` hint. Parameters are counted exactly by building the model on the
    meta device (no memory); None when nothing is known."""
    hf = hf_config(model_cfg, cache_dir)
    hint = OmegaConf.to_container(model_cfg.shape, resolve=True) if model_cfg.get("shape") else {}
    if hf is None and not hint:
        return None
    shape = {"params": hint.get("params"), "checkpoint_dtype": hint.get("dtype")}
    if hf is not None:
        shape["params"] = shape["params"] or _meta_params(hf, model_cfg)
        shape["checkpoint_dtype"] = hf.get("torch_dtype") or hf.get("dtype") or shape["checkpoint_dtype"]
    get = (hf or {}).get
    shape.update(
        hidden=get("hidden_size") or hint.get("hidden"),
        layers=get("num_hidden_layers") or hint.get("layers") or model_cfg.get("num_layers"),
        ffn=get("intermediate_size") or hint.get("ffn"),
        vocab=get("vocab_size") or hint.get("vocab"),
    )
    return shape if shape["params"] and shape["hidden"] and shape["layers"] else None


def hf_config(model_cfg: DictConfig, cache_dir: str | None = None) -> dict | None:
    """The model's Hugging Face config as a dict, without loading weights: the YAML's `hf_config`
    (random models) or a local config.json (model.path, a converted cache, the Hub cache)."""
    if model_cfg.get("hf_config") and not model_cfg.get("path"):  # a saved folder is read as loading reads it
        return OmegaConf.to_container(model_cfg.hf_config, resolve=True)
    for folder in _config_folders(model_cfg, cache_dir):
        path = Path(folder) / "config.json"
        if path.exists():
            import json

            return json.loads(path.read_text())
    return None


def _config_folders(model_cfg: DictConfig, cache_dir: str | None) -> list[Path]:
    folders = []
    if model_cfg.get("path"):
        folders.append(Path(str(model_cfg.path)).expanduser())
    if cache_dir:
        folders.append(Path(cache_dir) / "models" / safe_name(model_cfg.name))
    if model_cfg.get("hub_id"):
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model_cfg.hub_id), "config.json")
            if isinstance(found, str):
                folders.append(Path(found).parent)
    return folders


def _meta_params(hf: dict, model_cfg: DictConfig) -> int | None:
    try:
        import transformers

        config = transformers.AutoConfig.for_model(**hf)
        arch = model_cfg.get("arch") or (hf.get("architectures") or [None])[0]
        cls = getattr(transformers, arch) if arch else transformers.AutoModelForCausalLM
        with torch.device("meta"):
            model = cls(config) if arch else cls.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an unknown architecture: fall back to the YAML's hint
        return None


@dataclass
class Plan:
    """What a run needs, in bytes, and where. `on_device` is the peak on the compute device (per
    process: each rank holds its own)."""

    device: torch.device
    dtype: torch.dtype
    placement: str
    weights: int = 0
    activations: int = 0
    statistics: int = 0
    recovery: int = 0  # per process: the teacher's copy + this rank's share of the training state
    on_device: int = 0
    free: int = 0
    max_memory: dict | None = None
    notes: list[str] = field(default_factory=list)
    teacher: int = 0  # the dense teacher copy (replicated on every rank)
    training: int = 0  # gradients, AdamW moments (+ fp32 masters' extra) of the whole model, before sharding
    training_activations: int = 0  # what one micro-batch keeps for the backward pass
    data: int = 0  # the recovery's training data in host memory (counted on CPU runs)
    engine: str | None = None  # the recovery engine (when recovery trains)
    world: int = 1  # processes in the job
    fit_world: int | None = None  # the smallest world size (under a sharding engine) whose share fits

    @property
    def shards(self) -> int:
        """Ranks the training state is divided over: the world under FSDP / ZeRO-3, 1 under DDP."""
        return self.world if self.engine in SHARDING else 1

    def line(self) -> str:
        if self.notes and not self.weights:
            free = f"{self.free / GiB:.1f} GiB free"
            return f"memory plan: {self.notes[0]}; {self.device}, {free}; placement={self.placement}"
        where = f"{self.device}" + (" (weights in CPU memory)" if self.placement == "offload" else "")
        head = (
            f"memory plan: weights {self.weights / GiB:.1f} GiB ({str(self.dtype).removeprefix('torch.')})"
            f" + activations {self.activations / GiB:.1f} GiB + statistics {self.statistics / GiB:.1f} GiB"
        )
        if not self.training:
            return (
                head
                + (f" + recovery {self.recovery / GiB:.1f} GiB" if self.recovery else "")
                + f" = ~{self.on_device / GiB:.1f} GiB on {where}, {self.free / GiB:.1f} GiB free;"
                f" placement={self.placement}"
            )
        split = (
            f" (weights too: ÷ {self.shards} ranks, {self.engine})"
            if self.shards > 1
            else f" (replicated on {self.world} ranks, {self.engine})"
            if self.world > 1
            else ""
        )
        per = f" per process ({self.world} processes)" if self.world > 1 else ""
        out = (
            f"{head}, then recovery: teacher {self.teacher / GiB:.1f} GiB + gradients/AdamW"
            f" {self.training / GiB:.1f} GiB{split} + training activations {self.training_activations / GiB:.1f} GiB"
            f" = ~{self.on_device / GiB:.1f} GiB peak{per} on {where}, {self.free / GiB:.1f} GiB free;"
            f" placement={self.placement}"
        )
        if self.fit_world is not None and self.on_device > self.free:
            out += f"; the training state fits one GPU each with recovery.engine=fsdp over >= {self.fit_world} GPUs"
        return out

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "placement": self.placement,
            "weights_gib": round(self.weights / GiB, 3),
            "activations_gib": round(self.activations / GiB, 3),
            "statistics_gib": round(self.statistics / GiB, 3),
            "recovery_gib": round(self.recovery / GiB, 3),
            "on_device_gib": round(self.on_device / GiB, 3),
            "free_gib": round(self.free / GiB, 3),
            **({"training_gib": round(self.training / GiB, 3),
                "training_activations_gib": round(self.training_activations / GiB, 3),
                "engine": self.engine, "world_size": self.world} if self.training else {}),
        }  # fmt: skip


def _stage_needs(cfg: DictConfig, shape: dict, elt: int, pruner=None) -> tuple[int, int, int]:
    """(activations, statistics, largest block) in bytes for the run's stages, approximately: the
    pruner states its own need (`memory_bytes(shape, calib, elt)`: calibration inputs it keeps, its
    statistics; see pruners/base.py), perplexity holds one batch's fp32 logits."""
    hidden = int(shape["hidden"])
    ffn = int(shape.get("ffn") or 4 * hidden)
    vocab = int(shape.get("vocab") or 32000)
    block = (4 * hidden * hidden + 3 * hidden * ffn) * elt
    need = getattr(pruner, "memory_bytes", None)
    act, stats = need({**shape, "ffn": ffn, "vocab": vocab}, cfg.calib, elt) if need is not None else (0, 0)
    for ev in (cfg.get("eval") or {}).values():
        if "_target_" not in ev:  # knobs of an evaluator the run did not select (config.selected_evals)
            continue
        seqlen = ev.get("seqlen") or ev.get("max_seqlen") or 2048
        batch = ev.get("batch_size") or 1
        act = max(act, batch * seqlen * (vocab * 4 + 4 * hidden * elt + 3 * ffn * elt))
    return act, stats, block


def _recovery_needs(recovery, shape: dict, elt: int) -> tuple[int, int, int]:
    """(teacher, training state, training activations) in bytes for the recovery stage. Teacher: a
    copy of the dense model when the recovery asks for one (a teacher named in its config is not
    counted: its shape is not known here). Training state: the recovery's `training_bytes(shape,
    elt)` (gradients, AdamW's two moments, fp32 masters' extra), for the whole model before sharding;
    the student is counted at its unpruned size, an upper bound after a trimming pruner."""
    teacher = int(shape["params"]) * elt if getattr(recovery, "needs_teacher", False) else 0
    training = getattr(recovery, "training_bytes", None)
    state = int(training(shape, elt)) if training else 0
    return teacher, state, _training_activations(recovery, shape, elt) if state else 0


def _data_needs(recovery, device: torch.device) -> int:
    """The recovery's training data held in host memory (`data_bytes`: token ids, window order),
    counted in the plan where the host is the compute device (CPU runs)."""
    data = getattr(recovery, "data_bytes", None)
    return int(data()) if data is not None and device.type == "cpu" else 0


def _training_activations(recovery, shape: dict, elt: int) -> int:
    """What one micro-batch (`batch_size` windows of `seqlen` tokens) keeps for the backward pass,
    approximately: per token and Llama block ≈ 6·hidden + 4·ffn saved values (two norm inputs, q/k/v,
    attention in/out, MLP input; gate in/out, up out, down in) in the compute dtype (2 bytes under
    bf16/fp16 autocast, 4 for fp32, the model's otherwise), only each block's input with
    `gradient_checkpointing` (+ one block recomputed); plus the logits (student's and teacher's) and
    ~4 fp32 tokens × vocab loss slabs (over `loss.chunk` tokens at a time). 0 without a geometry."""
    b, s = getattr(recovery, "batch_size", None), getattr(recovery, "seqlen", None)
    if not (isinstance(b, int) and isinstance(s, int)):
        return 0
    precision = getattr(recovery, "precision", None)
    compute = 2 if precision in ("bf16", "fp16") else 4 if precision == "fp32" else elt
    hidden, layers = int(shape["hidden"]), int(shape["layers"])
    ffn, vocab = int(shape.get("ffn") or 4 * hidden), int(shape.get("vocab") or 32000)
    tokens, block = b * s, 6 * hidden + 4 * ffn
    if getattr(recovery, "gradient_checkpointing", False):
        blocks = tokens * (layers * hidden + block) * compute
    else:
        blocks = tokens * layers * block * compute
    teacher = getattr(recovery, "needs_teacher", False) or bool(getattr(recovery, "teacher", None))
    chunk = getattr(getattr(recovery, "loss", None), "chunk", None) or tokens
    logits = tokens * vocab * compute * (2 if teacher else 1) + min(tokens, chunk) * vocab * 4 * 4
    return blocks + logits


def plan(cfg: DictConfig, pruner=None, evaluators: dict | None = None, recovery=None, world: int | None = None) -> Plan:
    """Resolve device, dtype and placement, estimate the memory the run needs, and stop with one
    line if it cannot fit. Called before any weights load. `pruner`/`evaluators`/`recovery` (the
    instantiated stages) say whether they support `placement=offload`; `world`: processes in the job
    (default: the launcher's WORLD_SIZE).

    The peak per process is the larger of two phases: loading, pruning and evaluating (weights, the
    teacher copy, activations, statistics) and training (the teacher, plus weights, gradients and
    AdamW state: divided by the world size under FSDP, whole under DDP, plus one gathered
    block for FSDP's forward, plus the training activations). Every rank loads the whole model (and
    copies the teacher) before sharding, so the first phase never shrinks with more GPUs."""
    device = resolve_device(cfg.get("device", "auto"))
    placement = str(cfg.get("placement", "auto"))
    if placement not in PLACEMENTS:
        raise PrunebenchError(f"placement={placement!r} must be one of {', '.join(PLACEMENTS)}")
    world = world or launch()[0]
    if world > 1 and placement == "device_map":
        raise PrunebenchError(
            f"placement=device_map spreads one process over every GPU; under {world} processes each rank computes"
            " on its own GPU: use placement=device (or auto)"
        )
    shape = model_shape(cfg.model, cfg.paths.get("cache_dir"))
    dtype = resolve_dtype(cfg.model.dtype, device, (shape or {}).get("checkpoint_dtype"))
    max_memory = OmegaConf.to_container(cfg.max_memory) if cfg.get("max_memory") else None
    stages = [s for s in [pruner, recovery, *(evaluators or {}).values()] if s is not None]
    offloadable = all(getattr(s, "supports_offload", False) for s in stages)
    if placement == "offload" and not offloadable:
        names = [getattr(s, "name", type(s).__name__) for s in stages if not getattr(s, "supports_offload", False)]
        raise PrunebenchError(
            f"placement=offload runs layer-wise pruners (magnitude, wanda, sparsegpt) and eval=wikitext2;"
            f" {', '.join(map(str, names))} cannot (the whole model must be on the device): use placement=device"
            " or placement=device_map"
        )
    if placement == "stream" and (cannot := [s for s in stages if not getattr(s, "supports_stream", False)]):
        names = [getattr(s, "name", None) or type(s).__name__ for s in cannot]
        raise PrunebenchError(
            f"placement=stream prunes and evaluates one block at a time from disk (magnitude, wanda, sparsegpt with"
            f" pruner.sequential=true; eval=wikitext2; recovery=none); {', '.join(map(str, names))} need the whole"
            " model at once: use placement=offload or device"
        )
    if placement == "stream" and cfg.get("save_format", "hf") != "hf":
        raise PrunebenchError("placement=stream writes the pruned blocks as save_format=hf; drop save_format")
    p = Plan(device, dtype, placement, free=free_bytes(device), max_memory=max_memory, world=world)
    if shape is None:
        p.notes.append("model shape unknown before loading: no memory estimate")
        if placement == "auto":
            p.placement = "device"
        return p
    elt = torch.finfo(dtype).bits // 8
    p.weights = int(shape["params"]) * elt
    p.activations, p.statistics, block = _stage_needs(cfg, shape, elt, pruner)
    p.teacher, p.training, p.training_activations = _recovery_needs(recovery, shape, elt)
    p.data = _data_needs(recovery, device) if p.training else 0
    p.engine = getattr(recovery, "engine", "ddp") if p.training else None
    p.recovery = p.teacher + math.ceil(p.training / p.shards) + p.data
    headroom = 1.1  # allocator fragmentation, kernels' workspaces

    def need(where: str, shards: int | None = None) -> int:
        if where in ("offload", "stream"):  # embeddings + head on the device, one block, activations, statistics
            embed = 2 * int(shape.get("vocab") or 32000) * int(shape["hidden"]) * elt
            return int(headroom * (embed + 2 * block + p.activations + p.statistics))
        shards = p.shards if shards is None else shards
        before = p.weights + p.teacher + p.activations + p.statistics
        during = 0
        if p.training:  # FSDP gathers one block to compute with (and prefetches the next)
            gathered = 2 * block if shards > 1 else 0
            during = math.ceil((p.weights + p.training) / shards) + gathered + p.teacher + p.training_activations
            during += p.data
        return int(headroom * max(before, during))

    _, local_world, _ = launch()
    share = local_world if device.type == "cpu" else 1  # the processes of a CPU job share the host's memory
    if placement == "auto":
        if need("device") * share <= p.free or device.type == "cpu":
            p.placement = "device"
        elif offloadable:
            p.placement = "offload"
        else:  # several processes: one GPU each, never spread
            p.placement = "device" if world > 1 else "device_map"
    p.on_device = need(p.placement)
    if p.training and device.type != "cpu":  # the smallest world size whose FSDP share would fit
        p.fit_world = next((w for w in range(1, 4097) if need("device", w) <= p.free), None)
    if p.placement == "device_map":
        return p  # accelerate spreads the weights over every GPU (then CPU) itself
    if p.on_device * share > p.free:
        raise PrunebenchError(_advice(p, share, headroom))
    return p


def _advice(p: Plan, share: int, headroom: float) -> str:
    """The one line of a plan that does not fit: what it needs, and what to change."""
    dtype = str(p.dtype).removeprefix("torch.")
    total = f"~{p.on_device * share / GiB:.1f} GiB" + (f" ({share} processes)" if share > 1 else "")
    head = f"needs {total} on {p.device}, {p.free / GiB:.1f} GiB free (weights {p.weights / GiB:.1f} GiB {dtype})"
    if p.training and p.device.type != "cpu":
        where = f" under recovery.engine={p.engine}" + (f" on {p.world} GPUs" if p.world > 1 else "")
        advice = (
            f"recovery.engine=fsdp over >= {p.fit_world} GPUs would fit"
            if p.fit_world is not None
            else "no world size fits (every rank holds the whole model and the teacher before sharding, and its own"
            " activations): lower recovery.batch_size or recovery.seqlen, or use GPUs with more memory"
        )
        return f"{head}{where}; {advice}"
    if p.device.type == "cpu":
        advice = (
            "use a machine with more memory, or a GPU (device=cuda, model.dtype=float16)"
            if p.weights * headroom * share > p.free
            else "lower calib.nsamples, calib.seqlen, the eval batch size or recovery.batch_size"
        )
    elif p.placement == "device":
        advice = "try placement=offload or model.dtype=float16" if p.dtype == torch.float32 else "try placement=offload"
    else:
        advice = "lower calib.nsamples or calib.batch_size"
    return f"{head}; {advice}"


# ---------------------------------------------------------------------------------------------
# Where the weights go


def load_kwargs(p: Plan) -> dict:
    """Keyword arguments for `from_pretrained`: weights go straight to their place (no CPU copy
    of a 7B model first)."""
    if p.placement == "device" and p.device.type != "cpu":
        return {"device_map": {"": p.device}}
    if p.placement == "stream":
        return {"stream": p.device}
    if p.placement == "device_map":
        kw: dict = {"device_map": "auto"}
        if p.max_memory:
            kw["max_memory"] = p.max_memory
        return kw
    return {}


def place(model: torch.nn.Module, p: Plan) -> torch.nn.Module:
    """Put a loaded model where the plan says. `offload`: everything but the transformer blocks on
    the device (embeddings, rotary tables, final norm, head); the blocks stay in CPU memory and visit
    the device one at a time (`on_device`)."""
    if p.placement == "device_map" or getattr(model, "hf_device_map", None):
        return model
    if p.placement == "stream":  # a skeleton (models/stream.py): its non-block parts already on the device
        model.prunebench_offload = p.device
        return model
    if p.placement == "device":
        return model.to(p.device)
    from prunebench.models.blocks import find_blocks

    blocks = find_blocks(model)
    for module in model.children():
        _place_except(module, blocks, p.device)
    model.prunebench_offload = p.device  # the compute device of an offloaded model
    return model


def _place_except(module: torch.nn.Module, skip: torch.nn.Module, device: torch.device) -> None:
    if module is skip:
        return
    for child in module.children():
        _place_except(child, skip, device)
    for name, param in module.named_parameters(recurse=False):
        param.data = param.data.to(device)
        del name
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
