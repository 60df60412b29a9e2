#!/usr/bin/env bash
# Set up (idempotent), lint, and run every test that CI runs (unit, CLI, slow integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check prunebench tests scripts
ruff format --check prunebench tests scripts
# Two pytest-xdist workers by default (most tests use one core at a time: tiny models, subprocess
# start-up; conftest gives each worker one torch thread). --dist worksteal: an idle worker takes
# tests queued for the other, so a few long tests at the end do not leave a core idle.
# PYTEST_WORKERS=0 runs everything in one process (serial); any other count works too.
pytest -n "${PYTEST_WORKERS:-2}" --dist worksteal -m "not paper" "$@"
