"""Training: a single-process DPO loop without Ray vs pipelines.train_dpo on Ray Train (1 and 2 workers).

    python benchmarks/bench_train.py --quick                       # 6 steps (CI smoke)
    python benchmarks/bench_train.py                               # 40 steps, tiny policy, CPU
    python benchmarks/bench_train.py --model-shape qwen2-0.5b --steps 40 --max-length 1024   # GPU

All contenders train the same model (the policy of --model-shape) with the same loss (sigmoid DPO, beta 0.1),
AdamW + cosine schedule, per-device batch and steps, on the same pairs: the 300 chosen/rejected pairs of the
shipped UltraFeedback sample, with reference log-probs computed once beforehand by the real
`ReferenceLogProbs` operator (called directly, no Ray), so no contender runs the reference model.

* `single`: a plain loop in one process, the steps of train_dpo.train_loop_per_worker written out with the
  same helpers (tokenization, schedule, log-probs, loss), on as many torch threads as one Train worker gets
  (Ray sets OMP_NUM_THREADS = floor(cpus_per_worker), at least 1). Rank 0 of a 1-worker run sees the same
  rows in the same order, so its per-step losses must equal this loop's: the benchmark checks it.
* `single-all` (CPU, not --quick): the same loop on all cores' threads, for the 2-worker comparison.
* `ray-1w`, `ray-2w`: `pipelines.train_dpo.main` (TorchTrainer, gloo on CPU, NCCL on GPU). 2 workers take
  two global batches' worth of pairs per step (each its own shard), so scaling is compared in pairs/s.

Steps/s comes from the step end times (train/metrics.jsonl's `time` on the Ray side, the same clock in the
loop): 1 / the median time between consecutive step ends, and the mean rate beside it. That leaves out the
fixed start-up (Ray and worker start, model load, tokenization, the first step's warm-up); the wall time
with all of it is reported too.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import (
    REPO,
    add_model_args,
    clean,
    cuda_available,
    emit,
    init_local_ray,
    markdown_table,
    ratio,
    result,
    run_contender,
)
from benchmarks.models import prepare_models

PAIRS_FILE = REPO / "pipelines" / "data" / "ultrafeedback_binarized_sample_300.jsonl.gz"
SEED = 0
BETA = 0.1


def write_pairs(out_dir: Path, policy: str, max_length: int, limit: int | None) -> dict:
    """Chosen/rejected by the sample's labels (the first `limit` prompts), plus reference log-probs from the
    real operator; pairs whose prompt alone fills max_length are dropped, as the reference stage does."""
    from operators.base import QUARANTINE
    from operators.reflogp import ReferenceLogProbs

    with gzip.open(PAIRS_FILE, "rt", encoding="utf-8") as f:
        rows = []
        for row in itertools.islice(map(json.loads, f), limit):
            by = {r["label"]: r["text"] for r in row["responses"]}
            rows.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "chosen": by["chosen"],
                         "rejected": by["rejected"]})
    t0 = time.perf_counter()
    op = ReferenceLogProbs(model=policy, max_length=max_length, micro_batch_size=8)
    table = op(pa.Table.from_pylist(rows))
    keep = table.filter(pc.is_null(table.column(QUARANTINE))).drop_columns([QUARANTINE])
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(keep, out_dir / "part-0.parquet")
    return {"pairs": keep.num_rows, "dropped": table.num_rows - keep.num_rows,
            "reference_s": round(time.perf_counter() - t0, 2)}


def train_config(a: argparse.Namespace, workers: int, out_dir: str):
    from pipelines.runtime.config import from_dict
    from pipelines.train_dpo import TrainConfig

    cuda = cuda_available()
    return from_dict(TrainConfig, {
        "run": {"name": f"bench-{workers}w", "seed": SEED},
        "input": {"path": a.pairs, "max_length": a.max_length},
        "output": {"dir": out_dir},
        "model": {"policy": a.policy},
        "loss": {"name": "sigmoid", "beta": BETA},
        "optim": {"lr": 5e-5, "warmup_steps": 2, "max_steps": a.steps, "per_device_batch_size": a.batch_size,
                  "grad_accum": 1, "max_grad_norm": 1.0, "bf16": cuda},
        "scaling": {"num_workers": workers, "use_gpu": cuda, "cpus_per_worker": a.cpus_per_worker},
        "checkpoint": {"every_n_steps": 0, "keep": 1},  # one checkpoint, at the end, as the loop saves once
        "ray": {"num_cpus": len(os.sched_getaffinity(0)), "object_store_memory_gb": 1.0, "progress": False},
    })


def steady(times: list[float], pairs_per_step: int) -> dict:
    """Rates from the step end times, first step (warm-up) and everything before it left out.

    `steps_s` is 1 / the median step time: another job's burst on a shared machine slows a few steps, which
    moves a mean but hardly a median, and both sides run the same batches in the same order, so their
    medians compare. `steps_s_mean` is the plain (steps - 1) / (last end - first end).
    """
    if len(times) < 2 or times[-1] <= times[0]:
        return {"steps_s": None, "pairs_s": None, "steps_s_mean": None, "step_s_median": None}
    intervals = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    mid = len(intervals) // 2
    median = intervals[mid] if len(intervals) % 2 else (intervals[mid - 1] + intervals[mid]) / 2
    return {"steps_s": 1 / median, "pairs_s": pairs_per_step / median, "step_s_median": median,
            "steps_s_mean": (len(times) - 1) / (times[-1] - times[0])}


# ----------------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------------


def run_single(a: argparse.Namespace, threads: int | None) -> dict:
    """train_dpo.train_loop_per_worker for one rank, written out, without Ray or a process group."""
    t0 = time.time()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from operators.logprobs import pad_token_id, pair_logps
    from pipelines.training.batches import LocalData, LocalSchedule
    from pipelines.training.losses import Logps, get_loss
    from pipelines.training.model import disable_dropout, wrap_model
    from pipelines.training.placement import local_rows

    cuda = cuda_available()
    if threads and not cuda:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if cuda else "cpu")
    cfg = train_config(a, 1, a.work)
    oc = cfg.optim
    torch.manual_seed(cfg.run.seed)
    loss_fn = get_loss(cfg.loss.name)
    tokenizer = AutoTokenizer.from_pretrained(a.policy)
    model = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    disable_dropout(model)
    model = wrap_model(model, fsdp=False, device=device, world=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": oc.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=oc.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, oc.warmup_steps, oc.max_steps)
    rows = local_rows([pq.read_table(a.pairs)], None, 0, 1, oc.per_device_batch_size)
    data = LocalData.build(rows, tokenizer, cfg.input.max_length)
    sched = LocalSchedule(data.n_rows, oc.per_device_batch_size, oc.grad_accum, False, seed=cfg.run.seed, rank=0)
    pad = pad_token_id(tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=oc.bf16)

    model.train()
    times, losses, pairs = [], [], 0
    for step in range(oc.max_steps):
        idx = sched.indices(step, 0)
        with autocast:
            pol = pair_logps(model, [data.examples[i] for i in idx], pad, cfg.input.max_length)
        pol = Logps(*(t.float() for t in pol))
        ref = Logps(data.ref_chosen[idx].to(device), data.ref_rejected[idx].to(device), pol.chosen_tokens,
                    pol.rejected_tokens)
        loss, _ = loss_fn(pol, ref, {"is_sft": data.is_sft[idx]}, beta=cfg.loss.beta)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().mean()))  # a host sync, as train_dpo's metric reduction does
        pairs += len(idx)
        times.append(time.time())
    with tempfile.TemporaryDirectory() as tmp:  # the Ray side writes one final checkpoint too
        model.save_pretrained(tmp)
    wall = time.time() - t0
    return {"wall_s": wall, "startup_s": times[0] - t0 if times else None, "steps": len(times), "pairs": pairs,
            "pairs_per_step": oc.per_device_batch_size, "losses": losses,
            **steady(times, oc.per_device_batch_size), "torch_threads": torch.get_num_threads()}


def run_ray(a: argparse.Namespace, workers: int) -> dict:
    from pipelines import train_dpo

    t0 = time.time()
    init_s = init_local_ray(num_cpus=len(os.sched_getaffinity(0)), object_store_gb=1.0)
    out_dir = os.path.join(a.work, f"{workers}w")
    cfg = train_config(a, workers, out_dir)
    summary = train_dpo.main(cfg)
    wall = time.time() - t0
    with open(os.path.join(out_dir, "train", "metrics.jsonl"), encoding="utf-8") as f:
        metrics = sorted((json.loads(line) for line in f), key=lambda m: m["step"])
    times = [m["time"] for m in metrics]
    per_step = workers * a.batch_size
    final = summary.get("final_metrics") or {}
    return {"wall_s": wall, "fit_s": summary["seconds"], "ray_init_s": init_s,
            "startup_s": times[0] - t0 if times else None, "steps": len(metrics),
            "pairs": sum(int(m["pairs"]) for m in metrics), "pairs_per_step": per_step,
            "losses": [m["loss"] for m in metrics], **steady(times, per_step),
            "params_in_sync": final.get("params_in_sync"), "workers": workers}


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; 6 with --quick)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per worker per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--cpus-per-worker", type=float, default=None, help="default 0.5 on CPU (the demo's), 4 GPU")
    ap.add_argument("--workers", default=None, help="Ray Train worker counts (default 1,2; 1 on a 1-GPU machine)")
    ap.add_argument("--pairs-limit", type=int, default=None, help="pairs from the sample (default all 300; 48 --quick)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = cuda_available()
    a.steps = a.steps or (6 if a.quick else 40)
    a.pairs_limit = a.pairs_limit or (48 if a.quick else None)
    a.cpus_per_worker = a.cpus_per_worker or (4.0 if cuda else 0.5)
    one_thread_per_worker = max(1, math.floor(a.cpus_per_worker))

    if a.contender:
        if a.contender.startswith("ray-"):
            result(run_ray(a, int(a.contender[4:-1])))
        else:
            result(run_single(a, one_thread_per_worker if a.contender == "single" else None))
        return 0

    import torch

    notes = []
    if a.workers is None:
        gpus = torch.cuda.device_count() if cuda else 0
        a.workers = "1" if cuda and gpus < 2 else "1,2"
        if cuda and gpus < 2:
            notes.append(f"{gpus} GPU: 2-worker scaling needs 2 GPUs, not measured")
    workers = [int(w) for w in a.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    res: dict[str, dict] = {}
    try:
        policy = prepare_models(a.model_shape, a.models_dir or work / "models")["policy"]
        print("[bench_train] pairs + reference log-probs ...", file=sys.stderr, flush=True)
        info = write_pairs(work / "pairs", policy, a.max_length, a.pairs_limit)
        base = ["--policy", policy, "--pairs", str(work / "pairs"), "--steps", str(a.steps), "--batch-size",
                str(a.batch_size), "--max-length", str(a.max_length), "--cpus-per-worker", str(a.cpus_per_worker)]
        names = ["single"] + (["single-all"] if not cuda and not a.quick else []) + [f"ray-{w}w" for w in workers]
        for name in names:
            print(f"[bench_train] {name} ...", file=sys.stderr, flush=True)
            (work / name).mkdir()
            # The same OpenMP setting as a Train worker's (Ray sets it from cpus_per_worker).
            env = {"OMP_NUM_THREADS": str(one_thread_per_worker)} if name == "single" and not cuda else None
            res[name] = run_contender(Path(__file__).resolve(),
                                      [*base, "--contender", name, "--work", str(work / name)], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    s, r1, r2 = res["single"], res.get("ray-1w"), res.get("ray-2w")
    check: dict = {"steps_done": {n: r["steps"] for n, r in res.items()}}
    check["all_steps_done"] = all(r["steps"] == a.steps for r in res.values())
    check["losses_finite"] = all(math.isfinite(x) for r in res.values() for x in r["losses"])
    if r1:
        diffs = [abs(x - y) for x, y in zip(s["losses"], r1["losses"], strict=False)]
        check["loss_max_abs_diff_single_vs_1w"] = max(diffs) if diffs else None
        # CPU: the same kernels on the same rows, so equal to rounding. GPU: bf16 autocast and CUDA's
        # non-deterministic backward kernels (atomic adds) let the two runs drift a little over the steps.
        check["loss_tolerance"] = 2e-2 if cuda else 1e-4
        check["losses_match_single_vs_1w"] = bool(len(diffs) == a.steps and max(diffs) <= check["loss_tolerance"])
    if r2:
        check["params_in_sync_2w"] = r2.get("params_in_sync")

    labels = {"single": f"single process, {s['torch_threads']} thread(s), no Ray",
              "single-all": f"single process, {res.get('single-all', {}).get('torch_threads')} threads, no Ray",
              "ray-1w": "train_dpo on Ray Train, 1 worker", "ray-2w": "train_dpo on Ray Train, 2 workers"}
    rows = [[labels[n], r["steps"], r["pairs_per_step"], r["steps_s"], r["steps_s_mean"], r["pairs_s"], r["wall_s"],
             r["startup_s"], r["losses"][-1] if r["losses"] else None] for n, r in res.items()]
    table = markdown_table(["contender", "steps", "pairs/step", "steps/s (median step)", "steps/s (mean)",
                            "pairs/s (median step)", "wall s (incl. start-up)", "start-up s (to 1st step end)",
                            "last loss"], rows)
    if r1:
        table += (f"\n\nsingle vs 1 worker, per-step loss: max |diff| {check['loss_max_abs_diff_single_vs_1w']:.2e},"
                  f" match: {check['losses_match_single_vs_1w']}")
    ratios = {
        "ray_1w_over_single_steps_s": ratio((r1 or {}).get("steps_s"), s["steps_s"]),
        "ray_1w_over_single_steps_s_mean": ratio((r1 or {}).get("steps_s_mean"), s["steps_s_mean"]),
        "ray_2w_over_1w_pairs_s": ratio((r2 or {}).get("pairs_s"), (r1 or {}).get("pairs_s")),
        "ray_2w_over_single_all_pairs_s": ratio((r2 or {}).get("pairs_s"), res.get("single-all", {}).get("pairs_s")),
        "ray_1w_wall_over_single_wall": ratio((r1 or {}).get("wall_s"), s["wall_s"]),
    }
    emit("training", clean({"pairs": info, **res, "check": check}), ratios, table=table, notes=notes,
         targets={"ray_1w_over_single_steps_s": ">= 0.95", "ray_2w_over_1w_pairs_s": "report"},
         config={"model_shape": a.model_shape, "steps": a.steps, "per_device_batch_size": a.batch_size,
                 "max_length": a.max_length, "cpus_per_worker": a.cpus_per_worker, "workers": workers,
                 "loss": "sigmoid", "beta": BETA, "bf16": cuda, "quick": a.quick,
                 "startup": "excluded from steps/s, included in wall"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
