"""The tiny pipelines on CUDA in fp32, bf16 and fp16, against the CPU (skipped without CUDA)."""

import copy

import pytest
import torch

from prunebench import models, placement
from prunebench.evals.perplexity import Perplexity
from prunebench.models.blocks import prunable_linears
from prunebench.pruners.base import mask_agreement
from prunebench.pruners.sparsegpt import SparseGPT
from prunebench.pruners.wanda import Wanda
from tests.conftest import compose_cfg, random_calib

pytestmark = pytest.mark.gpu


def tiny():
    cfg = compose_cfg("model=tiny-llama")
    return models.load(cfg.model, cache_dir="/nonexistent")[0]


def masks(model):
    return {n: (m.weight == 0).cpu() for n, m in prunable_linears(model).items()}


@pytest.mark.parametrize("pruner", [Wanda, SparseGPT])
@pytest.mark.parametrize("where", ["device", "offload"])
def test_cuda_fp32_matches_cpu(pruner, where):
    cpu_model = tiny()
    cuda = torch.device("cuda")
    gpu_model = placement.place(copy.deepcopy(cpu_model), placement.Plan(cuda, torch.float32, where))
    calib = random_calib(n=8, seqlen=64)
    for model in (cpu_model, gpu_model):
        pruner(sparsity=0.5)(model, calib)
    agree = mask_agreement(cpu_model, gpu_model)
    assert agree > 0.999, agree  # TF32/kernel order may flip a near-tie
    ppl = Perplexity(seqlen=64, max_windows=4)
    tok = models.ByteTokenizer()
    assert ppl(gpu_model, tok)["ppl"] == pytest.approx(ppl(cpu_model, tok)["ppl"], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_runs_with_fp32_statistics(dtype):
    model = tiny().to("cuda", dtype)
    calib = random_calib(n=8, seqlen=64)
    stats = Wanda(sparsity=0.5)(model, calib)
    assert 0.49 < stats.achieved_sparsity <= 0.5
    assert next(model.parameters()).dtype == dtype
    assert Perplexity(seqlen=64, max_windows=4)(model, models.ByteTokenizer())["ppl"] > 1


def test_cuda_plan_and_peak_memory():
    cfg = compose_cfg("model=tiny-llama", "device=cuda")
    p = placement.plan(cfg)
    assert p.device.type == "cuda" and p.placement == "device"
    placement.reset_peak(p.device)
    torch.ones(1024, 1024, device=p.device)
    assert placement.peak_memory(p.device)["peak_allocated_mb"] >= 4
