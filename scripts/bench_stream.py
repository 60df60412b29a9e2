"""Streaming benchmark (issue 31): placement=stream against placement=device, each run a fresh
`prunebench run` process whose peak RSS (metrics.json `peak_rss_mb`, the kernel's ru_maxrss) and
stage times are read back.

    python scripts/bench_stream.py depth            # random Llama-shaped models of 8, 16, 32, 64 blocks
    python scripts/bench_stream.py smollm2 --repeats 2   # SmolLM2-135M, Wanda and SparseGPT, alternating
    python scripts/bench_stream.py capped --gib 4.1 # a >= 4 GB model pruned inside a memory cgroup of 1/3
    python scripts/bench_stream.py modes            # SmolLM2 Wanda: one forward a block; 2 processes vs 1

Random models are written block by block (never whole in memory) as Hugging Face folders with the
char tokenizer of the tiny test models (vocabulary 259: the embeddings are negligible, so the peak is
about blocks and activations). `capped` runs the process inside a cgroup-v1 memory limit
(/sys/fs/cgroup/memory, root) of a third of the model's size on disk and reports the cgroup's own
peak (memory.max_usage_in_bytes, page cache included) beside the process's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALIB = ["calib.nsamples=8", "calib.seqlen=128", "calib.batch_size=4"]


def write_random_llama(folder: Path, layers: int, hidden: int, ffn: int, heads: int, seed: int = 0) -> int:
    """A random Llama-shaped model (fp32) saved one block per shard with an index; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from prunebench.models.loading import saveable_byte_tokenizer

    if (folder / "model.safetensors.index.json").exists():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=False)  # fmt: skip
    config.save_pretrained(folder)
    saveable_byte_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map = {}
    shards = layers + 1
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
             p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
             p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
             p + "mlp.down_proj.weight": rand(hidden, ffn), p + "input_layernorm.weight": torch.ones(hidden),
             p + "post_attention_layernorm.weight": torch.ones(hidden)}  # fmt: skip
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
    rest = {"model.embed_tokens.weight": rand(259, hidden), "model.norm.weight": torch.ones(hidden),
            "lm_head.weight": rand(259, hidden)}  # fmt: skip
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(args: list[str], out: Path, cgroup: Path | None = None) -> dict:
    """One `prunebench run` (in `cgroup` when given); metrics.json plus the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "prunebench", "run", *args, f"hydra.run.dir={out}"]
    pre = None
    if cgroup is not None:
        pre = lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731 - the child joins it
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=pre)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "rc": r.returncode, "wall_s": wall}
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mb": m["peak_rss_mb"], "timings": m["timings"],
            "ppl": m["metrics"].get("wikitext2/ppl"), "nonzero_after": m["prune"]["nonzero_after"]}  # fmt: skip


def depth(work: Path, hidden: int, ffn: int) -> None:
    print("| blocks | model on disk | device: peak RSS | stream: peak RSS | stream prune s | device prune s |")
    print("|---|---|---|---|---|---|")
    for layers in (8, 16, 32, 64):
        folder = work / f"llama-{layers}x{hidden}"
        size = write_random_llama(folder, layers, hidden, ffn, heads=hidden // 64)
        common = ["model=tiny-llama", f"model.path={folder}", "pruner=wanda", "eval=[]", "baseline=false", *CALIB]
        d = run([*common, "placement=device"], work / "out-device")
        s = run([*common, "placement=stream"], work / "out-stream")
        print(f"| {layers} | {size / 2**20:.0f} MiB | {d.get('peak_rss_mb')} MB | {s.get('peak_rss_mb')} MB |"
              f" {s.get('timings', {}).get('prune')} | {d.get('timings', {}).get('prune')} |", flush=True)  # fmt: skip


def smollm2(work: Path, repeats: int) -> None:
    print("| pruner | placement | peak RSS | prune s | eval s | wall s | ppl |")
    print("|---|---|---|---|---|---|---|")
    for pruner in ("wanda", "sparsegpt"):
        for _ in range(repeats):
            for where in ("device", "stream"):  # alternating, same machine
                extra = ["save_model=true"] if where == "stream" else []
                r = run([f"pruner={pruner}", f"placement={where}", *extra], work / f"smol-{where}")
                t = r.get("timings", {})
                print(f"| {pruner} | {where} | {r.get('peak_rss_mb')} MB | {t.get('prune')} | {t.get('eval')} |"
                      f" {r.get('wall_s')} | {r.get('ppl')} |", flush=True)  # fmt: skip


def modes(work: Path) -> None:
    """SmolLM2 Wanda: one forward a block against the reference's two; two processes against one."""
    print("| run | peak RSS | prune s | ppl |")
    print("|---|---|---|---|")
    runs = (
        ("wanda, two forwards a block (reference)", []),
        ("wanda, pruner.one_forward=true", ["pruner.one_forward=true"]),
        ("wanda, --nproc 2", ["--nproc", "2"]),
    )
    for label, args in runs:
        nproc = args[:2] if args[:1] == ["--nproc"] else []
        rest = args[2:] if nproc else args
        shutil.rmtree(work / "modes", ignore_errors=True)
        out = work / "modes"
        cmd = [sys.executable, "-m", "prunebench", "run", *nproc, "pruner=wanda", *rest, f"hydra.run.dir={out}"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(f"| {label} | error: {r.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        m = json.loads((work / "modes" / "metrics.json").read_text())
        print(f"| {label} | {m['peak_rss_mb']} MB | {m['timings']['prune']} | {m['metrics']['wikitext2/ppl']:.3f} |",
              flush=True)  # fmt: skip


def capped(work: Path, gib: float, hidden: int, ffn: int) -> None:
    block = (4 * hidden * hidden + 3 * hidden * ffn) * 4
    layers = max(1, round(gib * 2**30 / block))
    folder = work / f"llama-{layers}x{hidden}"
    size = write_random_llama(folder, layers, hidden, ffn, heads=hidden // 64)
    limit = size // 3
    cgroup = Path("/sys/fs/cgroup/memory/prunebench-bench")
    cgroup.mkdir(exist_ok=True)
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    with open(cgroup / "memory.max_usage_in_bytes", "w") as f:
        f.write("0")  # reset the peak
    common = ["model=tiny-llama", f"model.path={folder}", "pruner=wanda", "eval=[]", "baseline=false",
              "save_model=true", "placement=stream", *CALIB]  # fmt: skip
    r = run(common, work / "out-capped", cgroup)
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    failcnt = int((cgroup / "memory.failcnt").read_text())
    model_dir = work / "out-capped" / "model"
    saved = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) if "error" not in r else 0
    print(f"model {layers} blocks x hidden {hidden}/ffn {ffn}: {size / 2**30:.2f} GiB on disk; cgroup limit"
          f" {limit / 2**30:.2f} GiB; process peak RSS {r.get('peak_rss_mb')} MB; cgroup peak (page cache included)"
          f" {peak / 2**30:.2f} GiB, limit hits {failcnt}; saved {saved / 2**30:.2f} GiB; {r}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("depth", "smollm2", "capped", "modes"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/prunebench-bench-stream"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gib", type=float, default=4.1)
    ap.add_argument("--hidden", type=int, default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"# load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; {os.cpu_count()} CPUs", flush=True)
    if a.what == "depth":
        depth(a.work, a.hidden or 512, 1408)
    elif a.what == "smollm2":
        smollm2(a.work, a.repeats)
    elif a.what == "modes":
        modes(a.work)
    else:
        hidden = a.hidden or 2048
        capped(a.work, a.gib, hidden, 5632 if hidden == 2048 else 4 * hidden)


if __name__ == "__main__":
    main()
