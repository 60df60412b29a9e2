from __future__ import annotations

import copy
import functools
import logging
import os
import random
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from prunebench import models
from prunebench.config import compose
from prunebench.data import Calibration


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose(*overrides)


def compose_cfg(*overrides: str):
    """`prunebench.config.compose`, composed once per process for each list of overrides: a Hydra
    compose costs ~0.3 s of CPU and the suite asks for the same few configs hundreds of times. Each
    call returns a deep copy, so a test that edits its config changes no other test's. A bad
    override still raises on every call (lru_cache keeps no exceptions). The config files do not
    change while the tests run; interpolations such as ${oc.env:...} resolve when read, as before."""
    return copy.deepcopy(_composed(tuple(overrides)))


@pytest.fixture
def tiny(request):
    """(model, tokenizer) of a tiny random model; parametrize with the model config name."""
    name = getattr(request, "param", "tiny-llama")
    cfg = compose_cfg(f"model={name}")
    return models.load(cfg.model, cache_dir="/nonexistent", seed=0)


# An unreachable Hub endpoint: a Hub model must fail cleanly in a test, never start a 13 GB download.
NO_HUB = "http://127.0.0.1:9"


@dataclass
class CliResult:
    """What a `prunebench` command left: its exit code and what it wrote to stdout and stderr."""

    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args, cache, cwd, env: dict[str, str] | None = None) -> CliResult:
    """`prunebench *args` in this process, as typer's CliRunner runs it (the same argv bridge, checks,
    Hydra run and exit code), from `cwd`, with PRUNEBENCH_CACHE=`cache`, no Hub and the extra `env`.
    A subprocess would pay ~10 s of imports (torch, transformers, hydra) that this process has
    already paid, for a tiny model's run of under a second. The tests of the real entry point,
    signals, torchrun and what a user sees on a crash keep their subprocesses.

    Everything a run changes in the process is put back when it returns, so that no test depends
    on the runs before it: the environment (trackers setdefault variables), cwd, sys.argv (the CLI
    hands Hydra its overrides through it), the root logger (Hydra's job handlers stay bound to
    CliRunner's streams, closed once it returns), warnings filters, torch's thread count, the
    torch/numpy/random generators (a run seeds them) and Hydra's singletons (`--cfg job` leaves
    HydraConfig set, and code that asks HydraConfig would then think it runs inside that job)."""
    import huggingface_hub.constants
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from typer.testing import CliRunner

    from prunebench.cli import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved_env = dict(os.environ)
    threads = torch.get_num_threads()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    hydra_cfg, hydra_global = HydraConfig.instance().cfg, GlobalHydra.instance().is_initialized()
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            mp.setenv("PRUNEBENCH_CACHE", str(cache))
            # huggingface_hub read HF_ENDPOINT when it was imported; its calls read the constant.
            mp.setenv("HF_ENDPOINT", NO_HUB)
            mp.setattr(huggingface_hub.constants, "ENDPOINT", NO_HUB)
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            mp.chdir(cwd)
            mp.setattr(sys, "argv", sys.argv[:])
            r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        HydraConfig.instance().cfg = hydra_cfg
        if not hydra_global:
            GlobalHydra.instance().clear()
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # What Python prints for an exception that leaves a real process: the failing assertion shows it.
        stderr += "".join(traceback.format_exception(r.exception))
    return CliResult(r.exit_code, r.stdout, stderr)


@pytest.fixture
def cli_inproc(tmp_path):
    """`cli_inproc(*args, env=None)`: `prunebench *args` in this process (`run_cli`), from tmp_path,
    with its cache in tmp_path/cache."""

    def invoke(*args, env: dict[str, str] | None = None) -> CliResult:
        return run_cli(*args, cache=Path(tmp_path) / "cache", cwd=tmp_path, env=env)

    return invoke


@pytest.fixture(autouse=True)
def _root_logging():
    """Each test starts with the root logger's handlers as they were: an in-process CLI run
    (typer's CliRunner) leaves Hydra's job handlers bound to that run's captured, later closed,
    streams, and a warning logged by the next run's pre-load checks would then print a logging
    traceback into its stderr. Tests must not depend on which runs came before them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per pytest worker: two workers with two threads each on two cores
    # spin against each other (OpenMP busy-waits). Subprocesses a test starts keep the default.
    torch.set_num_threads(1)


def random_calib(vocab: int = 259, n: int = 4, seqlen: int = 32, batch_size: int = 2, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(3, vocab, (n, seqlen), generator=g), "random", "test", seed, batch_size)


def pytest_collection_modifyitems(config, items):
    """`slow` tests first (a stable sort: each module keeps its order), so under pytest-xdist's
    worksteal (scripts/test.sh) the minutes-long real-model tests start at once and the many short
    tests fill the other worker, instead of one long test starting last on one core while the
    other idles. `gpu` tests need CUDA: skipped (with the reason) on machines without it."""
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cached_calib(folder, seed: int = 0) -> Calibration:
    """Random windows whose statistics cache under `folder` (the stats-cache tests)."""
    calib = random_calib(n=2, seqlen=16, seed=seed)
    calib.cache_dir = str(folder)
    return calib


def counted(value):
    """(calls, compute): compute() returns `value` and records each call, so a cache hit shows as none."""
    calls = []

    def compute():
        calls.append(1)
        return value

    return calls, compute
