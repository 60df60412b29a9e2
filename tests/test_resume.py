"""Training checkpoints, resume and stopping on a signal (recovery/resume.py), one code path for kd,
lm_finetune and lora: a training stopped by SIGTERM after a checkpoint and rerun into the same run dir
ends with bit-identical weights (one CPU process); under submitit the preemption signal saves, then
requeues through the Hydra launcher's checkpoint; gradient checkpointing leaves the losses unchanged;
`recovery.global_batch` sets the accumulation. The CLI kill/resume test is at the end (slow)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from prunebench import PrunebenchError
from prunebench.recovery import resume
from prunebench.recovery.kd import KD
from prunebench.recovery.lm_finetune import LMFinetune
from prunebench.recovery.lora import LoRA
from prunebench.recovery.train import checkpointing_on

STEPS, SEQLEN = 6, 32
COMMON = {"tokens": STEPS * SEQLEN, "seqlen": SEQLEN, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 2}
KINDS = ("kd", "lm_finetune", "lora")


def _recovery(kind: str, run_dir, tok, **extra):
    if kind == "kd":
        rec = KD(**{**COMMON, "val_windows": 2, **extra})
    elif kind == "lm_finetune":
        rec = LMFinetune(**{**COMMON, "lr": 1e-3, **extra})
    else:  # dropout on: the resumed run must replay the same dropout masks (RNG in the checkpoint)
        rec = LoRA(**{**COMMON, "val_windows": 2, "lr": 1e-3, "dropout": 0.1, **extra})
    rec.tokenizer, rec.run_dir = tok, run_dir
    return rec


def _train(rec, model, teacher) -> dict:
    return rec.train(model, teacher) if isinstance(rec, KD) else rec(model, teacher)


@pytest.fixture
def student_teacher(tiny):
    """(pristine student, teacher): a student that differs from its teacher, copied for every run
    (LoRA injects its layers into the model: a rerun starts from a fresh one, as the pipeline's does)."""
    model, tok = tiny
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)
    return student, teacher, tok


def _sigterm_after(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process right after optimiser step `step` (inside the training loop)."""
    real = resume.Checkpointer.periodic

    def periodic(self, done, steps, curve):
        real(self, done, steps, curve)
        if done == step:
            assert callable(signal.getsignal(signum)), "the training loop must handle the signal"
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(resume.Checkpointer, "periodic", periodic)


@pytest.mark.parametrize("kind", KINDS)
def test_stopped_by_sigterm_then_resumed_equals_uninterrupted(kind, student_teacher, tmp_path, monkeypatch, capsys):
    student, teacher, tok = student_teacher
    model = copy.deepcopy(student)
    full = _train(_recovery(kind, tmp_path / "a", tok), model, teacher)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-2.pt", "step-4.pt"]
    assert full["resumed_from_step"] is None

    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _sigterm_after(m, 3)
        with pytest.raises(resume.Stopped) as stopped:
            _train(_recovery(kind, tmp_path / "b", tok), copy.deepcopy(student), teacher)
    assert stopped.value.line == "saved checkpoint step 3 on SIGTERM; rerun the same command to resume"
    assert stopped.value.signum == signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2.pt", "step-3.pt"]
    assert signal.getsignal(signal.SIGTERM) == before  # the loop gave the signal back
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-3.pt", weights_only=True)
    assert state["data"] == {"position": 3, "per_step": 1} and isinstance(state["rng"]["cpu"], torch.Tensor)
    if kind == "lora":  # the adapters and nothing of the frozen base
        assert state["model"] and all("lora_" in k for k in state["model"])

    capsys.readouterr()
    model = copy.deepcopy(student)
    again = _train(_recovery(kind, tmp_path / "b", tok), model, teacher)
    assert "resuming recovery from" in capsys.readouterr().out and again["resumed_from_step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    assert again["loss_curve"] == full["loss_curve"]

    never = _train(_recovery(kind, tmp_path / "b", tok, resume="never"), copy.deepcopy(student), teacher)
    assert never["resumed_from_step"] is None


def test_resume_refuses_a_checkpoint_of_other_knobs(student_teacher, tmp_path):
    student, teacher, tok = student_teacher
    _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)
    with pytest.raises(PrunebenchError, match=r"recovery.lr=0.001 \(now 0.002\); rerun with the same knobs"):
        _train(_recovery("lm_finetune", tmp_path, tok, lr=2e-3), copy.deepcopy(student), teacher)


def test_resume_refuses_a_checkpoint_of_other_starting_weights(student_teacher, tmp_path):
    """A rerun into the same run dir with another model (pruner, calibration) never continues the other
    model's training, even with every knob the same."""
    student, teacher, tok = student_teacher
    _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)
    other = copy.deepcopy(student)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(PrunebenchError, match=r"^checkpoint in .* was written for other starting weights \(another"):
        _train(_recovery("lm_finetune", tmp_path, tok), other, teacher)
    _train(_recovery("lm_finetune", tmp_path, tok, resume="never"), other, teacher)  # the way out


def test_stray_and_leftover_files_in_the_checkpoint_folder(student_teacher, tmp_path):
    """A foreign step-x.pt is not a checkpoint (ignored, no ValueError); a .tmp left by a killed save is
    removed by the next save; a checkpoint that does not load into the model is refused in one line."""
    student, teacher, tok = student_teacher
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "step-x.pt").write_bytes(b"not ours")
    (ckpt / ".step-9.pt.tmp").write_bytes(b"torn")
    _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2.pt", "step-4.pt", "step-x.pt"]
    assert resume.latest(tmp_path).name == "step-4.pt"

    state = torch.load(ckpt / "step-4.pt", weights_only=True)
    state["model"] = {k: v[..., :1] for k, v in state["model"].items()}  # other shapes, same fingerprint
    torch.save(state, ckpt / "step-4.pt")
    with pytest.raises(
        PrunebenchError, match=r"step-4.pt does not fit this run \(RuntimeError.*recovery.resume=never$"
    ):
        _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)


def test_no_run_dir_no_checkpoint_and_sigterm_untouched(student_teacher, monkeypatch):
    """Without a run dir (Minitron's search KD, a library call) nothing is saved and the loop leaves
    SIGTERM to the process's own handler."""
    student, teacher, tok = student_teacher
    seen = []
    monkeypatch.setattr(resume, "stop_signals", _spy(resume.stop_signals, seen))
    _train(_recovery("kd", None, tok), copy.deepcopy(student), teacher)
    assert seen == [False]


def _spy(real, seen):
    def spy(enabled=True):
        seen.append(enabled)
        return real(enabled)

    return spy


def test_submitit_preemption_saves_then_requeues(student_teacher, tmp_path, monkeypatch, capsys):
    """In a submitit job its handler owns the preemption signal (SIGUSR2): the loop finishes the step,
    saves, then hands the signal to that handler, which asks the Hydra launcher for its `checkpoint`
    (the same sweep point again), requeues the job and exits; the requeued run resumes from the file."""
    student, teacher, tok = student_teacher
    submitit = pytest.importorskip("submitit")
    launcher_mod = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    from submitit.core.job_environment import SignalHandler
    from submitit.slurm.slurm import SlurmJobEnvironment

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "0")
    requeued = []
    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", lambda self, countdown: requeued.append(countdown))
    launcher = launcher_mod.SlurmLauncher(submitit_folder=str(tmp_path / "sub"))
    delayed = submitit.helpers.DelayedSubmission(launcher, ["recovery=lm_finetune"], "hydra.sweep.dir", 0, "j", {})
    delayed.set_timeout(60, 3)
    paths = types.SimpleNamespace(submitted_pickle=tmp_path / "submitted.pkl")
    handler = SignalHandler(SlurmJobEnvironment(), paths, delayed)
    old = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        _sigterm_after(monkeypatch, 3, signal.SIGUSR2)
        with pytest.raises(SystemExit):  # submitit's own exit after requeueing
            _train(_recovery("lm_finetune", tmp_path / "run", tok), copy.deepcopy(student), teacher)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert "saved checkpoint step 3 on SIGUSR2; rerun the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step-3.pt").exists()
    assert requeued == [3]
    again = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
    assert isinstance(again.function, launcher_mod.SlurmLauncher) and again.args[0] == ["recovery=lm_finetune"]


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_same_loss(kind, student_teacher, monkeypatch):
    """Activations recomputed in the backward pass (torch.utils.checkpoint runs, once per block and
    micro-batch): the same losses and weights within float tolerance, and the model gives gradient
    checkpointing back switched off."""
    import transformers.modeling_utils as hf

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = hf.checkpoint
    monkeypatch.setattr(hf, "checkpoint", counted)
    student, teacher, tok = student_teacher
    knobs = {"tokens": 3 * SEQLEN, "checkpoint_every": None}
    plain, ckpt = copy.deepcopy(student), copy.deepcopy(student)
    a = _train(_recovery(kind, None, tok, **knobs), plain, teacher)
    assert not calls
    b = _train(_recovery(kind, None, tok, gradient_checkpointing=True, **knobs), ckpt, teacher)
    assert len(calls) == 3 * student.config.num_hidden_layers  # 3 steps x every block
    assert not hasattr(ckpt, "_require_grads_hook")  # the embedding hook enabling added is gone
    assert b["gradient_checkpointing"] and not checkpointing_on(ckpt)
    for (s1, l1), (s2, l2) in zip(a["loss_curve"], b["loss_curve"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_each_rank_gets_its_own_rng_back(monkeypatch):
    """A checkpoint written by several processes holds every rank's RNG (a list by rank): each rank
    restores its own stream, not rank 0's; one process keeps the single state it always wrote."""
    torch.manual_seed(1)
    first = resume.rng_state()
    torch.manual_seed(2)
    second = resume.rng_state()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, want in ((0, first), (1, second)):
        monkeypatch.setenv("RANK", str(rank))
        torch.manual_seed(99)
        resume.set_rng_state([first, second])
        assert torch.equal(torch.get_rng_state(), want["cpu"])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert isinstance(resume.rank_rng_states(), dict)  # one process: no gather, the old format


def test_global_batch_sets_the_accumulation(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert KD(global_batch=4, batch_size=2, tokens=4 * 256).grad_accum == 2
    assert KD(global_batch=4, grad_accum=4, tokens=4 * 256).grad_accum == 4  # both stated, and they agree
    assert LMFinetune(global_batch=6, batch_size=3, tokens=6 * 256).grad_accum == 2
    assert KD(tokens=256).grad_accum == 1  # neither: one micro-batch per step
    with pytest.raises(PrunebenchError, match=r"recovery.global_batch=3 is not a multiple of recovery.batch_size=2"):
        KD(global_batch=3, batch_size=2)
    with pytest.raises(PrunebenchError, match="recovery.global_batch=4 and recovery.grad_accum=3 disagree"):
        KD(global_batch=4, grad_accum=3)
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes share the global batch
    assert KD(global_batch=4, tokens=4 * 256).grad_accum == 2
    assert LoRA(global_batch=4, tokens=4 * 256).grad_accum == 2  # LoRA trains data-parallel as well
    with pytest.raises(PrunebenchError, match=r"batch_size=1 × 2 processes = 2"):
        LMFinetune(global_batch=3, tokens=4 * 256)


@pytest.mark.parametrize(
    "knobs,needle",
    [({"checkpoint_every": 0}, "recovery.checkpoint_every=0 must be a positive integer or null"),
     ({"keep_checkpoints": 0}, "recovery.keep_checkpoints=0 must be a positive integer"),
     ({"resume": "always"}, "recovery.resume='always' must be auto or never"),
     ({"engine": "horovod"}, "recovery.engine='horovod' must be ddp or fsdp"),
     ({"text_field": ""}, "recovery.text_field='' must be a non-empty word"),
     ({"gradient_checkpointing": "yes"}, "recovery.gradient_checkpointing='yes' must be true or false"),
     ({"global_batch": 0}, "recovery.global_batch=0 must be a positive integer or null"),
     ({"engine": "fsdp", "checkpoint_every": 5}, "checkpoint_every is not supported under recovery.engine=fsdp")],
)  # fmt: skip
@pytest.mark.parametrize("cls", [KD, LMFinetune, LoRA])
def test_bad_training_knobs(cls, knobs, needle):
    with pytest.raises(PrunebenchError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cls(**knobs)


# -- the command line: kill a run after its first checkpoint, rerun the same command ------------------
RUN = ["experiment=smoke/tiny", "pruner=wanda", "recovery=kd", "recovery.seqlen=64", "recovery.tokens=12800",
       "recovery.val_windows=2", "recovery.checkpoint_every=20", "eval.wikitext2.max_windows=2",
       "baseline=false"]  # fmt: skip


def _run(tmp_path, run_dir, *extra, background=False):
    env = {**os.environ, "PRUNEBENCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model's steps: one thread is fastest, also on a busy machine
    cmd = [sys.executable, "-m", "prunebench", "run", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_sigterm_then_rerun_resumes_to_the_same_perplexity(tmp_path):
    """`prunebench run ... recovery.checkpoint_every=20` SIGTERMed once its first checkpoint exists
    stops after the current step with one line and exit 143; the same command again says it resumed
    and ends with the perplexity of an uninterrupted run (bit-identical in one CPU process)."""
    full = _run(tmp_path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())

    run_dir = tmp_path / "cut"
    proc = _run(tmp_path, run_dir, background=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-20.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("saved checkpoint")]
    assert len(lines) == 1 and lines[0].endswith("on SIGTERM; rerun the same command to resume"), err[-2000:]
    stopped_at = int(lines[0].split()[3])
    assert stopped_at >= 20 and (run_dir / "checkpoints" / f"step-{stopped_at}.pt").exists()
    assert "Traceback" not in err and not (run_dir / "metrics.json").exists()

    again = _run(tmp_path, run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming recovery from {run_dir / 'checkpoints' / f'step-{stopped_at}.pt'}" in again.stdout
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["recovery"]["resumed_from_step"] == stopped_at
    assert result["metrics"]["wikitext2/ppl"] == expected["metrics"]["wikitext2/ppl"]
    assert result["recovery"]["loss_curve"] == expected["recovery"]["loss_curve"]


@pytest.mark.slow
def test_torchrun_sigterm_then_rerun_resumes_on_two_processes(tmp_path):
    """torchrun with 2 gloo processes (global batch 2), SIGTERM to torchrun once the first checkpoint
    exists: torchrun passes it to both ranks, they agree to stop after the same step, rank 0 saves and
    says so in one line; the same command again resumes on both ranks and ends where an uninterrupted
    2-process run ends (loss curve and perplexity; across processes the issue asks float tolerance)."""
    extra = ["recovery.global_batch=2", "recovery.tokens=25600"]  # 200 steps of 2 x 64 tokens
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def run(run_dir, background=False):
        env = {**os.environ, "PRUNEBENCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
        env["OMP_NUM_THREADS"] = "1"
        cmd = [*torchrun, "-m", "prunebench", "run", *RUN, *extra, f"hydra.run.dir={run_dir}"]
        if background:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert expected["world_size"] == 2 and expected["recovery"]["grad_accum"] == 1

    run_dir = tmp_path / "cut"
    proc = run(run_dir, background=True)
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "step-20.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("saved checkpoint")]
    assert len(lines) == 1 and lines[0].endswith("on SIGTERM; rerun the same command to resume"), err[-3000:]
    stopped_at = int(lines[0].split()[3])
    assert (run_dir / "checkpoints" / f"step-{stopped_at}.pt").exists() and not (run_dir / "metrics.json").exists()

    again = run(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming recovery from") == 1  # rank 0 says it; both ranks resume
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["recovery"]["resumed_from_step"] == stopped_at and result["world_size"] == 2
    for (s1, l1), (s2, l2) in zip(expected["recovery"]["loss_curve"], result["recovery"]["loss_curve"], strict=True):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-4, abs=1e-6)
    ppl, want = result["metrics"]["wikitext2/ppl"], expected["metrics"]["wikitext2/ppl"]
    assert ppl == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("knob", [{"checkpoint_every": 10}, {"keep_checkpoints": 3}, {"resume": "never"}])
def test_search_kd_refuses_checkpoint_knobs(knob):
    """Minitron's search KD has no run dir: a checkpoint knob set there would be ignored, so it is refused."""
    from prunebench.pruners.minitron.search import SearchKnobs

    name = next(iter(knob))
    with pytest.raises(PrunebenchError, match=rf"^pruner.search.kd.{name}=.*never checkpoints or resumes"):
        SearchKnobs.parse({"tokens": 0, "kd": knob})
    assert SearchKnobs.parse({"tokens": 0, "kd": {"resume": "auto"}}).kd == {"resume": "auto"}


def test_paper_search_kd_global_batch_gives_the_papers_400_steps():
    from omegaconf import OmegaConf

    from prunebench.pruners.minitron.search import SearchKnobs

    root = os.path.join(os.path.dirname(__file__), "..", "conf", "experiment", "minitron", "paper")
    search = OmegaConf.to_container(OmegaConf.load(os.path.join(root, "minitron-8b_search_4b.yaml")).pruner.search)
    assert search["kd"]["global_batch"] == 1152 and "grad_accum" not in search["kd"]
    assert SearchKnobs.parse(search).steps == 400


def test_ddp_fp16_checkpoints_accelerates_scaler(student_teacher, monkeypatch, tmp_path):
    """The checkpoint saves and restores the engine's GradScaler: the one-process engine's own under
    fp16, accelerate's under DDP (DDP.scaler is the Accelerator's), so the loss scale survives a resume."""
    import prunebench.recovery.recipe as recipe_mod
    from prunebench.recovery import engine as eng

    student, teacher, tok = student_teacher
    scaler = torch.amp.GradScaler("cpu")
    fake = eng.Engine("ddp", "fp32", 1, 1, torch.device("cpu"))
    fake.scaler = scaler  # what DDP.__init__ takes from accelerate under fp16
    monkeypatch.setattr(recipe_mod, "make_engine", lambda *a, **k: fake)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(recipe_mod.resume.Checkpointer, "of", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        _train(_recovery("kd", tmp_path, tok), copy.deepcopy(student), teacher)
    assert seen["scaler"] is scaler


def test_resume_never_sets_the_earlier_run_aside_and_never_mixes_two_runs(student_teacher, tmp_path, monkeypatch):
    """Issue 29's B08: a run dir holding an earlier run's later checkpoints (step-4, step-6 of a longer
    run); `resume=never`, SIGTERM after step 2: the announced step-2 checkpoint exists (retention kept
    it), the earlier run's checkpoints sit in earlier-1/, and the rerun resumes from step 2, never 6."""
    student, teacher, tok = student_teacher
    _train(_recovery("lm_finetune", tmp_path, tok, tokens=8 * SEQLEN), copy.deepcopy(student), teacher)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4.pt", "step-6.pt"]
    _sigterm_after(monkeypatch, 2)
    with pytest.raises(resume.Stopped, match="saved checkpoint step 2 on SIGTERM"):
        _train(_recovery("lm_finetune", tmp_path, tok, resume="never"), copy.deepcopy(student), teacher)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2.pt"]
    assert sorted(p.name for p in (tmp_path / "earlier-1" / "checkpoints").iterdir()) == ["step-4.pt", "step-6.pt"]
    monkeypatch.undo()
    again = _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)
    assert again["resumed_from_step"] == 2


def test_retention_never_deletes_the_checkpoint_it_just_wrote(student_teacher, tmp_path):
    """Higher-numbered stray checkpoints never push out the one just saved (keep_checkpoints=1)."""
    student, teacher, tok = student_teacher
    rec = _recovery("lm_finetune", tmp_path, tok, keep_checkpoints=1)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    _train(rec, copy.deepcopy(student), teacher)
    saved = resume.Checkpointer(tmp_path, 2, 1, "auto", copy.deepcopy(student), None, None, {}, 1)
    (ckpt / "step-99.pt").write_bytes(b"x")
    saved.state = lambda step, curve, rng=None: {"step": step}
    assert saved.save(1, []).exists()


def test_cli_refuses_a_rerun_of_another_command_into_a_folder_with_checkpoints(tmp_path):
    """The folder's record of the command behind its checkpoints (.hydra/overrides.yaml) is kept: a rerun
    with other overrides is refused in one line before Hydra rewrites it; resume=never sets both aside."""
    from prunebench.cli import _check_output_dirs

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2.pt").write_bytes(b"x")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- recovery=lora\n- recovery.lr=0.001\n")
    same = [f"hydra.run.dir={run_dir}", "recovery=lora", "recovery.lr=0.001", "recovery.resume=auto"]
    assert _check_output_dirs(same)
    with pytest.raises(PrunebenchError, match=r"written by another command \(overrides differ: recovery.lr=0.001, rec"):
        _check_output_dirs([f"hydra.run.dir={run_dir}", "recovery=lora", "recovery.lr=0.002"])
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().endswith("0.001\n")
    _check_output_dirs([f"hydra.run.dir={run_dir}", "recovery=lora", "recovery.lr=0.002", "recovery.resume=never"])
    assert (run_dir / "earlier-1" / ".hydra" / "overrides.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_an_unwritable_checkpoint_folder_stops_before_training_in_one_line(student_teacher, tmp_path):
    student, teacher, tok = student_teacher
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(PrunebenchError, match=r"^cannot write checkpoints into .*checkpoints: "):
        _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)


def test_a_full_disk_while_saving_is_one_line(student_teacher, tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('[enforce fail at inline_container.cc:...]')."""
    student, teacher, tok = student_teacher

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(resume.torch, "save", full)
    with pytest.raises(PrunebenchError, match=r"could not write checkpoint .*step-2.pt: .*\(disk full\?\); free space"):
        _train(_recovery("lm_finetune", tmp_path, tok), copy.deepcopy(student), teacher)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_window_order_is_built_one_epoch_at_a_time():
    """The seeded order equals the concatenated permutations it replaced (resumes read the same
    windows), slices cross epochs, and a huge token budget costs one epoch of memory, not the budget's."""
    import math

    from prunebench.recovery.train import window_order

    g = torch.Generator().manual_seed(3)
    ref = torch.cat([torch.randperm(7, generator=g) for _ in range(math.ceil(30 / 7))])
    order = window_order(7, 30, 3)
    assert len(order) == len(ref) and all(torch.equal(order[k : k + 4], ref[k : k + 4]) for k in range(0, 28, 4))
    assert torch.equal(order[3:5], ref[3:5])  # back to an earlier epoch: replayed from the seed
    huge = window_order(1000, 10**12 // 256, 0)  # recovery.tokens=1e12 at seqlen 256
    assert len(huge) >= 10**12 // 256 and huge[:3].numel() == 3


def test_an_edited_corpus_is_not_resumed(student_teacher, tmp_path):
    """The checkpoint's fingerprint holds the corpus file's SHA-256: the same size, other text, refused."""
    student, teacher, tok = student_teacher
    corpus = tmp_path / "train.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    _train(_recovery("lm_finetune", tmp_path, tok, source=str(corpus)), copy.deepcopy(student), teacher)
    corpus.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. " * 40)
    with pytest.raises(PrunebenchError, match=r"written by a training with corpus="):
        _train(_recovery("lm_finetune", tmp_path, tok, source=str(corpus)), copy.deepcopy(student), teacher)
