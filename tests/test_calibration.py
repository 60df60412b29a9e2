"""The layer-by-layer calibration path against a full forward pass."""

import pytest
import torch

from prunebench.models.forward import Layerwise
from prunebench.pruners.stats import InputNorms, collect_full_forward, collect_stats, prunable_linears
from tests.conftest import random_calib


def test_input_norms_sum_over_tokens_mean_over_samples():
    layer = torch.nn.Linear(2, 1)
    stat = InputNorms(layer)
    stat.add(torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]))  # sample 1: sums 10, 4
    stat.add(torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]))  # sample 2: sums 1, 2
    assert torch.allclose(stat.norm_sq, torch.tensor([5.5, 3.0]))


@pytest.mark.parametrize("tiny", ["tiny-llama", "tiny-bert"], indirect=True)
def test_layerwise_stats_equal_full_forward(tiny):
    model, _ = tiny
    calib = random_calib(n=6, seqlen=24, batch_size=4)  # uneven last batch on purpose
    full = collect_full_forward(model, calib.input_ids, 3, InputNorms)
    layerwise = {}

    def edit(i, block, collect):
        _, stats = collect_stats(block, collect, InputNorms)
        layerwise.update({f"{i}.{k}": v for k, v in stats.items()})

    Layerwise(model, calib.input_ids, calib.batch_size).run(edit)
    assert set(layerwise) == set(full) == set(prunable_linears(model))
    for name in full:
        assert layerwise[name].nsamples == full[name].nsamples == 6
        torch.testing.assert_close(layerwise[name].norm_sq, full[name].norm_sq, rtol=1e-4, atol=1e-5)
