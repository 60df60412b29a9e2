"""Caches that cannot lie (prunebench.cache): truncated or corrupted entries are rebuilt with one
warning and give the same numbers; keys change with the data; secrets stay out of metrics.json."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prunebench import cache, models
from prunebench.config import compose, instantiate
from prunebench.models import convert, loading
from prunebench.pruners.stats import cached_stats
from prunebench.results import public_config
from tests.conftest import cached_calib, counted

WIKI = "wikitext2/wikitext-2-raw/wiki.test.raw"


def zero_middle(path: Path, n: int = 4096) -> None:
    """Overwrite n bytes in the middle with zeros (same size: only the checksum can tell)."""
    time.sleep(0.02)  # file times tick every few ms: a corruption in the write's own tick keeps its stat
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * min(n, size // 4))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def baselines(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "baselines").glob("*.json") if not p.name.endswith(".sum.json")]


def warnings_about(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


def test_entry_verifies_and_rebuilds(tmp_path, caplog):
    path, built = tmp_path / "e" / "x.json", []

    def build(tmp: Path) -> dict:
        built.append(1)
        tmp.write_text(json.dumps({"v": list(range(1000))}))
        return {"v": list(range(1000))}

    def load(p: Path) -> dict:
        return json.loads(p.read_text())

    ok = {"v": list(range(1000))}
    assert cache.entry(path, "k", build, load, "thing") == (ok, False)
    assert cache.entry(path, "k", build, load, "thing") == (ok, True) and len(built) == 1
    lose_sidecar = lambda p: cache.sidecar(p).unlink()  # noqa: E731 - e.g. killed between the two renames
    for damage, reason in ((truncate, "truncated"), (zero_middle, "SHA-256"), (lose_sidecar, "checksum")):
        caplog.clear()
        damage(path)
        assert cache.entry(path, "k", build, load, "thing") == (ok, False)
        assert len(warnings_about(caplog, reason)) == 1, caplog.text
    assert cache.entry(path, "other-key", build, load, "thing") == (ok, False)  # other inputs: rebuilt
    assert len(built) == 5 and not leftovers(tmp_path)


def test_interrupted_build_leaves_nothing(tmp_path):
    path = tmp_path / "m"

    def build(tmp: Path):
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt  # SIGINT/SIGTERM arrive as this (app.interrupts)

    with pytest.raises(KeyboardInterrupt):
        cache.entry(path, "k", build, lambda p: p, "model", folder=True)
    assert not path.exists() and not leftovers(tmp_path)
    # A temporary a killed process left behind is removed by the next builder (under the lock).
    (tmp_path / ".tmp-m~killed").mkdir()
    cache.entry(path, "k", lambda tmp: (tmp / "w").write_text("ok") and None, lambda p: p, "model", folder=True)
    assert (path / "w").read_text() == "ok" and not leftovers(tmp_path)


def test_converted_model_cache_rebuilds_with_the_same_logits(tmp_path, monkeypatch, caplog):
    """The embedded-GGUF path of models.load, with the GGUF dequantization replaced by saving a tiny
    seeded Llama: a truncated or zeroed cached model.safetensors is rebuilt, never loaded."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "model.gguf").write_bytes(b"GGUF fake source")
    calls = []

    def fake_convert(folder: Path, file: str, out: Path) -> None:
        calls.append(file)
        model, _ = models.load(compose("model=tiny-llama").model, cache_dir=tmp_path, seed=0)
        model.save_pretrained(out)
        models.char_tokenizer().save_pretrained(out)

    monkeypatch.setattr(loading, "package_dir", lambda name: package)
    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    cfg = OmegaConf.create(
        {"name": "fake-gguf", "kind": "causal_lm", "source": "gguf_package", "package": "fake", "file": "model.gguf",
         "dtype": "float32", "path": None, "reinit": False}
    )  # fmt: skip
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))

    def logits() -> torch.Tensor:
        model, _ = models.load(cfg, cache_dir=tmp_path / "cache")
        with torch.no_grad():
            return model(input_ids=ids).logits

    want = logits()
    assert torch.equal(logits(), want) and len(calls) == 1  # second load: from the verified cache
    weights = tmp_path / "cache" / "models" / "fake-gguf" / "model.safetensors"
    for damage in (truncate, zero_middle):
        caplog.clear()
        damage(weights)
        assert torch.equal(logits(), want)
        assert len(warnings_about(caplog, "fake-gguf")) == 1, caplog.text
    assert len(calls) == 3 and not leftovers(tmp_path)
    # A new source package (other bytes) is a new key: converted again.
    (package / "model.gguf").write_bytes(b"GGUF another source")
    logits()
    assert len(calls) == 4


def test_stats_cache_truncated_is_recomputed(tiny, tmp_path, caplog):
    model, _ = tiny
    calib = cached_calib(tmp_path)
    calls, compute = counted({"a": torch.arange(1000.0)})
    cached_stats(calib, model, "kind", compute)
    (path,) = tmp_path.glob("*.safetensors")
    truncate(path)
    out, reused = cached_stats(calib, model, "kind", compute)
    assert not reused and len(calls) == 2 and torch.equal(out["a"], torch.arange(1000.0))
    assert len(warnings_about(caplog, "statistics")) == 1
    out, reused = cached_stats(calib, model, "kind", compute)
    assert reused and torch.equal(out["a"], torch.arange(1000.0))


def test_dense_baseline_keyed_by_data_and_verified(tmp_path, monkeypatch, caplog):
    from prunebench.data.text import data_roots
    from prunebench.pipeline import dense_baseline

    source = next(r / WIKI for r in data_roots() if (r / WIKI).is_file())
    root = tmp_path / "data"
    (root / WIKI).parent.mkdir(parents=True)
    shutil.copy(source, root / WIKI)  # without SOURCE.md: read unverified, as a user's own data root
    monkeypatch.setenv("PRUNEBENCH_DATA", str(root))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    cfg = compose("experiment=smoke/tiny", f"paths.cache_dir={tmp_path / 'cache'}")
    model, tok = models.load(cfg.model, cfg.paths.cache_dir, seed=0)
    evaluators = {n: instantiate(e) for n, e in cfg.eval.items()}

    def baseline():
        return dense_baseline(cfg, model, tok, evaluators, torch.float32)

    first, reused = baseline()
    assert not reused and baseline() == (first, True)
    (path,) = baselines(tmp_path / "cache")
    truncate(path)
    assert baseline() == (first, False) and len(warnings_about(caplog, "dense baseline")) == 1
    with open(root / WIKI, "a", encoding="utf-8") as f:  # other data (beyond the evaluated windows, too)
        f.write(" = Extra = \n")
    assert baseline() == (first, False)  # not reused: a new key
    assert len(baselines(tmp_path / "cache")) == 2


def test_public_config_keeps_env_interpolations(monkeypatch):
    monkeypatch.setenv("PB_TOKEN", "hunter2")
    cfg = OmegaConf.create(
        {"token": "${oc.env:PB_TOKEN}", "url": "https://x/${token}", "n": 3, "m": "${n}",
         "paths": {"cache_dir": "${oc.env:PB_NOPE,/home/me/.cache}"}, "copy": "${paths.cache_dir}/lm",
         "items": ["${oc.env:PB_TOKEN}", "plain"]}
    )  # fmt: skip
    out = public_config(cfg)
    assert "hunter2" not in json.dumps(out) and out["paths"]["cache_dir"] == "${oc.env:PB_NOPE,/home/me/.cache}"
    assert out["token"] == "${oc.env:PB_TOKEN}" and out["url"] == "https://x/${token}"
    assert out["copy"] == "${paths.cache_dir}/lm" and out["items"] == ["${oc.env:PB_TOKEN}", "plain"]
    assert out["n"] == 3 and out["m"] == 3  # everything else resolved
