#!/usr/bin/env bash
# README command 2: set up the environment from the project's files, then run the whole CPU test suite.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast local loop (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The report test opens the page in headless Chromium (Debian's package). Installed when missing and this
# shell may use apt (root on Debian, as CI is); elsewhere that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium for the report's headless-browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "[setup] chromium could not be installed; its test will skip" >&2
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check operators pipelines tests benchmarks
# Two workers, a file each at a time: Ray, vLLM and Ray Train tests spend much of their time starting
# processes and waiting on them, so two files overlap well even on 2 cores. PREFSIFT_TEST_WORKERS=0 runs in
# one process (`-n 0` as an argument does the same).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PREFSIFT_TEST_WORKERS:-2}" --dist loadfile "$@"
