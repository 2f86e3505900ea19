"""Reward scoring: prefsift's RewardScorer on Ray Data (HF and vLLM backends) vs a plain HF forward loop at
the same micro-batch size and raw vLLM pooling (`LLM.classify`, every text in one call).

    python benchmarks/bench_score.py --quick                     # 128 responses (CI smoke)
    python benchmarks/bench_score.py                             # 2,400 responses, tiny reward model, CPU
    python benchmarks/bench_score.py --model-shape qwen2-0.5b --responses 9600 --micro-batch-size 32   # GPU

Inputs: the 600 real responses (300 prompts x 2) of the shipped UltraFeedback sample
(pipelines/data/ultrafeedback_binarized_sample_300.jsonl.gz), 1 to ~5,500 characters long, cycled to
`--responses` responses in file order (copy c of a prompt gets prompt_id `<id>-c<c>`; for c > 0 its
prompt starts with "[c] " and its responses end with c words " ok", so that, as in a deduplicated run, no
text repeats another's start and vLLM's prefix cache cannot score a repeated text for free). The pipeline reads
them as scored curation does: one row per prompt with its `responses` list.

Both sides read the same text: the reward tokenizer's chat template over [user prompt, assistant response],
cut to `--max-length` tokens keeping the end (the scorer's rule, `operators.score.truncate_keep_end`), and
both run forward passes of `--micro-batch-size` rows in the same dtype and, on CPU, the same number of torch
threads (Ray gives an actor OMP_NUM_THREADS = floor(num_cpus), at least 1, and the baseline is set to
match). The difference is what the operator adds: within each map_batches call of `--batch-size` rows it
sorts rows by length before cutting micro-batches, where the baseline pads every micro-batch, taken in input
order, to its longest row. Raw vLLM pooling gets the same token ids with the activation off (raw logits).
Every response's reward is compared with the HF loop's.

Start-up is excluded from both, as in bench_generate.py: the baseline's clock starts after the model is
loaded, the pipeline's when its actor's constructor (model load) returned; what remains in the pipeline's
time is tokenization, forwards and Ray Data's running cost, and its end: `materialize()` returns only once
the scorer's actor has exited (Ray Data's closing memory report asks every worker), engine shutdown
included. Raw's clock stops when `classify` returns and its `close()` is timed apart, so the JSON also gives
the ratio with engine teardown counted in both and in neither.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
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
    """One row per response (prompt_id, sample_idx, prompt, response), in file order."""
    with gzip.open(RESPONSES_FILE, "rt", encoding="utf-8") as f:
        base = [(row["prompt_id"], j, row["prompt"], r["text"])
                for row in map(json.loads, f) for j, r in enumerate(row["responses"])]
    # Copy c > 0 starts its prompt with "[c] " and ends its response with c words " ok", so that no text the
    # reward model reads repeats an earlier one's start: vLLM's prefix cache (on by default for last-token
    # pooling) would otherwise score a repeated text almost for free, which no deduplicated production run
    # sees. The prompt's mark changes a short text's first tokens; a text cut to its last --max-length
    # tokens starts c tokens later than copy 0's. A prompt's responses still share their prompt's tokens.
    rows = [(f"{pid}-c{c}", j, f"[{c}] {p}" if c else p, r + " ok" * c)
            for i, (pid, j, p, r) in enumerate(itertools.islice(itertools.cycle(base), n))
            for c in [i // len(base)]]
    cols = list(zip(*rows, strict=True))
    return pa.table({"prompt_id": list(cols[0]), "sample_idx": pa.array(cols[1], pa.int64()),
                     "prompt": list(cols[2]), "response": list(cols[3])})


def prompt_rows(flat: pa.Table) -> pa.Table:
    """The same responses as scored curation holds them: one row per prompt, `responses` a list of structs."""
    rows: dict[str, dict] = {}
    for r in flat.to_pylist():
        row = rows.setdefault(r["prompt_id"], {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "responses": []})
        row["responses"].append({"text": r["response"], "sample_idx": r["sample_idx"]})
    return pa.Table.from_pylist(list(rows.values()))


def _encoded(a: argparse.Namespace, table: pa.Table, tok) -> list[list[int]]:
    """Every response's token ids, as both sides read them (chat template, end kept)."""
    from operators.score import truncate_keep_end

    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
             for p, r in zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), strict=True)]
    texts = tok.apply_chat_template(convs, tokenize=False)
    return [truncate_keep_end(x, a.max_length, tok.bos_token_id)
            for x in tok(texts, add_special_tokens=False)["input_ids"]]


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


def run_raw_vllm(a: argparse.Namespace) -> dict:
    """vLLM's pooling runner as a user would call it: one LLM (built with the scorer's engine arguments),
    every text in one `LLM.classify` call with the activation off."""
    from transformers import AutoTokenizer

    from operators.vllm_engines import PoolingEngine

    table = pq.read_table(a.data)
    t0 = time.perf_counter()
    engine = PoolingEngine(a.model, _dtype(a), a.max_length, 0.3 if not cuda_available() else 0.85,
                           cuda_available(), False)
    tok = AutoTokenizer.from_pretrained(a.model)
    startup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    ids = _encoded(a, table, tok)
    # The user's own call on the engine's LLM, not PoolingEngine.classify (prefsift's path).
    import vllm
    from vllm.inputs import TokensPrompt

    outs = engine.llm.classify([TokensPrompt(prompt_token_ids=x) for x in ids], use_tqdm=False,
                               pooling_params=vllm.PoolingParams(use_activation=False))
    rewards = np.asarray([o.outputs.probs[0] for o in outs], dtype=np.float64)
    seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
    t2 = time.perf_counter()
    engine.close()  # the user's script pays this too, at its exit; reported apart (close_s)
    close_s = time.perf_counter() - t2
    pq.write_table(pa.table({"prompt_id": table.column("prompt_id"), "sample_idx": table.column("sample_idx"),
                             "reward": rewards}), a.out)
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "cpu_s": cpu, "startup_s": startup, "rows": table.num_rows, "tokens": tokens,
            "rows_s": table.num_rows / seconds, "tok_s": tokens / seconds, "close_s": close_s}


def _scorer_class(log: str) -> type:
    from operators.score import RewardScorer

    timed = timed_operator(RewardScorer, log)

    class BenchScorer(timed):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            import torch

            super().__init__(*args, **kwargs)
            _append(log, {"kind": "env", "torch_threads": torch.get_num_threads(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})

        async def __call__(self, batch):
            # This actor process's CPU time (all its threads) at each call's start and end: calls overlap,
            # so the scoring CPU is the last end's minus the first start's, not a sum over calls.
            _append(log, {"kind": "cpu", "at": "start", "process_s": time.process_time()})
            out = await super().__call__(batch)
            _append(log, {"kind": "cpu", "at": "end", "process_s": time.process_time()})
            return out

    return BenchScorer


def run_pipeline(a: argparse.Namespace, backend: str) -> dict:
    """The curate pipeline's score stage: `apply(ds, RewardScorer, scorer_resources(cfg))`."""
    import ray

    from operators.base import apply
    from operators.score import RewardModelCfg, ScoreCfg, scorer_resources

    init_s = init_local_ray(object_store_gb=1.0)
    cfg = ScoreCfg(models=[RewardModelCfg(path=a.model)], backend=backend, batch_size=a.batch_size,
                   micro_batch_size=a.micro_batch_size, max_length=a.max_length, dtype=_dtype(a),
                   num_cpus=a.actor_cpus, num_gpus=1.0 if cuda_available() else 0.0,
                   max_concurrent_batches=a.max_concurrent_batches)
    log = os.path.join(os.path.dirname(a.out), f"timings-{backend}.jsonl")
    ds = ray.data.from_arrow(prompt_rows(pq.read_table(a.data)))
    w0 = time.time()
    out = apply(ds, _scorer_class(log), scorer_resources(cfg), cfg=cfg).materialize()
    w1 = time.time()
    # The materialized blocks straight from the object store: another Ray Data pass would wait for a CPU
    # that the scorer actor may still hold (with --actor-cpus = all cores).
    nested = pa.concat_tables([t.select(["prompt_id", "responses"]) for t in ray.get(out.to_arrow_refs())])
    scored = pa.Table.from_pylist([{"prompt_id": r["prompt_id"], "sample_idx": s["sample_idx"], "reward": s["overall"]}
                                   for r in nested.to_pylist() for s in r["responses"]])
    pq.write_table(scored, a.out)
    tm = read_timings(log)
    with open(log, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    env = next((r for r in recs if r["kind"] == "env"), {})
    seconds = w1 - tm["init_end"]
    # From the last call's end until materialize() returned: the actor's exit, its engine's shutdown among
    # it, which Ray Data's closing memory report waits for (README, Performance: scoring).
    end_wait = w1 - tm["last_end"]
    return {"seconds": seconds, "end_wait_s": end_wait, "wall_s": w1 - w0, "startup_s": tm["init_end"] - w0, "engine_init_s": tm["init_s"],
            "steady_s": tm["span_s"], "batches": tm["batches"], "rows": scored.num_rows,
            "cpu_s": max(r["process_s"] for r in recs if r["kind"] == "cpu") -
                     min(r["process_s"] for r in recs if r["kind"] == "cpu"),
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
    ap.add_argument("--batch-size", type=int, default=32,
                    help="prompt rows per map_batches call, 2 responses each (the bucketing window)")
    ap.add_argument("--max-concurrent-batches", type=int, default=2)
    ap.add_argument("--contenders", default="baseline,raw-vllm,hf,vllm",
                    help="comma list of baseline,raw-vllm,hf,vllm (the last two: RewardScorer's backends)")
    ap.add_argument("--micro-batch-size", type=int, default=16, help="rows per forward pass, both sides")
    ap.add_argument("--max-length", type=int, default=512)
    # 1 on CPU: two OpenMP threads on a 2-core machine, beside Ray's own processes and any other job, spin
    # against each other; one thread per side scored 3-4x faster here than two.
    ap.add_argument("--actor-cpus", type=float, default=None, help="the scorer actor's num_cpus (default 1; 4 GPU)")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--contender", choices=["baseline", "raw-vllm", "hf", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.responses = a.responses or (128 if a.quick else 2400)
    if a.actor_cpus is None:
        a.actor_cpus = 4.0 if cuda_available() else 1.0

    if a.contender:
        runs = {"baseline": run_baseline, "raw-vllm": run_raw_vllm}
        result(runs[a.contender](a) if a.contender in runs else run_pipeline(a, a.contender))
        return 0

    wanted = a.contenders.split(",")
    if "baseline" not in wanted:
        wanted.insert(0, "baseline")  # every reward is checked against it
    notes = []
    if importlib.util.find_spec("vllm") is None and {"raw-vllm", "vllm"} & set(wanted):
        notes.append("vLLM is not installed here: raw-vllm and the vllm backend were skipped")
        wanted = [w for w in wanted if w not in ("raw-vllm", "vllm")]
    if a.quick and a.contenders == ap.get_default("contenders"):
        wanted = ["baseline", "hf"]
        notes.append("--quick skips vLLM: engine start-ups (~30 s each on CPU) would dominate a smoke run")
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    res, checks, load = {}, {}, {}
    try:
        model = prepare_models(a.model_shape, a.models_dir or work / "models")["reward"]
        data = work / "responses.parquet"
        pq.write_table(load_responses(a.responses), data)
        base = ["--model", model, "--data", str(data), "--responses", str(a.responses), "--batch-size",
                str(a.batch_size), "--micro-batch-size", str(a.micro_batch_size), "--max-length",
                str(a.max_length), "--actor-cpus", str(a.actor_cpus), "--max-concurrent-batches",
                str(a.max_concurrent_batches), *(["--dtype", a.dtype] if a.dtype else [])]
        for name in wanted:
            load[name] = round(os.getloadavg()[0], 2)
            print(f"[bench_score] {name} ... (load {load[name]})", file=sys.stderr, flush=True)
            # The same OpenMP setting as the actor's (Ray sets it from num_cpus).
            env = {"OMP_NUM_THREADS": str(_actor_threads(a.actor_cpus))} \
                if name in ("baseline", "raw-vllm") and not cuda_available() else None
            res[name] = run_contender(Path(__file__).resolve(),
                                      [*base, "--contender", name, "--out", str(work / f"{name}.parquet")], env=env)
        for name in wanted[1:]:
            checks[name] = compare(str(work / "baseline.parquet"), str(work / f"{name}.parquet"), _dtype(a))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b = res["baseline"]
    for name in ("hf", "vllm"):
        if name in res:  # the same encoded texts on every side (the rewards check shows it)
            res[name]["tokens"] = b["tokens"]
            res[name]["tok_s"] = b["tokens"] / res[name]["seconds"]
    if "hf" in res:
        res["hf"]["padded_tokens_modelled"] = b["pipeline_padded_tokens_modelled"]
    raws = {n: res[n]["rows_s"] for n in ("baseline", "raw-vllm") if n in res}
    fastest_raw = max(raws, key=raws.get)
    labels = {"baseline": "plain HF forward loop, input order", "raw-vllm": "raw vLLM pooling, one classify call",
              "hf": "prefsift RewardScorer (hf) on Ray Data", "vllm": "prefsift RewardScorer (vllm) on Ray Data"}
    rows = [[labels[n], r["rows"], r["tokens"], r.get("padded_tokens", r.get("padded_tokens_modelled")), r["seconds"],
             r["cpu_s"], r["rows_s"], r["tok_s"], ratio(r["rows_s"], raws[fastest_raw]),
             (checks.get(n) or {}).get("max_abs_diff"), r["startup_s"], load[n]] for n, r in res.items()]
    table = markdown_table(["contender", "responses", "tokens", "padded tokens run", "seconds (excl. start-up)",
                            "CPU s (scoring)", "responses/s", "tokens/s", f"x {fastest_raw}",
                            "max |reward diff| vs HF loop", "start-up s (excluded)", "load 1m"], rows)
    table += "\n\nrewards agree with the HF loop: " + ", ".join(f"{n} {c['agree']}" for n, c in checks.items())
    ratios = {f"{n}_over_fastest_raw_responses_s": ratio(res[n]["rows_s"], raws[fastest_raw])
              for n in ("hf", "vllm") if n in res}
    if "vllm" in res and "raw-vllm" in res:
        # Engine teardown counted alike: raw's close after its call, the pipeline's end wait (its actor's exit).
        v, r = res["vllm"], res["raw-vllm"]
        ratios["vllm_over_raw_vllm_teardown_in_both"] = ratio(v["rows_s"], r["rows"] / (r["seconds"] + r["close_s"]))
        ratios["vllm_over_raw_vllm_teardown_in_neither"] = ratio(v["rows"] / (v["seconds"] - v["end_wait_s"]),
                                                                 r["rows_s"])
    ratios["raw_vllm_over_hf_loop_responses_s"] = ratio(raws.get("raw-vllm"), raws.get("baseline"))
    ratios["vllm_backend_over_hf_backend"] = ratio(res.get("vllm", {}).get("rows_s"), res.get("hf", {}).get("rows_s"))
    notes += [f"the hf backend's padded tokens are modelled from the encoded lengths (length_buckets over "
              f"consecutive calls of {a.batch_size} prompt rows); real tokens {b['tokens']:,}",
              "CPU s: the scoring process's CPU time over the timed part (all threads; on CPU spin-waits count)",
              "teardown: raw's seconds exclude its engine's close (close_s); the pipeline's include its actor's "
              "exit (end_wait_s), which materialize() waits for; the teardown_in_both / _in_neither ratios count "
              "it alike",
              f"fastest raw contender: {fastest_raw}"]
    check = {"agree": all(c["agree"] for c in checks.values()), **checks}
    emit("reward scoring", clean({"responses": a.responses, **res, "check": check}), ratios, table=table,
         notes=notes, targets={"hf_over_fastest_raw_responses_s": ">= 1.0 (or the vllm backend's)"},
         config={"model_shape": a.model_shape, "responses": a.responses, "batch_size": a.batch_size,
                 "micro_batch_size": a.micro_batch_size, "max_length": a.max_length, "actor_cpus": a.actor_cpus,
                 "max_concurrent_batches": a.max_concurrent_batches, "dtype": _dtype(a), "quick": a.quick,
                 "startup": "excluded from all", "inputs": RESPONSES_FILE.name, "load_1m_at_start": load})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
