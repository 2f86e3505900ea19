"""The benchmark smoke run: `benchmarks/run_all.py --quick` once, then its JSON lines, stage by stage.

Nothing here asserts a time or a ratio threshold: a 2-core CI machine shared with other jobs says nothing
about speed. What must hold is that every stage ran, recorded where and with what it ran, produced positive
figures, and that the correctness checks inside each benchmark held (the same rewards on every row,
statistics equal to DuckDB's, equal per-step losses with and without Ray, balanced manifests).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run_all import CHECKS, NOT_IN_SMOKE, STAGES, check_results, lookup
from operators.generate import GenerateCfg
from operators.vllm_engines import resolve_engine

REPO = Path(__file__).resolve().parents[2]
BENCHES = {bench: stage for stage, (_, bench, _) in STAGES.items()}
# The engine generate.engine=auto picks here: the smoke run's vLLM contender beside raw vLLM.
AUTO = resolve_engine(GenerateCfg(backend="vllm"))

# Per bench: figures (paths under "figures") that must be positive numbers.
POSITIVE = {
    "generation": (f"{AUTO}.tokens", f"{AUTO}.tok_s", f"{AUTO}.seconds", "raw-vllm.tok_s"),
    "reward scoring": ("baseline.rows_s", "baseline.tok_s", "hf.rows_s", "hf.tok_s", "baseline.tokens"),
    "statistics": ("prefsift.seconds", "duckdb.seconds", "pandas.seconds", "ray_floor.seconds", "ray_floor.read_s",
                   "rows", "prompts"),
    "training": ("single.steps_s", "single.pairs_s", "ray-1w.steps_s", "ray-1w.pairs_s", "ray-1w.wall_s",
                 "pairs.pairs"),
    "end to end": ("wall_s", "stages.samples.seconds", "stages.samples.rows_out", "stages.pairs.rows_out",
                   "samples_per_s"),
    "curation": ("prefsift.seconds", "duckdb.seconds", "prefsift.stages.stats.seconds", "prompts", "parquet_mb"),
}
RATIOS = {
    "generation": (f"{AUTO}_over_raw_vllm",),
    "reward scoring": ("hf_over_fastest_raw_responses_s",),
    "statistics": ("prefsift_time_over_duckdb", "pandas_time_over_prefsift", "ray_read_over_duckdb"),
    "curation": ("prefsift_time_over_duckdb", "prefsift_cpu_over_duckdb"),
    "training": ("ray_1w_over_single_steps_s",),
    "end to end": ("prompts_per_s_wall",),
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    # vLLM on CPU sizes its KV cache from the machine's memory unless told; the suite runs beside other tests,
    # so every engine of the smoke run gets 1 GiB (vLLM's own variable; the same for every contender).
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(out)],
                          cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500,
                          check=False, env=env)
    assert proc.returncode == 0, f"run_all --quick exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["bench"]: r for r in lines}


def test_every_stage_ran(records):
    assert sorted(records) == sorted(BENCHES)


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_record_shape(records, bench):
    r = records[bench]
    for key in ("hardware", "versions", "figures", "ratios", "targets", "config", "date"):
        assert key in r, f"{bench}: no {key!r}"
    assert r["hardware"]["cores"] >= 1 and r["hardware"]["cpu"]
    assert r["versions"]["python"] and r["versions"].get("ray") and r["versions"].get("torch")
    assert r["config"]["quick"] is True


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_correctness_checks_held(records, bench):
    checks = check_results(records[bench])
    assert set(checks) == set(CHECKS[bench])
    # None means "not measured here": in the CPU smoke run, only the contenders the smoke sizes leave out.
    skipped = NOT_IN_SMOKE.get(bench, ())
    assert all(v is True for k, v in checks.items() if k not in skipped), checks
    assert all(checks[k] is None for k in skipped), checks


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_figures_are_positive(records, bench):
    figures = records[bench]["figures"]
    for path in POSITIVE[bench]:
        v = lookup(figures, path)
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, (path, v)


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_ratios_reported(records, bench):
    ratios = records[bench]["ratios"]
    for name in RATIOS[bench]:
        v = ratios.get(name)
        assert isinstance(v, (int, float)) and v > 0, (name, v)  # present and positive; never a threshold


def test_vllm_comparison_when_installed(records):
    import importlib.util

    figures = records["generation"]["figures"]
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: bench_generate runs its HF contender only")
    for name in ("raw-vllm", AUTO):
        assert figures[name]["tok_s"] > 0 and figures[name]["samples"] == figures["check"]["samples_expected"]
    # the same per-sample seeds: every sample of the pipeline's engine is raw vLLM's, token for token
    same = figures["check"]["same_as_raw"][AUTO]
    assert same["compared"] == figures["check"]["samples_expected"] and same["identical"] == same["compared"]
    assert records["generation"]["ratios"][f"{AUTO}_over_raw_vllm"] > 0


def test_rewards_compared_on_every_row(records):
    check = records["reward scoring"]["figures"]["check"]["hf"]
    assert check["joined"] == check["rows_baseline"] == check["rows_pipeline"] == records["reward scoring"][
        "config"]["responses"]
    assert check["mismatched"] == 0


def test_e2e_breakdown(records):
    fig = records["end to end"]["figures"]
    stages = fig["stages"]
    assert stages["prompts"]["rows_in"] == fig["prompts"] == records["end to end"]["config"]["prompts"]
    # One row per prompt that fits max_model_len, holding its K samples; the rest are counted as quarantined.
    gen = stages["samples"]
    assert gen["rows_out"] == gen["rows_in"] - gen["quarantined_total"] > 0
    assert stages["scored"]["rows_in"] == gen["rows_out"]
    # The statistics count responses: K for each scored prompt.
    assert stages["stats"]["rows_in"] == fig["k"] * stages["scored"]["rows_out"]
