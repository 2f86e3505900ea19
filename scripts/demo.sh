#!/usr/bin/env bash
# README command 1: set up, build the tiny models, then curate -> train -> evaluate -> report on a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/python -m pipelines.tools.tiny_models runs/tiny_models
exec .venv/bin/python -m pipelines.run --config pipelines/configs/demo_cpu.yaml "$@"
