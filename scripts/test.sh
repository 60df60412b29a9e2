#!/usr/bin/env bash
# Set up (idempotent), lint, and run every test that CI runs (unit, CLI, slow integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check prunebench tests scripts
ruff format --check prunebench tests scripts
pytest -m "not paper" "$@"
