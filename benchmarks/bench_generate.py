"""Generation across batch boundaries: raw one-call `vllm.LLM.generate` vs prefsift's Generator on Ray Data
with the synchronous engine (one `LLM.generate` per map_batches call), the async engine and the stepped
engine (several calls in flight), and `ray.data.llm` fed K rows per prompt.

    python benchmarks/bench_generate.py --quick                 # HF only, 8 prompts (CI smoke)
    python benchmarks/bench_generate.py                         # 512 prompts x 4, 8 calls, lengths ~60 mean
    python benchmarks/bench_generate.py --model-shape qwen2-0.5b --prompts 4096 --batch-size 256   # GPU

The shape is production's: many map_batches calls (prompts / batch size, at least 8 by default) and
variable output lengths. On the tiny model a sample's length is set by an eos logit offset
(`--eos-offset`, default -0.4 on top of the tiny policy's eos bonus: mean ~60 tokens, a long tail, cap
`--max-tokens` 512); the length distribution is printed. Real shapes (random weights) emit eos rarely,
so there lengths run to the cap.

Every contender gets the same requests: every prompt templated and tokenized the same way, K samples per
prompt, each with its own seed `sample_seed(seed, prompt_id, j)`, the same temperature, top_p, max_tokens
and max_model_len, prefix caching on. Prompts too long for max_model_len - max_tokens are dropped beforehand.

Start-up is EXCLUDED: raw times `llm.generate` (with tokenization) after `LLM(...)` returned; the pipeline
counts from the moment its actor's engine was ready (the actor logs it) until `materialize()` returned.
ray.data.llm builds its engine inside its own stage, so its time is wall time minus the raw engine's median
start-up in this run (labelled as such). Samples are compared by (prompt_id, sample_idx) with the first raw
round's: the same seed gives the same tokens unless another batch composition rounds a logit differently;
the count of samples that differ is printed, per contender and round.

On a small shared machine one contender's place in the run moves its speed more than the engines differ,
so every contender runs `--repeats` rounds (default 3), each round in a rotated order (ABC, BCA, CAB): every
contender holds every place once when the repeats equal the contenders (with two contenders the rounds
alternate AB, BA, AB, ...). A ratio is taken within a round (contender over that round's raw call), so the
machine's drift between rounds cancels in each pair; the headline is the median over the rounds, printed
with each round's ratio, the geometric mean, the rounds at the target and a 95% bootstrap interval of the
median, beside raw's own spread over the rounds (and each raw round over the next: the noise floor). The
1-minute load average before and after each contender and `uptime` at the start and end are recorded. Each round is a fresh process with its own engine: Ray Data builds the
actor, and so the engine, per execution, and engines kept alive side by side would hold a KV cache each.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
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
from benchmarks.models import load_prompts, prepare_models
from operators.generate import GenerateCfg
from operators.vllm_engines import resolve_engine

SEED = 0
TEMPERATURE = 1.0
TOP_P = 0.95
TARGET = 0.95  # issue 13: the engine generate.engine=auto picks, over raw one-call LLM.generate
LABELS = {"raw-vllm": "raw vllm.LLM.generate, one call", "sync": "prefsift Generator, sync engine",
          "async": "prefsift Generator, async engine", "stepped": "prefsift Generator, stepped engine",
          "stepped-ray-niceness": "prefsift Generator, stepped engine at Ray's worker niceness (15)",
          "ray-data-llm": "ray.data.llm, K rows per prompt",
          "hf": "prefsift Generator (hf)"}


def uptime_line() -> str:
    """`uptime`'s line (the load averages), recorded next to the figures."""
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def policy_with_eos_offset(src: str, dst: Path, offset: float) -> str:
    """The tiny policy with its eos logit moved by `offset` (pipelines.tools.tiny_models gives eos a fixed
    bonus; a negative offset makes samples longer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dst / "config.json").is_file():
        return str(dst)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id, 0] += offset
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


def _fitting_prompts(model: str, n: int, max_tokens: int, max_model_len: int) -> list[dict]:
    """Prompts whose templated token ids leave room for max_tokens, with their ids and per-sample seeds."""
    from transformers import AutoTokenizer

    from operators.generate import conversation, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for row in load_prompts(n * 4):
        ids = prompt_token_ids(tok, conversation(row["prompt"], None))
        if len(ids) + max_tokens <= max_model_len:
            out.append({**row, "ids": ids})
        if len(out) == n:
            break
    return out


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _samples_out(keys: list[tuple[str, int]], lengths: list[int], texts: list[str]) -> dict:
    return {"tokens": sum(lengths), "samples": len(keys),
            "by_key": {f"{p}\x1f{j}": [n, _digest(t)] for (p, j), n, t in zip(keys, lengths, texts, strict=True)}}


def _engine_cfg(a: argparse.Namespace, engine: str = "async", backend: str = "vllm",
                niceness: int | None = GenerateCfg.niceness) -> GenerateCfg:
    cuda = cuda_available()
    return GenerateCfg(
        backend=backend, engine=engine, model=a.model, num_samples=a.k, temperature=TEMPERATURE, top_p=TOP_P,
        max_tokens=a.max_tokens, dtype=a.dtype, max_model_len=a.max_model_len, batch_size=a.batch_size,
        max_concurrent_batches=a.max_concurrent_batches, max_requests_in_flight=a.max_requests_in_flight,
        # On 2 CPUs a whole-CPU actor would leave nothing for Ray Data's read and write tasks (DESIGN.md).
        num_cpus=a.actor_cpus, num_gpus_per_worker=1.0 if cuda and backend == "hf" else 0.0,
        gpu_memory_utilization=a.gpu_memory_utilization, enable_prefix_caching=True, niceness=niceness,
    )


def run_raw_vllm(a: argparse.Namespace, prompts: list[dict]) -> dict:
    """What a user writes without prefsift: one LLM, every request in one generate call."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from operators.generate import conversation, prompt_token_ids, sample_seed
    from operators.vllm_engines import engine_kwargs

    cuda = cuda_available()
    t0 = time.perf_counter()
    # The same engine arguments as the Generator's engines (whole-prompt prefill on CPU, among others).
    llm = LLM(**engine_kwargs(_engine_cfg(a), SEED, cuda, a.dtype))
    startup = time.perf_counter() - t0

    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    reqs, params, keys = [], [], []
    for row in prompts:
        ids = prompt_token_ids(tok, conversation(row["prompt"], None))
        for j in range(a.k):
            reqs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=1, seed=sample_seed(SEED, row["prompt_id"], j), temperature=TEMPERATURE,
                                         top_p=TOP_P, max_tokens=a.max_tokens, detokenize=False))
            keys.append((row["prompt_id"], j))
    outs = llm.generate(reqs, sampling_params=params, use_tqdm=False)
    texts = tok.batch_decode([o.outputs[0].token_ids for o in outs], skip_special_tokens=True)
    seconds = time.perf_counter() - t1
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    return {**_samples_out(keys, lengths, texts), "seconds": seconds, "startup_s": startup, "calls": 1,
            "tok_s": sum(lengths) / seconds}


def run_pipeline(a: argparse.Namespace, prompts: list[dict], engine: str, backend: str = "vllm",
                 niceness: int | None = GenerateCfg.niceness) -> dict:
    """The curate pipeline's generate stage: `apply(ds, Generator, generator_resources(cfg))`."""
    import pyarrow as pa
    import ray

    from operators.base import apply
    from operators.generate import Generator, generator_resources

    init_s = init_local_ray(object_store_gb=1.0)
    cfg = _engine_cfg(a, engine, backend, niceness)
    # One log per contender process: every round runs in a process of its own.
    log = os.path.join(os.path.dirname(a.prompts_file), f"timings-{backend}-{engine}-{os.getpid()}.jsonl")
    ds = ray.data.from_arrow(pa.Table.from_pylist([{k: r[k] for k in ("prompt_id", "prompt", "source")}
                                                   for r in prompts]))
    w0 = time.time()
    out = apply(ds, timed_operator(Generator, log), generator_resources(cfg), cfg=cfg, seed=SEED).materialize()
    w1 = time.time()
    rows = out.select_columns(["prompt_id", "responses"]).take_all()
    tm = read_timings(log)
    # Start-up = dataset start until the engine is ready (actor process spawn, imports, engine start), the
    # part the raw side does before its timer starts. Everything after it counts.
    seconds = w1 - tm["init_end"]
    keys = [(r["prompt_id"], s["sample_idx"]) for r in rows for s in r["responses"] or []]
    lengths = [s["num_tokens"] for r in rows for s in r["responses"] or []]
    texts = [s["text"] for r in rows for s in r["responses"] or []]
    return {**_samples_out(keys, lengths, texts), "seconds": seconds, "wall_s": w1 - w0,
            "startup_s": tm["init_end"] - w0, "calls": tm["batches"], "tok_s": sum(lengths) / seconds,
            "ray_init_s": init_s, "batch_size": cfg.prompts_per_call(), "calls_in_flight": cfg.calls_in_flight()}


def run_ray_data_llm(a: argparse.Namespace, prompts: list[dict]) -> dict:
    """ray.data.llm's vLLM processor: it keeps only outputs[0], so K rows per prompt, each with its seed."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from operators.generate import sample_seed
    from operators.vllm_engines import engine_kwargs

    init_s = init_local_ray(object_store_gb=1.0)
    kw = engine_kwargs(_engine_cfg(a), SEED, cuda_available(), a.dtype)
    model = kw.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=kw, batch_size=a.batch_size * a.k, concurrency=1,
        max_concurrent_batches=a.max_concurrent_batches, chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False, log_engine_metrics=False,
        # DESIGN.md: without a CPU bundle it waits for a GPU on this machine.
        **({} if cuda_available() else {"placement_group_config": {"bundles": [{"CPU": a.actor_cpus}]}}),
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"prompt_id": row["prompt_id"], "sample_idx": row["sample_idx"],
                                "tokenized_prompt": row["ids"],
                                "sampling_params": {"n": 1, "seed": row["seed"], "temperature": TEMPERATURE,
                                                    "top_p": TOP_P, "max_tokens": a.max_tokens,
                                                    "detokenize": False}},
        postprocess=lambda row: {"prompt_id": row["prompt_id"], "sample_idx": row["sample_idx"],
                                 "token_ids": list(row["generated_tokens"])},
    )
    rows = [{"prompt_id": p["prompt_id"], "sample_idx": j, "ids": p["ids"],
             "seed": sample_seed(SEED, p["prompt_id"], j)} for p in prompts for j in range(a.k)]
    w0 = time.time()
    out = processor(ray.data.from_items(rows)).take_all()
    wall = time.time() - w0
    tok = AutoTokenizer.from_pretrained(a.model)
    texts = tok.batch_decode([r["token_ids"] for r in out], skip_special_tokens=True)
    lengths = [len(r["token_ids"]) for r in out]
    # seconds and tok_s include the engine's start-up here; main() subtracts the raw engine's median start-up.
    return {**_samples_out([(r["prompt_id"], r["sample_idx"]) for r in out], lengths, texts),
            "seconds": wall, "wall_s": wall, "startup_is_estimate": True,
            "calls": -(-len(rows) // (a.batch_size * a.k)), "tok_s": sum(lengths) / wall, "ray_init_s": init_s}


def length_summary(lengths: list[int], cap: int) -> dict:
    import numpy as np

    n = np.asarray(lengths)
    if not n.size:
        return {}
    return {"mean": round(float(n.mean()), 1), "p10": int(np.percentile(n, 10)), "p50": int(np.median(n)),
            "p90": int(np.percentile(n, 90)), "p99": int(np.percentile(n, 99)), "max": int(n.max()),
            "at_cap": int((n == cap).sum()), "samples": int(n.size)}


def compare_samples(base: dict, other: dict) -> dict:
    """How many samples match the raw call's exactly (same length, same text), by (prompt_id, sample_idx)."""
    shared = base.keys() & other.keys()
    same = sum(base[k] == other[k] for k in shared)
    return {"compared": len(shared), "identical": same, "differ": len(shared) - same,
            "missing": len(base.keys() - other.keys())}


def bootstrap_median(values: list[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median, rounds resampled with replacement (fixed seed, so
    the same rounds give the same interval). With few rounds it is wide, which is the point: it says how
    far the rounds' median could move."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    return round(float(np.percentile(meds, 2.5)), 4), round(float(np.percentile(meds, 97.5)), 4)


def round_stats(values: list[float]) -> dict:
    """Median, range, geometric mean and bootstrap interval of per-round figures (ratios or tok/s)."""
    import numpy as np

    lo, hi = bootstrap_median(values)
    return {"per_round": values, "median": round(median(values), 4), "min": min(values), "max": max(values),
            "spread": round(max(values) - min(values), 4), "geomean": round(float(np.exp(np.mean(np.log(values)))), 4),
            "ci95_median": [lo, hi], "rounds": len(values)}


def summarize(rounds: list[dict[str, dict]], cap: int, expected: int) -> tuple[dict, dict, dict, str]:
    """Per contender: the median round (tok_s, seconds) with every round kept under `rounds`; the sample
    check against the first raw round; each round's ratio over that round's raw call, their median and
    spread; the table, one row per contender and round."""
    names = list(dict.fromkeys(n for rnd in rounds for n in rnd))
    raw_startups = [rnd["raw-vllm"]["startup_s"] for rnd in rounds if "raw-vllm" in rnd]
    by_key: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in rounds:
        for n, r in rnd.items():
            by_key[n].append(r.pop("by_key"))
            if n == "ray-data-llm" and raw_startups:  # its engine starts inside the timed stage
                r["startup_s"] = median(raw_startups)
                r["seconds"] = r["wall_s"] - r["startup_s"]
                r["tok_s"] = r["tokens"] / r["seconds"]
    base_name = "raw-vllm" if "raw-vllm" in names else next(iter(names), "")
    base = by_key[base_name][0] if names else {}
    res, spread, check = {}, {}, {"samples_expected": expected, "same_as_raw": {}}
    check["all_samples"] = all(r["samples"] == expected for rnd in rounds for r in rnd.values())
    rows = []
    for n in names:
        runs = [(i, rnd[n]) for i, rnd in enumerate(rounds) if n in rnd]
        per_round = []
        for i, r in runs:
            raw = rounds[i].get("raw-vllm", {}).get("tok_s")
            per_round.append(ratio(r["tok_s"], raw))
            rows.append([LABELS[n], i + 1, list(rounds[i]).index(n) + 1, r["calls"], r["tokens"], r["seconds"],
                         r["tok_s"], per_round[-1], r["startup_s"], f"{r['load_1m']}-{r.get('load_1m_end')}"])
        tok_s = [r["tok_s"] for _, r in runs]
        mid = min(runs, key=lambda ir: abs(ir[1]["tok_s"] - median(tok_s)))[1]
        res[n] = {**{k: v for k, v in mid.items() if k not in ("load_1m", "load_1m_end")}, "tok_s": median(tok_s),
                  "seconds": median([r["seconds"] for _, r in runs]),
                  "rounds": [{k: r.get(k) for k in ("tok_s", "seconds", "startup_s", "load_1m", "load_1m_end")}
                             for _, r in runs],
                  "lengths": length_summary([v[0] for v in by_key[n][0].values()], cap)}
        # Rounds compared with the first raw round (raw's own later rounds too): the one with most differences.
        compared = [compare_samples(base, k) for k in by_key[n][1 if n == base_name else 0:]]
        if compared:
            worst = max(compared, key=lambda c: (c["differ"] + c["missing"], -c["compared"]))
            check["same_as_raw"][n] = {**worst, "rounds": len(compared),
                                       "rounds_identical": sum(not c["differ"] and not c["missing"] for c in compared)}
        if n != "raw-vllm" and per_round and None not in per_round:
            spread[n] = {**round_stats(per_round), "rounds_at_target": sum(v >= TARGET for v in per_round)}
    if "raw-vllm" in names and len(by_key["raw-vllm"]) > 1:
        # The baseline's own drift: raw's tok/s over the rounds, and each raw round over the next one (what a
        # contender's ratio would read if it were raw itself, measured a round later).
        raw_tok_s = [r["tok_s"] for rnd in rounds for n, r in rnd.items() if n == "raw-vllm"]
        following = [ratio(a, b) for a, b in zip(raw_tok_s, raw_tok_s[1:], strict=False)]
        spread["raw-vllm"] = {"tok_s": round_stats([round(v) for v in raw_tok_s]),
                              "over_next_round": round_stats(following)}
    table = markdown_table(["contender", "round", "place", "map_batches calls", "tokens", "seconds (excl. start-up)",
                            "tokens/s", "x raw (same round)", "start-up s (excluded)", "load 1m (start-end)"], rows)
    ratios = {n: sp for n, sp in spread.items() if n != "raw-vllm"}
    if ratios:
        table += "\n\n" + markdown_table(
            ["contender", "x raw, median of rounds", "95% bootstrap interval", "geometric mean", "min", "max",
             f"rounds >= {TARGET}", "each round"],
            [[LABELS[n], sp["median"], f"{sp['ci95_median'][0]:.2f}-{sp['ci95_median'][1]:.2f}", sp["geomean"],
              sp["min"], sp["max"], f"{sp['rounds_at_target']} of {sp['rounds']}",
              ", ".join(f"{v:.2f}" for v in sp["per_round"])] for n, sp in ratios.items()])
    if "raw-vllm" in spread:
        own, nxt = spread["raw-vllm"]["tok_s"], spread["raw-vllm"]["over_next_round"]
        table += (f"\n\nraw's own spread: {own['median']:,.0f} tok/s median of {own['rounds']} rounds, "
                  f"{own['min']:,.0f}-{own['max']:,.0f} (max/min {own['max'] / own['min']:.2f}); a raw round over "
                  f"the next raw round: median {nxt['median']:.2f}, {nxt['min']:.2f}-{nxt['max']:.2f}")
    if names:
        ls = res[base_name]["lengths"]
        table += (f"\n\noutput lengths ({LABELS[base_name]}): mean {ls.get('mean')}, p10 {ls.get('p10')}, "
                  f"p50 {ls.get('p50')}, p90 {ls.get('p90')}, p99 {ls.get('p99')}, max {ls.get('max')}, "
                  f"{ls.get('at_cap')} of {ls.get('samples')} at the cap {cap}")
    return res, check, spread, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=None, help="default 512; 8 with --quick")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 512; 16 with --quick")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eos-offset", type=float, default=-0.4, help="tiny policy only: eos logit offset")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per map_batches call, every contender")
    ap.add_argument("--max-concurrent-batches", type=int, default=GenerateCfg.max_concurrent_batches,
                    help="map_batches calls in flight per actor (async, stepped, ray.data.llm)")
    ap.add_argument("--max-requests-in-flight", type=int, default=None, help="default: the engine's own")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds of every contender, each in a rotated order; default 3, 1 with --quick")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="0.3 on CPU (DESIGN.md), 0.85 GPU")
    ap.add_argument("--backends", default=None,
                    help="comma list of raw-vllm,sync,async,stepped,stepped-ray-niceness,ray-data-llm,hf "
                         "(default: raw-vllm,sync,async,stepped,ray-data-llm; hf with --quick)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = cuda_available()
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.gpu_memory_utilization = a.gpu_memory_utilization or (0.85 if cuda else 0.3)
    a.prompts = a.prompts or (8 if a.quick else 512)
    a.max_tokens = a.max_tokens or (16 if a.quick else 512)
    a.repeats = a.repeats or (1 if a.quick else 3)
    if a.quick:
        a.batch_size = min(a.batch_size, 2)

    if a.contender:
        with open(a.prompts_file, encoding="utf-8") as f:
            prompts = json.load(f)
        if a.contender == "raw-vllm":
            result(run_raw_vllm(a, prompts))
        elif a.contender == "ray-data-llm":
            result(run_ray_data_llm(a, prompts))
        elif a.contender == "hf":
            result(run_pipeline(a, prompts, "sync", backend="hf"))
        elif a.contender == "stepped-ray-niceness":  # the stepped engine as before generate.niceness (0)
            result(run_pipeline(a, prompts, "stepped", niceness=None))
        else:
            result(run_pipeline(a, prompts, a.contender))
        return 0

    have_vllm = importlib.util.find_spec("vllm") is not None
    wanted = (a.backends or ("hf" if a.quick else "raw-vllm,sync,async,stepped,ray-data-llm")).split(",")
    notes = []
    if not have_vllm and set(wanted) - {"hf"}:
        notes.append("vLLM is not installed here: only the hf contender ran")
        wanted = [w for w in wanted if w == "hf"]
    if a.quick and a.backends is None:
        notes.append("--quick skips vLLM: engine start-ups (~30 s each on CPU) would dominate a smoke run")

    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    models = prepare_models(a.model_shape, a.models_dir or work / "models")
    model = models["policy"]
    if a.model_shape == "tiny" and a.eos_offset:
        model = policy_with_eos_offset(model, work / "policy_eos", a.eos_offset)
    prompts = _fitting_prompts(model, a.prompts, a.max_tokens, a.max_model_len)
    pfile = work / "prompts.json"
    pfile.write_text(json.dumps(prompts), encoding="utf-8")
    base = ["--model", model, "--prompts-file", str(pfile), "--k", str(a.k), "--max-tokens", str(a.max_tokens),
            "--max-model-len", str(a.max_model_len), "--batch-size", str(a.batch_size),
            "--max-concurrent-batches", str(a.max_concurrent_batches), "--dtype", a.dtype,
            "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--actor-cpus", str(a.actor_cpus),
            *(["--max-requests-in-flight", str(a.max_requests_in_flight)] if a.max_requests_in_flight else [])]
    rounds: list[dict[str, dict]] = []  # per round: contender -> its result, in the round's order
    uptime = [uptime_line()]
    try:
        for rep in range(a.repeats):
            order = wanted[rep % len(wanted):] + wanted[:rep % len(wanted)]
            rounds.append({})
            for name in order:
                load = round(os.getloadavg()[0], 2)
                print(f"[bench_generate] round {rep + 1}/{a.repeats}: {name} ... (load {load})", file=sys.stderr,
                      flush=True)
                try:
                    r = run_contender(Path(__file__).resolve(), [*base, "--contender", name])
                except RuntimeError as e:
                    if name != "ray-data-llm":
                        raise
                    notes.append(f"ray.data.llm did not run in round {rep + 1}: {str(e).splitlines()[-1][:300]}")
                    continue
                rounds[-1][name] = {**r, "load_1m": load, "load_1m_end": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    uptime.append(uptime_line())

    res, check, spread, table = summarize(rounds, a.max_tokens, len(prompts) * a.k)
    for n, c in check["same_as_raw"].items():
        if c["differ"] or c["missing"]:
            notes.append(f"{n}: {c['differ']} samples differ from raw's and {c['missing']} are missing in its worst "
                         "round; a sample's seed is its own, so a difference comes from the batch it ran in "
                         "(another composition rounds the logits differently)")
    # The target is on the engine generate.engine=auto picks on this device (operators.vllm_engines.resolve_engine).
    auto = resolve_engine(GenerateCfg(backend="vllm")) if have_vllm else "async"
    if have_vllm:
        notes.append(f"generate.engine=auto picks the {auto} engine here")
    ratios = {f"{n.replace('-', '_')}_over_raw_vllm": sp["median"] for n, sp in spread.items() if n != "raw-vllm"}
    ratios["async_over_sync"] = ratio(res.get("async", {}).get("tok_s"), res.get("sync", {}).get("tok_s"))
    emit("generation", clean({"prompts": len(prompts), "k": a.k, **res, "check": check, "ratio_spread": spread}),
         ratios, table=table, notes=notes, targets={f"{auto}_over_raw_vllm": ">= 0.95"},
         config={"model_shape": a.model_shape, "prompts": len(prompts), "k": a.k, "max_tokens": a.max_tokens,
                 "max_model_len": a.max_model_len, "eos_offset": a.eos_offset if a.model_shape == "tiny" else None,
                 "batch_size": a.batch_size, "max_concurrent_batches": a.max_concurrent_batches,
                 "actor_cpus": a.actor_cpus, "dtype": a.dtype, "temperature": TEMPERATURE, "top_p": TOP_P,
                 "quick": a.quick, "startup": "excluded from all", "repeats": a.repeats,
                 "max_requests_in_flight": a.max_requests_in_flight,
                 "uptime_start_end": uptime, "orders": [list(r) for r in rounds],
                 "load_1m_at_start": [{n: r["load_1m"] for n, r in rnd.items()} for rnd in rounds]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
