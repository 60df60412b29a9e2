"""logger=mlflow|tensorboard|wandb: what a tracker wrote is read back with the tracker's own reader, for
one real tiny run (fine-tuning recovery, so there is a loss curve) and a real 2-job Hydra sweep."""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from prunebench import tracking
from prunebench.config import CONF_DIR
from prunebench.results import read_json
from tests.conftest import compose_cfg, run_cli

TINY = [
    "experiment=smoke/tiny",
    "recovery=lm_finetune",
    "recovery.tokens=640",
    "recovery.seqlen=64",
    "recovery.log_every=2",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(cfg, result, run dir, wall seconds) of one real in-process run, as app.py would hand them."""
    from prunebench import pipeline

    root = tmp_path_factory.mktemp("single")
    cfg = compose_cfg(*TINY, f"paths.cache_dir={root / 'cache'}")
    start = time.perf_counter()
    result = pipeline.run(cfg, root / "outputs" / "run1")
    return cfg, result, root / "outputs" / "run1", time.perf_counter() - start


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real `prunebench run -m` sweep of 2 jobs: (sweep dir, [(cfg, result, job dir), ...])."""
    root = tmp_path_factory.mktemp("multi")
    out = root / "multirun" / "sweep1"
    r = run_cli("run", "-m", *TINY, "pruner=magnitude,wanda", f"hydra.sweep.dir={out}", cache=root / "cache", cwd=root)
    assert r.exit_code == 0, r.stderr
    jobs = []
    for metrics in sorted(out.glob("*/metrics.json")):
        result = read_json(metrics)
        jobs.append((OmegaConf.create(result["config"]), result, metrics.parent))
    assert len(jobs) == 2
    return out, jobs


def with_logger(cfg, logger: str, *overrides: str):
    """`cfg` with logger=<logger> (and logger.* overrides) as `prunebench run ... logger=...` would compose it."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger = compose_cfg(f"logger={logger}", *overrides).logger
    return cfg


# ---------------------------------------------------------------------------------------------- what is logged
def test_describe_flattens_the_result(tiny_run):
    cfg, result, run_dir, _ = tiny_run
    run = tracking.describe(cfg, result, run_dir)
    assert run.name == run.group == "tiny-llama_wanda" and run.root == run_dir.parent.resolve()
    assert run.params["pruner.sparsity"] == 0.5 and run.params["recovery.name"] == "lm_finetune"
    assert run.metrics["wikitext2/ppl"] == result["metrics"]["wikitext2/ppl"]
    assert run.metrics["dense/wikitext2/ppl"] == result["baseline"]["wikitext2/ppl"]
    assert run.metrics["time/prune"] == result["timings"]["prune"]
    assert run.metrics["prune/achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert run.series["recovery/loss_curve"] == [(s, v) for s, v in result["recovery"]["loss_curve"]]
    assert [s for s, _ in run.series["recovery/loss_curve"]] == [0, 2, 4, 6, 8, 9]
    names = {p.name for p in run.artifacts}
    assert {"metrics.json", "curves.png"} <= names  # curves.png: the loss curve, drawn for the trackers


def test_series_finds_every_curve_shape():
    prune = {  # MiniBridgeBERT: one row per bridging step, each with its training curve
        "steps": [{"step": 0, "dev_mcc": 40.0, "teacher_step": None, "curve": [[0, 1.0], [5, 0.5]]},
                  {"step": 1, "dev_mcc": 35.5, "teacher_step": 0, "curve": [[0, 0.9]]}],
        "per_matrix": {"a": 0.5},
        "layers_kept": [0, 1, 2],
        "search": {"candidates": [{"id": 0, "val": [{"step": 0, "tokens": 0, "lm": 3.0}, {"step": 4, "tokens": 8,
                                                                                          "lm": 2.5}]}]},
    }  # fmt: skip
    recovery = {"checkpoints": [{"step": 10, "kd": 0.3, "lm": 2.0}], "nli": {"loss_curve": [{"step": 1, "loss": 1.2}]}}
    found = {**tracking.series(prune, "prune"), **tracking.series(recovery, "recovery")}
    assert found == {
        "prune/steps/dev_mcc": [(0, 40.0), (1, 35.5)],
        "prune/steps/0/curve": [(0, 1.0), (5, 0.5)],
        "prune/steps/1/curve": [(0, 0.9)],
        "prune/search/candidates/0/val/tokens": [(0, 0.0), (4, 8.0)],
        "prune/search/candidates/0/val/lm": [(0, 3.0), (4, 2.5)],
        "recovery/checkpoints/kd": [(10, 0.3)],
        "recovery/checkpoints/lm": [(10, 2.0)],
        "recovery/nli/loss_curve/loss": [(1, 1.2)],
    }


def test_sweep_jobs_share_one_group(sweep):
    out, jobs = sweep
    runs = [tracking.describe(cfg, result, job) for cfg, result, job in jobs]
    assert {r.group for r in runs} == {"multirun/sweep1"}
    assert [r.name for r in runs] == ["tiny-llama_magnitude #0", "tiny-llama_wanda #1"]
    assert {r.root for r in runs} == {out.parent.resolve()}


def test_hydra_multirun_names_the_sweep(tmp_path):
    """Inside a Hydra multirun job the sweep comes from HydraConfig, wherever the job directory is."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("config", [f"hydra.sweep.dir={tmp_path / 'day' / 'sw'}"], return_hydra_config=True)
    hydra_cfg.hydra.mode, hydra_cfg.hydra.job.num = RunMode.MULTIRUN, 3
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        assert tracking._where(tmp_path / "anywhere") == (tmp_path / "day", "day/sw", "3")
    finally:
        HydraConfig.instance().cfg = None


# ---------------------------------------------------------------------------------------------- MLflow
def _mlflow(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_run_reads_back(tiny_run, tmp_path, monkeypatch):
    cfg, result, run_dir, _ = tiny_run
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's relative defaults (./mlruns) must not land in the working directory
    where = tracking.log_run(with_logger(cfg, "mlflow"), result, run_dir)
    assert not any(elsewhere.iterdir())
    store = run_dir.parent / "mlflow.db"  # MLflow's own default (sqlite:///mlflow.db): `mlflow ui` opens it
    assert where and store.is_file() and (run_dir.parent / "mlruns").is_dir()
    client = _mlflow(f"sqlite:///{store.resolve()}")
    exp = client.get_experiment_by_name("tiny-llama_wanda")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-llama_wanda"
    assert run.data.params["pruner.sparsity"] == "0.5" and run.data.params["model.name"] == "tiny-llama"
    assert run.data.metrics["wikitext2/ppl"] == pytest.approx(result["metrics"]["wikitext2/ppl"])
    assert run.data.metrics["dense/wikitext2/ppl"] == pytest.approx(result["baseline"]["wikitext2/ppl"])
    assert run.data.metrics["time/eval"] == pytest.approx(result["timings"]["eval"])
    history = client.get_metric_history(run.info.run_id, "recovery/loss_curve")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in result["recovery"]["loss_curve"]]
    assert {"metrics.json", "curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json")).read_text())
    assert logged["metrics"] == result["metrics"]


def test_mlflow_sweep_is_one_experiment(sweep, tmp_path):
    out, jobs = sweep
    uri = (tmp_path / "store").as_uri()  # tracking_uri: any store, here a fresh one
    for cfg, result, job in jobs:
        assert tracking.log_run(with_logger(cfg, "mlflow", f"logger.tracking_uri={uri}"), result, job)
    client = _mlflow(uri)
    exp = client.get_experiment_by_name("multirun/sweep1")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.run_name"])
    assert [r.info.run_name for r in runs] == ["tiny-llama_magnitude #0", "tiny-llama_wanda #1"]
    assert [r.data.params["pruner.name"] for r in runs] == ["magnitude", "wanda"]
    assert all(r.data.metrics["wikitext2/ppl"] > 0 and r.data.tags["job"] in "01" for r in runs)


def test_failed_job_is_a_failed_run(tmp_path):
    cfg = with_logger(compose_cfg(*TINY), "mlflow")
    run_dir = tmp_path / "outputs" / "broken"
    run_dir.mkdir(parents=True)
    assert tracking.log_failure(cfg, run_dir, RuntimeError("CUDA out of memory\nwhile pruning"))
    client = _mlflow(f"sqlite:///{(tmp_path / 'outputs' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-llama_wanda").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"] == "CUDA out of memory while pruning"
    assert run.data.params["pruner.name"] == "wanda" and not run.data.metrics


# ---------------------------------------------------------------------------------------------- TensorBoard
def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_run_reads_back(tiny_run):
    cfg, result, run_dir, _ = tiny_run
    assert tracking.log_run(with_logger(cfg, "tensorboard"), result, run_dir)
    acc = _events(run_dir)
    assert acc.Scalars("wikitext2/ppl")[0].value == pytest.approx(result["metrics"]["wikitext2/ppl"], rel=1e-6)
    assert acc.Scalars("dense/wikitext2/ppl")[0].value == pytest.approx(result["baseline"]["wikitext2/ppl"], rel=1e-6)
    curve = [(e.step, e.value) for e in acc.Scalars("recovery/loss_curve")]
    assert curve == [(s, pytest.approx(v, rel=1e-6)) for s, v in result["recovery"]["loss_curve"]]
    assert "config" in " ".join(acc.Tags()["tensors"])  # text summaries are tensors
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")  # the HParams tab compares sweep jobs


def test_tensorboard_sweep_is_one_logdir(sweep):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    out, jobs = sweep
    for cfg, result, job in jobs:
        assert tracking.log_run(with_logger(cfg, "tensorboard"), result, job)
    mux = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(out))
    mux.Reload()
    assert sorted(mux.Runs()) == ["0", "1"]  # `tensorboard --logdir <sweep dir>`: one run per job
    for (_, result, _), name in zip(jobs, ["0", "1"], strict=True):
        assert mux.Scalars(name, "wikitext2/ppl")[0].value == pytest.approx(result["metrics"]["wikitext2/ppl"], 1e-6)


# ---------------------------------------------------------------------------------------------- W&B
def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline `run-<id>.wandb` file: W&B's LevelDB-style log (a 7-byte
    ':W&B' header, then 32 KiB blocks of records with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _wandb_run(folder: Path) -> dict:
    """history {key: [(step, value)]}, summary {key: value}, the run record and file paths of one offline run."""
    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    from google.protobuf.message import DecodeError

    records: list = []
    for _ in range(120):  # wandb.finish() can return before W&B's service process has written the file
        try:
            records = wandb_records(run_file)
        except DecodeError:  # read while a record was half-written: read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    history, summary, run, files = {}, {}, None, set()
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                history.setdefault(k, []).append((row["_step"], v))
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            run = rec.run
        elif kind == "files":
            files |= {f.path for f in rec.files.files}
    return {"history": history, "summary": summary, "run": run, "files": files, "dir": run_file.parent}


def test_wandb_offline_run_reads_back(tiny_run):
    cfg, result, run_dir, _ = tiny_run
    assert tracking.log_run(with_logger(cfg, "wandb"), result, run_dir)
    w = _wandb_run(run_dir)
    assert w["history"]["recovery/loss_curve"] == [(s, pytest.approx(v)) for s, v in result["recovery"]["loss_curve"]]
    assert w["summary"]["wikitext2/ppl"] == pytest.approx(result["metrics"]["wikitext2/ppl"])
    assert w["summary"]["dense/wikitext2/ppl"] == pytest.approx(result["baseline"]["wikitext2/ppl"])
    assert w["run"].display_name == "tiny-llama_wanda" and w["run"].run_group == "tiny-llama_wanda"
    config = {i.key: json.loads(i.value_json) for i in w["run"].config.update}
    assert config["pruner"]["sparsity"] == 0.5
    assert {"metrics.json", "curves.png"} <= w["files"] and (w["dir"] / "files" / "metrics.json").is_file()


def test_wandb_sweep_is_one_group(sweep):
    out, jobs = sweep
    for cfg, result, job in jobs:
        assert tracking.log_run(with_logger(cfg, "wandb"), result, job)
    runs = [_wandb_run(job)["run"] for _, _, job in jobs]
    assert {r.run_group for r in runs} == {"multirun/sweep1"} and runs[0].run_id != runs[1].run_id


# ---------------------------------------------------------------------------------------------- failures
def test_none_logs_nothing(tiny_run):
    cfg, result, run_dir, _ = tiny_run
    assert cfg.logger.name == "none" and tracking.log_run(cfg, result, run_dir) is None


@pytest.mark.parametrize(
    "logger,overrides,needle",
    [
        ("mlflow", ["logger.tracking_uri=nosuch://host"], "logger=mlflow failed"),
        ("wandb", ["logger.mode=sometimes"], "logger.mode='sometimes'"),
    ],
)
def test_a_failing_tracker_warns_in_one_line(tiny_run, caplog, logger, overrides, needle):
    cfg, result, run_dir, _ = tiny_run
    with caplog.at_level(logging.WARNING, logger="prunebench.tracking"):
        assert tracking.log_run(with_logger(cfg, logger, *overrides), result, run_dir) is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "prunebench.tracking"]
    assert needle in line and "metrics.json is complete" in line and "\n" not in line


def test_a_missing_tracker_names_the_extra(tiny_run, caplog, monkeypatch):
    cfg, result, run_dir, _ = tiny_run
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with caplog.at_level(logging.WARNING, logger="prunebench.tracking"):
        assert tracking.log_run(with_logger(cfg, "wandb"), result, run_dir) is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "prunebench.tracking"]
    assert "pip install prunebench[wandb]" in line
