"""Training checkpoints and resume (recovery/resume.py): a KD interrupted after a checkpoint and
rerun into the same run dir ends with bit-identical weights (one CPU process)."""

from __future__ import annotations

import copy

import pytest
import torch

from prunebench import PrunebenchError
from prunebench.recovery import resume
from prunebench.recovery.kd import KD

KNOBS = {"tokens": 6 * 32, "seqlen": 32, "val_windows": 2, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 2}


def _kd(run_dir, tok, **extra):
    kd = KD(**{**KNOBS, **extra})
    kd.tokenizer, kd.run_dir = tok, run_dir
    return kd


def test_interrupted_then_resumed_equals_uninterrupted(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a student that differs from its teacher
        for p in model.parameters():
            p.mul_(0.9)
    start = copy.deepcopy(model.state_dict())

    full = _kd(tmp_path / "a", tok).train(model, teacher)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-2.pt", "step-4.pt"]

    model.load_state_dict(start)  # the rerun rebuilds the pruned student from scratch, as the pipeline does
    real_save = resume.save

    def save_then_die(run_dir, step, *args):
        real_save(run_dir, step, *args)
        if step == 4:
            raise KeyboardInterrupt  # SIGTERM after the step-4 checkpoint

    monkeypatch.setattr(resume, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _kd(tmp_path / "b", tok).train(model, teacher)
    monkeypatch.setattr(resume, "save", real_save)
    model.load_state_dict(start)
    capsys.readouterr()
    again = _kd(tmp_path / "b", tok).train(model, teacher)
    assert "resuming recovery from" in capsys.readouterr().out
    assert again["resumed_from_step"] == 4 and full["resumed_from_step"] is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    assert again["loss_curve"] == full["loss_curve"]
    assert again["lm_val_loss"]["after"] == full["lm_val_loss"]["after"]

    model.load_state_dict(start)  # resume=never starts over
    never = _kd(tmp_path / "b", tok, resume="never").train(model, teacher)
    assert never["resumed_from_step"] is None


@pytest.mark.parametrize(
    "knobs,needle",
    [({"checkpoint_every": 0}, "checkpoint_every"), ({"keep_checkpoints": 0}, "keep_checkpoints"),
     ({"resume": "always"}, "auto or never")],
)  # fmt: skip
def test_bad_checkpoint_knobs(knobs, needle):
    with pytest.raises(PrunebenchError, match=needle):
        KD(**knobs)
