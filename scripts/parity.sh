#!/usr/bin/env bash
# The authors' side of issue #28's parity table: SliceGPT (microsoft/TransformerCompression) and
# LLM-Pruner (horseee/LLM-Pruner, llama3.py's GQA block pruning) run with their own code on the
# embedded SmolLM2-135M, fed the exact token windows prunebench uses, scored with prunebench's
# perplexity formula. Nothing here is committed code of theirs: their sources are unpacked under
# $PARITY_DIR (default /tmp/parity), patched there by the steps below, and run in scratch venvs.
# scripts/parity_compare.py runs prunebench's side and prints the table.
#
#   scripts/parity.sh                 # every step: setup data slicegpt llm_pruner summary
#   scripts/parity.sh slicegpt        # one step (setup and data must have run once)
#   SLICEGPT_SRC=~/TransformerCompression LLM_PRUNER_SRC=~/LLM-Pruner.tar.gz scripts/parity.sh
#
# Sources: SLICEGPT_SRC / LLM_PRUNER_SRC may each be a checkout folder, a .tar.gz, or a URL of one;
# the defaults are GitHub tarballs of the commits this was written against (a user with internet).
# Protocol knobs (defaults: a few minutes per run on 2 CPU cores):
#   SG_NSAMPLES=32 SG_SEQLEN=512 SG_SPARSITIES="0.25 0.55" SG_ORIENTATION=pca SG_ROUND=8 SG_BATCH=16
#   LP_NSAMPLES=10 LP_SEQLEN=64 LP_RATIOS="0.25 0.35" LP_START=4 LP_END=28 LP_TAYLOR=param_first
#   CALIB_SOURCE=c4 SEED=0 EVAL_SEQLEN=512 EVAL_WINDOWS=16 TORCH_SPEC=torch==2.13.0
# (on an idle 2-core CPU: SliceGPT ~3-7 min per sparsity, LLM-Pruner ~1-2 min per ratio, most of it
# the 16 x 512 evaluation; several times that on a loaded machine)
# The GQA fold experiment (what the authors' query-head order costs, see patch_llm_pruner):
#   PARITY_GQA_FOLD=hf LP_RATIOS=0.35 scripts/parity.sh llm_pruner     # results tagged _hf-fold
# Only one heavy job runs at a time (the runs are sequential). Results: $PARITY_DIR/results/*.json
# (+ .log with /usr/bin/time -v; LLM-Pruner also .groups.json: every DepGraph group and its scores).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARITY_DIR=${PARITY_DIR:-/tmp/parity}
SLICEGPT_COMMIT=6b12cdee6ad51791d7c776b3a046bc408b9e77e9
LLM_PRUNER_COMMIT=128a07d977f9b205d60ab14cfbc6a78f8a8e39d2
SLICEGPT_SRC=${SLICEGPT_SRC:-https://github.com/microsoft/TransformerCompression/archive/$SLICEGPT_COMMIT.tar.gz}
LLM_PRUNER_SRC=${LLM_PRUNER_SRC:-https://github.com/horseee/LLM-Pruner/archive/$LLM_PRUNER_COMMIT.tar.gz}
MODEL_SRC=${MODEL_SRC:-${PRUNEBENCH_CACHE:-$HOME/.cache/prunebench}/models/smollm2-135m}
# The name the authors' SliceGPT Llama adapter sees (its name gate is widened to accept it below).
MODEL_NAME=HuggingFaceTB/SmolLM2-135M-Instruct
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

SG_NSAMPLES=${SG_NSAMPLES:-32}
SG_SEQLEN=${SG_SEQLEN:-512}
SG_SPARSITIES=${SG_SPARSITIES:-0.25 0.55}
SG_ORIENTATION=${SG_ORIENTATION:-pca}
SG_ROUND=${SG_ROUND:-8}
SG_BATCH=${SG_BATCH:-16}
LP_NSAMPLES=${LP_NSAMPLES:-10}
LP_SEQLEN=${LP_SEQLEN:-64}
LP_RATIOS=${LP_RATIOS:-0.25 0.35}
LP_START=${LP_START:-4}
LP_END=${LP_END:-28}
LP_TAYLOR=${LP_TAYLOR:-param_first}
CALIB_SOURCE=${CALIB_SOURCE:-c4}
SEED=${SEED:-0}
EVAL_SEQLEN=${EVAL_SEQLEN:-512}
EVAL_WINDOWS=${EVAL_WINDOWS:-16}

SG_DIR=$PARITY_DIR/TransformerCompression
LP_DIR=$PARITY_DIR/LLM-Pruner
DATA=$PARITY_DIR/data
RESULTS=$PARITY_DIR/results
DRIVERS=$PARITY_DIR/drivers
MODEL=$PARITY_DIR/model/smollm2-135m
SG_CALIB=$DATA/calib_${CALIB_SOURCE}_${SG_NSAMPLES}x${SG_SEQLEN}_seed${SEED}.pt
LP_CALIB=$DATA/calib_${CALIB_SOURCE}_${LP_NSAMPLES}x${LP_SEQLEN}_seed${SEED}.pt
EVAL=$DATA/wikitext2_test_${EVAL_WINDOWS}x${EVAL_SEQLEN}.pt

say() { printf '[parity] %s\n' "$*" >&2; }
die() { printf '[parity] error: %s\n' "$*" >&2; exit 1; }

# --- sources -------------------------------------------------------------------------------------
# unpack SRC (folder | .tar.gz | URL of a .tar.gz) into DEST/ as a pristine copy, top folder stripped
unpack() {
  local src=$1 dest=$2
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  if [[ -d $src ]]; then
    (cd "$src" && tar --exclude=.git --exclude=lm-evaluation-harness -cf - .) | tar -xf - -C "$dest.tmp"
  elif [[ -f $src ]]; then
    tar -xzf "$src" -C "$dest.tmp" --strip-components=1 --exclude='*/lm-evaluation-harness'
  elif [[ $src == http*://* ]]; then
    curl -fsSL "$src" | tar -xz -C "$dest.tmp" --strip-components=1 --exclude='*/lm-evaluation-harness' \
      || die "could not download $src; pass a local checkout or tarball instead (SLICEGPT_SRC / LLM_PRUNER_SRC)"
  else
    die "source $src is neither a folder, a file nor a URL"
  fi
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
}

# replace OLD by NEW in FILE exactly COUNT times, or stop: an upstream change never passes silently
edit() {
  local file=$1 count=$2 old=$3 new=$4
  python3 - "$file" "$count" "$old" "$new" <<'PY'
import sys
path, count, old, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
text = open(path, encoding="utf-8").read()
found = text.count(old)
if found != count:
    sys.exit(f"[parity] patch of {path}: expected {count} occurrence(s) of {old!r}, found {found}")
open(path, "w", encoding="utf-8").write(text.replace(old, new))
PY
}

patch_slicegpt() {
  # 1. The Llama adapter only accepts names starting meta-llama/Llama-2 or Meta-Llama-3 (#128);
  #    SmolLM2 is a Llama (GQA changes nothing: only the hidden dimension is sliced).
  edit "$SG_DIR/src/slicegpt/adapters/llama_adapter.py" 2 \
    'model_name.startswith("meta-llama/Llama-2") or model_name.startswith("meta-llama/Meta-Llama-3")' \
    'model_name.startswith(("meta-llama/Llama-2", "meta-llama/Meta-Llama-3", "HuggingFaceTB/SmolLM2"))'
}

patch_llm_pruner() {
  # 1. MetaPruner.prune_local builds the KV-head index list with torch.cat over the chosen heads;
  #    when n_pruned // head_dim == 0 (ratio 0.25 of 3 KV heads: 48 channels < one 64-wide head)
  #    the list is empty and torch.cat raises. Removing nothing is what the rounding-down means.
  edit "$LP_DIR/LLMPruner/torch_pruning/pruner/algorithms/metapruner.py" 1 \
    '                elif consecutive_groups > 1:
                    pruning_groups = imp_argsort[:(n_pruned//consecutive_groups)]
                    group_size = consecutive_groups' \
    '                elif consecutive_groups > 1:
                    pruning_groups = imp_argsort[:(n_pruned//consecutive_groups)]
                    if len(pruning_groups) == 0:  # parity patch: fewer channels than one group
                        continue
                    group_size = consecutive_groups'
  # 2. An experiment, inert unless PARITY_GQA_FOLD=hf: the importance of the query rows and o_proj
  #    columns (n_heads*hd long) is folded onto the KV channels (n_kv*hd) by
  #    imp.view(rep, n_kv*hd).sum(0), which credits query head h to KV head h mod n_kv, while
  #    Hugging Face's repeat_kv (and the removal itself, _ExpandIndexMapping) pairs it with KV head
  #    h // rep. With PARITY_GQA_FOLD=hf the fold follows repeat_kv, to measure what the order costs.
  edit "$LP_DIR/LLMPruner/pruner/hf_llama_pruner.py" 1 'import torch
import torch.nn as nn
' 'import os
import torch
import torch.nn as nn
'
  edit "$LP_DIR/LLMPruner/pruner/hf_llama_pruner.py" 2 \
    '                imp = imp.view(len(imp) // min_imp_size, min_imp_size).sum(0)
' \
    '                if os.environ.get("PARITY_GQA_FOLD") == "hf" and consecutive_groups > 1:  # parity experiment
                    imp = imp.view(min_imp_size // consecutive_groups, len(imp) // min_imp_size, consecutive_groups)
                    imp = imp.sum(1).flatten()
                else:
                    imp = imp.view(len(imp) // min_imp_size, min_imp_size).sum(0)
'
}

model_copy() {
  # transformers 4.41/4.43 read rope_theta (not transformers 5's rope_parameters; the default
  # 10000 would silently change the model) and torch_dtype; the tokenizer class name
  # "TokenizersBackend" is transformers 5's: the same tokenizer.json loads as PreTrainedTokenizerFast,
  # once its BPE merges are written as "a b" strings (tokenizers 0.19 cannot read pairs). The token
  # ids fed to both codes come from prunebench's tokenizer anyway (step data); `check` compares.
  [[ -f $MODEL_SRC/config.json ]] || die "no model at $MODEL_SRC: run prunebench once (it converts SmolLM2 there)"
  rm -rf "$MODEL" && mkdir -p "$MODEL"
  cp "$MODEL_SRC"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$MODEL"/
  python3 - "$MODEL" <<'PY'
import json, sys
folder = sys.argv[1]
cfg = json.load(open(f"{folder}/config.json"))
rope = cfg.get("rope_parameters") or {}
assert rope.get("rope_type", "default") == "default", rope
cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
cfg["torch_dtype"] = cfg.get("dtype", "float32")
json.dump(cfg, open(f"{folder}/config.json", "w"), indent=2)
tj = json.load(open(f"{folder}/tokenizer.json"))
merges = tj["model"].get("merges") or []
if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs; 0.19 reads "a b" strings
    assert not any(" " in x for pair in merges for x in pair)
    tj["model"]["merges"] = [" ".join(pair) for pair in merges]
    json.dump(tj, open(f"{folder}/tokenizer.json", "w"), ensure_ascii=False)
tok = json.load(open(f"{folder}/tokenizer_config.json"))
tok["tokenizer_class"] = "PreTrainedTokenizerFast"
json.dump(tok, open(f"{folder}/tokenizer_config.json", "w"), indent=2)
PY
}

venv() {
  local dir=$1; shift
  if [[ ! -x $dir/bin/python ]]; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q "$TORCH_SPEC"  # the CPU wheel; an unpinned torch pulls a CUDA build
  fi
  "$dir/bin/pip" install -q "$@"
}

step_setup() {
  mkdir -p "$PARITY_DIR/src" "$RESULTS" "$DRIVERS"
  say "sources: $SLICEGPT_SRC, $LLM_PRUNER_SRC"
  unpack "$SLICEGPT_SRC" "$SG_DIR"
  unpack "$LLM_PRUNER_SRC" "$LP_DIR"
  patch_slicegpt
  patch_llm_pruner
  model_copy
  # SliceGPT pins transformers 4.41.0 and datasets 2.18.0 (its decoder-layer subclass follows 4.41's
  # forward). LLM-Pruner's llama3.py (July 2024) needs a transformers whose Llama attention reshapes
  # with -1 and reads per-layer num_heads: 4.43 (Llama-3.1's release, which more_results/ covers).
  venv "$PARITY_DIR/venv-slicegpt" transformers==4.41.0 datasets==2.18.0 accelerate ml-collections numpy tqdm
  venv "$PARITY_DIR/venv-llmpruner" transformers==4.43.4 accelerate sentencepiece numpy
  write_drivers
  say "setup done: $SG_DIR, $LP_DIR, $MODEL"
}

# --- data: prunebench's own windows, dumped from the repo venv ------------------------------------
step_data() {
  mkdir -p "$DATA" "$DRIVERS"
  write_drivers
  (cd "$REPO" && .venv/bin/python "$DRIVERS/dump_data.py" --out "$DATA" --source "$CALIB_SOURCE" --seed "$SEED" \
    --calib "$SG_NSAMPLES" "$SG_SEQLEN" --calib "$LP_NSAMPLES" "$LP_SEQLEN" \
    --eval-seqlen "$EVAL_SEQLEN" --eval-windows "$EVAL_WINDOWS")
}

# --- runs ----------------------------------------------------------------------------------------
timed() {  # LOG CMD...: run under /usr/bin/time -v when present (its peak RSS goes into the log)
  local log=$1; shift
  if [[ -x /usr/bin/time ]]; then /usr/bin/time -v "$@" 2>&1 | tee "$log"; else "$@" 2>&1 | tee "$log"; fi
  return "${PIPESTATUS[0]}"
}

step_slicegpt() {
  for s in $SG_SPARSITIES; do
    local tag=slicegpt_s${s}_${CALIB_SOURCE}${SG_NSAMPLES}x${SG_SEQLEN}_${SG_ORIENTATION}
    say "SliceGPT sparsity $s -> $RESULTS/$tag.json"
    (cd "$PARITY_DIR" && export PYTHONPATH="$SG_DIR/src" && timed "$RESULTS/$tag.log" \
      "$PARITY_DIR/venv-slicegpt/bin/python" "$DRIVERS/run_slicegpt.py" --model "$MODEL_NAME" --model-path "$MODEL" \
      --sparsity "$s" --round-interval "$SG_ROUND" --final-orientation "$SG_ORIENTATION" \
      --cal-batch-size "$SG_BATCH" --calib "$SG_CALIB" --eval "$EVAL" --out "$RESULTS/$tag.json" \
      --cache "$PARITY_DIR/dense_slicegpt_venv.json")
  done
}

step_llm_pruner() {
  for r in $LP_RATIOS; do
    local tag=llm_pruner_r${r}_l${LP_START}-${LP_END}_${LP_TAYLOR}_${CALIB_SOURCE}${LP_NSAMPLES}x${LP_SEQLEN}
    [[ ${PARITY_GQA_FOLD:-} == hf ]] && tag=${tag}_hf-fold
    say "LLM-Pruner ratio $r, layers [$LP_START, $LP_END) -> $RESULTS/$tag.json"
    (cd "$PARITY_DIR" && export PYTHONPATH="$LP_DIR" && timed "$RESULTS/$tag.log" \
      "$PARITY_DIR/venv-llmpruner/bin/python" "$DRIVERS/run_llm_pruner.py" --model-path "$MODEL" \
      --pruning-ratio "$r" --layer-start "$LP_START" --layer-end "$LP_END" --taylor "$LP_TAYLOR" \
      --calib "$LP_CALIB" --eval "$EVAL" --out "$RESULTS/$tag.json" \
      --cache "$PARITY_DIR/dense_llmpruner_venv.json")
  done
}

step_summary() {
  python3 - "$RESULTS" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")) if ".groups" not in p.name]
print("| method | setting | dense ppl | pruned ppl | prune s | peak RSS MB (process / prune stage) | params | removed |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['method']} | {r['setting']} | {r['dense_ppl']:.3f} | {r['ppl']:.3f} | {r['prune_seconds']:.1f} |"
          f" {r['peak_rss_mb']:.0f} / {r['prune_peak_rss_mb']:.0f} | {r['params_after']:,} | {r['params_removed_share']:.2%} |")
PY
}

write_drivers() {
  mkdir -p "$DRIVERS"
  # ---------------------------------------------------------------------------- dump_data.py
  cat > "$DRIVERS/dump_data.py" <<'PY'
"""prunebench's calibration windows (data.calibration_windows, as pipeline.run draws them with
cfg.seed) and WikiText-2 test windows (evals.perplexity.Perplexity.windows), saved as int64 .pt."""
import argparse
import hashlib
import json
from pathlib import Path

import torch

from prunebench import models
from prunebench.config import compose
from prunebench.data import calibration_windows, verify
from prunebench.evals.perplexity import Perplexity

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--source", default="c4")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--calib", nargs=2, type=int, action="append", metavar=("NSAMPLES", "SEQLEN"), default=[])
p.add_argument("--eval-seqlen", type=int, default=512)
p.add_argument("--eval-windows", type=int, default=16)
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
cfg = compose()
verify.configure(verify=True, cache_dir=cfg.paths.cache_dir)
model, tok = models.load(cfg.model, cfg.paths.cache_dir, seed=a.seed)
manifest = {}
for n, seqlen in a.calib:
    c = calibration_windows(tok, a.source, n, seqlen, a.seed)
    path = out / f"calib_{a.source}_{n}x{seqlen}_seed{a.seed}.pt"
    torch.save(c.input_ids.to(torch.int64).clone(), path)
    manifest[path.name] = {"shape": list(c.shape), "method": c.method, "key": c.key, "source": a.source, "seed": a.seed}
ev = Perplexity(dataset="wikitext2_test", seqlen=a.eval_seqlen, max_windows=a.eval_windows)
w = ev.windows(model, tok).to(torch.int64).clone()
path = out / f"wikitext2_test_{a.eval_windows}x{a.eval_seqlen}.pt"
torch.save(w, path)
manifest[path.name] = {"shape": list(w.shape), "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]}
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
print(json.dumps(manifest, indent=1))
PY
  # ---------------------------------------------------------------------------- common.py
  cat > "$DRIVERS/parity_common.py" <<'PY'
"""What both drivers share: prunebench's perplexity formula and the memory/time probes."""
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def ppl(model, windows: torch.Tensor) -> float:
    """exp(mean over windows of the window's mean next-token NLL), fp32 logits: prunebench's
    evals/perplexity.py (one window per forward, no attention mask, no ignored ids)."""
    model.eval()
    total = 0.0
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0]
        total += float(F.cross_entropy(logits[:-1].float(), w[1:], reduction="mean"))
    return math.exp(total / len(windows))


def cached(path: str, key: str, compute):
    """A value stored in the JSON file `path` under `key` (the dense model's perplexity does not
    change between settings), else compute() and store it."""
    store = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    if key not in store:
        store[key] = compute()
        Path(path).write_text(json.dumps(store, indent=1))
    return store[key]


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied tensor once


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    """VmHWM := VmRSS, so the next VmHWM is the peak of one stage (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


class Stage:
    """Wall seconds and peak RSS of a block: `with Stage() as s: ...; s.seconds, s.peak_mb`."""

    def __enter__(self):
        reset_hwm()
        self.rss_before_mb = status_mb("VmRSS")
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0  # less sensitive to a shared machine than wall time
        self.peak_mb = status_mb("VmHWM")
PY
  # ---------------------------------------------------------------------------- run_slicegpt.py
  cat > "$DRIVERS/run_slicegpt.py" <<'PY'
"""SliceGPT with the authors' library, in the order of experiments/run_slicegpt.py:slicing_main
(load -> [baseline ppl] -> replace_layers -> fuse_modules -> [fused ppl] -> ConstSlicingScheduler
with d rounded down to a multiple of --round-interval -> rotate_and_slice -> ppl), on CPU in fp32,
with prunebench's calibration windows in place of data_utils.prepare_dataloader and prunebench's
WikiText-2 windows in place of prepare_test_dataloader."""
import argparse
import json
import logging
import platform

import torch
from torch.utils.data import DataLoader, Dataset

from parity_common import Stage, cached, params, peak_rss_mb, ppl
from slicegpt import gpu_utils, hf_utils, layernorm_fusion, rotate
from slicegpt.config import config
from slicegpt.slicing_scheduler import ConstSlicingScheduler

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--model-path", required=True)
p.add_argument("--sparsity", type=float, required=True)
p.add_argument("--round-interval", type=int, default=8)
p.add_argument("--final-orientation", default="pca", choices=["pca", "random"])
p.add_argument("--cal-batch-size", type=int, default=16)
p.add_argument("--calib", required=True)
p.add_argument("--eval", required=True)
p.add_argument("--out", required=True)
p.add_argument("--cache", required=True, help="JSON file of the dense and fused perplexities")
a = p.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")
torch.manual_seed(0)


class Windows(Dataset):
    """The dict batches prepare_dataloader yields (input_ids, attention_mask), from fixed windows."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


config.device = torch.device("cpu")
config.dtype = torch.float32
calib, windows = torch.load(a.calib), torch.load(a.eval)
with Stage() as load:
    adapter, tokenizer = hf_utils.get_model_and_tokenizer(a.model, a.model_path, dtype=torch.float32)
model = adapter.model
dense_params = params(model)
dense_ppl = cached(a.cache, f"dense {a.eval}", lambda: ppl(model, windows))
# The authors' evaluator (gpu_utils.evaluate_ppl: per-sequence mean NLL, pad = eos id 2 ignored,
# absent from WikiText-2) against the formula above, on the first windows only (it is slow on CPU).
check = windows[:2]
test_loader = DataLoader(Windows(check), batch_size=1)
dense_check = cached(a.cache, f"dense check {a.eval}", lambda: {
    "windows": len(check), "prunebench_formula": ppl(model, check),
    "authors_evaluate_ppl": gpu_utils.evaluate_ppl(model, model.config.pad_token_id, test_loader)})

with Stage() as fuse:
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
fused_params = params(model)
fused_ppl = cached(a.cache, f"fused {a.eval}", lambda: ppl(model, windows))  # --eval-fused-model: the embedding mean subtraction is not exact for RMSNorm

d = int((1 - a.sparsity) * adapter.hidden_size)
d -= d % a.round_interval
loader = DataLoader(Windows(calib), batch_size=a.cal_batch_size)
with Stage() as slicing:
    rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(d), final_orientation=a.final_orientation)
pruned_params = params(model)
pruned_ppl = ppl(model, windows)
pruned_check = {"windows": len(check), "prunebench_formula": ppl(model, check),
                "authors_evaluate_ppl": gpu_utils.evaluate_ppl(model, model.config.pad_token_id, test_loader)}

shapes = {
    "embed": list(model.model.embed_tokens.weight.shape),
    "lm_head": list(model.lm_head.weight.shape),
    "layer0.q_proj": list(model.model.layers[0].self_attn.q_proj.weight.shape),
    "layer0.attn_shortcut_Q": list(model.model.layers[0].attn_shortcut_Q.shape),
    "last.down_proj": list(model.model.layers[-1].mlp.down_proj.weight.shape),
    "last.mlp_shortcut_Q": list(model.model.layers[-1].mlp_shortcut_Q.shape),
}
result = {
    "method": "slicegpt",
    "setting": f"sparsity {a.sparsity} (d={d})",
    "sparsity": a.sparsity,
    "width": d,
    "round_interval": a.round_interval,
    "final_orientation": a.final_orientation,
    "calib": {"file": a.calib, "shape": list(calib.shape), "batch_size": a.cal_batch_size},
    "eval": {"file": a.eval, "shape": list(windows.shape)},
    "dense_ppl": dense_ppl,
    "dense_ppl_check": dense_check,
    "fused_ppl": fused_ppl,
    "ppl": pruned_ppl,
    "ppl_check": pruned_check,
    "params_before": dense_params,
    "params_after_fusion": fused_params,
    "params_after": pruned_params,
    "params_removed_share": 1 - pruned_params / dense_params,
    "sliced_fraction_authors": 1 - pruned_params / fused_params,  # run_slicegpt.py's log line
    "prune_seconds": fuse.seconds + slicing.seconds,
    "prune_cpu_seconds": fuse.cpu_seconds + slicing.cpu_seconds,
    "seconds": {"load": load.seconds, "fuse": fuse.seconds, "rotate_and_slice": slicing.seconds},
    "prune_peak_rss_mb": max(fuse.peak_mb, slicing.peak_mb),
    "rss_before_prune_mb": fuse.rss_before_mb,
    "peak_rss_mb": peak_rss_mb(),
    "shapes": shapes,
    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                 "python": platform.python_version()},
    "threads": torch.get_num_threads(),
}
open(a.out, "w").write(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k not in ("shapes", "calib", "eval")}, indent=1))
PY
  # ---------------------------------------------------------------------------- run_llm_pruner.py
  cat > "$DRIVERS/run_llm_pruner.py" <<'PY'
"""LLM-Pruner's GQA block pruning with the authors' library, in the order of llama3.py's
`--block_wise` branch (DepGraph MetaPruner rooted at k_proj with head_dim consecutive groups and
gate_proj, TaylorImportance, one backward of the mean LM loss on the example prompts, pruner.step(),
then per-layer num_heads / num_key_value_heads), on CPU in fp32 (llama3.py loads fp16 always;
hf_prune.py keeps fp32 on --device cpu), with prunebench's calibration windows in place of
get_examples('bookcorpus', ...) and prunebench's WikiText-2 windows in place of PPLMetric."""
import argparse
import json
import os
import platform
import random
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import LLMPruner.torch_pruning as tp
from LLMPruner.pruner import hf_llama_pruner as llama_pruner
from parity_common import Stage, cached, params, peak_rss_mb, ppl

p = argparse.ArgumentParser()
p.add_argument("--model-path", required=True)
p.add_argument("--pruning-ratio", type=float, required=True)
p.add_argument("--layer-start", type=int, default=4)
p.add_argument("--layer-end", type=int, default=28)
p.add_argument("--taylor", default="param_first")
p.add_argument("--grouping-strategy", default="sum")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--calib", required=True)
p.add_argument("--eval", required=True)
p.add_argument("--out", required=True)
p.add_argument("--cache", required=True, help="JSON file of the dense perplexity")
a = p.parse_args()
random.seed(a.seed)
np.random.seed(a.seed)
torch.manual_seed(a.seed)



class Recorder:
    """The importance the authors' MetaPruner sees for each group (one value per root channel, before
    its view(-1, head_dim).sum(1) per head) and the group's members, for the report."""

    def __init__(self, inner):
        self.inner, self.groups, self.names = inner, [], None

    def __call__(self, group, **kw):
        out = self.inner(group, **kw)
        names = self.names = self.names or {m: n for n, m in model.named_modules()}
        members = [f"{names.get(dep.target.module, type(dep.target.module).__name__)}:{dep.handler.__name__}:{len(idxs)}"
                   for dep, idxs in group]
        self.groups.append({"root": members[0], "members": members, "importance": out.tolist() if out is not None else None})
        return out


@torch.no_grad()
def fold_check(model, layers):
    """param_first KV-group scores recomputed from the gradients, with the authors' fold of the
    query / o_proj channels (imp.view(rep, n_kv*hd).sum(0): query head h is credited to KV head
    h mod n_kv) and with Hugging Face's order (repeat_kv: query head h reads KV head h // rep)."""
    out = []
    for i in layers:
        att = model.model.layers[i].self_attn
        hd, nkv = att.head_dim, att.num_key_value_heads
        kv = sum((m.weight * m.weight.grad).abs().sum(1) for m in (att.k_proj, att.v_proj))
        q = (att.q_proj.weight * att.q_proj.weight.grad).abs().sum(1)
        o = (att.o_proj.weight * att.o_proj.weight.grad).abs().sum(0)
        rep = q.numel() // kv.numel()
        authors = kv + (q + o).view(rep, -1).sum(0)
        hf = kv + (q + o).view(nkv, rep, hd).sum(1).flatten()
        out.append({"layer": i, "authors_fold": authors.view(-1, hd).sum(1).tolist(),
                    "hf_fold": hf.view(-1, hd).sum(1).tolist(), "authors_channels": authors.tolist()})
    return out


examples, windows = torch.load(a.calib), torch.load(a.eval)
with Stage() as load:
    tokenizer = AutoTokenizer.from_pretrained(a.model_path)
    model = LlamaForCausalLM.from_pretrained(a.model_path, torch_dtype=torch.float32)
dense_params = params(model)
dense_ppl = cached(a.cache, f"dense {a.eval}", lambda: ppl(model, windows))
heads_before = [(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features) for l in model.model.layers]
kv_before = [l.self_attn.k_proj.weight.detach().clone() for l in model.model.layers]
q_before = [l.self_attn.q_proj.weight.detach().clone() for l in model.model.layers]

with Stage() as prune:
    for param in model.parameters():
        param.requires_grad_(True)
    forward_prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338],
                                    [1, 3439, 17632, 1925, 29892, 278, 6368, 310]])  # llama3.py's tracing input
    imp = Recorder(llama_pruner.TaylorImportance(group_reduction=a.grouping_strategy, taylor=a.taylor))
    layers = range(a.layer_start, a.layer_end)
    pruner = tp.pruner.MetaPruner(
        model,
        forward_prompts,
        importance=imp,
        global_pruning=False,
        iterative_steps=1,
        ch_sparsity=a.pruning_ratio,
        ignored_layers=[],
        channel_groups={},
        consecutive_groups={l.self_attn.k_proj: l.self_attn.head_dim for l in model.model.layers},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner},
        root_module_types=None,
        root_instances=[model.model.layers[i].self_attn.k_proj for i in layers]
        + [model.model.layers[i].mlp.gate_proj for i in layers],
    )
    model.zero_grad()
    if a.taylor in ("param_mix", "param_second"):
        for j in range(len(examples)):  # llama3.py's per-sample Fisher accumulation
            batch = examples[j].unsqueeze(0)
            model(batch, labels=batch).loss.backward()
            for mp in model.parameters():
                mp.grad = mp.grad * mp.grad / len(examples)
                if hasattr(mp, "acc_grad"):
                    mp.acc_grad += mp.grad
                else:
                    mp.acc_grad = mp.grad.clone()
            model.zero_grad()
    loss = model(examples, labels=examples).loss
    loss.backward()
    t_fold = time.perf_counter()
    folds = fold_check(model, layers) if a.taylor == "param_first" else None
    t_fold = time.perf_counter() - t_fold  # a check of ours: left out of the pruning time
    pruner.step()
    for layer in model.model.layers:
        layer.self_attn.num_heads = layer.self_attn.q_proj.weight.data.shape[0] // layer.self_attn.head_dim
        layer.self_attn.num_key_value_heads = layer.self_attn.k_proj.weight.data.shape[0] // layer.self_attn.head_dim
    model.zero_grad()
    for name, mp in model.named_parameters():
        if "weight" in name:
            mp.grad = None
    del pruner
for param in model.parameters():
    param.requires_grad_(False)

pruned_params = params(model)
pruned_ppl = ppl(model, windows)


def kept_rows(before, after):
    """Which rows of `before` survive in `after` (rows are kept in order)."""
    kept, j = [], 0
    for i in range(before.shape[0]):
        if j < after.shape[0] and torch.equal(before[i], after[j]):
            kept.append(i)
            j += 1
    return kept


per_layer = []
for i, l in enumerate(model.model.layers):
    hd = l.self_attn.head_dim
    kv_kept = sorted({r // hd for r in kept_rows(kv_before[i], l.self_attn.k_proj.weight.detach())})
    q_kept = sorted({r // hd for r in kept_rows(q_before[i], l.self_attn.q_proj.weight.detach())})
    per_layer.append({"layer": i, "q_heads": l.self_attn.q_proj.out_features // hd,
                      "kv_heads": l.self_attn.k_proj.out_features // hd,
                      "ffn": l.mlp.gate_proj.out_features, "kv_kept": kv_kept, "q_kept": q_kept})
result = {
    "method": "llm_pruner",
    "setting": f"ratio {a.pruning_ratio}, layers [{a.layer_start}, {a.layer_end}), {a.taylor}"
    + (" (GQA fold in HF order: parity experiment)" if os.environ.get("PARITY_GQA_FOLD") == "hf" else ""),
    "gqa_fold_order": os.environ.get("PARITY_GQA_FOLD") or "authors",
    "pruning_ratio": a.pruning_ratio,
    "layers": [a.layer_start, a.layer_end],
    "taylor": a.taylor,
    "grouping_strategy": a.grouping_strategy,
    "calib": {"file": a.calib, "shape": list(examples.shape)},
    "eval": {"file": a.eval, "shape": list(windows.shape)},
    "calib_loss": float(loss),
    "dense_ppl": dense_ppl,
    "ppl": pruned_ppl,
    "params_before": dense_params,
    "params_after": pruned_params,
    "params_removed_share": 1 - pruned_params / dense_params,
    "prune_seconds": prune.seconds - t_fold,
    "prune_cpu_seconds": prune.cpu_seconds,
    "seconds": {"load": load.seconds, "prune": prune.seconds},
    "prune_peak_rss_mb": prune.peak_mb,
    "rss_before_prune_mb": prune.rss_before_mb,
    "peak_rss_mb": peak_rss_mb(),
    "per_layer": per_layer,
    "attn_implementation": model.config._attn_implementation,
    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                 "python": platform.python_version()},
    "threads": torch.get_num_threads(),
}
open(a.out, "w").write(json.dumps(result, indent=1))
if folds:  # does the recomputation reproduce what MetaPruner saw, and which KV head would each fold drop?
    recorded = [g["importance"] for g in imp.groups if ".self_attn." in g["root"]]
    for f, rec in zip(folds, recorded, strict=True):
        f["max_abs_diff_vs_recorded"] = max(abs(x - y) for x, y in zip(f.pop("authors_channels"), rec))
    result["gqa_fold"] = {
        "max_abs_diff_vs_recorded": max(f["max_abs_diff_vs_recorded"] for f in folds),
        "layers_where_folds_rank_kv_heads_differently": [
            f["layer"] for f in folds
            if sorted(range(len(f["authors_fold"])), key=f["authors_fold"].__getitem__)
            != sorted(range(len(f["hf_fold"])), key=f["hf_fold"].__getitem__)],
        "layers_where_lowest_kv_head_differs": [
            f["layer"] for f in folds
            if min(range(len(f["authors_fold"])), key=f["authors_fold"].__getitem__)
            != min(range(len(f["hf_fold"])), key=f["hf_fold"].__getitem__)],
        "per_layer": folds,
    }
    open(a.out, "w").write(json.dumps(result, indent=1))
open(a.out.replace(".json", ".groups.json"), "w").write(json.dumps(imp.groups))
print(json.dumps({k: v for k, v in result.items() if k not in ("per_layer", "calib", "eval")}, indent=1))
PY
}

main() {
  local steps=("$@")
  [[ ${#steps[@]} -gt 0 ]] || steps=(setup data slicegpt llm_pruner summary)
  for s in "${steps[@]}"; do
    case $s in
      setup) step_setup ;;
      data) step_data ;;
      slicegpt) write_drivers; step_slicegpt ;;
      llm_pruner) write_drivers; step_llm_pruner ;;
      summary) step_summary ;;
      *) die "unknown step $s; steps: setup data slicegpt llm_pruner summary" ;;
    esac
  done
}

main "$@"
