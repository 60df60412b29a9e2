"""Every option of every config group composes; instantiable ones instantiate."""

import pytest
import yaml
from omegaconf import OmegaConf

from prunebench import PrunebenchError, models
from prunebench.config import CONF_DIR, GROUPS, group_options, instantiate, validate
from tests.conftest import compose_cfg

OPTIONS = [(g, o) for g in GROUPS for o in group_options(g)]
EXPERIMENTS = list(group_options("experiment"))
TABLES = sorted({e.rsplit("/", 1)[0] for e in EXPERIMENTS if e.count("/") == 2})  # <paper>/<scale>
EXPECTED_KEYS = ["paper", "table", "row", "column", "metric", "value", "tolerance", "source", "compare"]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), group


@pytest.mark.parametrize("group,option", OPTIONS)
def test_option_composes_and_instantiates(group, option):
    override = f"{group}=[{option}]" if group == "eval" else f"{group}={option}"
    cfg = compose_cfg(override)
    validate(cfg)
    if group in ("pruner", "recovery"):
        assert callable(instantiate(cfg[group]))
    if group == "eval":
        for node in cfg.eval.values():
            assert callable(instantiate(node))
    if group == "model":
        assert cfg.model.name == option
        if cfg.model.source == "random":
            model, tok = models.load(cfg.model, cache_dir="/nonexistent")
            assert model.config.num_hidden_layers == cfg.model.hf_config.num_hidden_layers


def test_eval_selects_several_and_none():
    assert list(compose_cfg("eval=[]").eval) == []
    assert list(compose_cfg("eval=[wikitext2]").eval) == ["wikitext2"]


def test_instantiate_refuses_foreign_targets():
    with pytest.raises(PrunebenchError, match="only targets under"):
        instantiate(OmegaConf.create({"_target_": "os.system", "command": "echo hi"}))
    with pytest.raises(PrunebenchError):
        instantiate(
            OmegaConf.create({"_target_": "prunebench.recovery.none.NoRecovery", "x": {"_target_": "os.getcwd"}})
        )


@pytest.mark.parametrize(
    "override,message",
    [
        ("pruner.sparsity=1.0", "outside"),
        ("pruner.sparsity=-0.1", "outside"),
        ("pruner.pattern=4:4", "N < M"),
        ("pruner.pattern=2x4", "N:M"),
        ("calib.seqlen=0", "positive"),
        ("calib.nsamples=-1", "positive"),
        ("eval.wikitext2.max_windows=0", "positive"),
    ],
)
def test_validate_rejects(override, message):
    with pytest.raises(PrunebenchError, match=message):
        validate(compose_cfg(override))


def test_experiment_values_override_the_primary_config():
    cfg = compose_cfg("experiment=gblm/paper/llama2-7b_gblm_4-8")
    assert cfg.expected.value == 8.63 and cfg.expected.metric == "wikitext2/ppl"
    assert cfg.model.name == "llama2-7b" and cfg.pruner.pattern == "4:8" and cfg.calib.seqlen == 2048
    assert cfg.eval.wikitext2.seqlen == 2048 and cfg.eval.wikitext2.max_windows is None
    assert compose_cfg("experiment=full_protocol").profile == "full"
    assert compose_cfg().expected is None


def _entries(expected) -> list:
    return list(expected) if OmegaConf.is_list(expected) else [expected]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_carries_its_paper_number(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    assert not OmegaConf.missing_keys(cfg), f"{experiment} leaves ??? of its _table unset"
    if experiment.count("/") == 2:  # <paper>/<scale>/<cell>: one cell of a paper's table
        assert cfg.expected, experiment
        for entry in _entries(cfg.expected):
            assert list(entry) == EXPECTED_KEYS, experiment
            assert entry.paper == experiment.split("/")[0] and entry.metric and entry.row, experiment


def test_table_bases_are_not_options():
    bases = sorted(p.relative_to(CONF_DIR / "experiment") for p in (CONF_DIR / "experiment").rglob("_*.yaml"))
    assert [str(b.parent) for b in bases] == TABLES  # one base per <paper>/<scale> folder, each with cells
    assert all(b.name == "_table.yaml" for b in bases)
    options = group_options("experiment")
    assert not [o for o in options if o.rsplit("/", 1)[-1].startswith("_")]
    assert len(options) == len(list((CONF_DIR / "experiment").rglob("*.yaml"))) - len(bases)


@pytest.mark.parametrize("table", TABLES)
def test_table_cells_pull_their_base_and_its_header_shows_their_numbers(table):
    folder = CONF_DIR / "experiment" / table
    header = "\n".join(line for line in (folder / "_table.yaml").read_text().splitlines() if line.startswith("#"))
    for cell in (e for e in EXPERIMENTS if e.startswith(f"{table}/")):
        defaults = yaml.safe_load((CONF_DIR / "experiment" / f"{cell}.yaml").read_text())["defaults"]
        assert defaults[0] == f"/experiment/{table}/_table", cell
        for entry in _entries(compose_cfg(f"experiment={cell}").expected):
            if entry.value is not None:  # the base's header tabulates the paper's numbers for the reader
                assert str(entry.value) in header, f"{cell}: {entry.value} missing from {table}/_table.yaml"


# Knobs still given as nested mappings whose defaults live in the YAML alone (issue 30, item 1: not yet
# declared as nested models): the test below skips them, and only them.
NESTED = {"pruner.minitron": {"target", "search", "agg", "depth"}, "recovery.lora": {"kd"},
          "recovery.lora_llm_pruner": {"kd"}, "recovery.sbert_nli_sts": {"nli", "sts", "dev"}}  # fmt: skip


def _code_defaults(cls) -> dict:
    import inspect

    out = {}
    for klass in reversed(cls.__mro__):  # a subclass's parameters over its bases'
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return {**out, **getattr(cls, "DEFAULTS", {})}


def test_yaml_defaults_are_the_code_defaults():
    """Issue 30: a knob's default lives in one place. For every component class, at least one option
    of its group (its base) states exactly the defaults its constructor takes; the other options of
    the same class are presets (eval=cola of the classification fine-tune, recovery=lora_llm_pruner of
    lora) and may differ. Interpolations (${seed}, ${paths.cache_dir}, ...) are the run's, not defaults."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    bases: dict[type, list[tuple[str, dict]]] = {}
    for group in ("pruner", "recovery", "eval"):
        for option in group_options(group):
            cfg = compose_cfg(f"{group}={option}")
            nodes = cfg.eval if group == "eval" else {option: cfg[group]}
            for key, node in nodes.items():
                if "_target_" not in node:
                    continue
                raw = OmegaConf.to_container(node, resolve=False)
                skip = NESTED.get(f"{group}.{option}", set()) | {"_target_", "name"}
                knobs = {k: v for k, v in raw.items() if k not in skip and not (isinstance(v, str) and "${" in v)}
                bases.setdefault(get_class(node._target_), []).append((f"{group}={option} ({key})", knobs))
    for cls, options in bases.items():
        code = _code_defaults(cls)
        diffs = {label: {k: (v, code.get(k)) for k, v in knobs.items() if code.get(k, object()) != v}
                 for label, knobs in options}  # fmt: skip
        assert any(not d for d in diffs.values()), f"{cls.__name__}: no option states its code defaults: {diffs}"
