"""Efficiency: parameters, non-zero parameters, FLOPs per token, prefill latency, decode speed and
peak memory of the model as it is (dense before pruning, pruned after: the same process measures
both, so this evaluator is never read from the baseline cache).

FLOPs per token (forward, multiply-add = 2 FLOPs), at a context of `prompt_len` tokens:
    2 · Σ_linear (in · out)  +  4 · layers · prompt_len · (heads · head_dim)   [QKᵀ and AV]
`flops_per_token_nonzero` counts only non-zero linear weights: what sparse kernels could reach.

`sparse_kernels: true` measures what 2:4 sparsity buys on real hardware: every linear whose weight
is 2:4 (at most 2 non-zeros in each 4 consecutive inputs) is converted with
`torch.sparse.to_sparse_semi_structured` (cuSPARSELt, else CUTLASS: sparse tensor cores, Ampere and
later, fp16/bf16), and the latency of those linears and of the whole prefill forward is timed
against the dense weights (`linear_speedup`, `prefill_speedup` = dense time / sparse time). The
model is restored afterwards. On a CPU, an older GPU, fp32 weights or a model without 2:4 linears,
one log line says why the measurement was skipped and only the dense metrics are returned.

    eval: {efficiency: {_target_: prunebench.evals.efficiency.Efficiency, prompt_len: 128, gen_len: 32,
                        sparse_kernels: false}}
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from prunebench import PrunebenchError
from prunebench.knobs import Batch, context_of
from prunebench.models import count_params
from prunebench.models.blocks import find_blocks
from prunebench.models.export import is_24
from prunebench.placement import compute_device, sync
from prunebench.results import proc_status_mb, reset_peak_rss

log = logging.getLogger(__name__)


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


def semi_structured_unsupported(model: nn.Module) -> str | None:
    """Why PyTorch's semi-structured (2:4) kernels cannot run this model here, or None if they can."""
    device = compute_device(model)
    if device.type != "cuda":
        return f"the model runs on {device.type}; 2:4 sparse kernels need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {major}.{minor}; 2:4 sparse tensor cores need >= 8.0 (Ampere)"
    if not all(p.is_cuda for p in model.parameters()):
        return "the weights stay in CPU memory (placement=offload); use placement=device"
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the model is {str(dtype).removeprefix('torch.')}; 2:4 kernels need model.dtype=bfloat16 or float16"
    return None


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)


class Efficiency:
    cacheable = False  # latency must be measured beside the pruned model, in the same process

    def __init__(
        self,
        prompt_len: Annotated[int, Field(ge=1, le=131072)] = 128,
        gen_len: Annotated[int, Field(ge=1, le=131072)] = 32,
        repeats: Annotated[int, Field(ge=1, le=1000)] = 5,
        batch_size: Batch | None = 1,
        sparse_kernels: bool = False,
    ):
        self.prompt_len, self.gen_len, self.repeats, self.batch_size = prompt_len, gen_len, repeats, batch_size
        self.sparse_kernels, self._said = sparse_kernels, set()

    def check(self, num_layers: int, dims: Mapping | None = None) -> None:
        """The prompt and the generated tokens together within the model's context."""
        ctx, n = context_of(dims), self.prompt_len + self.gen_len
        if ctx and n > ctx:
            raise PrunebenchError(
                f"eval.efficiency.prompt_len + gen_len={n} is beyond the model's context of {ctx} positions"
                f" (max_position_embeddings); use at most {ctx}"
            )

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
        out["prefill_tokens_per_s"] = self.batch_size * self.prompt_len / max(statistics.median(prefill), 1e-9)
        if hasattr(model, "generate") and model.get_output_embeddings() is not None:
            kw = {"attention_mask": torch.ones_like(prompt), "do_sample": False, "use_cache": True,
                  "min_new_tokens": self.gen_len, "max_new_tokens": self.gen_len, "pad_token_id": 0}  # fmt: skip
            decode = [timed(lambda: model.generate(input_ids=prompt, **kw), device) for _ in range(self.repeats)]
            # generate = one prefill + gen_len − 1 cached decode steps (+ the last token's sampling)
            decode_s = statistics.median(decode) - statistics.median(prefill)
            if decode_s > 0:
                out["decode_tokens_per_s"] = self.batch_size * (self.gen_len - 1) / decode_s
            else:  # timing noise (one repeat on a busy machine) left no decode time: no number, not 1.5e10
                log.warning(
                    "efficiency: generate took no longer than the prefill (timing noise); no decode tokens/s"
                    " recorded: raise eval.efficiency.repeats or eval.efficiency.gen_len"
                )
        peak = _peak_mb(device)
        if peak is not None:
            out["peak_mb"] = peak
        if self.sparse_kernels:
            out.update(self.sparse_speedup(model, prompt))
        return out

    def _median_s(self, fn, device: torch.device) -> float:
        fn()  # warm-up: kernel selection and workspace allocation
        return statistics.median(timed(fn, device) for _ in range(self.repeats))

    def sparse_speedup(self, model: nn.Module, prompt: torch.Tensor) -> dict[str, float]:
        """Latency of the 2:4 linears and of the prefill forward with semi-structured sparse weights,
        against dense; {} (and one log line) where it cannot be measured."""
        reason = semi_structured_unsupported(model)
        linears = (
            {} if reason else {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_24(m.weight)}
        )
        if not reason and not linears:
            reason = "no linear weight has a 2:4 pattern (pruner.pattern=2:4 makes one)"
        sparse, failed = {}, []
        for name, m in linears.items():
            try:
                sparse[name] = to_semi_structured(m.weight.detach())
            except (RuntimeError, ValueError) as err:  # a shape the kernels do not take
                failed.append(f"{name} ({str(err).strip().splitlines()[0][:80]})")
        if failed:
            log.warning("efficiency: %d 2:4 linear(s) stay dense: %s", len(failed), "; ".join(failed[:3]))
        if not reason and not sparse:
            reason = "no 2:4 linear could be converted to a semi-structured sparse tensor"
        if reason:
            if reason not in self._said:  # once, though the dense baseline and the pruned model both ask
                log.warning("efficiency: sparse_kernels skipped: %s; dense metrics only", reason)
                self._said.add(reason)
            return {}
        device = compute_device(model)
        dense_s = sparse_s = 0.0
        for name, w in sparse.items():
            m = linears[name]
            x = torch.randn(prompt.numel(), m.in_features, dtype=m.weight.dtype, device=m.weight.device)
            dense_s += self._median_s(lambda: F.linear(x, m.weight), device)  # noqa: B023 (called here)
            sparse_s += self._median_s(lambda: F.linear(x, w), device)  # noqa: B023
        forward = lambda: model(input_ids=prompt, use_cache=False)  # noqa: E731
        dense_prefill = self._median_s(forward, device)  # again, right beside the sparse timing
        out = {"sparse_linears": len(sparse), "linear_ms_dense": 1000 * dense_s, "linear_ms_sparse": 1000 * sparse_s,
               "linear_speedup": dense_s / sparse_s}  # fmt: skip
        originals = {name: linears[name].weight for name in sparse}
        try:
            for name, w in sparse.items():
                linears[name].weight = nn.Parameter(w, requires_grad=False)
            sparse_prefill = self._median_s(forward, device)
        except RuntimeError as err:  # an op of this architecture the sparse tensor subclass does not cover
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            log.warning("efficiency: the forward with sparse weights failed (%s); linear timings only", first)
            return out
        finally:  # the dense weights come back whatever happened: later evaluators and save read them
            for name, w in originals.items():
                linears[name].weight = w
        return {**out, "prefill_ms_dense": 1000 * dense_prefill, "prefill_ms_sparse": 1000 * sparse_prefill,
                "prefill_speedup": dense_prefill / sparse_prefill}  # fmt: skip
