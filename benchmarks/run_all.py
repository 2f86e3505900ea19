"""Run every stage's benchmark, one subprocess each, and print their ratios against the targets.

    python benchmarks/run_all.py --quick                  # the CI smoke run (asserts no time)
    python benchmarks/run_all.py --save                   # full sizes; appends to benchmarks/results/
    python benchmarks/run_all.py --stages stats --extra stats="--rows 1000000" --save
    python benchmarks/run_all.py --stages generate,score,train --model-shape qwen2-0.5b --save   # GPU

Each script prints its table and one JSON line (benchmarks/common.py); this collects the lines, checks that
each benchmark's own correctness checks held (same rewards, statistics equal to DuckDB's, equal losses, ...),
and with --save appends them to benchmarks/results/<date>-<hardware-slug>.jsonl. It exits non-zero when a
script fails, prints no JSON line, or reports a failed correctness check; a missed time target never fails.

The tiny (or --model-shape) models are built once into one folder that every script reuses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import operator
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_TAG, REPO, fmt, hardware, hardware_slug, markdown_table, today

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# stage -> (script, the bench name it emits, takes --model-shape)
STAGES: dict[str, tuple[str, str, bool]] = {
    "generate": ("bench_generate.py", "generation", True),
    "score": ("bench_score.py", "reward scoring", True),
    "stats": ("bench_stats.py", "statistics", False),
    "train": ("bench_train.py", "training", True),
    "e2e": ("bench_e2e.py", "end to end", False),
    "curate": ("bench_curate.py", "curation", False),
}
# Smoke sizes beyond each script's own --quick. The smoke run checks that every benchmark runs and that its
# correctness checks hold; its times mean nothing, so each size is the smallest that still has several blocks
# and batch boundaries: 8k rows keep pandas' groupby-apply to a second, 2k rated prompts are 8 files of 250.
# Training runs the single process and 1 Ray Train worker, the pair its target compares; the 2-worker fit
# (the costliest contender) and its parameter-sync check are tests/pipelines/test_train_dpo.py's.
QUICK_EXTRA = {"stats": ["--rows", "8000"], "curate": ["--prompts", "2000"], "e2e": ["--prompts", "24"],
               "train": ["--workers", "1"]}
# Checks that the smoke run leaves unmeasured (None) because of QUICK_EXTRA.
NOT_IN_SMOKE = {"training": ("check.params_in_sync_2w",)}
# bench name -> the checks (paths under "figures") that must be true; None means "not run here".
CHECKS: dict[str, tuple[str, ...]] = {
    "generation": ("check.all_samples",),
    "reward scoring": ("check.agree",),
    "statistics": ("check.agree",),
    "training": ("check.all_steps_done", "check.losses_finite", "check.losses_match_single_vs_1w",
                 "check.params_in_sync_2w"),
    "end to end": ("check.all_stages", "check.all_balanced"),
    "curation": ("check.agree", "check.selection_same", "check.no_text_shuffle"),
}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def lookup(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d


def check_results(record: dict[str, Any]) -> dict[str, bool | None]:
    return {p: lookup(record.get("figures", {}), p) for p in CHECKS.get(record.get("bench", ""), ())}


def target_met(value: Any, target: Any) -> bool | None:
    """'>= 0.95' style targets; anything else ('report', '—') is not a threshold."""
    m = re.fullmatch(r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(target))
    if not m or not isinstance(value, (int, float)):
        return None
    return bool(_OPS[m.group(1)](value, float(m.group(2))))


def have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def script_args(stage: str, a: argparse.Namespace, models_dir: str) -> list[str]:
    script, _, shaped = STAGES[stage]
    args = ["--quick"] if a.quick else []
    if a.quick:
        args += QUICK_EXTRA.get(stage, [])
    if stage == "generate" and a.quick and not a.no_vllm and have_vllm():
        # bench_generate --quick alone runs HF only; the smoke run compares raw vLLM with the engine that
        # generate.engine=auto picks on CPU, the pair the target is about, through Ray Data as a run uses it
        from operators.generate import GenerateCfg
        from operators.vllm_engines import resolve_engine

        args += ["--backends", f"raw-vllm,{resolve_engine(GenerateCfg(backend='vllm'))}"]
    if stage not in ("stats", "curate"):
        args += ["--models-dir", models_dir]
    if shaped and a.model_shape:
        args += ["--model-shape", a.model_shape]
    for extra in a.extra:
        name, _, rest = extra.partition("=")
        if name == stage:
            args += shlex.split(rest)
    return [sys.executable, str(HERE / script), *args]


def run_one(stage: str, cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, int, float, str]:
    """Stream the script's stdout (its table) except its JSON line, which is returned."""
    print(f"\n[run_all] {stage}: {' '.join(shlex.quote(c) for c in cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    record, tail = None, []
    # Its own process group, so that a timeout also ends the contender subprocesses the script started.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(BENCH_TAG):
                record = json.loads(line)
            else:
                print(line, end="", flush=True)
                tail = (tail + [line])[-20:]
        rc = proc.wait()
    finally:
        timer.cancel()
    if rc == -signal.SIGKILL and time.perf_counter() - t0 >= timeout:
        tail.append(f"[run_all] {stage} timed out after {timeout:.0f}s\n")
    return record, rc, time.perf_counter() - t0, "".join(tail)


def summary_table(records: dict[str, dict[str, Any]], walls: dict[str, float]) -> str:
    rows = []
    for stage, rec in records.items():
        checks = check_results(rec)
        ok = "yes" if all(v is not False for v in checks.values()) else "NO: " + ", ".join(
            k for k, v in checks.items() if v is False)
        targets = rec.get("targets", {})
        for name, value in rec.get("ratios", {}).items():
            target = targets.get(name)
            met = target_met(value, target)
            rows.append([stage, name, fmt(value), target or "", "-" if met is None else fmt(met), ok,
                         round(walls[stage], 1)])
    return markdown_table(["stage", "ratio", "value", "target", "met", "checks held", "script wall s"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes (each script's --quick)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--model-shape", default=None, help="passed to generate, score and train (e.g. qwen2-0.5b)")
    ap.add_argument("--models-dir", default=None, help="build/reuse models here (default: a temp dir)")
    ap.add_argument("--extra", action="append", default=[], metavar="STAGE=ARGS",
                    help='more arguments for one script, e.g. --extra stats="--rows 1000000" (repeatable)')
    ap.add_argument("--no-vllm", action="store_true", help="--quick: skip the raw-vLLM vs pipeline-vLLM pair")
    ap.add_argument("--save", action="store_true", help="append the JSON lines to benchmarks/results/")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per script (default 900 quick, 3600)")
    a = ap.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    timeout = a.timeout or (900.0 if a.quick else 3600.0)

    tmp = None if a.models_dir else tempfile.mkdtemp(prefix="bench_models_")
    models_dir = a.models_dir or tmp
    assert models_dir is not None
    records: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    try:
        for stage in stages:
            record, rc, wall, tail = run_one(stage, script_args(stage, a, models_dir), timeout)
            walls[stage] = wall
            if record is None or rc != 0:
                failed.append(f"{stage} (exit {rc}{', no JSON line' if record is None else ''})")
                print(f"[run_all] {stage} FAILED, exit {rc}; last output:\n{tail}", file=sys.stderr, flush=True)
            if record is not None:
                record["run_all"] = {"stage": stage, "script_wall_s": round(wall, 1), "exit": rc}
                records[stage] = record
                bad = [k for k, v in check_results(record).items() if v is False]
                if bad:
                    failed.append(f"{stage} (correctness check failed: {', '.join(bad)})")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n## all benchmarks{' (quick)' if a.quick else ''}\n\n{summary_table(records, walls)}\n", flush=True)
    print(f"total wall {time.perf_counter() - t0:.0f}s", flush=True)
    lines = [json.dumps(r, allow_nan=False) + "\n" for r in records.values()]
    # --out is this run's lines alone; the results file collects runs of one day on one machine (appended).
    paths = [(Path(a.out), "w")] if a.out else []
    if a.save and records:
        hw = next(iter(records.values())).get("hardware") or hardware()
        paths.append((Path(a.results_dir) / f"{today()}-{hardware_slug(hw)}.jsonl", "a"))
    for path, mode in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode, encoding="utf-8") as f:
            f.writelines(lines)
        print(f"[run_all] wrote {len(lines)} JSON lines to {path}", file=sys.stderr, flush=True)
    if failed:
        print(f"[run_all] FAILED: {'; '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
