"""The catalogue of bad inputs (issue 14): configs, knobs, models, data files and report inputs. Each one
ends with exit 2 and exactly one `error:` line naming the knob or file, no traceback, no metrics.json
with status complete, and an earlier run's results untouched.

Most rows go through the real `prunebench` command in-process (typer's CliRunner: the same checks,
argv bridge and exit codes, without a new interpreter); a few rows run it as a subprocess, where a
Python traceback would show exactly as a user sees it.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prunebench.cli import app
from tests.test_cli import prunebench

TINY = ["experiment=smoke/tiny"]  # tiny-llama: 2 layers, hidden 64, FFN 128, context 256
LACO30 = [*TINY, "pruner=laco", "model.hf_config.num_hidden_layers=30"]
KD = [*TINY, "recovery=kd"]
BERT = ["model=tiny-bert", "eval=[]", "calib.seqlen=16", "calib.nsamples=2"]
MINITRON = [*TINY, "pruner=minitron", "pruner.target.heads=null", "pruner.target.ffn=null"]  # no default shape

# (id, arguments of `prunebench run`, what the one error line must contain)
RUN_ROWS = [
    # configs and flags
    ("unknown-pruner", ["pruner=foo"], "unknown pruner 'foo'"),
    ("unknown-model", ["model=nope"], "unknown model 'nope'"),
    ("unknown-experiment", ["experiment=nope"], "unknown experiment 'nope'"),
    ("unknown-eval", ["eval=[nope]"], "unknown eval 'nope'"),
    ("unknown-key", [*TINY, "pruner.nope=1"], "pruner.nope"),
    ("unknown-added-key", [*TINY, "+pruner.nope=1"], "nope"),
    ("bad-syntax", [*TINY, "pruner.sparsity=["], "override 'pruner.sparsity=['"),
    ("config-path", [*TINY, "-cp", "/tmp"], "--config-path"),
    ("config-name", [*TINY, "--config-name", "evil"], "--config-name"),
    ("rerun-pickle", [*TINY, "--experimental-rerun", "/tmp/config.pickle"], "--experimental-rerun"),
    ("config-dir-missing", [*TINY, "--config-dir", "/nonexistent/conf"], "--config-dir"),
    ("target-traversal", [*TINY, "+eval.x={_target_: prunebench.config.Path.touch}"], "prunebench.config.Path.touch"),
    ("target-os", [*TINY, "+eval.x={_target_: prunebench.models.os.system}"], "prunebench.models.os.system"),
    ("hydra-callback", [*TINY, "+hydra.callbacks.x={_target_: os.getcwd}"], "hydra.callbacks.x"),
    ("hydra-env", [*TINY, "+hydra.job.env_set.LD_PRELOAD=/tmp/x.so"], "LD_PRELOAD"),
    # top-level knobs
    ("seed-str", [*TINY, "seed=x"], "seed='x'"),
    ("seed-float", [*TINY, "seed=1.5"], "seed=1.5"),
    ("seed-negative", [*TINY, "seed=-1"], "seed=-1"),
    ("seed-huge", [*TINY, "seed=99999999999"], "seed=99999999999"),
    ("seed-bool", [*TINY, "seed=true"], "seed=True"),
    ("baseline-str", [*TINY, "baseline=maybe"], "baseline='maybe'"),
    ("device", [*TINY, "device=cuda:7"], "device=cuda:7"),
    ("placement", [*TINY, "placement=banana"], "placement="),
    ("dtype", [*TINY, "model.dtype=int3"], "model.dtype"),
    # calibration
    ("nsamples-huge", [*TINY, "calib.nsamples=1000000000"], "calib.nsamples=1000000000 is outside [1, 4096]"),
    ("nsamples-zero", [*TINY, "calib.nsamples=0"], "calib.nsamples=0"),
    ("nsamples-float", [*TINY, "calib.nsamples=4.5"], "calib.nsamples=4.5"),
    ("calib-seqlen-zero", [*TINY, "calib.seqlen=0"], "calib.seqlen=0"),
    ("calib-seqlen-context", [*TINY, "calib.seqlen=100000"], "calib.seqlen=100000 is beyond"),
    ("calib-batch-zero", [*TINY, "calib.batch_size=0"], "calib.batch_size=0"),
    # mask pruners
    ("sparsity-high", [*TINY, "pruner.sparsity=1.5"], "outside [0, 1)"),
    ("sparsity-negative", [*TINY, "pruner.sparsity=-0.1"], "pruner.sparsity=-0.1"),
    ("sparsity-nan", [*TINY, "pruner.sparsity=nan"], "pruner.sparsity=nan"),
    ("pattern-n-ge-m", [*TINY, "pruner.pattern=4:2"], "N < M"),
    ("pattern-syntax", [*TINY, "pruner.pattern=2x4"], "pruner.pattern='2x4'"),
    ("pattern-vs-sparsity", [*TINY, "pruner.pattern=2:4", "pruner.sparsity=0.6"], "pruner.sparsity=0.5"),
    ("pattern-width", [*TINY, "pruner.pattern=2:4", "model.hf_config.intermediate_size=130"], "intermediate_size=130"),
    ("group", [*TINY, "pruner.group=column"], "pruner.group"),
    ("kd-on-encoder", ["model=tiny-bert", "eval=[]", "recovery=kd"], "recovery (KD distils next-token logits) needs a"),
    ("lm-finetune-on-encoder", ["model=tiny-roberta", "eval=[]", "recovery=lm_finetune"], "needs a causal language"),
    (
        "modernbert-drops-layer-0",
        ["model=tiny-modernbert", "eval=[]", "pruner=layer_drop", "pruner.keep=bottom", "pruner.layers=1"],
        "keep layer 0",
    ),
    (
        "experts-per-tok-above-experts",
        ["model=tiny-mixtral", "model.hf_config.num_experts_per_tok=8"],
        "num_experts_per_tok=8 routes each token to more experts than the 4",
    ),
    (
        "minitron-experts-above-have",
        [
            "model=tiny-mixtral",
            "pruner=minitron",
            "pruner.target.heads=null",
            "pruner.target.ffn=null",
            "pruner.target.experts=9",
        ],
        "more than the model's 4 experts",
    ),
    (  # before the 2.7-minute GGUF conversion: the model YAML's model_type is known without a config.json
        "experts-on-dense-gguf",
        ["model=gemma3-270m", "pruner=minitron", "pruner.target.heads=null", "pruner.target.experts=2"],
        "pruner.target.experts: gemma3_text has no experts",
    ),
    (
        "lora-engine-added",  # LoRA has the recipe's engine knob; Hydra's advice leads to the lora-fsdp row
        [*TINY, "recovery=lora", "+recovery.engine=fsdp"],
        "An item is already at 'recovery.engine'",
    ),
    ("train-seqlen-1", [*TINY, "recovery=lm_finetune", "recovery.seqlen=1"], "recovery.seqlen=1 is outside [2,"),
    ("val-windows-huge", [*TINY, "recovery=lora", "recovery.val_windows=100000"], "recovery.val_windows=100000"),
    # issue 29: an override that would change nothing is refused, so metrics.json's config is what ran
    (
        "hf-config-on-loaded-weights",
        ["model=gemma3-270m", "+model.hf_config.num_hidden_layers=4"],
        "model.hf_config is ignored by model.source=gguf_chunks",
    ),
    ("sequential-str", [*TINY, "pruner.sequential=maybe"], "pruner.sequential"),
    ("gblm-alpha-negative", [*TINY, "pruner=gblm", "pruner.alpha=-1"], "pruner.alpha=-1"),
    ("gblm-alpha-nan", [*TINY, "pruner=gblm", "pruner.alpha=nan"], "pruner.alpha=nan"),
    ("gblm-alpha-inf", [*TINY, "pruner=gblm", "pruner.alpha=inf"], "pruner.alpha=inf"),
    ("gblm-alpha-str", [*TINY, "pruner=gblm", "pruner.alpha=big"], "pruner.alpha='big'"),
    ("gblm-grad-norm", [*TINY, "pruner=gblm", "pruner.grad_norm=l3"], "grad_norm"),
    ("gblm-terms", [*TINY, "pruner=gblm", "pruner.terms=x"], "pruner.terms"),
    ("sparsegpt-percdamp", [*TINY, "pruner=sparsegpt", "pruner.percdamp=0"], "pruner.percdamp=0"),
    ("sparsegpt-blocksize", [*TINY, "pruner=sparsegpt", "pruner.blocksize=0"], "pruner.blocksize=0"),
    ("sparsegpt-one-shot", [*TINY, "pruner=sparsegpt", "pruner.sequential=false"], "one-shot"),
    # depth pruners: silent no-ops and ignored knobs
    ("laco-C-too-large", [*LACO30, "pruner.C=50"], "pruner.C=50"),
    ("laco-C-one", [*LACO30, "pruner.C=1"], "pruner.C"),
    ("laco-H", [*LACO30, "pruner.H=40"], "pruner.H"),
    ("laco-L", [*LACO30, "pruner.L=-1"], "pruner.L=-1"),
    ("laco-T-zero", [*LACO30, "pruner.T=0"], "pruner.T=0"),
    ("laco-T-high", [*LACO30, "pruner.T=1.5"], "pruner.T=1.5"),
    ("laco-I", [*LACO30, "pruner.I=0"], "pruner.I=0"),
    ("laco-calib-n", [*LACO30, "pruner.calib_n=0"], "pruner.calib_n=0"),
    ("laco-calib-chars", [*LACO30, "pruner.calib_chars=0"], "pruner.calib_chars=0"),
    ("laco-merge", [*LACO30, "pruner.merge=x"], "pruner.merge"),
    ("laco-sparsity-ignored", [*LACO30, "pruner.sparsity=0.3"], "pruner.sparsity=0.3 is ignored"),
    ("drop-keep-and-remove", [*TINY, "pruner=layer_drop", "pruner.keep=bottom", "pruner.remove=[1]"], "pruner.remove"),
    ("drop-list-and-layers", [*TINY, "pruner=layer_drop", "pruner.keep=[0]", "pruner.layers=1"], "pruner.layers=1"),
    ("drop-layers", [*TINY, "pruner=layer_drop", "pruner.layers=31"], "pruner.layers"),
    ("drop-keep", [*TINY, "pruner=layer_drop", "pruner.keep=side"], "pruner.keep"),
    ("drop-remove-empty", [*TINY, "pruner=layer_drop", "pruner.keep=null", "pruner.remove=[]"], "pruner.remove"),
    ("drop-sparsity-ignored", [*TINY, "pruner=layer_drop", "pruner.sparsity=0.5"], "pruner.sparsity=0.5 is ignored"),
    ("shortgpt-n-zero", [*TINY, "pruner=shortgpt", "pruner.n=0"], "pruner.n"),
    ("shortgpt-n-all", [*TINY, "pruner=shortgpt", "pruner.n=2"], "pruner.n"),
    ("none-pattern-ignored", [*TINY, "pruner=none", "pruner.pattern=2:4"], "pruner.pattern=2:4 is ignored"),
    # evaluation
    ("eval-windows-zero", [*TINY, "eval.wikitext2.max_windows=0"], "eval.wikitext2.max_windows=0"),
    ("eval-seqlen-context", [*TINY, "eval.wikitext2.seqlen=100000"], "eval.wikitext2.seqlen=100000 is beyond"),
    ("eval-seqlen-str", [*TINY, "eval.wikitext2.seqlen=long"], "eval.wikitext2.seqlen"),
    ("eval-batch-zero", [*TINY, "eval.wikitext2.batch_size=0"], "eval.wikitext2.batch_size=0"),
    ("eval-max-seqlen", [*TINY, "eval.wikitext2.max_seqlen=0"], "eval.wikitext2.max_seqlen=0"),
    ("efficiency-repeats", [*TINY, "eval=[efficiency]", "eval.efficiency.repeats=0"], "eval.efficiency.repeats=0"),
    ("efficiency-context", [*TINY, "eval=[efficiency]", "eval.efficiency.prompt_len=250"], "prompt_len + gen_len"),
    # recovery
    ("kd-lr-zero", [*KD, "recovery.lr=0"], "recovery.lr=0"),
    ("kd-lr-nan", [*KD, "recovery.lr=nan"], "recovery.lr=nan"),
    ("kd-temperature", [*KD, "recovery.temperature=0"], "recovery.temperature=0"),
    ("kd-tokens", [*KD, "recovery.tokens=-1"], "recovery.tokens=-1"),
    ("kd-seqlen-context", [*KD, "recovery.seqlen=1000"], "recovery.seqlen=1000 is beyond"),
    ("kd-grad-accum", [*KD, "recovery.grad_accum=0"], "recovery.grad_accum=0"),
    ("kd-clip", [*KD, "recovery.clip=-1"], "recovery.clip=-1"),
    ("finetune-lr", [*TINY, "recovery=lm_finetune", "recovery.lr=2"], "recovery.lr=2"),
    # recovery at scale: batch geometry, checkpoints, engine (issue 21), from the knobs' declarations
    (
        "global-batch-indivisible",
        [*KD, "recovery.global_batch=3", "recovery.batch_size=2"],
        "recovery.global_batch=3 is not a multiple of recovery.batch_size=2 × 1 process = 2",
    ),
    (
        "global-batch-vs-grad-accum",
        [*KD, "recovery.global_batch=4", "recovery.grad_accum=3"],
        "recovery.global_batch=4 and recovery.grad_accum=3 disagree",
    ),
    ("global-batch-zero", [*TINY, "recovery=lora", "recovery.global_batch=0"], "recovery.global_batch=0"),
    ("checkpoint-every-zero", [*KD, "recovery.checkpoint_every=0"], "recovery.checkpoint_every=0 must be a positive"),
    (
        "keep-checkpoints-zero",
        [*TINY, "recovery=lm_finetune", "recovery.keep_checkpoints=0"],
        "recovery.keep_checkpoints=0",
    ),
    ("resume-choice", [*KD, "recovery.resume=always"], "recovery.resume='always' must be auto or never"),
    ("engine-choice", [*KD, "recovery.engine=horovod"], "recovery.engine='horovod' must be ddp or fsdp"),
    ("engine-deepspeed", [*KD, "recovery.engine=deepspeed"], "recovery.engine='deepspeed' must be ddp or fsdp"),
    ("lora-fsdp", [*TINY, "recovery=lora", "recovery.engine=fsdp"], "recovery=lora trains data-parallel only"),
    (
        "search-kd-checkpoint",
        [*MINITRON, "+pruner.search.kd.checkpoint_every=5"],
        "pruner.search.kd.checkpoint_every=5",
    ),
    ("text-field-empty", [*KD, "recovery.text_field=''"], "recovery.text_field='' must be a non-empty word"),
    (
        "gradient-checkpointing-str",
        [*KD, "recovery.gradient_checkpointing=maybe"],
        "recovery.gradient_checkpointing='maybe' must be true or false",
    ),
    (
        "checkpoints-sharded",
        [*KD, "recovery.engine=fsdp", "recovery.checkpoint_every=10"],
        "recovery.checkpoint_every is not supported under recovery.engine=fsdp",
    ),
    # minitron (tiny-llama: 2 layers, hidden 64, 4 heads / 2 KV heads, FFN 128)
    ("minitron-too-big", [*MINITRON, "pruner.target.ffn=256"], "pruner.target.ffn=256 is more than"),
    ("minitron-layers", [*MINITRON, "pruner.target.layers=3"], "pruner.target.layers=3 is more than"),
    ("minitron-gqa", [*MINITRON, "pruner.target.heads=3", "pruner.target.kv_heads=2"], "not divisible by"),
    ("minitron-agg", [*MINITRON, "pruner.target.ffn=64", "pruner.agg.batch=max"], "pruner.agg.batch='max'"),
    ("minitron-encoder", [*BERT, "pruner=minitron", "pruner.target.heads=2"], "causal language model"),
    # models
    ("encoder-perplexity", ["model=tiny-bert", "calib.seqlen=16"], "causal language model"),
    ("encoder-gblm", [*BERT, "pruner=gblm"], "causal language model"),
    ("bridge-rank", [*BERT, "pruner=minibridge", "pruner.rank=0"], "pruner.rank=0"),
    ("bridge-rank-hidden", [*BERT, "pruner=minibridge", "pruner.blocks=[2]", "pruner.rank=65"], "hidden size 64"),
    ("bridge-block-0", [*BERT, "pruner=minibridge", "pruner.blocks=[0,2]"], "count from 1"),
    ("bridge-duplicates", [*BERT, "pruner=minibridge", "pruner.blocks=[2,2]"], "twice"),
    ("bridge-decoder", [*TINY, "pruner=minibridge", "eval=[]"], "needs an encoder"),
    ("model-path-missing", [*TINY, "model.path=/nonexistent/model"], "model.path=/nonexistent/model"),
    ("hub-model-offline", ["model=llama2-7b"], "model.path"),
    # output folders a knob names stay inside the run dir unless absolute (issue 23)
    (
        "adapter-dir-escapes",
        [*TINY, "recovery=lora", "recovery.merge=separate", "recovery.adapter_dir=../x"],
        "recovery.adapter_dir=../x leaves the run directory",
    ),  # fmt: skip
    # issue 23: unknown top-level keys, absurd overrides, knobs the chosen mode ignores
    ("unknown-top-level-key", [*TINY, "+nosuchtop=1"], "unknown top-level key 'nosuchtop'"),
    ("quick-seqlen-set-beyond-context", ["model=tiny-llama", "calib.seqlen=512"], "calib.seqlen=512 is beyond"),
    ("override-too-long", [*TINY, "+pruner.x=" + "a" * 100_000], "an override of 100,010 characters"),
    (
        "adapter-dir-with-masked-merge",
        [*TINY, "recovery=lora", "recovery.adapter_dir=ad"],
        "recovery.adapter_dir=ad is only used by recovery.merge=separate",
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """An earlier run's results, which no bad input may touch."""
    folder = tmp_path_factory.mktemp("earlier")
    (folder / "metrics.json").write_text(json.dumps({"status": "complete", "metrics": {"wikitext2/ppl": 1.0}}))
    return folder, (folder / "metrics.json").read_bytes()


@pytest.fixture(scope="module")
def runner(tmp_path_factory, earlier):
    # A fresh cache, and an unreachable Hub endpoint so a Hub model fails in one line, never downloads.
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNEBENCH_CACHE", str(cache))
    mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    yield CliRunner()
    mp.undo()


def assert_one_line(code: int, stderr: str, needle: str, out, earlier) -> None:
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], stderr[-2000:]
    assert not any(json.loads(p.read_text()).get("status") == "complete" for p in out.rglob("metrics.json"))
    folder, before = earlier
    assert (folder / "metrics.json").read_bytes() == before


def test_catalogue_is_large_enough():
    rows = RUN_ROWS, DATA_ROWS, REPORT_ROWS, SUBPROCESS_ROWS, FOLDER_ROWS, CORPUS_ROWS
    assert sum(map(len, rows)) >= 60


@pytest.mark.parametrize("args,needle", [r[1:] for r in RUN_ROWS], ids=[r[0] for r in RUN_ROWS])
def test_run_rejects(runner, earlier, tmp_path, args, needle):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *args, f"hydra.run.dir={out}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


@pytest.mark.parametrize(
    "config_json", [None, b'{"model_type": "lla', b"\x00\xff" * 16], ids=["empty", "truncated", "binary"]
)
def test_bad_model_folder(runner, earlier, tmp_path, config_json):
    folder = tmp_path / "model"
    folder.mkdir()
    if config_json is not None:
        (folder / "config.json").write_bytes(config_json)
    result = runner.invoke(app, ["run", *TINY, f"model.path={folder}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, "config.json", tmp_path, earlier)


def _tiny_folder(folder, pickled: bool = False, ffn: int | None = None) -> None:
    """A saved tiny-llama: its weights pickled (pytorch_model.bin only), or its config.json claiming
    another FFN width than its weights have."""
    import torch

    from prunebench import models
    from prunebench.config import compose

    model, _ = models.load(compose("model=tiny-llama").model, cache_dir="/nonexistent")
    model.save_pretrained(folder)
    if pickled:
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if ffn is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": ffn}))


# (id, how the model.path folder is made, what the one error line must contain) (issue 23)
FOLDER_ROWS = [
    (
        "weights-vs-config-shapes",
        {"ffn": 96},
        "down_proj.weight has shape [64, 128] in model.safetensors but [64, 96] by its config",
    ),
    ("pickled-weights-only", {"pickled": True}, "holds only pickled weights (pytorch_model.bin); prunebench loads"),
]


@pytest.mark.parametrize("make,needle", [r[1:] for r in FOLDER_ROWS], ids=[r[0] for r in FOLDER_ROWS])
def test_bad_model_weights(runner, earlier, tmp_path, make, needle):
    _tiny_folder(tmp_path / "model", **make)
    result = runner.invoke(app, ["run", *TINY, f"model.path={tmp_path / 'model'}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


# (id, environment variable, what it is set to under tmp_path, needle) (issue 23)
ENV_ROWS = [
    ("cache-is-a-file", "PRUNEBENCH_CACHE", "file", "paths.cache_dir="),
    ("data-root-missing", "PRUNEBENCH_DATA", "nonexistent", "PRUNEBENCH_DATA="),
]


@pytest.mark.parametrize("var,what,needle", [r[1:] for r in ENV_ROWS], ids=[r[0] for r in ENV_ROWS])
def test_bad_environment(runner, earlier, tmp_path, monkeypatch, var, what, needle):
    if what == "file":
        (tmp_path / what).write_text("not a folder")
    monkeypatch.setenv(var, str(tmp_path / what))
    result = runner.invoke(app, ["run", *TINY, f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)
    assert "is a file" in result.stderr or "does not exist" in result.stderr


# Data files: a dataset file that is binary, truncated JSON or a JSON row without text.
DATA_ROWS = [
    ("binary-wikitext", "wikitext2/wikitext-2-raw/wiki.test.raw", b"\x00\xff\xfe" * 64, "wiki.test.raw"),
    ("corrupt-c4", "c4/c4_sample.json", b'{"text": "a"}\n{"text": ', "c4_sample.json"),
    ("c4-no-text", "c4/c4_sample.json", b'{"url": "x"}\n', "c4_sample.json"),
]


@pytest.mark.parametrize("rel,content,needle", [r[1:] for r in DATA_ROWS], ids=[r[0] for r in DATA_ROWS])
def test_bad_data_file(runner, earlier, tmp_path, monkeypatch, rel, content, needle):
    root = tmp_path / "data"
    (root / rel).parent.mkdir(parents=True)
    (root / rel).write_bytes(content)
    monkeypatch.setenv("PRUNEBENCH_DATA", str(root))
    from prunebench import PrunebenchError
    from prunebench.data import load_texts

    name = "wikitext2_test" if "wiki" in rel else "c4"
    with pytest.raises(PrunebenchError) as err:
        load_texts(name)
    message = str(err.value)
    assert "\n" not in message and needle in message


# `prunebench report` inputs: (id, the folder's metrics.json content or None for no folder, needle)
REPORT_ROWS = [
    ("report-missing-folder", None, "is not a directory"),
    ("report-corrupt-json", b'{"status": "complete", "metr', "metrics.json"),
    ("report-binary-json", b"\x00\xff" * 32, "metrics.json"),
    ("report-not-an-object", b"[1, 2]", "metrics.json"),
    ("report-nothing-complete", b'{"status": "interrupted"}', "no complete metrics.json"),
]


@pytest.mark.parametrize("content,needle", [r[1:] for r in REPORT_ROWS], ids=[r[0] for r in REPORT_ROWS])
def test_report_rejects(runner, earlier, tmp_path, content, needle):
    folder = tmp_path / "runs"
    if content is not None:
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "metrics.json").write_bytes(content)
    result = runner.invoke(app, ["report", str(folder)])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path / "none", earlier)


# The real command line in a new interpreter: what a user sees, traceback or not.
SUBPROCESS_ROWS = [
    ("seed-str", ["run", *TINY, "seed=x"], "seed='x'"),
]


@pytest.mark.parametrize("args,needle", [r[1:] for r in SUBPROCESS_ROWS], ids=[r[0] for r in SUBPROCESS_ROWS])
def test_subprocess_rejects(earlier, tmp_path, args, needle):
    r = prunebench(*args, f"hydra.run.dir={tmp_path / 'out'}", cache=tmp_path / "cache", cwd=tmp_path)
    assert_one_line(r.returncode, r.stderr, needle, tmp_path, earlier)


def test_report_on_corrupt_metrics_subprocess(earlier, tmp_path):
    (tmp_path / "runs" / "0").mkdir(parents=True)
    (tmp_path / "runs" / "0" / "metrics.json").write_text('{"status": "compl')
    r = prunebench("report", str(tmp_path / "runs"), cache=tmp_path / "cache", cwd=tmp_path)
    assert_one_line(r.returncode, r.stderr, "metrics.json", tmp_path / "none", earlier)


# Refused before any model loads (issue 23, item 10): loading is made to fail loudly, so a check that
# came after it would end in another error than the expected line.
BEFORE_LOAD_ROWS = [
    (
        "unknown-eval-dataset",
        [*TINY, "eval.wikitext2.dataset=nosuch"],
        "eval.wikitext2.dataset='nosuch' is not a known",
    ),
    ("unknown-calib-source", [*TINY, "calib.source=nosuch"], "calib.source='nosuch' is not a known dataset"),
    (
        "unknown-laco-source",
        [*TINY, "pruner=laco", "model.hf_config.num_hidden_layers=4", "pruner.calib_source=x"],
        "pruner.calib_source='x'",
    ),  # fmt: skip
    ("unknown-lm-eval-task", [*TINY, "eval=[lm_eval]", "eval.lm_eval.tasks=[nosuchtask]"], "unknown lm-eval task"),
    ("lora-on-encoder", [*BERT, "recovery=lora"], "recovery (LoRA trains on next-token logits) needs a causal"),
    ("laco-on-2-layers", [*TINY, "pruner=laco"], "the model has 2 layers, LaCo needs at least 3"),
    (
        "laco-C-too-large",
        [*TINY, "pruner=laco", "model.hf_config.num_hidden_layers=4", "pruner.C=4"],
        "use 2 ≤ pruner.C ≤ 2",
    ),  # fmt: skip
]


@pytest.fixture
def no_loading(monkeypatch):
    def load(*_a, **_k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("prunebench.models.load", load)


@pytest.mark.parametrize("args,needle", [r[1:] for r in BEFORE_LOAD_ROWS], ids=[r[0] for r in BEFORE_LOAD_ROWS])
def test_refused_before_loading(runner, earlier, tmp_path, no_loading, args, needle):
    result = runner.invoke(app, ["run", *args, f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


def test_global_batch_world_size_refused_before_loading(runner, earlier, tmp_path, monkeypatch, no_loading):
    """A world size that does not divide recovery.global_batch (torchrun sets WORLD_SIZE): one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["run", *KD, "recovery.global_batch=3", f"hydra.run.dir={tmp_path / 'o'}"])
    needle = "recovery.global_batch=3 is not a multiple of recovery.batch_size=1 × 2 processes = 2"
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


def test_data_checksum_mismatch_is_refused_before_loading(runner, earlier, tmp_path, monkeypatch, no_loading):
    """A data file that does not match its SOURCE.md digest stops the run before the model loads."""
    import shutil

    from prunebench.data import text

    shipped = text.locate(text.LOCAL["wikitext2_test"])[0]
    root = tmp_path / "data"
    for folder in ("wikitext2", "c4"):
        shutil.copytree(shipped / folder, root / folder)
    with open(root / "wikitext2" / "wikitext-2-raw" / "wiki.test.raw", "ab") as f:
        f.write(b"tampered\n")
    monkeypatch.setenv("PRUNEBENCH_DATA", str(root))
    monkeypatch.setattr("prunebench.cli.check_overrides", lambda *a, **k: 1)  # the run's own setup must catch it
    result = runner.invoke(app, ["run", *TINY, f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, "does not match the sha256", tmp_path, earlier)


# recovery.source as the user's data (issue 21): (id, files to write under tmp_path, arguments, needle);
# "{tmp}" stands for tmp_path. All refused before any model loads, with the Hub unreachable.
CORPUS_ROWS = [
    ("corpus-missing-file", {}, [*KD, "recovery.source={tmp}/missing.jsonl"], "missing.jsonl: no such file or folder"),
    (
        "corpus-no-text-field",
        {"c.jsonl": '{"body": "x"}\n'},
        [*KD, "recovery.source={tmp}/c.jsonl"],
        "c.jsonl has no field 'text' (fields: body); set recovery.text_field",
    ),
    (
        "corpus-hub-offline",
        {},
        [
            *KD,
            "recovery.source=hf:HuggingFaceFW/fineweb-edu",
            "recovery.source_config=sample-10BT",
            "recovery.streaming=true",
        ],  # fmt: skip
        "recovery.source=hf:HuggingFaceFW/fineweb-edu: the Hugging Face Hub is unreachable",
    ),
    (
        "corpus-hub-eval-split",
        {},
        [*KD, "recovery.source=hf:wikitext", "recovery.source_config=wikitext-2-raw-v1", "recovery.source_split=test"],
        "the test split of wikitext is evaluation data",
    ),
    (
        "corpus-split-ignored",
        {"c.jsonl": '{"text": "x"}\n'},
        [*TINY, "recovery=lm_finetune", "recovery.source={tmp}/c.jsonl", "recovery.source_split=train"],
        "recovery.source_split=train is ignored",
    ),
]


@pytest.mark.parametrize("files,args,needle", [r[1:] for r in CORPUS_ROWS], ids=[r[0] for r in CORPUS_ROWS])
def test_corpus_refused_before_loading(runner, earlier, tmp_path, monkeypatch, no_loading, files, args, needle):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no Hub, whatever this machine's network
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["run", *args, f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


def test_corpus_token_ids_outside_the_vocabulary(runner, earlier, tmp_path):
    """A .bin shard written with another tokenizer (ids ≥ the tokenizer's vocabulary) is refused when
    it is read, naming the file: the vocabulary is known once the tokenizer has loaded."""
    import numpy as np

    np.array([5, 6, 65535, 7] * 32, dtype="<u2").tofile(tmp_path / "c.bin")  # 65535: beyond any uint16-read vocabulary
    source = tmp_path / "c.bin"
    args = [*TINY, "pruner=magnitude", "baseline=false", "recovery=lm_finetune", "recovery.tokens=64",
            "recovery.seqlen=16", f"recovery.source={source}", f"hydra.run.dir={tmp_path / 'o'}"]  # fmt: skip
    result = runner.invoke(app, ["run", *args])
    assert_one_line(result.exit_code, result.stderr, "c.bin holds token id 65535, outside the tokenizer's", tmp_path,
                    earlier)  # fmt: skip


def test_corpus_larger_than_memory_is_refused_before_loading(runner, earlier, tmp_path, no_loading):
    """Issue 29: the training data is counted (the corpus's int64 token ids and one epoch of the window order:
    recipe.data_bytes, against the host's memory, where it lives on every device), so a corpus that cannot be
    held stops before loading, in one line naming it. A sparse 1 TiB .bin shard of 2-byte ids: 4 TiB of int64
    ids and 16 GiB of window order; nothing of it is read."""
    with open(tmp_path / "c.bin", "wb") as f:
        f.truncate(2**40)
    args = [*TINY, "recovery=lm_finetune", f"recovery.source={tmp_path / 'c.bin'}", f"hydra.run.dir={tmp_path / 'o'}"]
    result = runner.invoke(app, ["run", *args])
    assert_one_line(result.exit_code, result.stderr, "c.bin: training holds ~4112.0 GiB of it in memory", tmp_path,
                    earlier)  # fmt: skip


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_refusal_under_several_processes_is_said_once_and_exits_2_everywhere(runner, tmp_path, monkeypatch, rank):
    """torchrun / SLURM: every rank refuses before any process group starts (exit 2); rank 0 alone prints."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["run", *TINY, "pruner.sparsity=1.5", f"hydra.run.dir={tmp_path / 'o'}"])
    assert result.exit_code == 2
    assert ("outside [0, 1)" in result.stderr) == (rank == "0") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--nproc", "2", *KD, "recovery.global_batch=3"], "recovery.global_batch=3 is not a multiple of"),
        (["--nproc", "0", *TINY], "--nproc 0 must be a whole number of processes"),
        (["--nproc=two", *TINY], "--nproc two must be a whole number"),
        ([*TINY, "--nproc"], "--nproc needs a number of processes"),
    ],
    ids=["world-size-rule", "zero", "word", "missing"],
)
def test_nproc_is_checked_once_before_any_process_starts(runner, earlier, tmp_path, no_loading, monkeypatch, args,
                                                         needle):  # fmt: skip
    """`prunebench run --nproc N`: the launching process checks the config for N processes (WORLD_SIZE
    rules included) before starting any: one line, exit 2, no worker, no torchrun traceback."""
    monkeypatch.setattr("prunebench.launch.launch", lambda *a: pytest.fail("a worker was started"))
    result = runner.invoke(app, ["run", *args, f"hydra.run.dir={tmp_path / 'o'}"])
    assert_one_line(result.exit_code, result.stderr, needle, tmp_path, earlier)


def test_nproc_under_torchrun_is_refused(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["run", "--nproc", "2", *TINY, f"hydra.run.dir={tmp_path / 'o'}"])
    assert result.exit_code == 2 and "--nproc starts the processes itself" in result.stderr
