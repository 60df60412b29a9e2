"""eval=efficiency with sparse_kernels: 2:4 linears on PyTorch semi-structured sparse kernels (GPU,
marked `gpu`), and elsewhere one line saying why it was skipped while the run goes on."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from prunebench import models
from prunebench.evals import efficiency
from prunebench.evals.efficiency import Efficiency
from prunebench.pruners.magnitude import Magnitude
from prunebench.pruners.wanda import Wanda
from tests.conftest import compose_cfg, random_calib, run_cli

SKIP = "sparse_kernels skipped"


def tiny_24():
    model = models.load(compose_cfg("model=tiny-llama").model, cache_dir="/nonexistent")[0]
    Wanda(sparsity=0.5, pattern="2:4")(model, random_calib())
    return model


def quick(**kw) -> Efficiency:
    return Efficiency(prompt_len=16, gen_len=4, repeats=1, sparse_kernels=True, **kw)


def test_cpu_says_why_once_and_keeps_dense_metrics(caplog):
    model = tiny_24()
    ev = quick()
    with caplog.at_level(logging.WARNING, logger="prunebench.evals.efficiency"):
        first, second = ev(model), ev(model)  # the dense baseline and the pruned model share the evaluator
    lines = [r.getMessage() for r in caplog.records if SKIP in r.getMessage()]
    assert lines == ["efficiency: sparse_kernels skipped: the model runs on cpu; 2:4 sparse kernels need a CUDA GPU;"
                     " dense metrics only"]  # fmt: skip
    for m in (first, second):
        assert m["prefill_ms"] > 0 and m["decode_tokens_per_s"] > 0 and "linear_speedup" not in m


def test_no_24_linear_is_a_reason(monkeypatch, caplog):
    monkeypatch.setattr(efficiency, "semi_structured_unsupported", lambda model: None)  # as on a capable GPU
    model = models.load(compose_cfg("model=tiny-llama").model, cache_dir="/nonexistent")[0]
    Wanda(sparsity=0.5)(model, random_calib())  # unstructured: not 2:4
    with caplog.at_level(logging.WARNING, logger="prunebench.evals.efficiency"):
        m = quick()(model)
    assert "no linear weight has a 2:4 pattern" in caplog.text and "sparse_linears" not in m


def test_swap_and_restore_plumbing(monkeypatch):
    """With the kernels stubbed (a dense copy stands in for the sparse tensor): every 2:4 linear is
    timed, the forward runs on the swapped weights, and the model gets its own weights back."""
    monkeypatch.setattr(efficiency, "semi_structured_unsupported", lambda model: None)
    swapped = []
    monkeypatch.setattr(efficiency, "to_semi_structured", lambda w: swapped.append(w) or w.clone())
    model = tiny_24()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    m = quick()(model)
    assert m["sparse_linears"] == len(swapped) == 14  # 7 linears x 2 blocks; the dense head is left out
    assert m["linear_ms_dense"] > 0 and m["linear_ms_sparse"] > 0 and m["prefill_ms_sparse"] > 0
    assert m["linear_speedup"] == pytest.approx(m["linear_ms_dense"] / m["linear_ms_sparse"])
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]), n


def test_cli_run_continues(tmp_path):
    out = tmp_path / "run"
    knobs = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=64", "pruner.pattern=2:4", "eval=[efficiency]"]
    small = ["eval.efficiency.prompt_len=16", "eval.efficiency.gen_len=4", "eval.efficiency.repeats=1"]
    r = run_cli("run", *knobs, *small, "eval.efficiency.sparse_kernels=true", "device=cpu",
                f"hydra.run.dir={out}", cache=tmp_path / "cache", cwd=tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert (r.stdout + r.stderr).count(SKIP) == 1
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["efficiency/prefill_ms"] > 0 and "efficiency/linear_speedup" not in metrics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_semi_structured_speedup(dtype):
    """A random Llama wide enough for the sparse kernels' shape rules, 2:4 by magnitude, on CUDA."""
    import transformers

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability >= 8.0")
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=16, num_key_value_heads=16)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to("cuda", dtype).eval()
    Magnitude(sparsity=0.5, pattern="2:4")(model, None)
    linear = model.model.layers[0].mlp.up_proj
    x = torch.randn(256, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():  # the sparse kernel computes the same product
        ref = torch.nn.functional.linear(x, linear.weight)
        got = torch.nn.functional.linear(x, efficiency.to_semi_structured(linear.weight.detach()))
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)

    dense_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = Efficiency(prompt_len=256, gen_len=4, repeats=5, sparse_kernels=True)(model)
    assert m["sparse_linears"] == 14
    assert m["linear_speedup"] > 0 and m["prefill_speedup"] > 0
    print({k: round(v, 3) for k, v in m.items() if "ms" in k or "speedup" in k})
    for n, p in model.named_parameters():  # dense again afterwards
        assert p.layout == torch.strided and torch.equal(p, dense_weights[n]), n
