#!/usr/bin/env bash
# Set up (idempotent), lint, and run every test that CI runs (unit, CLI, slow integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check prunebench tests scripts
ruff format --check prunebench tests scripts
# PYTEST_WORKERS=2 spreads the tests over two pytest-xdist workers (most tests use one core at a
# time: tiny models, subprocess start-up). Not yet the default: the whole suite has not been
# validated under xdist. 0 runs in one process.
pytest -n "${PYTEST_WORKERS:-0}" -m "not paper" "$@"
