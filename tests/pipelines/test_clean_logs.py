"""A clean run's log: the stage lines, the summary table, and nothing that looks like a failure.

The curation runs as a user runs it, `python -m pipelines.curate` in its own process with its own embedded
Ray, on the generation path: model actors load weights and measure prompts past the context length.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RATED = str(REPO / "pipelines/configs/real_rated.yaml")
PROMPTS = str(REPO / "pipelines/data/arena_hard_prompts_200.jsonl.gz")

# Words that read as a failure, and lines each library repeats per actor that a user has to read past.
ALARMING = ("Error", "Failed", "Traceback")
CHATTER = ("Loading weights", "Writing model shards", "Token indices sequence length", "TrainingReport(",
           "Progress bars disabled")


# vLLM on CPU (DESIGN.md): float32, a small explicit KV cache (no warm-up pass to size it).
BACKENDS = {"hf": ["generate.backend=hf", "score.backend=hf"],
            "vllm": ["generate.backend=vllm", "generate.dtype=float32", "generate.kv_cache_gib=0.0625",
                     "score.backend=vllm", "score.kv_cache_gib=0.0625"]}


@pytest.mark.slow  # a Ray start-up and two model actor pools in a subprocess
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_curate_generation_log_is_clean(tiny_models, tmp_path, backend):
    """With vLLM too: its engines are shut down when Ray Data deletes their actors' operators, before the
    actors exit (no "engine core exited unexpectedly", no EngineDeadError, no resource tracker KeyErrors)."""
    if backend == "vllm":
        pytest.importorskip("vllm", reason="the vllm extra is not installed")
    out = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.curate", "--config", RATED, f"input.path={PROMPTS}", "input.limit=12",
         *BACKENDS[backend], f"generate.model={tiny_models['policy']}", "generate.num_samples=2",
         "generate.max_tokens=8", "generate.max_model_len=256", "generate.num_cpus=0.5",
         f"score.models=[{{path: {tiny_models['reward']}}}]", "score.num_cpus=0.5", "select.fraction=0.5",
         f"output.dir={out}", "ray.progress=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env, timeout=900)
    log = res.stdout
    assert res.returncode == 0, log
    for stage in ("prompts", "samples", "scored", "stats", "selection", "pairs"):
        assert re.search(rf"^\[prefsift\] stage {stage}: .* in [\d.]+s$", log, re.M), (stage, log)
    # Arena-Hard prompts past 256 tokens are measured, then quarantined: the tokenizer's warning does not apply
    assert re.search(r"^samples\s+12 prompt\s+\d+ prompt\s+\d+ \(prompt_too_long: \d+\)", log, re.M), log
    assert log.strip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"
    noisy = [line for line in log.splitlines() if any(w in line for w in ALARMING + CHATTER)]
    assert not noisy, "\n".join(noisy)
