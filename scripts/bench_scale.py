"""Scale benchmark (issue 11): layer-wise pruning against the two-pass bound, offload against device
placement, perplexity throughput against a bare forward, and bf16 vs fp32 mask agreement.

Timings and memory do not depend on the weights, so the model is randomly initialised from a real
config (`--shape llama2-7b` reads conf/model/llama2-7b.yaml's shape: Llama-2-7B's exact sizes) and
fed random tokens. On a GPU machine:

    python scripts/bench_scale.py --shape llama2-7b --dtype bfloat16 --nsamples 128 --seqlen 2048

On this CPU (the same code paths, a small Llama):

    python scripts/bench_scale.py --shape small --dtype float32 --nsamples 16 --seqlen 256

Goals: Wanda/SparseGPT ≤ 1.2× two bare block forwards over the calibration set (SparseGPT adds its
O(d³) OBS sweep on top, reported apart); offload ≤ 1.5× device; perplexity ≥ 0.95× bare-forward
tokens/s; bf16/fp32 mask agreement reported.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from prunebench import memory, placement
from prunebench.config import compose
from prunebench.data import Calibration
from prunebench.evals.perplexity import Perplexity
from prunebench.models.blocks import find_blocks
from prunebench.models.forward import capture_inputs
from prunebench.pruners.base import mask_agreement
from prunebench.pruners.sparsegpt import SparseGPT
from prunebench.pruners.wanda import Wanda
from prunebench.results import peak_rss_mb

SMALL = {"params": None, "hidden": 512, "layers": 8, "ffn": 1376, "vocab": 32000, "heads": 8}


def build(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A Llama of the given shape with seeded random weights, created directly in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"], vocab_size=shape["vocab"],
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def timed(fn, device: torch.device) -> float:
    placement.sync(device)
    t = time.perf_counter()
    fn()
    placement.sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def bare_two_pass(model, calib: Calibration, device) -> float:
    """The bound: capture block-0 inputs, then every block forward twice over every batch (one pass
    for statistics, one for the next block's inputs), nothing else."""

    def run():
        hidden, calls = capture_inputs(model, calib.input_ids, calib.batch_size)
        for block in find_blocks(model):
            for _ in range(2):
                out = [call(block, h) for call, h in zip(calls, hidden, strict=True)]
            hidden = out

    return timed(run, device)


def prune_time(model, pruner, calib, device) -> tuple[float, dict]:
    placement.reset_peak(device)
    seconds = timed(lambda: pruner(model, calib), device)
    return seconds, placement.peak_memory(device)


@torch.no_grad()
def ppl_throughput(model, windows: torch.Tensor, device) -> tuple[float, float]:
    """(evaluator tokens/s, bare forward tokens/s) over the same windows."""
    ev = Perplexity(seqlen=None, max_windows=None, batch_size=1)  # the papers' protocol: the whole split
    ev.windows = lambda m, t: windows  # random tokens: the timing does not depend on the text
    tokens = windows.numel()
    t_eval = timed(lambda: ev(model, None), device)

    def bare():
        for w in windows.split(1):
            model(input_ids=w.to(device), use_cache=False)

    return tokens / t_eval, tokens / timed(bare, device)


def bf16_agreement(shape, device, calib) -> float:
    """Wanda masks of the same weights in bf16 and in fp32 (weights rounded to bf16 once)."""
    ref = build(shape, torch.bfloat16, device).float()
    half = copy.deepcopy(ref).to(torch.bfloat16)
    for model in (ref, half):
        Wanda(sparsity=0.5)(model, calib)
    return mask_agreement(ref, half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", help="small | a conf/model name with a shape block (llama2-7b)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sparsegpt,offload,ppl,agreement")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = placement.resolve_device(args.device)
    dtype = placement.DTYPES[args.dtype]
    shape = SMALL if args.shape == "small" else dict(compose(f"model={args.shape}").model.shape)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (args.nsamples, args.seqlen), generator=g)
    calib = Calibration(ids, "random", "random tokens", 0, args.batch_size)
    rows = []

    model = build(shape, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    bound = bare_two_pass(model, calib, device)
    rows.append(("two bare block forwards (bound)", bound, 1.0, ""))
    for name, pruner in [("wanda", Wanda(sparsity=0.5)), ("sparsegpt", SparseGPT(sparsity=0.5))]:
        if name in skip:
            continue
        model = build(shape, dtype, device)
        seconds, peak = prune_time(model, pruner, calib, device)
        rows.append((f"{name}, placement=device", seconds, seconds / bound, peak))
        if "offload" not in skip:
            home = build(shape, dtype, torch.device("cpu"))
            home = memory.place(home, memory.Plan(device, dtype, "offload"))
            off, peak_off = prune_time(home, type(pruner)(sparsity=0.5), calib, device)
            note = {**peak_off, "vs device": round(off / seconds, 2)}
            rows.append((f"{name}, placement=offload", off, off / bound, note))
        del model
    print(f"| {params / 1e9:.2f}B-parameter Llama ({args.shape}), {args.dtype} on {placement.device_name(device)} |"
          f" {args.nsamples} x {args.seqlen} calibration tokens, batch {args.batch_size} |")  # fmt: skip
    print("| run | seconds | × bound | peak device memory / notes |\n|---|---|---|---|")
    for name, seconds, ratio, note in rows:
        print(f"| {name} | {seconds:.1f} | {ratio:.2f} | {note} |")
    if "ppl" not in skip:
        model = build(shape, dtype, device)
        windows = torch.randint(3, shape["vocab"], (args.ppl_windows, args.seqlen), generator=g)
        ev, bare = ppl_throughput(model, windows, device)
        print(f"\nperplexity evaluator {ev:.0f} tokens/s vs bare forward {bare:.0f} tokens/s: {ev / bare:.3f}×")
    if "agreement" not in skip:
        print(f"bf16 vs fp32 Wanda mask agreement: {bf16_agreement(shape, device, calib):.5f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
