"""Device, precision, placement and the memory plan (CPU paths; CUDA ones are in test_gpu.py)."""

import copy

import pytest
import torch

from prunebench import PrunebenchError, memory, models, pipeline, placement
from prunebench.evals.perplexity import Perplexity
from prunebench.models.blocks import prunable_linears
from prunebench.pruners.base import mask_agreement
from prunebench.pruners.sparsegpt import SparseGPT
from prunebench.pruners.stats import InputNorms, collect_full_forward
from prunebench.pruners.wanda import Wanda
from tests.conftest import compose_cfg, random_calib


def tiny(dtype=torch.float32):
    cfg = compose_cfg("model=tiny-llama")
    return models.load(cfg.model, cache_dir="/nonexistent")[0].to(dtype)


def offload(model):
    cpu = torch.device("cpu")
    return memory.place(model, memory.Plan(cpu, torch.float32, "offload"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize(
    "spec,needle",
    [("cuda", "CUDA is not available"), ("cuda:7", "CUDA is not available"), ("banana", "not a device")],
)
def test_bad_devices_are_one_line(spec, needle):
    with pytest.raises(PrunebenchError, match=needle):
        placement.resolve_device(spec)


def test_auto_and_cpu_devices():
    assert placement.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert placement.resolve_device("auto").type in ("cpu", "mps")


def test_dtypes():
    cpu = torch.device("cpu")
    assert placement.resolve_dtype("float16", cpu) == torch.float32  # upcast on the CPU
    assert placement.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert placement.resolve_dtype("auto", cpu) == torch.float32
    assert placement.resolve_dtype("auto", torch.device("meta"), "float16") == torch.float16
    with pytest.raises(PrunebenchError, match="model.dtype"):
        placement.resolve_dtype("int3", cpu)


@pytest.mark.parametrize("pruner", [Wanda, SparseGPT])
@pytest.mark.parametrize("sequential", [True, False])
def test_offload_gives_the_same_masks_and_perplexity(pruner, sequential):
    if pruner is SparseGPT and not sequential:
        pytest.skip("SparseGPT has no one-shot mode")
    dense = tiny()
    moved = offload(copy.deepcopy(dense))
    assert placement.offloaded(moved) and not placement.offloaded(dense)
    calib = random_calib(n=4, seqlen=32)
    for model in (dense, moved):
        pruner(sparsity=0.5, sequential=sequential)(model, calib)
    for (name, a), b in zip(prunable_linears(dense).items(), prunable_linears(moved).values(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        assert torch.equal(a.weight, b.weight), name
    ppl = Perplexity(seqlen=64, max_windows=3, batch_size=2)
    tok = models.ByteTokenizer()
    assert ppl(moved, tok)["ppl"] == pytest.approx(ppl(dense, tok)["ppl"], rel=1e-6)


def test_offloaded_dense_statistics_equal_a_full_forward():
    dense = tiny()
    calib = random_calib(n=4, seqlen=32)
    full = collect_full_forward(dense, calib.input_ids, 2, InputNorms)
    blockwise = collect_full_forward(offload(copy.deepcopy(dense)), calib.input_ids, 2, InputNorms)
    for name, stat in full.items():
        torch.testing.assert_close(blockwise[name].norm_sq, stat.norm_sq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_fp32_statistics_and_masks(dtype):
    ref = tiny()
    with torch.no_grad():  # the same weights in both precisions: round them to the half format once
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    half = copy.deepcopy(ref).to(dtype)
    calib = random_calib(n=4, seqlen=32)
    stats = collect_full_forward(half, calib.input_ids, 2, InputNorms)
    assert all(s.sum.dtype == torch.float32 for s in stats.values())
    for model in (ref, half):
        Wanda(sparsity=0.5)(model, calib)
    # Scores differ only by half-precision activations: almost every mask entry agrees.
    assert mask_agreement(ref, half) > 0.97


def test_plan_stops_before_loading_when_it_cannot_fit(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 * placement.GiB)
    cfg = compose_cfg("model=llama2-7b", "device=cpu")
    with pytest.raises(PrunebenchError, match=r"needs ~.* GiB on cpu, 8.0 GiB free"):
        memory.plan(cfg)
    small = memory.plan(compose_cfg("model=tiny-llama", "device=cpu"))
    assert small.placement == "device" and "memory plan" in small.line()


def test_auto_placement_offloads_when_the_device_is_too_small(monkeypatch):
    fake = torch.device("meta")  # stands in for an accelerator with 8 GiB free
    monkeypatch.setattr(memory, "resolve_device", lambda spec: fake)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 * placement.GiB)
    cfg = compose_cfg("model=llama2-7b", "model.dtype=float16", "pruner=wanda")
    from prunebench.config import instantiate

    evaluators = {n: instantiate(e) for n, e in cfg.eval.items()}
    p = memory.plan(cfg, instantiate(cfg.pruner), evaluators, instantiate(cfg.recovery))
    assert p.placement == "offload" and p.on_device < 8 * placement.GiB < p.weights * 1.5
    gblm = compose_cfg("model=llama2-7b", "model.dtype=float16", "pruner=gblm")
    p = memory.plan(gblm, instantiate(gblm.pruner), evaluators, instantiate(gblm.recovery))
    assert p.placement == "device_map"  # the gradient pass needs the whole model: accelerate spreads it
    with pytest.raises(PrunebenchError, match="placement=offload"):
        memory.plan(compose_cfg("pruner=gblm", "placement=offload"), instantiate(gblm.pruner))


def test_pipeline_records_the_device_and_offload_matches(tmp_path):
    results = {}
    for where in ("device", "offload"):
        cfg = compose_cfg(
            "model=tiny-llama", "pruner=wanda", "calib.nsamples=4", "calib.seqlen=32", "eval.wikitext2.seqlen=64",
            "eval.wikitext2.max_windows=2", f"placement={where}", "device=cpu", f"paths.cache_dir={tmp_path}",
        )  # fmt: skip
        results[where] = pipeline.run(cfg, tmp_path / where)
    assert results["offload"]["metrics"] == results["device"]["metrics"]
    dev = results["offload"]["device"]
    assert dev["placement"] == "offload" and dev["device"] == "cpu" and dev["dtype"] == "float32"
    assert {"load", "prune", "eval"} <= set(results["offload"]["timings"])


def test_device_map_placement_loads_through_accelerate(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny()
    dense.save_pretrained(tmp_path / "m")
    p = memory.Plan(torch.device("cpu"), torch.float32, "device_map", max_memory={"cpu": "1GiB"})
    kw = memory.load_kwargs(p)
    assert kw == {"device_map": "auto", "max_memory": {"cpu": "1GiB"}}
    mapped = memory.place(AutoModelForCausalLM.from_pretrained(tmp_path / "m", **kw), p)
    assert not placement.offloaded(mapped)
    ppl = Perplexity(seqlen=64, max_windows=2)
    tok = models.ByteTokenizer()
    assert ppl(mapped, tok)["ppl"] == pytest.approx(ppl(dense, tok)["ppl"], rel=1e-5)


def test_plan_counts_what_recovery_keeps():
    """The teacher copy, gradients and AdamW moments of the recovery stage are in the memory plan."""
    from prunebench.config import instantiate

    def plan_for(*knobs):
        cfg = compose_cfg("model=smollm2-135m", "device=cpu", *knobs)
        return memory.plan(cfg, instantiate(cfg.pruner), None, instantiate(cfg.recovery))

    none, ft, kd = plan_for(), plan_for("recovery=lm_finetune"), plan_for("recovery=kd")
    lora = plan_for("recovery=lora")
    weights = none.weights  # fp32: 4 bytes a parameter
    data = instantiate(compose_cfg("recovery=kd").recovery).data_bytes()  # the corpus ids, text, window order
    assert none.recovery == 0 and "recovery" not in none.line()
    assert ft.recovery == 3 * weights + data and kd.recovery == 4 * weights + data  # + the dense teacher's copy
    assert 0 < lora.recovery < 0.1 * weights and kd.on_device > ft.on_device > lora.on_device > none.on_device
    assert "recovery" in kd.line() and kd.to_dict()["recovery_gib"] > 0


# ---------------------------------------------------------------------------------------------
# The memory plan of recovery on several processes (tiny-llama, numbers computed by hand)

TINY_PARAMS = 2 * 259 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64  # untied head: 107,200
TINY_BLOCK = 4 * 64 * 64 + 3 * 64 * 128  # the plan's one-block estimate (4·h² + 3·h·ffn), in values


def _kd_plan(monkeypatch, free_bytes: int, world: int, *knobs: str, device: str = "meta"):
    """The plan of tiny-llama, no pruner, no evaluator, recovery=kd (1 window x 32 tokens), on a fake
    accelerator (the meta device) with `free_bytes` free."""
    from prunebench.config import instantiate

    monkeypatch.setattr(memory, "resolve_device", lambda spec: torch.device(device))
    monkeypatch.setattr(memory, "free_bytes", lambda d: free_bytes)
    cfg = compose_cfg(
        "model=tiny-llama", "pruner=none", "eval=[]", "recovery=kd", "recovery.seqlen=32", "recovery.tokens=4096",
        *knobs,
    )  # fmt: skip
    return memory.plan(cfg, instantiate(cfg.pruner), {}, instantiate(cfg.recovery), world)


def _during(shards: int, elt: int = 4, precision_bytes: int = 4) -> int:
    """Per-rank bytes while training, by hand: weights + gradients + AdamW (+ fp32 masters' extra)
    divided over the shards, one gathered block (x2: prefetch) when sharded, the replicated teacher,
    and one micro-batch's activations (2 blocks x 32 tokens x (6·64 + 4·128) values, student and
    teacher logits 32 x 259, four fp32 loss slabs 32 x 259)."""
    state = (elt + 12 + 4 - elt) * TINY_PARAMS  # fp32 masters/weights, gradients, two moments: 16 B each
    gathered = 2 * TINY_BLOCK * elt if shards > 1 else 0
    activations = 32 * 2 * (6 * 64 + 4 * 128) * precision_bytes + 32 * 259 * (2 * precision_bytes + 16)
    return -(-state // shards) + gathered + TINY_PARAMS * elt + activations


def test_plan_divides_the_training_state_under_fsdp(monkeypatch):
    assert memory.model_shape(compose_cfg("model=tiny-llama").model)["params"] == TINY_PARAMS
    need_fsdp4 = int(1.1 * _during(4))  # 1,774,924 bytes
    p = _kd_plan(monkeypatch, need_fsdp4, 4, "recovery.engine=fsdp")
    assert p.world == 4 and p.shards == 4 and p.engine == "fsdp"
    assert p.weights == 4 * TINY_PARAMS and p.teacher == p.weights and p.training == 12 * TINY_PARAMS
    assert p.recovery == p.teacher + 3 * TINY_PARAMS  # teacher + a quarter of the fp32 training state
    assert p.on_device == need_fsdp4 and p.placement == "device" and p.fit_world == 4
    assert "÷ 4 ranks, fsdp" in p.line() and "recovery" in p.line()
    # DDP replicates the whole training state on every rank: the same 4 GPUs do not hold it, FSDP on >= 4 would.
    with pytest.raises(PrunebenchError, match=r"under recovery.engine=ddp on 4 GPUs; recovery.engine=fsdp over >= 4"):
        _kd_plan(monkeypatch, need_fsdp4, 4)
    assert int(1.1 * _during(1)) > int(1.1 * _during(3)) > need_fsdp4  # why 3 GPUs are not enough
    # One process on the same device: the line says how many GPUs it would take (device_map is the fallback).
    one = _kd_plan(monkeypatch, need_fsdp4, 1)
    assert one.placement == "device_map" and one.fit_world == 4 and "fsdp over >= 4 GPUs" in one.line()


def test_plan_of_a_half_precision_student_counts_fp32_masters(monkeypatch):
    p = _kd_plan(monkeypatch, 2**40, 2, "recovery.engine=fsdp", "model.dtype=bfloat16", "recovery.precision=bf16")
    assert p.weights == 2 * TINY_PARAMS and p.training == (12 + 2) * TINY_PARAMS  # + 2 B a parameter of masters
    assert p.on_device == int(1.1 * _during(2, elt=2, precision_bytes=2))


def test_plan_when_no_world_size_fits(monkeypatch):
    """Every rank loads the whole model and copies the teacher before sharding: below that, no world size helps."""
    with pytest.raises(PrunebenchError, match="no world size fits") as err:
        _kd_plan(monkeypatch, 2 * 4 * TINY_PARAMS, 8, "recovery.engine=fsdp")
    assert "\n" not in str(err.value)


def test_several_processes_take_a_gpu_each_and_no_device_map(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for k, v in {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    assert placement.resolve_device("auto") == placement.resolve_device("cuda") == torch.device("cuda", 3)
    with pytest.raises(PrunebenchError, match=r"^device=cuda:1 names one GPU for 16 processes; use device=cuda"):
        placement.resolve_device("cuda:1")  # every rank on one GPU
    monkeypatch.setenv("LOCAL_RANK", "9")
    with pytest.raises(PrunebenchError, match="at most 8 processes per node"):
        placement.resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM --gpus-per-task: each task sees its own GPU
    assert placement.resolve_device("auto") == placement.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(PrunebenchError, match="placement=device_map spreads one process"):
        memory.plan(compose_cfg("model=tiny-llama", "device=cpu", "placement=device_map"), world=2)


def test_cpu_processes_share_the_host_memory(monkeypatch):
    """Two CPU ranks on one host each hold a copy: the plan compares twice the per-process need."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    p = _kd_plan(monkeypatch, 10 * 2**30, 2, device="cpu")
    assert p.world == 2 and p.shards == 1 and "per process (2 processes)" in p.line()
    with pytest.raises(PrunebenchError, match=r"\(2 processes\) on cpu"):
        _kd_plan(monkeypatch, int(1.5 * p.on_device), 2, device="cpu")
