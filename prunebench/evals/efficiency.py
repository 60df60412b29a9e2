"""Efficiency: parameters, non-zero parameters, FLOPs per token, prefill latency, decode speed and
peak memory of the model as it is (dense before pruning, pruned after: the same process measures
both, so this evaluator is never read from the baseline cache).

FLOPs per token (forward, multiply-add = 2 FLOPs), at a context of `prompt_len` tokens:
    2 · Σ_linear (in · out)  +  4 · layers · prompt_len · (heads · head_dim)   [QKᵀ and AV]
`flops_per_token_nonzero` counts only non-zero linear weights: what sparse kernels could reach.

    eval: {efficiency: {_target_: prunebench.evals.efficiency.Efficiency, prompt_len: 128, gen_len: 32}}
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from prunebench.models import count_params
from prunebench.models.blocks import find_blocks
from prunebench.placement import compute_device, sync
from prunebench.results import proc_status_mb, reset_peak_rss


def attention_blocks(model: nn.Module) -> int:
    """Blocks that still attend (a MiniBridgeBERT bridge replaces a block by a low-rank map)."""
    return sum(any("Attention" in type(m).__name__ for m in b.modules()) for b in find_blocks(model))


def flops_per_token(model: nn.Module, context: int, nonzero: bool = False) -> float:
    linear = sum(
        int(torch.count_nonzero(m.weight)) if nonzero else m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(heads, 1)
    attention = 4 * attention_blocks(model) * context * heads * head_dim
    return 2.0 * linear + attention


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _peak_mb(device: torch.device) -> float | None:
    """Peak memory of the measured calls: CUDA max allocated on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mb("VmHWM")


def timed(fn, device: torch.device) -> float:
    """Seconds of `fn()`: CUDA events on a GPU (kernels run asynchronously, so the host clock alone
    would time the launches), the host clock after a device sync elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class Efficiency:
    cacheable = False  # latency must be measured beside the pruned model, in the same process

    def __init__(self, prompt_len: int = 128, gen_len: int = 32, repeats: int = 5, batch_size: int = 1):
        self.prompt_len, self.gen_len, self.repeats, self.batch_size = prompt_len, gen_len, repeats, batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer=None) -> dict[str, float]:
        device = compute_device(model)
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (self.batch_size, self.prompt_len), generator=g).to(device)
        params, nonzero = count_params(model)
        out = {
            "params": params,
            "nonzero_params": nonzero,
            "layers": attention_blocks(model),
            "gflops_per_token": flops_per_token(model, self.prompt_len) / 1e9,
            "gflops_per_token_nonzero": flops_per_token(model, self.prompt_len, nonzero=True) / 1e9,
        }
        model(input_ids=prompt, use_cache=False)  # warm-up: first full-size calls allocate and pick kernels
        _peak_reset(device)
        prefill = [timed(lambda: model(input_ids=prompt, use_cache=False), device) for _ in range(self.repeats)]
        out["prefill_ms"] = 1000 * statistics.median(prefill)
        if hasattr(model, "generate") and model.get_output_embeddings() is not None:
            kw = {"attention_mask": torch.ones_like(prompt), "do_sample": False, "use_cache": True,
                  "min_new_tokens": self.gen_len, "max_new_tokens": self.gen_len, "pad_token_id": 0}  # fmt: skip
            decode = [timed(lambda: model.generate(input_ids=prompt, **kw), device) for _ in range(self.repeats)]
            # generate = one prefill + gen_len − 1 cached decode steps (+ the last token's sampling)
            decode_s = statistics.median(decode) - statistics.median(prefill)
            out["decode_tokens_per_s"] = self.batch_size * (self.gen_len - 1) / max(decode_s, 1e-9)
        peak = _peak_mb(device)
        if peak is not None:
            out["peak_mb"] = peak
        return out
