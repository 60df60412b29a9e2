"""prunebench.models.forward: the one place for forward hooks (block inputs/outputs, the layer-wise
driver, Block Influence, stopping a forward), checked against plain whole-model forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunebench import models
from prunebench.models.blocks import final_norm, find_blocks
from prunebench.models.forward import (
    Layerwise,
    Stop,
    block_influence,
    capture_inputs,
    forward_windows,
    token_norms,
    watch_blocks,
)
from tests.conftest import compose_cfg, random_calib


def tiny_model(layers: int = 3):
    cfg = compose_cfg("model=tiny-llama", f"model.hf_config.num_hidden_layers={layers}")
    return models.load(cfg.model, cache_dir="/nonexistent")[0].eval()


def test_block_influence_is_one_minus_cosine_and_half_for_a_zero_vector():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    expected = 1 - F.cosine_similarity(a, b, dim=-1, eps=0.0)
    torch.testing.assert_close(block_influence(a, b), expected)
    torch.testing.assert_close(block_influence(a, b, token_norms(a), token_norms(b)), block_influence(a, b))
    assert block_influence(a, a).abs().max() < 1e-6
    b[0, 0] = 0
    assert block_influence(a, b)[0, 0] == 0.5  # 0/0: ShortGPT's public code counts it as 0.5


def test_layerwise_outputs_equal_the_whole_model_forward():
    """Block by block (the driver evals.perplexity uses under offload/stream) gives the same final
    hidden states as one plain forward, and the blocks' inputs are what watch_blocks sees."""
    model = tiny_model()
    ids = random_calib(n=4, seqlen=16).input_ids
    seen: dict[int, list] = {}
    with watch_blocks(find_blocks(model), lambda i, x, y: seen.setdefault(i, []).append((x, y))), torch.no_grad():
        logits = torch.cat([model(input_ids=b, use_cache=False).logits for b in ids.split(2)])
    assert not any(b._forward_hooks for b in find_blocks(model))  # removed on exit
    hidden = Layerwise(model, ids, 2, desc="test").run(outputs=True)
    with torch.no_grad():
        torch.testing.assert_close(model.get_output_embeddings()(final_norm(model)(torch.cat(hidden))), logits)
    first, _ = capture_inputs(model, ids, 2)
    torch.testing.assert_close(torch.cat(first), torch.cat([x for x, _ in seen[0]]))
    torch.testing.assert_close(torch.cat(hidden), torch.cat([y for _, y in seen[2]]))


def test_stop_ends_a_forward_and_hooks_go_even_on_an_error():
    model = tiny_model()
    ids = random_calib(n=2, seqlen=8).input_ids
    calls = []

    def stop_at_block_0(i, x, y):
        calls.append(i)
        raise Stop

    with watch_blocks(find_blocks(model), stop_at_block_0), torch.no_grad():
        assert forward_windows(model, ids, 1) == ids.numel()
    assert calls == [0, 0]  # block 0 of each batch, nothing after it

    def boom(*_):
        raise RuntimeError("boom")

    handle = find_blocks(model)[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        forward_windows(model, ids, 1, [handle])
    assert not find_blocks(model)[1]._forward_hooks
