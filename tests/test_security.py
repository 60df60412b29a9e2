"""No code from config input: only registered prunebench components are instantiated, Hydra's own hooks
(callbacks, launchers, sweepers, logging) come from allow-lists, and --config-dir files are checked like
conf/. Every attack writes a marker file if it runs; the marker must never appear."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from prunebench import PrunebenchError
from prunebench.cli import check_overrides, config_dirs
from prunebench.config import instantiate
from prunebench.registry import check_hydra, check_target, registry
from tests.test_cli import prunebench

TINY = ["experiment=smoke/tiny"]


def one_error_line(r) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    return errors[0]


def test_the_registry_is_the_shipped_configs():
    reg = registry()
    assert "prunebench.pruners.wanda.Wanda" in reg and "prunebench.evals.perplexity.Perplexity" in reg
    assert all(t.startswith("prunebench.") for t in reg)
    check_target("prunebench.pruners.laco.LaCo", "pruner")  # registered: accepted


@pytest.mark.parametrize(
    "target",
    [
        "prunebench.config.Path.touch",  # attribute traversal to pathlib
        "prunebench.models.os.system",  # a module's `os` attribute
        "prunebench.pruners.laco.torch.save",
        "prunebench.PrunebenchError",  # a prunebench object, but not a registered component
        "os.system",
        "${oc.env:EVIL}",  # an interpolation resolves later to anything: refused as written
    ],
)
def test_unregistered_targets_are_refused_without_calling_them(target, tmp_path, monkeypatch):
    import os

    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    mark = tmp_path / "MARK"
    node = OmegaConf.create({"_target_": target, "_args_": [str(mark)]})
    with pytest.raises(PrunebenchError, match="refusing to instantiate"):
        instantiate(node)
    with pytest.raises(PrunebenchError, match="refusing to instantiate"):
        check_overrides([*TINY, f"+eval.x={{_target_: '{target}', _args_: ['{mark}']}}"])
    assert not mark.exists() and not called


def test_nested_and_added_targets_are_checked(tmp_path):
    mark = tmp_path / "MARK"
    evil = f"{{_target_: prunebench.config.Path.touch, _args_: ['{mark}']}}"
    for override in (f"+pruner.hook={evil}", f"+recovery.x.y={evil}", f"+extra=[{evil}]"):
        with pytest.raises(PrunebenchError, match="refusing"):
            check_overrides([*TINY, override])
    assert not mark.exists()


@pytest.mark.parametrize(
    "section,needle",
    [
        ({"callbacks": {"x": {"_target_": "os.system", "_args_": ["touch M"]}}}, "hydra.callbacks.x"),
        ({"launcher": {"_target_": "os.system"}}, "hydra.launcher._target_"),
        ({"sweeper": {"_target_": "prunebench.models.os.system"}}, "hydra.sweeper._target_"),
        (
            {
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "sampler": {"_target_": "os.system"},
                }
            },  # fmt: skip
            "hydra.sweeper.sampler",
        ),
        ({"sweeper": {"custom_search_space": "os.system"}}, "custom_search_space"),
        ({"job_logging": {"handlers": {"x": {"class": "os.system"}}}}, "hydra.job_logging.handlers.x.class"),
        ({"hydra_logging": {"formatters": {"x": {"()": "subprocess.call"}}}}, "formatters.x.()"),
        ({"job": {"env_set": {"LD_PRELOAD": "/tmp/evil.so"}}}, "LD_PRELOAD"),
    ],
)
def test_hydra_section_allow_lists(section, needle):
    with pytest.raises(PrunebenchError, match="refusing") as err:
        check_hydra(OmegaConf.create(section))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_hydra_plugins_and_hydra_overrides_pass():
    check_hydra(
        OmegaConf.create(
            {
                "callbacks": {},
                "launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"},
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "sampler": {"_target_": "optuna.samplers.TPESampler"},
                },  # fmt: skip
                "job_logging": {"handlers": {"console": {"class": "logging.StreamHandler"}}},
                "job": {"env_set": {"OMP_NUM_THREADS": "1"}},
            }
        )
    )
    assert check_overrides([*TINY, "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]) == 1


def test_hydra_callbacks_override_is_checked_in_process(tmp_path):
    mark = tmp_path / "MARK"
    with pytest.raises(PrunebenchError, match="hydra.callbacks"):
        check_overrides([*TINY, f"+hydra.callbacks.x={{_target_: os.system, _args_: ['touch {mark}']}}"])
    assert not mark.exists()


def test_flags_that_bypass_the_checks_are_refused(tmp_path):
    for args, needle in (
        (["-cp", str(tmp_path)], "--config-path"),
        (["--config-name=evil"], "--config-name"),
        (["--experimental-rerun", str(tmp_path / "config.pickle")], "pickle"),
        (["--config-d", str(tmp_path / "nope")], "--config-dir"),  # argparse abbreviations count too
    ):
        with pytest.raises(PrunebenchError, match=needle):
            config_dirs(args)
    assert config_dirs([f"--config-dir={tmp_path}", "-m"]) == (tmp_path,)


def _evil_dir(tmp_path, mark):
    """An extra config folder: an eval option with a traversal target, and an experiment that adds a
    Hydra callback (a `# @package _global_` file may set hydra.*)."""
    d = tmp_path / "evil"
    (d / "eval").mkdir(parents=True)
    (d / "experiment").mkdir()
    (d / "eval" / "evil.yaml").write_text(
        f"# an evaluator\nevil:\n  _target_: prunebench.config.Path.touch\n  _args_: ['{mark}']\n"
    )
    (d / "experiment" / "evil.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/smoke/tiny\n"
        f"hydra:\n  callbacks:\n    x:\n      _target_: os.system\n      _args_: ['touch {mark}']\n"
    )
    return d


def test_config_dir_yaml_is_checked_in_process(tmp_path):
    mark = tmp_path / "MARK"
    d = _evil_dir(tmp_path, mark)
    with pytest.raises(PrunebenchError, match="prunebench.config.Path.touch"):
        check_overrides([*TINY, "eval=[wikitext2,evil]"], (d,))
    with pytest.raises(PrunebenchError, match="hydra.callbacks"):
        check_overrides(["experiment=evil"], (d,))
    with pytest.raises(PrunebenchError, match="unknown experiment 'evil'"):  # without --config-dir: not an option
        check_overrides(["experiment=evil"])
    assert not mark.exists()


@pytest.mark.parametrize("attack", ["callback", "config_dir"])  # a few seconds each: one subprocess
def test_cli_attacks_never_run(attack, tmp_path):
    """The real command line: refused before Hydra runs anything (exit 2, one line, no marker)."""
    mark = tmp_path / "MARK"
    if attack == "callback":
        args = [*TINY, f"+hydra.callbacks.x={{_target_: os.system, _args_: ['touch {mark}']}}"]
    else:
        args = ["--config-dir", str(_evil_dir(tmp_path, mark)), "experiment=evil"]
    r = prunebench("run", *args, f"hydra.run.dir={tmp_path / 'out'}", cache=tmp_path / "cache", cwd=tmp_path)
    assert "refusing" in one_error_line(r) and r.returncode == 2
    assert not mark.exists() and not (tmp_path / "out" / "metrics.json").exists()
