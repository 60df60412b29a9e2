"""Experiment tracking: one run's metrics.json, logged to the tracker researchers already use.

`logger=none` (default) | `mlflow` | `tensorboard` | `wandb` (conf/logger/). After a job, the Hydra task
calls `log_run(cfg, result, run_dir)` (or `log_failure(cfg, run_dir, err)`); everything comes from the
`result` dict that pipeline.run wrote to metrics.json, so a finished run can also be logged later:
`log_run(cfg, read_json(run_dir / "metrics.json"), run_dir)`.

What one run logs (`describe`), the same names in every tracker:
- params: the resolved config, flattened (`pruner.sparsity`, `recovery.lr`, ...);
- metrics: every metric (`wikitext2/ppl`), the dense baseline beside it (`dense/wikitext2/ppl`), stage
  seconds (`time/prune`), the numeric prune/recovery summary (`prune/achieved_sparsity`,
  `recovery/loss_last`) and memory (`memory/peak_rss_mb`, `device/peak_allocated_mb`);
- series: every per-step curve in the result, e.g. `recovery/loss_curve` (fine-tuning, KD: `[[step,
  loss], ...]`), `recovery/checkpoints/lm` (KD held-out losses), `prune/steps/dev_mcc` (MiniBridgeBERT
  per bridging step) and `prune/steps/<i>/curve` (its training losses);
- artifacts: metrics.json, the Hydra config and overrides, the job log, plots (`curves.png` is drawn
  when the run has curves), the saved model's card (model/README.md).

A sweep (`-m`) is one MLflow experiment / W&B group with one run per job, so the tracker's own UI
compares them; TensorBoard writes each job's events into its run directory (`tensorboard --logdir
<sweep dir>`). A tracker that fails (not installed, bad URI) logs one warning; the run is unaffected.

    # conf/logger/mlflow.yaml
    _target_: prunebench.tracking.MLflow
    name: mlflow
    tracking_uri: null  # null: SQLite <parent of the run or sweep dir>/mlflow.db, MLflow's own default
    experiment: null    # null: the sweep, else the run's name
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError

log = logging.getLogger(__name__)

EXTRAS = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}  # pip install prunebench[<extra>]


@dataclass
class Run:
    """What a tracker receives for one job: names, where shared stores live, and the flat data."""

    name: str  # the run's name in the tracker: cfg.name, plus the job number in a sweep
    group: str  # MLflow experiment / W&B group: the sweep for a multirun, else the run's name
    root: Path  # parent of the run directory, or of the sweep directory: default home of shared stores
    run_dir: Path
    config: dict  # the resolved config, nested (W&B keeps the nesting)
    params: dict[str, str | int | float | bool] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # set for a failed job


# ---------------------------------------------------------------------------------------------- what a run logs
def _key(name: str) -> str:
    """A metric/param name every tracker accepts (MLflow allows word characters, . / - and space)."""
    return re.sub(r"[^\w./\- ]", "_", str(name))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten(node, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> {"a.b.c": value}; lists and None become JSON text (tracker params are scalars)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, (str, int, float, bool)):
        return {_key(prefix): node}
    return {_key(prefix): json.dumps(node, default=str)}


def series(node, path: str) -> dict[str, list[tuple[int, float]]]:
    """Every per-step curve under `node`: `[[step, value], ...]` lists become `path`, lists of
    `{"step": s, "<field>": v, ...}` rows become `path/<field>` for each numeric field; rows are also
    searched for nested curves (`path/<i>/...`)."""
    out: dict[str, list[tuple[int, float]]] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(series(v, f"{path}/{k}"))
    elif isinstance(node, list) and node:
        if all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_number, p)) for p in node):
            out[_key(path)] = [(int(s), float(v)) for s, v in node]
        elif all(isinstance(p, dict) for p in node):
            if all(_number(p.get("step")) for p in node):
                for k in node[0]:
                    if k != "step" and all(_number(p.get(k)) for p in node):
                        out[_key(f"{path}/{k}")] = [(int(p["step"]), float(p[k])) for p in node]
            for i, p in enumerate(node):
                out.update(series({k: v for k, v in p.items() if isinstance(v, (dict, list))}, f"{path}/{i}"))
    return out


def _scalars(node: dict | None, form: str) -> dict[str, float]:
    """The numeric top-level entries of `node`, named `form.format(key)`."""
    return {_key(form.format(k)): float(v) for k, v in (node or {}).items() if _number(v)}


def _where(run_dir: Path) -> tuple[Path, str | None, str | None]:
    """(root, sweep group, job number). A multirun job knows its sweep from HydraConfig; without Hydra
    (logging a finished run later), a run directory whose parent holds Hydra's multirun.yaml is a job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode != RunMode.MULTIRUN:
                return run_dir.parent, None, None
            from hydra.utils import to_absolute_path

            sweep = Path(to_absolute_path(hc.sweep.dir))
            return sweep.parent, f"{sweep.parent.name}/{sweep.name}", str(hc.job.num)
    except ImportError:
        pass
    if (run_dir.parent / "multirun.yaml").exists():
        sweep = run_dir.parent
        return sweep.parent, f"{sweep.parent.name}/{sweep.name}", run_dir.name
    return run_dir.parent, None, None


def _config(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, dict):
        return cfg
    from prunebench.results import public_config

    try:
        return public_config(cfg)  # ${oc.env:...} values (tokens, home paths) stay unresolved
    except Exception:  # noqa: BLE001 - a failed job may hold a broken interpolation: log it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def describe(cfg: DictConfig | dict, result: dict | None, run_dir: Path, error: str | None = None) -> Run:
    """The flat view of one job that every tracker logs; `result` is metrics.json (None for a failed job)."""
    run_dir = Path(run_dir).resolve()
    config = (result or {}).get("config") or _config(cfg)
    name = str(config.get("name") or run_dir.name)
    root, sweep, job = _where(run_dir)
    run = Run(
        name=f"{name} #{job}" if job is not None else name,
        group=sweep or name,
        root=root,
        run_dir=run_dir,
        config=config,
        params=flatten({k: v for k, v in config.items() if k != "hydra"}),
        error=error,
    )
    run.tags = {"status": "failed" if error else "complete", "run_dir": str(run_dir)}
    if job is not None:
        run.tags["job"] = job
    if error:
        run.tags["error"] = error
    if result:
        prune, recovery = result.get("prune") or {}, result.get("recovery") or {}
        run.tags.update(overrides=" ".join(result.get("overrides") or []), git_commit=str(result.get("git_commit")))
        run.tags.update({f"version/{k}": str(v) for k, v in (result.get("versions") or {}).items()})
        run.metrics.update(_scalars(prune, "prune/{}"))
        run.metrics.update(_scalars(recovery, "recovery/{}"))
        run.metrics.update(_scalars({"peak_rss_mb": result.get("peak_rss_mb")}, "memory/{}"))
        run.metrics.update(_scalars(result.get("device"), "device/{}"))
        run.metrics.update(_scalars(result.get("timings"), "time/{}"))
        # The pruner's own timings (per MiniBridgeBERT step, importance, ...): `time/prune_<k>`.
        run.metrics.update(_scalars(prune.get("timings"), "time/prune_{}"))
        run.metrics.update(_scalars(result.get("baseline"), "dense/{}"))
        run.metrics.update(_scalars(result.get("metrics"), "{}"))
        run.series = {**series({k: v for k, v in prune.items() if k != "per_matrix"}, "prune"),
                      **series(recovery, "recovery")}  # fmt: skip
    run.artifacts = _artifacts(run_dir, result)
    return run


def _artifacts(run_dir: Path, result: dict | None) -> list[Path]:
    """metrics.json, the Hydra config and overrides, the job log, plots, the saved model's card."""
    if result and not (run_dir / "curves.png").exists():
        try:
            from prunebench.report import curves_plot

            curves_plot([{**result, "_dir": str(run_dir)}], run_dir / "curves.png")  # None without curves
        except Exception as err:  # noqa: BLE001 - a plot is a nicety; the numbers are logged anyway
            log.warning("tracking: no curves.png (%s)", _line(err))
    found = [run_dir / "metrics.json", run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "overrides.yaml"]
    found += sorted(run_dir.glob("*.log")) + sorted(run_dir.glob("*.png")) + [run_dir / "model" / "README.md"]
    return [p for p in found if p.is_file()]


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------- the trackers
class MLflow:
    """MLflow tracking (mlflow.org): params, metrics (series with their steps), tags and artifacts
    through `MlflowClient`. The default store is the one MLflow itself defaults to, a SQLite file
    `<root>/mlflow.db` beside the runs, with artifacts under `<root>/mlruns`: `cd <root> && mlflow ui`
    opens it as is (creating a fresh one runs MLflow's schema migrations once, a few seconds). Any
    other URI (sqlite:///..., file:, http://) is used as given."""

    def __init__(self, name: str = "mlflow", tracking_uri: str | None = None, experiment: str | None = None):
        self.name, self.tracking_uri, self.experiment = name, tracking_uri, experiment

    def log(self, run: Run) -> str:
        root = run.root.resolve()
        uri = self.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        if uri.startswith("file:") or "://" not in uri:  # a file store the user named: MLflow 3's opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if uri.startswith(("http://", "https://")):  # each request bounded: MLflow's defaults retry for minutes
            for var, value in (("TIMEOUT", "10"), ("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1")):
                os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{var}", value)
        # The default store's artifacts beside it, not in MLflow's ./mlruns of the current directory.
        artifacts = None if self.tracking_uri else (root / "mlruns").as_uri()
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        client = MlflowClient(tracking_uri=uri)
        name = self.experiment or run.group
        found = client.get_experiment_by_name(name)
        exp = found.experiment_id if found else _create_experiment(client, name, artifacts)
        mrun = client.create_run(exp, run_name=run.name)
        rid, now = mrun.info.run_id, int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in run.metrics.items()]
        metrics += [Metric(k, v, now, s) for k, pts in run.series.items() for s, v in pts]
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in run.params.items()]
        tags = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in run.tags.items()]
        try:
            client.log_batch(rid, metrics=metrics, params=params, tags=tags)
            for path in run.artifacts:
                rel = path.parent.relative_to(run.run_dir)
                client.log_artifact(rid, str(path), None if str(rel) == "." else str(rel))
        finally:
            client.set_terminated(rid, "FAILED" if run.error else "FINISHED")
        return f"run {rid} in experiment '{name}' at {uri}"


def _create_experiment(client, name: str, artifacts: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    location = artifacts and artifacts + "/" + re.sub(r"[^\w.-]+", "_", name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a parallel sweep job created it first
        return client.get_experiment_by_name(name).experiment_id


class TensorBoard:
    """TensorBoard event files (torch.utils.tensorboard.SummaryWriter): each metric as a scalar at
    step 0, each series at its steps, the config as text and as HParams (the HParams tab compares
    the jobs of a sweep). Written into the run directory by default, beside metrics.json."""

    def __init__(self, name: str = "tensorboard", log_dir: str | None = None):
        from prunebench.cache import output_folder

        self.name, self.log_dir = name, output_folder(log_dir, "logger.log_dir") if log_dir else None

    def log(self, run: Run) -> str:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if self.log_dir is None:
            where = run.run_dir
        elif self.log_dir.is_absolute():  # a shared log dir: one subfolder per run, as the runs are laid out
            where = self.log_dir / run.run_dir.relative_to(run.root)
        else:  # a relative output folder lands inside the run dir (issue 23)
            where = run.run_dir / self.log_dir
        writer = SummaryWriter(log_dir=str(where))
        try:
            for k, v in run.metrics.items():
                writer.add_scalar(k, v, 0)
            for k, pts in run.series.items():
                for s, v in pts:
                    writer.add_scalar(k, v, s)
            text = OmegaConf.to_yaml(OmegaConf.create(run.config))
            writer.add_text("config", "    " + text.replace("\n", "\n    "))  # Markdown code block
            writer.add_text("run", "  \n".join(f"{k}: {v}" for k, v in run.tags.items()))
            # add_hparams would open a second run directory; write its three summaries into this one.
            # HParams only pick up metrics already logged as scalars, which all of these are.
            for summary in hparams(run.params, dict.fromkeys(run.metrics, 0.0)):
                writer.file_writer.add_summary(summary)
        finally:
            writer.close()
        return f"event files in {where}"


class WandB:
    """Weights & Biases (wandb.ai): the nested config, each series as history rows (one row per step,
    all series at that step), metrics in the run summary, artifacts copied into the run's files.
    `mode: offline` by default: nothing leaves the machine until `wandb sync <dir>/wandb/offline-run-*`."""

    MODES = ("offline", "online", "disabled")

    def __init__(
        self,
        name: str = "wandb",
        mode: str = "offline",
        project: str = "prunebench",
        group: str | None = None,
        dir: str | None = None,
    ):
        if mode not in self.MODES:
            raise PrunebenchError(f"logger.mode={mode!r} must be one of {', '.join(self.MODES)}")
        from prunebench.cache import output_folder

        self.name, self.mode, self.project, self.group = name, mode, project, group
        self.dir = output_folder(dir, "logger.dir") if dir else None  # relative: inside the run dir

    def log(self, run: Run) -> str:
        import wandb

        where = run.run_dir / self.dir if self.dir else run.run_dir  # an absolute dir replaces the run dir
        where.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True)
        # W&B's own cache, config, data and artifact folders (its service's debug log lands in the cache
        # one) default to ~/.cache, ~/.config, ~/.local/share and ./artifacts: kept beside the run instead.
        # Variables the user set win; the service process reads them once, when the first run starts it.
        home = where / "wandb"
        for var, sub in (("CACHE", "cache"), ("CONFIG", "config"), ("DATA", "data"), ("ARTIFACT", "artifacts")):
            os.environ.setdefault(f"WANDB_{var}_DIR", str(home / sub))
        wrun = wandb.init(
            mode=self.mode,
            dir=str(where),
            project=self.project,
            group=self.group or run.group,
            name=run.name,
            config=run.config,
            tags=[run.tags["status"]],
            settings=settings,
        )
        try:
            steps = sorted({s for pts in run.series.values() for s, _ in pts})
            rows = {s: {} for s in steps}
            for k, pts in run.series.items():
                for s, v in pts:
                    rows[s][k] = v
            for s in steps:
                wrun.log(rows[s], step=s)
            wrun.summary.update({**run.metrics, **{f"tag/{k}": v for k, v in run.tags.items()}})
            files = Path(wrun.dir)
            for path in run.artifacts:
                target = files / path.relative_to(run.run_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                wrun.save(str(target), base_path=str(files), policy="now")
        finally:
            wrun.finish(exit_code=1 if run.error else 0)
        return f"{self.mode} run {wrun.id} in {Path(wrun.dir).parent}"


# ---------------------------------------------------------------------------------------------- reachability
CONNECT_S = 3.0  # the one connection attempt before a run
LOG_LIMIT_S = 120.0  # a whole remote log call (params, metrics, artifacts); then the job goes on without it
_UNREACHABLE: dict[str, str] = {}  # tracker URL -> why, found once per process: a sweep warns once, never waits


def endpoint(node) -> str | None:
    """The network URL a tracker config talks to (an MLflow http(s) server, W&B online), or None for
    the local stores (files, SQLite, TensorBoard event files, W&B offline)."""
    target = str(node.get("_target_", ""))
    if target.endswith(".MLflow"):
        uri = str(node.get("tracking_uri") or "")
        return uri if uri.startswith(("http://", "https://")) else None
    if target.endswith(".WandB") and node.get("mode", "offline") == "online":
        return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return None


def _connect(url: str, timeout: float = CONNECT_S) -> str | None:
    """None when a TCP connection to the URL's host opens within `timeout`, else why not."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        return type(err).__name__ if isinstance(err, TimeoutError) else _line(err)
    return None


def preflight(cfg: DictConfig | dict) -> bool:
    """Check a remote tracker once, before the run (one connection attempt of CONNECT_S seconds):
    when it is unreachable, ONE warning now, and the run (every job of a sweep in this process) is
    not logged there instead of stalling on the tracker's retries after metrics.json is written.
    False when the tracker was found unreachable."""
    node = cfg.get("logger") if cfg is not None else None
    url = endpoint(node) if node and "_target_" in node else None
    if url is None:
        return True
    if url not in _UNREACHABLE and (why := _connect(url)) is not None:
        _UNREACHABLE[url] = why
        log.warning(
            "logger=%s: %s is unreachable (%s); this run is not logged there, metrics.json is written as usual",
            node.get("name", "logger"), url, why,
        )  # fmt: skip
    return url not in _UNREACHABLE


def _bounded(call, url: str, limit: float):
    """`call()` in a daemon thread, waited for at most `limit` seconds: a tracker that stops answering
    mid-run costs the job that long at most (the thread is abandoned; the tracker is then skipped)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's handler
            box["error"] = err

    thread = threading.Thread(target=target, name="prunebench-tracker", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        _UNREACHABLE[url] = f"no answer within {limit:.0f} s"
        raise TimeoutError(f"{url} gave no answer within {limit:.0f} s; later jobs skip it")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------------- entry points
def _log(cfg: DictConfig | dict, result: dict | None, run_dir: Path, error: str | None) -> str | None:
    node = cfg.get("logger") if cfg is not None else None
    if not node or "_target_" not in node:
        return None
    name = node.get("name", "logger")
    url = endpoint(node)
    if url is not None and not preflight(cfg):
        return None  # warned once already (before the run)
    try:
        from prunebench.config import instantiate

        tracker = instantiate(OmegaConf.create(node) if isinstance(node, dict) else node)
        run = describe(cfg, result, run_dir, error)
        where = tracker.log(run) if url is None else _bounded(lambda: tracker.log(run), url, LOG_LIMIT_S)
    except ImportError as err:
        extra = EXTRAS.get(name, name)
        log.warning("logger=%s skipped: %s (pip install prunebench[%s]); metrics.json is complete", name, err, extra)
        return None
    except Exception as err:  # noqa: BLE001 - a tracker never fails the run: metrics.json is already written
        log.warning("logger=%s failed: %s; metrics.json is complete", name, _line(err))
        return None
    log.info("logger=%s: %s", name, where)
    return where


def log_run(cfg: DictConfig | dict, result: dict, run_dir: Path) -> str | None:
    """Log a finished job (`result` = what pipeline.run returned / metrics.json) to `cfg.logger`.
    Returns where it went, or None (logger=none, or the tracker failed: one warning, never an error)."""
    return _log(cfg, result, Path(run_dir), None)


def log_failure(cfg: DictConfig | dict, run_dir: Path, error: BaseException | str) -> str | None:
    """Log a failed job (its config, the error, its log file) as a failed run, so a sweep's tracker
    view shows which points failed and why."""
    return _log(cfg, None, Path(run_dir), _line(error) if isinstance(error, BaseException) else str(error))
