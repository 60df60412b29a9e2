from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from prunebench import models
from prunebench.config import CONF_DIR
from prunebench.data import Calibration


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def tiny(request):
    """(model, tokenizer) of a tiny random model; parametrize with the model config name."""
    name = getattr(request, "param", "tiny-llama")
    cfg = compose_cfg(f"model={name}")
    return models.load(cfg.model, cache_dir="/nonexistent", seed=0)


def random_calib(vocab: int = 259, n: int = 4, seqlen: int = 32, batch_size: int = 2, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(3, vocab, (n, seqlen), generator=g), "random", "test", seed, batch_size)
