#!/usr/bin/env bash
# README command 2: set up the environment from the project's files, then run the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check operators pipelines tests benchmarks 2>/dev/null || .venv/bin/ruff check operators pipelines tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
