"""Knowledge distillation: the loss math of recovery/distill.py and recovery=kd on tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from prunebench import PrunebenchError, models, pipeline
from prunebench.models import ByteTokenizer
from prunebench.recovery.distill import LOGIT_LOSSES, DistillLoss, distill_step, dynamic_alpha, logit_loss, map_layers
from prunebench.recovery.kd import KD, kd_checkpoints
from tests.conftest import compose_cfg as compose

TINY_KD = dict(tokens=32 * 6, seqlen=32, val_windows=2, log_every=1, lr=3e-3, min_lr=3e-4)


def tiny(*overrides: str, seed: int = 0):
    return models.load(compose("model=tiny-llama", *overrides).model, "/nonexistent", seed=seed)[0]


def batch(n: int = 2, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
@pytest.mark.parametrize("extra", [{}, {"temperature": 2.0}, {"topk": 5}])
def test_loss_is_zero_when_student_is_teacher(kind, extra):
    model = tiny()
    x = batch()
    loss = DistillLoss(kind, intermediate={"loss": "cosine", "layers": 2}, **extra)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        parts = loss(out, out, mask=torch.ones_like(x))
    assert abs(float(parts["loss"])) < 1e-6 and abs(parts["logit"]) < 1e-6 and abs(parts["is"]) < 1e-6


def test_kl_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])

    def softmax(row, tau=1.0):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    fwd = sum(kl(softmax(tr), softmax(sr)) for sr, tr in zip(s.tolist(), t.tolist(), strict=True)) / 2
    rev = sum(kl(softmax(sr), softmax(tr)) for sr, tr in zip(s.tolist(), t.tolist(), strict=True)) / 2
    hot = sum(kl(softmax(tr, 2), softmax(sr, 2)) for sr, tr in zip(s.tolist(), t.tolist(), strict=True)) / 2 * 4
    assert float(logit_loss(s, t, "kld")) == pytest.approx(fwd, abs=1e-6)
    assert float(logit_loss(s, t, "reverse_kld")) == pytest.approx(rev, abs=1e-6)
    assert float(logit_loss(s, t, "kld", temperature=2.0)) == pytest.approx(hot, abs=1e-6)  # × τ²
    assert float(logit_loss(s, t, "mse")) == pytest.approx(float(((s - t) ** 2).mean()), abs=1e-6)
    # bf16 inputs are computed in fp32: the same number as from the upcast bf16 values
    sb, tb = s.bfloat16(), t.bfloat16()
    assert logit_loss(sb, tb).dtype == torch.float32
    assert float(logit_loss(sb, tb)) == pytest.approx(float(logit_loss(sb.float(), tb.float())), abs=1e-7)


def test_topk_truncation():
    t = torch.tensor([[4.0, 3.0, -1.0, -2.0]])
    s = torch.tensor([[1.0, 0.0, 5.0, 5.0]])  # differs from the teacher mostly outside its top-2
    p, q = torch.softmax(t[0, :2], -1), torch.softmax(s[0, :2], -1)
    expected = float((p * (p.log() - q.log())).sum())
    assert float(logit_loss(s, t, "kld", topk=2)) == pytest.approx(expected, abs=1e-6)
    assert float(logit_loss(s, t, "kld")) > 2 * expected
    s2 = torch.tensor([[4.0, 3.0, 9.0, 9.0]])  # equal on the teacher's top-2: zero after truncation
    assert float(logit_loss(s2, t, "kld", topk=2)) < 1e-7 < float(logit_loss(s2, t, "kld"))
    assert float(logit_loss(s, t, "kld", topk=100)) == pytest.approx(float(logit_loss(s, t, "kld")))


def test_mask_ignores_padding_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g, requires_grad=True), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = logit_loss(s, t, "kld", mask=mask)
    assert base.item() > 0
    s_noisy = s.detach().clone()
    s_noisy[0, 3:] += 10  # only padded positions change
    assert float(logit_loss(s_noisy, t, "kld", mask=mask)) == pytest.approx(base.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(base, s)
    for kind in LOGIT_LOSSES:
        whole = logit_loss(s, t, kind, mask=mask, topk=3 if kind == "kld" else None)
        chunked = logit_loss(s, t, kind, mask=mask, topk=3 if kind == "kld" else None, chunk=3)
        assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)
    (grad_chunked,) = torch.autograd.grad(logit_loss(s, t, "kld", mask=mask, chunk=4), s)
    torch.testing.assert_close(grad_chunked, grad)
    assert grad[0, 3:].abs().max() == 0


def test_dynamic_alpha_is_logit_over_is_and_detached():
    teacher, student = tiny(), tiny()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss = DistillLoss("kld", intermediate={"loss": "cosine", "layers": 2})
    x = batch()
    with torch.no_grad():
        t_out = teacher(x, output_hidden_states=True)
    parts = loss(student(x, output_hidden_states=True), t_out)
    assert parts["is"] > 0 and parts["alpha"] == pytest.approx(parts["logit"] / parts["is"], rel=1e-5)
    assert parts["loss"].item() == pytest.approx(2 * parts["logit"], rel=1e-5)  # α·L_is equals L_logit in value
    a = dynamic_alpha(torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True))
    assert float(a) == 0.5 and not a.requires_grad
    assert map_layers(2, 3, 5) == [(1, 3), (2, 4)] and map_layers([[-1, -1], [0, 2]], 3, 5) == [(2, 4), (0, 2)]


def test_classifier_logits_and_clm_term():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1])
    parts = DistillLoss("kld", clm_weight=0.5)({"logits": s}, {"logits": t}, labels)
    expected = float(logit_loss(s, t) + 0.5 * torch.nn.functional.cross_entropy(s, labels))
    assert float(parts["loss"]) == pytest.approx(expected, abs=1e-6)


def test_intermediate_with_different_hidden_sizes_trains_a_projection():
    teacher, student = tiny(), tiny("model.hf_config.hidden_size=32", "model.hf_config.intermediate_size=64")
    loss = DistillLoss("kld", intermediate={"loss": "cosine", "layers": 1})
    extra = loss.setup_projection(32, 64, "cpu")
    assert extra and extra[0].shape == (64, 32)
    parts = distill_step(student, teacher, {"input_ids": batch()}, loss)
    parts["loss"].backward()
    assert extra[0].grad is not None and parts["is"] > 0


def test_one_kd_step_lowers_the_loss():
    teacher = tiny()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.8)
    loss = DistillLoss("kld")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = {"input_ids": batch(4, 32)}
    first = distill_step(student, teacher, x, loss)
    first["loss"].backward()
    opt.step()
    with torch.no_grad():
        second = distill_step(student, teacher, x, loss)
    assert second["logit"] < first["logit"]


def test_loss_none_is_conventional_training_without_the_teacher():
    """loss=none: L = clm_weight · next-token CE, the teacher is never called while training (only
    the held-out distillation loss reads it); it needs clm_weight > 0."""
    student = tiny(seed=1)
    x = batch(2, 16)

    class Untouchable(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("loss=none ran the teacher")

    parts = distill_step(student, Untouchable(), {"input_ids": x}, DistillLoss("none", clm_weight=1.0))
    expected = float(student(input_ids=x, labels=x).loss)
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5) and "logit" not in parts
    for bad in (dict(loss="none"), dict(loss="none", clm_weight=1.0, intermediate={"layers": 1})):
        with pytest.raises(PrunebenchError, match="loss=none"):
            KD(**bad)
    kd = KD(loss="none", clm_weight=1.0, **TINY_KD)
    kd.tokenizer = ByteTokenizer()
    out = kd(student, tiny())
    assert out["lm_val_loss"]["after"] < out["lm_val_loss"]["before"] and out["loss"] == "none"


def test_needs_teacher_only_without_a_configured_teacher(tmp_path):
    assert KD().needs_teacher
    assert not KD(teacher="tiny-llama").needs_teacher
    teacher = tiny()
    teacher.save_pretrained(tmp_path / "t")
    assert not KD(teacher=str(tmp_path / "t")).needs_teacher


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(source="wikitext2_test"), "recovery.source=wikitext2_test is an evaluation split"),
        (dict(val_source="c4"), "recovery.val_source=c4 is the training source"),
        (dict(loss="kl"), "recovery.loss='kl' is unknown"),
        (dict(temperature=0), "recovery.temperature=0 must be > 0"),
        (dict(temperature=-1.0), "recovery.temperature=-1.0 must be > 0"),
        (dict(tokens=100), "recovery.tokens=100 is less than one optimiser step"),
        (dict(tokens=1024, seqlen=256, grad_accum=8), "recovery.tokens=1024 is less than one optimiser step"),
        (dict(topk=0), "recovery.topk=0"),
        (dict(precision="fp8"), "recovery.precision='fp8'"),
        (dict(intermediate={"loss": "l1"}), "recovery.intermediate.loss='l1'"),
        (dict(teacher="no-such-model"), "recovery.teacher='no-such-model'"),
    ],
)
def test_bad_knobs_fail_in_init(kwargs, needle):
    with pytest.raises(PrunebenchError) as err:
        KD(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_configured_teacher_and_checkpoints():
    student = tiny(seed=1)  # the configured teacher is tiny-llama drawn with seed 0
    kd = KD(teacher="tiny-llama", **TINY_KD)
    kd.tokenizer = ByteTokenizer()
    out = kd(student, None, compose("model=tiny-llama"))
    assert out["distillation_loss"]["after"] < out["distillation_loss"]["before"]
    knobs = {k: v for k, v in TINY_KD.items() if k != "tokens"}
    points = kd_checkpoints(tiny(seed=1), tiny(), ByteTokenizer(), 32 * 6, [2, 6], **knobs)
    assert [p["step"] for p in points] == [0, 2, 6] and points[2]["tokens"] == 32 * 6
    assert all(p["kd"] >= 0 and p["lm"] > 0 for p in points)
    with pytest.raises(PrunebenchError, match="checkpoints"):
        kd_checkpoints(tiny(seed=1), tiny(), ByteTokenizer(), 32 * 6, [7], **knobs)


def test_kd_keeps_masks_and_lowers_kl_on_a_pruned_tiny_model():
    from prunebench.models.blocks import prunable_linears
    from prunebench.pruners.wanda import Wanda
    from tests.conftest import random_calib

    student, teacher = tiny(seed=1), tiny()  # two random tiny models: a KL large enough to fall clearly
    Wanda(sparsity=0.5)(student, random_calib())
    zeros = {n: m.weight == 0 for n, m in prunable_linears(student).items()}
    kd = KD(**{**TINY_KD, "tokens": 32 * 12})
    kd.tokenizer = ByteTokenizer()
    out = kd(student, teacher)
    assert out["steps"] == 12 and len(out["loss_curve"]) == 12
    assert out["distillation_loss"]["after"] < out["distillation_loss"]["before"]
    for n, m in prunable_linears(student).items():
        assert bool((m.weight[zeros[n]] == 0).all())


def test_pipeline_runs_kd_end_to_end(tmp_path):
    cfg = compose(
        "experiment=smoke/tiny",
        "recovery=kd",
        "recovery.tokens=256",
        "recovery.seqlen=32",
        "recovery.val_windows=2",
        "recovery.log_every=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    result = pipeline.run(cfg, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["recovery"]["steps"] == 8 and m["recovery"]["tokens"] == 256
    assert m["recovery"]["loss_curve"][0][0] == 0 and m["recovery"]["loss_curve"][-1][0] == 7
    before, after = m["metrics"]["recovery/kd_val_before"], m["metrics"]["recovery/kd_val_after"]
    assert before > 0 and after > 0 and "recovery/lm_val_loss" in m["metrics"]
    assert m["recovery"]["distillation_loss"] == {"before": before, "after": after}
    assert result["recovery"]["teacher"].startswith("unpruned")
