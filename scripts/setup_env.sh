#!/usr/bin/env bash
# Builds .venv from the project's own files. Idempotent: a stamp keyed on pyproject.toml skips a finished install.
#   PREFSIFT_EXTRAS=cpu,dev (default) | gpu,dev
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PREFSIFT_EXTRAS:-cpu,dev}
STAMP=.venv/.prefsift-installed
KEY="$(sha256sum pyproject.toml scripts/setup_env.sh scripts/cpu-excludes.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi
echo "[setup] building .venv (extras: $EXTRAS); a cold install takes a few minutes" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip only bootstraps uv, which installs the rest: parallel downloads and byte-compiling on every core. The
# bytecode is compiled at install because a shell with PYTHONDONTWRITEBYTECODE set never caches it later, and
# every Ray worker would then compile torch, vLLM and transformers again as it imports them.
# pip's warnings about configured local indexes that are absent are noise.
quiet() { { grep -v -e "is ignored: it is neither" -e "^$" || true; }; }
.venv/bin/pip install -q -U pip "uv==0.13.9" 2>&1 | quiet
UV=(.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python)
if [[ "$EXTRAS" == *cpu* ]]; then
  # The CPU wheel of torch first: asked for by exact version, pip takes the CPU build rather than a CUDA one
  # (uv would take PyPI's CUDA build), so pip fetches the file and uv installs it.
  rm -rf .venv/wheels
  .venv/bin/pip download -q --no-deps -d .venv/wheels torch==2.13.0 2>&1 | quiet
  "${UV[@]}" .venv/wheels/torch-*.whl && rm -rf .venv/wheels
  "${UV[@]}" --excludes scripts/cpu-excludes.txt -e ".[$EXTRAS]"
  # A .venv built before these were excluded still has them.
  .venv/bin/uv pip uninstall -q --python .venv/bin/python torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  "${UV[@]}" -e ".[$EXTRAS]"
fi
echo "$KEY" > "$STAMP"
echo "[setup] done" >&2
