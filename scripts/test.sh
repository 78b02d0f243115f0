#!/usr/bin/env bash
# Run the test suite on a fresh machine (CPU only; ~12 minutes on 2 cores after the install):
#
#   bash scripts/test.sh [PYTEST_ARGS...]        e.g. bash scripts/test.sh -m "not deepspeed"
#
# Creates .venv if missing, installs the project with every extra (torch 2.13.0 pinned first, so no
# dependency pulls another torch), lints, then runs pytest offline. The real-data tests use the packaged
# all-MiniLM-L6-v2 and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check beft_trainer recipes benchmarks tests
ruff format --check beft_trainer recipes benchmarks tests
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
