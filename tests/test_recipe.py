"""The one training recipe of kd, lm_finetune and lora (prunebench/recovery/recipe.py): its knobs are
declared once, its YAML side (conf/recovery/_train.yaml) states the same defaults, and the training
data is counted before anything loads."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from omegaconf import OmegaConf

from prunebench.config import compose
from prunebench.recovery.kd import KD
from prunebench.recovery.lm_finetune import LMFinetune
from prunebench.recovery.lora import LoRA
from prunebench.recovery.recipe import INT64, Recipe

RECIPES = {"kd": KD, "lm_finetune": LMFinetune, "lora": LoRA}


def code_defaults(cls: type) -> dict:
    """The defaults a recipe built in code takes: the recipe's own parameters, the shared knobs of
    Recipe.__init__, and the shared knobs whose default the recipe changes (its DEFAULTS)."""
    out = {}
    for owner in (Recipe, cls):
        for name, p in inspect.signature(owner.__init__).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out[name] = p.default
    return {**out, **cls.DEFAULTS}


@pytest.mark.parametrize("option", ["kd", "lm_finetune", "lora"])
def test_yaml_defaults_are_the_code_defaults(option):
    node = OmegaConf.to_container(compose(f"recovery={option}").recovery, resolve=True)
    node.pop("_target_")
    declared = code_defaults(RECIPES[option])
    assert set(node) == set(declared), set(node) ^ set(declared)
    differ = {k: (node[k], declared[k]) for k in node if node[k] != declared[k] and k != "kd"}
    assert not differ  # {knob: (yaml, code)}
    shared = OmegaConf.load(compose.__globals__["CONF_DIR"] / "recovery" / "_train.yaml")
    assert set(shared) <= set(inspect.signature(Recipe.__init__).parameters)  # the shared file: the recipe's knobs


def test_every_recipe_follows_the_run_seed():
    """lm_finetune's seed followed 0 whatever the run's seed; it follows ${seed} as kd's and lora's do."""
    for option in RECIPES:
        assert compose(f"recovery={option}", "seed=7").recovery.seed == 7


def test_the_training_data_is_counted(tmp_path):
    """data_bytes: the corpus's token ids as int64 and one epoch of the window order, from file sizes
    (and a corpus beyond the host's memory is refused: tests/test_bad_inputs.py)."""
    np.arange(4096, dtype="<u2").tofile(tmp_path / "c.bin")  # 4096 ids of 2 bytes
    rec = LMFinetune(source=str(tmp_path / "c.bin"), tokens=512, seqlen=64)
    assert rec.data_bytes() == INT64 * 4096 + INT64 * (4096 // 64)
    assert rec.training_bytes({"params": 1000}, 4) == 12 * 1000  # the plan's device state: the data stays on the host
    np.save(tmp_path / "d.npy", np.arange(1000, dtype=np.int32))
    assert KD(source=str(tmp_path / "d.npy"), tokens=512, seqlen=64).data_bytes() == INT64 * (1000 + 1000 // 64)
    (tmp_path / "t.jsonl").write_text('{"text": "' + "x" * 999 + '"}\n')  # 1,012 bytes: ~506 tokens, the text
    text = LMFinetune(source=str(tmp_path / "t.jsonl"), tokens=64, seqlen=16).data_bytes()
    assert text == INT64 * 506 + 1012 + INT64 * (506 // 16)
