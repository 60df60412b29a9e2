"""The prunebench command line: `run` (prune -> recover -> evaluate), `ls` (config groups and options),
`report` (tables from metrics.json), `reproduce` (a paper's table as one sweep), `data` (datasets).
Typer owns the verbs; Hydra owns the knobs."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
from pathlib import Path

import typer

from prunebench import PrunebenchError
from prunebench.config import GROUPS, group_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# Hydra flags that take a value (the value is not an override).
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_MAX_CHECKED = 256  # sweep points composed up front; bigger sweeps are checked job by job


def _fail(message: str, code: int = 2):
    if os.environ.get("RANK", "0") == "0":  # a multi-process job: every rank refuses, rank 0 alone says why
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def split_args(args: list[str]) -> list[str]:
    """The override tokens among Hydra's command-line arguments."""
    overrides, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif arg == "--info":
            skip = i + 1 < len(args) and args[i + 1] in _INFO_TOPICS
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _check_group_choice(group: str, value, dirs: tuple[Path, ...] = ()) -> None:
    options = group_options(group, dirs)
    for v in value if isinstance(value, list) else [value]:
        if v is not None and str(v) not in options:
            raise PrunebenchError(f"unknown {group} '{v}'; choose one of: {', '.join(options)} (prunebench ls {group})")


def config_dirs(args: list[str]) -> tuple[Path, ...]:
    """The extra config folders (--config-dir) among Hydra's arguments, read with Hydra's own argument
    parser (so abbreviations and `--flag=value` count as Hydra counts them). Flags that would load a
    config past the checks are refused: another primary config (--config-path, --config-name) and
    --experimental-rerun (a pickle, which runs code when loaded)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        ns, _ = parser.parse_known_args(args)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - argparse's own message, on one line
        raise PrunebenchError(f"bad Hydra arguments: {' '.join(str(err).split())}") from None
    for flag, value in (("--config-path", ns.config_path), ("--config-name", ns.config_name)):
        if value is not None:
            raise PrunebenchError(
                f"{flag} {value}: prunebench runs conf/config.yaml; add your own configs with --config-dir DIR"
            )
    if ns.experimental_rerun is not None:
        raise PrunebenchError("--experimental-rerun loads a pickle (which can run code); rerun with the overrides")
    if ns.config_dir is None:
        return ()
    folder = Path(ns.config_dir)
    if not folder.is_dir():
        raise PrunebenchError(f"--config-dir {folder} is not a directory")
    return (folder,)


MAX_OVERRIDE = 2000  # characters: a list of 80 layer indices is ~300; longer belongs in a config file


def check_overrides(overrides: list[str], dirs: tuple[Path, ...] = ()) -> int:
    """Compose every point of the sweep and run the config checks, before any job starts or any
    model loads: registered `_target_`s only, Hydra's own section (callbacks, launcher, sweeper)
    from its allow-lists, every knob. `dirs` are --config-dir folders, composed and checked like
    conf/. Returns the number of points checked."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from prunebench.config import fit_quick_profile, initialize, validate
    from prunebench.registry import check_hydra

    if long := next((o for o in overrides if len(o) > MAX_OVERRIDE), None):
        raise PrunebenchError(
            f"an override of {len(long):,} characters ({long[:40]}...) is longer than {MAX_OVERRIDE:,};"
            " put long values in a config file (--config-dir)"
        )
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        where = f"override {err.override!r}: " if isinstance(err, OverrideParseException) else ""
        raise PrunebenchError(where + " ".join(str(err).split())) from None
    choices = []  # Hydra's own settings (hydra.*, hydra/launcher=...) too: they are composed and checked
    for o in parsed:
        key = o.key_or_group
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
        except Exception:  # noqa: BLE001 - interval/optuna sweeps: each job checks its value; the rest is checked here
            continue
        if key in GROUPS and o.is_sweep_override():
            for v in values:
                _check_group_choice(key, v, dirs)
        elif key in GROUPS and not o.is_delete():
            _check_group_choice(key, o.value(), dirs)
        prefix = o.get_key_element()
        choices.append([o.input_line] if values == [None] else [f"{prefix}={v}" for v in values])
    points = list(itertools.islice(itertools.product(*choices), _MAX_CHECKED))
    with initialize(dirs):
        for point in points:
            try:
                cfg = compose("config", overrides=list(point), return_hydra_config=True)
                check_hydra(cfg.get("hydra"))
                with open_dict(cfg):
                    del cfg["hydra"]
                fit_quick_profile(cfg, list(point))
                validate(cfg, build=True)
            except (HydraException, OmegaConfBaseException) as err:
                raise PrunebenchError(" ".join(str(err).split("\n")[0:2])) from None
    return len(points)


def _check_output_dirs(overrides: list[str]) -> list[tuple[str, Path]]:
    """A rerun never overwrites an earlier run: refuse a run/sweep dir that already holds results.
    Returns the (knob, folder) pairs the command line names, which `run` locks for the whole run."""
    named = []
    for o in overrides:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if o.startswith(key):
                folder = Path(o[len(key) :])
                if folder.is_dir() and any(folder.rglob("metrics.json")):
                    raise PrunebenchError(f"{folder} already holds results; choose a new {key[:-1]}")
                if key == "hydra.run.dir=":
                    _check_lineage(folder, overrides)
                named.append((key[:-1], folder))
    return named


def _check_lineage(folder: Path, overrides: list[str]) -> None:
    """Training checkpoints in a run dir belong to the command that wrote them (its .hydra/overrides.yaml):
    only that command resumes them. Checked before Hydra starts, because Hydra rewrites .hydra/ at once:
    a refused rerun must leave the folder's record of its checkpoints' command as it was."""
    checkpoints = sorted((folder / "checkpoints").glob("step-*.pt"))
    if not checkpoints:
        return
    if "recovery.resume=never" in overrides:  # start over: the earlier run's checkpoints and record move aside
        from prunebench.recovery.resume import set_aside

        set_aside(folder, record=True)
        return
    recorded = folder / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return
    import yaml

    try:
        before = [str(o) for o in yaml.safe_load(recorded.read_text(encoding="utf-8")) or []]
    except (yaml.YAMLError, OSError, TypeError):
        return
    # the checkpoint policy itself may change between the interrupted run and its resume
    # (hydra.* overrides are not in overrides.yaml: Hydra records them in hydra.yaml)
    policy = ("recovery.resume=", "recovery.keep_checkpoints=", "recovery.checkpoint_every=", "hydra.", "hydra/")
    same = [o for o in before if not o.startswith(policy)], [o for o in overrides if not o.startswith(policy)]
    if sorted(same[0]) != sorted(same[1]):
        differ = sorted(set(same[0]) ^ set(same[1]))
        raise PrunebenchError(
            f"{folder} holds training checkpoints written by another command"
            f" (overrides differ: {', '.join(differ[:4])});"
            " rerun that command to resume them, add recovery.resume=never to start over (they are kept aside),"
            " or choose a new hydra.run.dir"
        )


def _rank_overrides(overrides: list[str]) -> list[str]:
    """Hydra settings for one process of a multi-process job (torchrun, accelerate launch, SLURM):
    all ranks share one run dir (named after the launcher's job id, since each rank's clock differs),
    and only rank 0 writes Hydra's .hydra/ folder and log there."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    extra = []
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or os.environ["MASTER_PORT"]
        extra.append(f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/dist-{job}_${{name}}")
    if int(os.environ.get("RANK", "0")) > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


@contextlib.contextmanager
def _world_size(nproc: int | None):
    """WORLD_SIZE set to the processes `--nproc` will start, while the config is checked."""
    if not nproc or nproc == 1:
        yield
        return
    os.environ["WORLD_SIZE"] = str(nproc)
    try:
        yield
    finally:
        del os.environ["WORLD_SIZE"]


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def run(ctx: typer.Context) -> None:
    """Run prune -> recover -> evaluate. Arguments are Hydra's: overrides (pruner=wanda
    pruner.sparsity=0.6), -m for sweeps, --cfg job to print the config, hydra.run.dir=...; and
    --nproc N: N processes on this node (torchrun --standalone --nproc_per_node N, checked once)."""
    args = list(ctx.args)
    if args[:1] in (["--help"], ["-h"]):
        typer.echo(ctx.get_help())
        typer.echo("\nHydra's own help: prunebench run --hydra-help; options: prunebench ls")
        raise typer.Exit(0)
    from prunebench.launch import launch, split_nproc, under_launcher

    try:
        nproc, args = split_nproc(args)
        if nproc and under_launcher():
            raise PrunebenchError("--nproc starts the processes itself: drop it under torchrun, accelerate or SLURM")
    except PrunebenchError as err:
        _fail(str(err))
    overrides = split_args(args)
    try:
        named = _check_output_dirs(overrides)
        # checked once here, for the number of processes that will run (world-size rules: global_batch)
        with _world_size(nproc):
            check_overrides(overrides, config_dirs(args))
    except PrunebenchError as err:
        _fail(str(err))
    if nproc and nproc > 1:
        raise typer.Exit(launch(nproc, args))
    from prunebench.app import busy_message, run_task
    from prunebench.cache import RunDirBusy, run_dir_lock

    sys.argv = ["prunebench", *args, *_rank_overrides(overrides)]
    with contextlib.ExitStack() as held:  # a folder named on the command line: locked before Hydra writes there
        for knob, folder in named if os.environ.get("RANK", "0") == "0" else ():  # rank 0 locks for all ranks
            try:
                held.enter_context(run_dir_lock(folder))
            except RunDirBusy:
                _fail(busy_message(folder, knob))
        run_task()


data_app = typer.Typer(no_args_is_help=False, help="Datasets: where each resolves, and fetching them once.")
app.add_typer(data_app, name="data")


@data_app.callback(invoke_without_command=True)
def data(ctx: typer.Context) -> None:
    """List where each dataset file resolves (data roots: $PRUNEBENCH_DATA, ./data, ../shared/data, then
    the Hub) and verify it against its SOURCE.md SHA-256: ok | mismatch | missing | unverified | hub."""
    if ctx.invoked_subcommand is None:
        from prunebench.data.labelled import FILES
        from prunebench.data.text import LOCAL, survey
        from prunebench.evals.opencompass import FILES as TASKS

        tasks = {**TASKS, "piqa_labels": "piqa/valid-labels.lst"}
        try:
            rows = survey({**LOCAL, **FILES, **tasks})
        except PrunebenchError as err:
            _fail(str(err))
        for r in rows:
            note = f"  (expected {r['expected'][:12]}…, found {r['actual'][:12]}…)" if r["status"] == "mismatch" else ""
            typer.echo(f"{r['name']:<24} {r['status']:<10} {r['where']}{note}")
        bad = [r["name"] for r in rows if r["status"] in ("mismatch", "missing")]
        if bad:
            _fail(f"{len(bad)} data file(s) missing or not matching their SOURCE.md: {', '.join(bad)}", code=1)


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="wikitext2 | c4"),
    root: Path = typer.Option(Path("data"), help="data root to write into (read first: $PRUNEBENCH_DATA, ./data)"),
) -> None:
    """Download a dataset once from the Hugging Face Hub into the data root (for offline compute nodes)."""
    from prunebench.data.text import fetch

    try:
        for path in fetch(name, root):
            typer.echo(f"wrote {path}")
    except PrunebenchError as err:
        _fail(str(err))


@app.command("ls")
def ls(group: str = typer.Argument(None, help="one config group: " + ", ".join(GROUPS))) -> None:
    """List config groups and their options, with a one-line description each."""
    if group is not None and group not in GROUPS:
        _fail(f"unknown config group '{group}'; choose one of: {', '.join(GROUPS)}")
    columns = max(shutil.get_terminal_size((100, 24)).columns, 60)
    for g in [group] if group else GROUPS:
        typer.echo(f"{g}:")
        options = group_options(g)
        if g == "experiment" and group is None:  # ~140 cells: one line per paper table, cells on request
            options = _tables(options)
        width = max((len(o) for o in options), default=0)
        for option, desc in options.items():
            line = f"  {option:<{width}}  {desc}"
            typer.echo(line if len(line) <= columns else line[: columns - 1] + "…")
    if group is None:
        typer.echo("(prunebench ls experiment lists every cell; prunebench ls GROUP one group)")


def _tables(options: dict[str, str]) -> dict[str, str]:
    """Experiment cells grouped by paper table (`<paper>/<scale>/`): one entry each, with its count."""
    tables: dict[str, list[str]] = {}
    for option in options:
        paper, _, rest = option.partition("/")
        scale = rest.split("/", 1)[0] if "/" in rest else ""
        tables.setdefault(f"{paper}/{scale}/*" if scale else option, []).append(option)
    out = {}
    for key, cells in tables.items():
        if len(cells) == 1 and key == cells[0]:
            out[key] = options[key]
        else:
            paper, scale = key.split("/")[:2]
            out[key] = f"{len(cells)} cells; the table: prunebench reproduce {paper} --scale {scale}"
    return out


@app.command()
def report(
    folder: Path = typer.Argument(..., help="a run or sweep directory (searched for metrics.json)"),
    out: Path = typer.Option(None, help="where to write the tables (default: FOLDER)"),
    metric: str = typer.Option(None, help="metric of the pivot table and plot (default: the first)"),
    plot: bool = typer.Option(False, "--plot", help="also draw METRIC against sparsity per method (PNG)"),
) -> None:
    """Tabulate every metrics.json under FOLDER: one row per run, the method x pattern pivot (the
    papers' layout), and paper numbers beside reproduced ones; Markdown, CSV and LaTeX."""
    from prunebench import report as rep

    if not folder.is_dir():
        _fail(f"{folder} is not a directory; pass a run or sweep directory (e.g. multirun/2026-01-01/12-00-00)")
    try:
        runs = rep.collect(folder)
    except (ValueError, OSError, AttributeError) as err:  # a truncated, binary or foreign metrics.json
        _fail(f"a metrics.json under {folder} is unreadable ({type(err).__name__}); delete or restore it")
    if not runs:
        _fail(f"no complete metrics.json under {folder}; run `prunebench run` first")
    out = out or folder
    keys = rep.metric_keys(runs)
    if metric is not None and metric not in keys:
        _fail(f"--metric {metric} is not in these runs; choose one of: {', '.join(keys)}")
    metric = metric or (keys[0] if keys else None)
    written = []
    for stem, (header, rows) in _views(rep, runs, folder, metric).items():
        paths = rep.write(header, rows, out, stem)
        typer.echo(f"\n{stem}:\n{paths['md_text']}")
        written.append(paths["md"].with_suffix(".{csv,md,tex}"))
    if plot and metric:
        written.append(rep.plot(runs, metric, out / "report.png"))
    typer.echo("\nwrote " + ", ".join(str(p) for p in written))


def _views(rep, runs: list[dict], folder: Path, metric: str | None) -> dict:
    views = {"report": rep.runs_table(runs, folder)}
    if metric and len(runs) > 1 and len({r["config"]["model"]["name"] for r in runs}) == 1:
        views["pivot"] = rep.pivot_table(runs, metric)
    if any(r["config"].get("expected") for r in runs):
        views["paper"] = rep.paper_table(runs)
    views.update(rep.extra_views(runs, folder))  # Minitron's search candidates and rankings, where present
    return views


def remaining(cells: list[str], folder: Path) -> list[str]:
    """The experiment cells with no complete metrics.json under `folder` (a reproduce being resumed)."""
    from prunebench import report as rep

    done = {o.split("=", 1)[1] for r in rep.collect(folder) for o in r.get("overrides", [])
            if o.startswith("experiment=")}  # fmt: skip
    return [c for c in cells if c not in done]


def _force(arg: str) -> str:
    """`key=value` -> `++key=value` for a config key (not a group choice, a flag or hydra's own)."""
    key = arg.split("=", 1)[0]
    group = "/" in key or key.split("@")[0] in GROUPS  # hydra/launcher=joblib, model@x=...: groups
    if "=" not in arg or arg.startswith(("+", "~", "-", "hydra", "experiment=")) or group:
        return arg
    return "++" + arg


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def reproduce(
    ctx: typer.Context,
    paper: str = typer.Argument(..., help="a folder of conf/experiment: gblm, wanda, ..."),
    scale: str = typer.Option("embedded", help="embedded (SmolLM2 on this machine) or paper (the published models)"),
    resume: Path = typer.Option(None, help="an interrupted reproduce folder: run only its cells without a result"),
) -> None:
    """Run every experiment config of PAPER at SCALE as one sweep, then print the reproduced table
    beside the paper's numbers. Extra arguments are Hydra overrides/flags for every job.

    Embedded scale on a 2-core CPU (docs/results.md): gblm 16 min, laco ~30-40 min (9 cells with its baselines),
    bert_cls 35 min, sbert 74 min, minibridgebert 1.7 h, minitron 3.4 h. Paper scale needs the Hub and GPUs."""
    import datetime

    from prunebench import report as rep

    cells = [o for o in group_options("experiment") if o.startswith(f"{paper}/{scale}/")]
    if not cells:
        known = sorted({o.rsplit("/", 1)[0] for o in group_options("experiment") if o.count("/") == 2})
        _fail(f"no experiments for '{paper}' at scale '{scale}'; available: {', '.join(known)}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    root = resume or Path("multirun") / f"reproduce-{paper}-{scale}" / stamp
    total = len(cells)
    if resume is not None:  # a long table survives a stopped machine: finished cells are kept, not rerun
        if not resume.is_dir():
            _fail(f"--resume {resume} is not a directory; pass the folder an earlier reproduce printed")
        cells = remaining(cells, resume)
        typer.echo(f"resume {resume}: {total - len(cells)} of {total} cells complete")
    sweep_dir = root / f"resume-{stamp}" if resume is not None else root
    args = ["-m", "experiment=" + ",".join(cells), f"hydra.sweep.dir={sweep_dir}", *ctx.args]
    if cells:  # a resumed table may have nothing left to run: then only the tables are written
        try:
            check_overrides(split_args(args), config_dirs(args))
        except PrunebenchError as err:
            _fail(str(err))
    # Hydra composes a multirun's master config without the sweep (so without any experiment's pruner):
    # a knob only the experiment brings ("pruner.train_limit") must be force-set there; each point was
    # checked above with the plain override, so a misspelt key still stops.
    args = [_force(a) for a in args]
    typer.echo(f"reproduce {paper} at scale {scale}: {len(cells)} runs into {sweep_dir}")
    from prunebench.app import run_task

    if cells:
        from prunebench.app import busy_message
        from prunebench.cache import RunDirBusy, run_dir_lock

        sys.argv = ["prunebench", *args]
        try:
            with run_dir_lock(root):  # two `--resume` of one table would run its missing cells twice
                run_task()
        except RunDirBusy:
            _fail(busy_message(root, "--resume folder" if resume is not None else "sweep folder"))
    runs = rep.collect(root)
    if not runs:
        _fail(f"no run of {paper}/{scale} completed; see the logs under {root}")
    pivot = "wikitext2/ppl" if "wikitext2/ppl" in rep.metric_keys(runs) else None  # the GBLM/Wanda layout
    for stem, (header, rows) in _views(rep, runs, root, pivot).items():
        rep.write(header, rows, root, stem)
        typer.echo(f"\n{stem}:\n{rep.markdown(header, rows)}")
    # MiniBridgeBERT's MCC against parameters; recovery loss curves and search candidates (Minitron)
    plots = [rep.steps_plot(runs, root / "steps.png"), rep.curves_plot(runs, root / "curves.png")]
    if drawn := [str(p) for p in plots if p is not None]:
        typer.echo("plots: " + ", ".join(drawn))
    typer.echo(f"\n{len(runs)}/{total} runs complete; tables written to {root}")
    if len(runs) < total:
        typer.echo(f"finish the rest: prunebench reproduce {paper} --scale {scale} --resume {root}")


if __name__ == "__main__":
    app()
