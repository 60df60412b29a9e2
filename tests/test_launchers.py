"""Hydra launchers from the `sweep` extra: the SLURM launcher asks for GPUs from config, and a sweep
runs through submitit's local executor (the same code path as SLURM, without a cluster)."""

import subprocess
import sys

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "prunebench.cli", "run", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def test_slurm_launcher_requests_gpus_from_config(tmp_path):
    r = run("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.mem_gb=96", "--cfg", "hydra", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    launcher = r.stdout.split("  launcher:\n", 1)[1]
    for line in ("gpus_per_node: 4", "partition: gpu", "mem_gb: 96", "cpus_per_task: 8", "timeout_min: 240"):
        assert f"    {line}\n" in launcher, line
    assert "SlurmLauncher" in launcher


@pytest.mark.slow
def test_sweep_through_submitit_local_executor(tmp_path):
    r = run("-m", "hydra/launcher=submitit_local", "experiment=smoke/tiny", "pruner=magnitude,wanda",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=10", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.parent.name for p in (tmp_path / "sweep").rglob("metrics.json")) == ["0", "1"]


def test_slurm_gpu_launcher_composes_one_task_per_gpu(tmp_path):
    """hydra/launcher=slurm_gpu: N tasks x M nodes, one per GPU, from config (no SLURM here)."""
    r = run("hydra/launcher=slurm_gpu", "hydra.launcher.nodes=2", "--cfg", "hydra", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    launcher = r.stdout.split("  launcher:\n", 1)[1]
    for line in ("nodes: 2", "tasks_per_node: 8", "gpus_per_node: 8", "SlurmLauncher"):
        assert line in launcher, line
