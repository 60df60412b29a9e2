"""The prunebench command line: `run`, `ls`, `report`. Typer owns the verbs; Hydra owns the knobs."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import typer

from prunebench import PrunebenchError
from prunebench.config import CONF_DIR, GROUPS, group_options

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


def _check_group_choice(group: str, value) -> None:
    options = group_options(group)
    for v in value if isinstance(value, list) else [value]:
        if v is not None and str(v) not in options:
            raise PrunebenchError(f"unknown {group} '{v}'; choose one of: {', '.join(options)} (prunebench ls {group})")


def check_overrides(overrides: list[str]) -> int:
    """Compose every point of the sweep and run the config checks, before any job starts or any
    model loads. Returns the number of points checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from prunebench.config import validate

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise PrunebenchError(" ".join(str(err).split())) from None
    choices = []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra"):
            continue
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
        except Exception:  # noqa: BLE001 - interval/optuna sweeps: checked by each job instead
            return 0
        if key in GROUPS and o.is_sweep_override():
            for v in values:
                _check_group_choice(key, v)
        elif key in GROUPS and not o.is_delete():
            _check_group_choice(key, o.value())
        prefix = o.get_key_element()
        choices.append([o.input_line] if values == [None] else [f"{prefix}={v}" for v in values])
    points = list(itertools.islice(itertools.product(*choices), _MAX_CHECKED))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for point in points:
            try:
                cfg = compose("config", overrides=list(point))
                validate(cfg, build=True)
            except (HydraException, OmegaConfBaseException) as err:
                raise PrunebenchError(" ".join(str(err).split("\n")[0:2])) from None
    return len(points)


def _check_output_dirs(overrides: list[str]) -> None:
    """A rerun never overwrites an earlier run: refuse a run/sweep dir that already holds results."""
    for o in overrides:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if o.startswith(key):
                folder = Path(o[len(key) :])
                if folder.is_dir() and any(folder.rglob("metrics.json")):
                    raise PrunebenchError(f"{folder} already holds results; choose a new {key[:-1]}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def run(ctx: typer.Context) -> None:
    """Run prune -> recover -> evaluate. Arguments are Hydra's: overrides (pruner=wanda
    pruner.sparsity=0.6), -m for sweeps, --cfg job to print the config, hydra.run.dir=..."""
    args = list(ctx.args)
    if args[:1] in (["--help"], ["-h"]):
        typer.echo(ctx.get_help())
        typer.echo("\nHydra's own help: prunebench run --hydra-help; options: prunebench ls")
        raise typer.Exit(0)
    overrides = split_args(args)
    try:
        _check_output_dirs(overrides)
        check_overrides(overrides)
    except PrunebenchError as err:
        _fail(str(err))
    from prunebench.app import task

    sys.argv = ["prunebench", *args]
    task()


data_app = typer.Typer(no_args_is_help=False, help="Datasets: where each resolves, and fetching them once.")
app.add_typer(data_app, name="data")


@data_app.callback(invoke_without_command=True)
def data(ctx: typer.Context) -> None:
    """List where each corpus resolves (data roots: $PRUNEBENCH_DATA, ./data, ../shared/data, then the Hub)."""
    if ctx.invoked_subcommand is None:
        from prunebench.data.text import LOCAL, where

        for name in LOCAL:
            typer.echo(f"{name:<16} {where(name)}")


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
    for g in [group] if group else GROUPS:
        typer.echo(f"{g}:")
        options = group_options(g)
        width = max((len(o) for o in options), default=0)
        for option, desc in options.items():
            typer.echo(f"  {option:<{width}}  {desc}")


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
    runs = rep.collect(folder)
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


def _force(arg: str) -> str:
    """`key=value` -> `++key=value` for a config key (not a group choice, a flag or hydra.*)."""
    key = arg.split("=", 1)[0]
    if "=" not in arg or arg.startswith(("+", "~", "-", "hydra.", "experiment=")) or key in GROUPS:
        return arg
    return "++" + arg


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def reproduce(
    ctx: typer.Context,
    paper: str = typer.Argument(..., help="a folder of conf/experiment: gblm, wanda, ..."),
    scale: str = typer.Option("embedded", help="embedded (SmolLM2 on this machine) or paper (the published models)"),
) -> None:
    """Run every experiment config of PAPER at SCALE as one sweep, then print the reproduced table
    beside the paper's numbers. Extra arguments are Hydra overrides/flags for every job."""
    import datetime

    cells = [o for o in group_options("experiment") if o.startswith(f"{paper}/{scale}/")]
    if not cells:
        known = sorted({o.rsplit("/", 1)[0] for o in group_options("experiment") if o.count("/") == 2})
        _fail(f"no experiments for '{paper}' at scale '{scale}'; available: {', '.join(known)}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    sweep_dir = Path("multirun") / f"reproduce-{paper}-{scale}" / stamp
    args = ["-m", "experiment=" + ",".join(cells), f"hydra.sweep.dir={sweep_dir}", *ctx.args]
    try:
        check_overrides(split_args(args))
    except PrunebenchError as err:
        _fail(str(err))
    # Hydra composes a multirun's master config without the sweep (so without any experiment's pruner):
    # a knob only the experiment brings ("pruner.train_limit") must be force-set there; each point was
    # checked above with the plain override, so a misspelt key still stops.
    args = [_force(a) for a in args]
    typer.echo(f"reproduce {paper} at scale {scale}: {len(cells)} runs into {sweep_dir}")
    from prunebench import report as rep
    from prunebench.app import task

    sys.argv = ["prunebench", *args]
    task()
    runs = rep.collect(sweep_dir)
    if not runs:
        _fail(f"no run of {paper}/{scale} completed; see the logs under {sweep_dir}")
    for stem, (header, rows) in _views(rep, runs, sweep_dir, "wikitext2/ppl").items():
        rep.write(header, rows, sweep_dir, stem)
        typer.echo(f"\n{stem}:\n{rep.markdown(header, rows)}")
    typer.echo(f"\n{len(runs)}/{len(cells)} runs complete; tables written to {sweep_dir}")


if __name__ == "__main__":
    app()
