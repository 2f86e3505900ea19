#!/usr/bin/env bash
# GPU benchmarks on one GPU: generation, reward scoring and training with randomly initialised real shapes
# (a Qwen2-0.5B-shaped policy and a Llama-3.2-1B-shaped reward model, built by benchmarks/models.py; no hub).
#
#   bash benchmarks/gpu.sh                                   # on a box that already has Ray (and vLLM)
#   WHEELHOUSE=/path/to/wheels bash benchmarks/gpu.sh        # install the carried wheels first
#   WHEELHOUSE=/path/to/wheels bash benchmarks/gpu.sh --quick   # smoke sizes, a few minutes
#
# Results: one JSON line per benchmark, appended to benchmarks/results/<date>-<gpu-slug>.jsonl (RESULTS_DIR
# to change), and the tables on stdout. Other settings: PYTHON (default python3), MODEL_SHAPE (qwen2-0.5b),
# MODELS_DIR (where the random-init models are built once and reused), SITE_DIR (where wheels go).
#
# Wheels. The GPU machine has torch, transformers, triton, pyarrow, pandas, psutil, pyyaml and aiohttp, but
# no network, no Ray and no vLLM. Build a wheelhouse on a machine with network, for the GPU box's Python
# (3.12 on the H200 boxes) and platform, and bring it along (scp, a shared volume, or a folder inside the
# checkout that git ignores, e.g. `.whl/`, listed in .git/info/exclude):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheelhouse \
#       ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py tensorboardX \
#       pydantic pydantic-core annotated-types typing-inspection
#
# That is Ray with its data/train extras' dependencies that the box lacks (~70 MB, most of it Ray). vLLM is
# optional: without it bench_generate runs only its HF contender and says so. A vLLM wheel pins one torch
# version (`unzip -p vllm-*.whl '*/METADATA' | grep '^Requires-Dist: torch'`); carry a vLLM built for the
# box's torch plus its missing dependencies (`... | grep ^Requires-Dist`), or that torch too (several GB).
# The wheels are installed with `pip --no-index --no-deps --target "$SITE_DIR"` and put first on
# PYTHONPATH, so the box's own torch and CUDA libraries are left as they are.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SHAPE=${MODEL_SHAPE:-qwen2-0.5b}
RESULTS=${RESULTS_DIR:-$REPO/benchmarks/results}
MODELS=${MODELS_DIR:-${TMPDIR:-/tmp}/prefsift-bench-models}
SITE=${SITE_DIR:-${TMPDIR:-/tmp}/prefsift-site}
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ -n "${WHEELHOUSE:-}" ]]; then
    shopt -s nullglob
    wheels=("$WHEELHOUSE"/*.whl)
    shopt -u nullglob
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu.sh: WHEELHOUSE=$WHEELHOUSE holds no .whl files" >&2
        exit 2
    fi
    echo "gpu.sh: installing ${#wheels[@]} wheels from $WHEELHOUSE into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

# Preflight: a GPU, and every module the three benchmarks import, named with the wheel that provides it.
"$PY" - <<'EOF'
import importlib
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device; run bench_*.py directly for CPU figures")
need = {"ray.data": "ray", "ray.train.torch": "ray + tensorboardX, pydantic", "jsonschema": "jsonschema",
        "transformers": "transformers", "pyarrow": "pyarrow", "psutil": "psutil", "yaml": "pyyaml"}
missing = []
for mod, wheel in need.items():
    try:
        importlib.import_module(mod)
    except Exception as e:  # any failure to import, so that every missing piece is reported at once
        missing.append(f"{mod} ({wheel}): {type(e).__name__}: {e}")
if missing:
    sys.exit("gpu.sh: missing modules; add their wheels to WHEELHOUSE:\n  " + "\n  ".join(missing))
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
EOF

# vLLM is optional; a wheel built against another torch fails on import with more than an ImportError.
# ray.data.llm is a contender too when it imports (it needs aiohttp; its failure to run is noted, not fatal).
if "$PY" -c "import vllm" >/dev/null 2>&1; then
    BACKENDS=raw-vllm,sync,async
    "$PY" -c "import ray.data.llm" >/dev/null 2>&1 && BACKENDS=$BACKENDS,ray-data-llm
    SCORERS=baseline,raw-vllm,hf,vllm
else
    BACKENDS=hf
    SCORERS=baseline,hf
    echo "gpu.sh: vllm does not import here; generation runs the HF backend only, scoring the HF loop and backend" >&2
fi

# Generation crosses at least 8 map_batches calls (prompts / batch size), as production does. The random-init
# policy rarely emits eos, so its lengths run to max-tokens; the length distribution is printed.
if (( QUICK )); then
    GEN="--prompts 64 --max-tokens 64 --max-model-len 2048 --batch-size 8"
    SCORE="--responses 1200 --batch-size 128 --micro-batch-size 32 --max-length 1024"
    TRAIN="--steps 10 --max-length 1024"
else
    # 2048 prompts x K=4 x 256 tokens in 8 calls of 256 prompts keeps vLLM's batch full for tens of seconds.
    GEN="--prompts 2048 --max-tokens 256 --max-model-len 2048 --batch-size 256 --max-concurrent-batches 4"
    SCORE="--responses 9600 --batch-size 128 --micro-batch-size 32 --max-length 1024"
    TRAIN="--steps 40 --max-length 1024"
fi

echo "gpu.sh: building the $SHAPE models in $MODELS (once; reused by every benchmark)" >&2
"$PY" -m benchmarks.models "$MODELS" --shape "$SHAPE" >&2

QUICK_FLAG=()
(( QUICK )) && QUICK_FLAG=(--quick)
"$PY" benchmarks/run_all.py ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --stages generate,score,train --model-shape "$SHAPE" \
    --models-dir "$MODELS" --save --results-dir "$RESULTS" \
    --extra generate="--backends $BACKENDS $GEN" --extra score="--contenders $SCORERS $SCORE" --extra train="$TRAIN"
