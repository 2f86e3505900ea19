"""Reward scoring: prefsift's RewardScorer on Ray Data vs a plain HF forward loop at the same batch size.

    python benchmarks/bench_score.py --quick                     # 128 responses (CI smoke)
    python benchmarks/bench_score.py                             # 2,400 responses, tiny reward model, CPU
    python benchmarks/bench_score.py --model-shape qwen2-0.5b --responses 9600 --micro-batch-size 32   # GPU

Inputs: the 600 real responses (300 prompts x 2) of the shipped UltraFeedback sample
(pipelines/data/ultrafeedback_binarized_sample_300.jsonl.gz), 1 to ~5,500 characters long, cycled to
`--responses` rows in file order (copy c of a prompt gets prompt_id `<id>-c<c>`).

Both sides read the same text: the reward tokenizer's chat template over [user prompt, assistant response],
cut to `--max-length` tokens keeping the end (the scorer's rule, `operators.score.truncate_keep_end`), and
both run forward passes of `--micro-batch-size` rows in the same dtype and, on CPU, the same number of torch
threads (Ray gives an actor OMP_NUM_THREADS = floor(num_cpus), at least 1, and the baseline is set to
match). The difference is what the operator adds: within each map_batches call of `--batch-size` rows it
sorts rows by length before cutting micro-batches, where the baseline pads every micro-batch, taken in input
order, to its longest row. Every row's reward is compared between the two.

Start-up is excluded from both, as in bench_generate.py: the baseline's clock starts after the model is
loaded, the pipeline's when its actor's constructor (model load) returned; what remains in the pipeline's
time is tokenization, forwards and Ray Data's running cost.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import (
    REPO,
    _append,
    add_model_args,
    clean,
    cuda_available,
    emit,
    init_local_ray,
    markdown_table,
    ratio,
    read_timings,
    result,
    run_contender,
    timed_operator,
)
from benchmarks.models import prepare_models

RESPONSES_FILE = REPO / "pipelines" / "data" / "ultrafeedback_binarized_sample_300.jsonl.gz"


def load_responses(n: int) -> pa.Table:
    with gzip.open(RESPONSES_FILE, "rt", encoding="utf-8") as f:
        base = [(row["prompt_id"], j, row["prompt"], r["text"])
                for row in map(json.loads, f) for j, r in enumerate(row["responses"])]
    rows = [(f"{pid}-c{i // len(base)}", j, p, r)
            for i, (pid, j, p, r) in enumerate(itertools.islice(itertools.cycle(base), n))]
    cols = list(zip(*rows, strict=True))
    return pa.table({"prompt_id": list(cols[0]), "sample_idx": pa.array(cols[1], pa.int64()),
                     "prompt": list(cols[2]), "response": list(cols[3])})


def _dtype(a: argparse.Namespace) -> str:
    return a.dtype or ("bfloat16" if cuda_available() else "float32")


def _actor_threads(actor_cpus: float) -> int:
    """The torch thread count Ray gives an actor (ray._private.utils.set_omp_num_threads_if_unset)."""
    return max(1, math.floor(actor_cpus))


# ----------------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------------


def run_baseline(a: argparse.Namespace) -> dict:
    """What a user writes: batches of micro_batch_size rows in input order, right-padded to the longest."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from operators.score import truncate_keep_end

    cuda = cuda_available()
    if not cuda:
        torch.set_num_threads(_actor_threads(a.actor_cpus))
    device = "cuda" if cuda else "cpu"
    table = pq.read_table(a.data)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=getattr(torch, _dtype(a))).to(device)
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tok.pad_token_id
    if cuda:
        torch.cuda.synchronize()
    startup = time.perf_counter() - t0

    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    rewards = np.empty(table.num_rows)
    tokens = padded = cells = 0
    lengths: list[int] = []
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, table.num_rows, a.micro_batch_size):
            convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts[lo:lo + a.micro_batch_size], responses[lo:lo + a.micro_batch_size],
                                     strict=True)]
            texts = tok.apply_chat_template(convs, tokenize=False)
            ids = [truncate_keep_end(x, a.max_length, tok.bos_token_id)
                   for x in tok(texts, add_special_tokens=False)["input_ids"]]
            width = max(map(len, ids))
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                batch[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            rewards[lo:lo + len(ids)] = logits[:, 0].float().cpu().numpy()
            lengths += map(len, ids)
            tokens += sum(map(len, ids))
            padded += len(ids) * width
            cells += len(ids) * width * width
    seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
    pq.write_table(pa.table({"prompt_id": table.column("prompt_id"), "sample_idx": table.column("sample_idx"),
                             "reward": rewards}), a.out)
    p_padded, p_cells = _bucketed_padding(lengths, a)
    return {"seconds": seconds, "cpu_s": cpu, "startup_s": startup, "rows": table.num_rows, "tokens": tokens,
            "padded_tokens": padded, "attention_cells": cells, "pipeline_padded_tokens_modelled": p_padded,
            "pipeline_attention_cells_modelled": p_cells, "rows_s": table.num_rows / seconds,
            "tok_s": tokens / seconds, "torch_threads": torch.get_num_threads()}


def _bucketed_padding(lengths: list[int], a: argparse.Namespace) -> tuple[int, int]:
    """Padded tokens (and rows x width^2, what attention costs) the operator runs: consecutive map_batches
    calls of batch_size rows (one input block), each sorted by length and cut into micro-batches
    (operators.score.length_buckets)."""
    from operators.score import length_buckets

    tokens = cells = 0
    for lo in range(0, len(lengths), a.batch_size):
        part = lengths[lo:lo + a.batch_size]
        for b in length_buckets(part, a.micro_batch_size):
            width = max(part[i] for i in b)
            tokens += len(b) * width
            cells += len(b) * width * width
    return tokens, cells


def _scorer_class(log: str) -> type:
    from operators.score import RewardScorer

    timed = timed_operator(RewardScorer, log)

    class BenchScorer(timed):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            import torch

            super().__init__(*args, **kwargs)
            _append(log, {"kind": "env", "torch_threads": torch.get_num_threads(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})

        def __call__(self, batch):
            c0 = time.process_time()  # this actor process, all its threads
            out = super().__call__(batch)
            _append(log, {"kind": "cpu", "cpu_s": time.process_time() - c0})
            return out

    return BenchScorer


def run_pipeline(a: argparse.Namespace) -> dict:
    """The curate pipeline's score stage: `apply(ds, RewardScorer, scorer_resources(cfg))`."""
    import ray

    from operators.base import apply
    from operators.score import RewardModelCfg, ScoreCfg, scorer_resources

    init_s = init_local_ray(object_store_gb=1.0)
    cfg = ScoreCfg(models=[RewardModelCfg(path=a.model)], batch_size=a.batch_size,
                   micro_batch_size=a.micro_batch_size, max_length=a.max_length, dtype=_dtype(a),
                   num_cpus=a.actor_cpus, num_gpus=1.0 if cuda_available() else 0.0)
    log = os.path.join(os.path.dirname(a.out), "timings.jsonl")
    ds = ray.data.from_arrow(pq.read_table(a.data))
    w0 = time.time()
    out = apply(ds, _scorer_class(log), scorer_resources(cfg), cfg=cfg).materialize()
    w1 = time.time()
    # The materialized blocks straight from the object store: another Ray Data pass would wait for a CPU
    # that the scorer actor may still hold (with --actor-cpus = all cores).
    scored = pa.concat_tables([t.select(["prompt_id", "sample_idx", "reward"]) for t in ray.get(out.to_arrow_refs())])
    pq.write_table(scored, a.out)
    tm = read_timings(log)
    with open(log, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    env = next((r for r in recs if r["kind"] == "env"), {})
    seconds = w1 - tm["init_end"]
    return {"seconds": seconds, "wall_s": w1 - w0, "startup_s": tm["init_end"] - w0, "engine_init_s": tm["init_s"],
            "steady_s": tm["span_s"], "batches": tm["batches"], "rows": scored.num_rows,
            "cpu_s": sum(r["cpu_s"] for r in recs if r["kind"] == "cpu"),
            "rows_s": scored.num_rows / seconds,
            "steady_rows_s": scored.num_rows / tm["span_s"] if tm["span_s"] else None,
            "torch_threads": env.get("torch_threads"), "ray_init_s": init_s}


def compare(base: str, pipe: str, dtype: str) -> dict:
    """Every row's reward, joined on (prompt_id, sample_idx)."""
    b = pq.read_table(base).to_pandas().set_index(["prompt_id", "sample_idx"])["reward"]
    p = pq.read_table(pipe).to_pandas().set_index(["prompt_id", "sample_idx"])["reward"]
    joined = b.to_frame("base").join(p.to_frame("pipe"), how="inner")
    diff = (joined["base"] - joined["pipe"]).abs()
    # fp32: only summation order differs (other padding widths); bf16 GEMMs of other shapes round differently.
    atol, rtol = (1e-4, 1e-4) if dtype == "float32" else (5e-2, 5e-2)
    ok = diff <= atol + rtol * joined["base"].abs()
    return {"rows_baseline": int(len(b)), "rows_pipeline": int(len(p)), "joined": int(len(joined)),
            "max_abs_diff": float(diff.max()) if len(diff) else None, "atol": atol, "rtol": rtol,
            "mismatched": int((~ok).sum()), "reward_std": float(joined["base"].std()) if len(joined) > 1 else None,
            "agree": bool(len(b) == len(p) == len(joined) and ok.all())}


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "tiny | qwen2-0.5b (its 1B-shaped reward model)")
    ap.add_argument("--responses", type=int, default=None, help="default 2400; 128 with --quick")
    # The demo config's sizes: 64 rows per call, forwards of 16, 512 tokens.
    ap.add_argument("--batch-size", type=int, default=64, help="rows per map_batches call (the bucketing window)")
    ap.add_argument("--micro-batch-size", type=int, default=16, help="rows per forward pass, both sides")
    ap.add_argument("--max-length", type=int, default=512)
    # 1 on CPU: two OpenMP threads on a 2-core machine, beside Ray's own processes and any other job, spin
    # against each other; one thread per side scored 3-4x faster here than two.
    ap.add_argument("--actor-cpus", type=float, default=None, help="the scorer actor's num_cpus (default 1; 4 GPU)")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--contender", choices=["baseline", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.responses = a.responses or (128 if a.quick else 2400)
    if a.actor_cpus is None:
        a.actor_cpus = 4.0 if cuda_available() else 1.0

    if a.contender:
        result(run_baseline(a) if a.contender == "baseline" else run_pipeline(a))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    try:
        model = prepare_models(a.model_shape, a.models_dir or work / "models")["reward"]
        data = work / "responses.parquet"
        pq.write_table(load_responses(a.responses), data)
        base = ["--model", model, "--data", str(data), "--responses", str(a.responses), "--batch-size",
                str(a.batch_size), "--micro-batch-size", str(a.micro_batch_size), "--max-length",
                str(a.max_length), "--actor-cpus", str(a.actor_cpus), *(["--dtype", a.dtype] if a.dtype else [])]
        res = {}
        for name in ("baseline", "pipeline"):
            print(f"[bench_score] {name} ...", file=sys.stderr, flush=True)
            # The same OpenMP setting as the actor's (Ray sets it from num_cpus).
            env = {"OMP_NUM_THREADS": str(_actor_threads(a.actor_cpus))} if name == "baseline" and not cuda_available() else None
            res[name] = run_contender(Path(__file__).resolve(),
                                      [*base, "--contender", name, "--out", str(work / f"{name}.parquet")], env=env)
        check = compare(str(work / "baseline.parquet"), str(work / "pipeline.parquet"), _dtype(a))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, p = res["baseline"], res["pipeline"]
    # The same encoded texts on both sides (the rewards check shows it), so the same real tokens.
    p["tokens"] = b["tokens"]
    p["tok_s"] = b["tokens"] / p["seconds"]
    p["padded_tokens_modelled"] = b["pipeline_padded_tokens_modelled"]
    p["attention_cells_modelled"] = b["pipeline_attention_cells_modelled"]

    rows = [["plain HF forward loop, input order", b["rows"], b["tokens"], b["padded_tokens"], b["attention_cells"],
             b["seconds"], b["cpu_s"], b["rows_s"], b["tok_s"], None, b["torch_threads"], b["startup_s"]],
            ["prefsift RewardScorer on Ray Data", p["rows"], p["tokens"], p["padded_tokens_modelled"],
             p["attention_cells_modelled"], p["seconds"], p["cpu_s"], p["rows_s"], p["tok_s"], p["steady_rows_s"],
             p["torch_threads"], p["startup_s"]]]
    table = markdown_table(["contender", "responses", "tokens", "padded tokens run", "rows x width^2",
                            "seconds (excl. start-up)", "CPU s (scoring)", "responses/s", "tokens/s",
                            "responses/s, batches only", "torch threads", "start-up s (excluded)"], rows)
    table += (f"\n\nrewards on {check['joined']:,} rows: max |diff| {check['max_abs_diff']:.2e}, "
              f"agree: {check['agree']}")
    ratios = {"pipeline_over_baseline_responses_s": ratio(p["rows_s"], b["rows_s"]),
              "pipeline_steady_over_baseline_responses_s": ratio(p["steady_rows_s"], b["rows_s"]),
              "baseline_cpu_over_pipeline_cpu": ratio(b["cpu_s"], p["cpu_s"]),
              "baseline_padding_over_pipeline_padding": ratio(b["padded_tokens"], p["padded_tokens_modelled"]),
              "baseline_attention_over_pipeline_attention": ratio(b["attention_cells"], p["attention_cells_modelled"])}
    notes = [f"the pipeline's padded tokens and rows x width^2 are modelled from the encoded lengths "
             f"(length_buckets over consecutive calls of {a.batch_size} rows); real tokens {b['tokens']:,}",
             "CPU s: the scoring process's CPU time over the timed part (all threads; on CPU spin-waits count)"]
    emit("reward scoring", clean({"responses": a.responses, "baseline": b, "pipeline": p, "check": check}),
         ratios, table=table, notes=notes, targets={"pipeline_over_baseline_responses_s": ">= 1.0"},
         config={"model_shape": a.model_shape, "responses": a.responses, "batch_size": a.batch_size,
                 "micro_batch_size": a.micro_batch_size, "max_length": a.max_length, "actor_cpus": a.actor_cpus,
                 "dtype": _dtype(a), "quick": a.quick, "startup": "excluded from both",
                 "inputs": RESPONSES_FILE.name})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
