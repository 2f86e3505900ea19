"""Generation: raw `vllm.LLM.generate` vs prefsift's Generator through Ray Data (vLLM and HF backends).

    python benchmarks/bench_generate.py --quick                 # HF only, 8 prompts (CI smoke)
    python benchmarks/bench_generate.py                         # 200 prompts x 4 samples, vLLM + HF
    python benchmarks/bench_generate.py --model-shape qwen2-0.5b --prompts 1000 --max-tokens 256   # GPU

Both sides get the same requests: every prompt templated and tokenized the same way, K samples per prompt,
each with its own seed `sample_seed(seed, prompt_id, j)`, the same temperature, top_p, max_tokens and
max_model_len, prefix caching on. Prompts too long for max_model_len - max_tokens are dropped beforehand,
so no row is quarantined on either side.

Start-up is EXCLUDED from both: raw times `llm.generate` (with tokenization) after `LLM(...)` returned; the
pipeline counts from the moment its actor's engine was ready (the actor logs it) until `materialize()`
returned, so the actor's process spawn, imports and engine start are left out as the raw side's are. What
stays in the pipeline's time is Ray's running cost: scheduling, batching, moving rows, decoding, and the
tail of each map_batches call, so the ratio shows the price of running inside Ray Data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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

SEED = 0
TEMPERATURE = 1.0
TOP_P = 0.95


def _fitting_prompts(model: str, n: int, max_tokens: int, max_model_len: int) -> list[dict]:
    """Prompts whose templated token ids leave room for max_tokens (the same rule as the Generator's cap)."""
    from transformers import AutoTokenizer

    from operators.generate import conversation, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(model)
    out, pool = [], load_prompts(n * 4)
    for row in pool:
        if len(prompt_token_ids(tok, conversation(row["prompt"], None))) + max_tokens <= max_model_len:
            out.append(row)
        if len(out) == n:
            break
    return out


def run_raw_vllm(a: argparse.Namespace, prompts: list[dict]) -> dict:
    """What a user writes without prefsift: one LLM, every request in one generate call."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from operators.generate import conversation, prompt_token_ids, sample_seed

    cuda = cuda_available()
    t0 = time.perf_counter()
    # The same engine settings as operators/generate.py's vLLM backend (whole-prompt prefill on CPU: see
    # the comment there).
    llm = LLM(a.model, dtype=a.dtype, enforce_eager=not cuda, max_model_len=a.max_model_len,
              gpu_memory_utilization=a.gpu_memory_utilization, enable_prefix_caching=True, seed=SEED,
              **({} if cuda else {"enable_chunked_prefill": False}))
    startup = time.perf_counter() - t0

    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    reqs, params = [], []
    for row in prompts:
        ids = prompt_token_ids(tok, conversation(row["prompt"], None))
        for j in range(a.k):
            reqs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=1, seed=sample_seed(SEED, row["prompt_id"], j), temperature=TEMPERATURE,
                                         top_p=TOP_P, max_tokens=a.max_tokens))
    outs = llm.generate(reqs, sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "startup_s": startup, "tokens": tokens, "samples": len(outs),
            "tok_s": tokens / seconds, "torch_threads": _threads()}


class _RawVLLMActor:
    def run(self, a: argparse.Namespace, prompts: list[dict]) -> dict:
        return run_raw_vllm(a, prompts)


def run_raw_vllm_in_actor(a: argparse.Namespace, prompts: list[dict]) -> dict:
    """The raw loop again, inside one plain Ray actor with the Generator's CPUs and no Ray Data: what running
    under Ray at all costs here (on 2 cores the engine shares them with Ray's own processes)."""
    import ray

    init_s = init_local_ray(object_store_gb=1.0)
    actor = ray.remote(num_cpus=a.actor_cpus, num_gpus=1 if cuda_available() else 0)(_RawVLLMActor).remote()
    return {**ray.get(actor.run.remote(a, prompts)), "ray_init_s": init_s}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_pipeline(a: argparse.Namespace, prompts: list[dict], backend: str) -> dict:
    """The curate pipeline's generate stage: `apply(ds, Generator, generator_resources(cfg))`."""
    import pyarrow as pa
    import ray

    from operators.base import apply
    from operators.generate import Generator, generator_resources
    from pipelines.runtime.stages import column_sums

    cuda = cuda_available()
    init_s = init_local_ray(object_store_gb=1.0)
    cfg = GenerateCfg(
        backend=backend, model=a.model, num_samples=a.k, temperature=TEMPERATURE, top_p=TOP_P,
        max_tokens=a.max_tokens, dtype=a.dtype, max_model_len=a.max_model_len, batch_size=a.batch_size,
        # On 2 CPUs a whole-CPU actor would leave nothing for Ray Data's read and write tasks (DESIGN.md).
        num_cpus=a.actor_cpus, num_gpus_per_worker=1.0 if cuda and backend == "hf" else 0.0,
        gpu_memory_utilization=a.gpu_memory_utilization, enable_prefix_caching=True,
    )
    log = os.path.join(os.path.dirname(a.prompts_file), f"timings-{backend}.jsonl")  # removed with the work dir
    ds = ray.data.from_arrow(pa.Table.from_pylist(prompts))
    w0 = time.time()
    out = apply(ds, timed_operator(Generator, log), generator_resources(cfg), cfg=cfg, seed=SEED).materialize()
    w1 = time.time()
    sums = column_sums(out, ["num_tokens"])
    tm = read_timings(log)
    # Start-up = dataset start until the engine is ready (actor process spawn, imports, engine start), the
    # same part the raw side does before its timer starts. Everything after it counts.
    startup = tm["init_end"] - w0
    seconds = w1 - tm["init_end"]
    tokens = int(sums["num_tokens"])
    return {"seconds": seconds, "wall_s": w1 - w0, "startup_s": startup, "engine_init_s": tm["init_s"],
            "steady_s": tm["span_s"],
            "batches": tm["batches"], "tokens": tokens, "samples": out.count(), "tok_s": tokens / seconds,
            "steady_tok_s": tokens / tm["span_s"] if tm["span_s"] else None, "ray_init_s": init_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=None, help="default 200; 8 with --quick")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64; 16 with --quick")
    ap.add_argument("--max-model-len", type=int, default=512)
    # vLLM batches continuously only while requests are queued, and every call drains to empty at its end,
    # so small calls waste the tail of each one (GenerateCfg.prompts_per_call).
    ap.add_argument("--batch-size", type=int, default=None,
                    help="prompts per map_batches call (default: the pipeline's, per backend)")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="0.3 on CPU (DESIGN.md), 0.85 GPU")
    ap.add_argument("--backends", default=None, help="comma list of raw-vllm,vllm,hf (default: all; hf with --quick)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = cuda_available()
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.gpu_memory_utilization = a.gpu_memory_utilization or (0.85 if cuda else 0.3)
    a.prompts = a.prompts or (8 if a.quick else 200)
    a.max_tokens = a.max_tokens or (16 if a.quick else 64)

    if a.contender:
        import json

        with open(a.prompts_file, encoding="utf-8") as f:
            prompts = json.load(f)
        if a.contender == "raw-vllm":
            result(run_raw_vllm(a, prompts))
        elif a.contender == "raw-vllm-actor":
            result(run_raw_vllm_in_actor(a, prompts))
        else:
            result(run_pipeline(a, prompts, a.contender))
        return 0

    import json

    try:
        import vllm  # noqa: F401

        have_vllm = True
    except ImportError:
        have_vllm = False
    wanted = (a.backends or ("hf" if a.quick else "raw-vllm,raw-vllm-actor,vllm,hf")).split(",")
    notes = []
    if not have_vllm and {"raw-vllm", "raw-vllm-actor", "vllm"} & set(wanted):
        notes.append("vLLM is not installed here: raw-vllm, raw-vllm-actor and the vllm backend were skipped")
        wanted = [w for w in wanted if w == "hf"]
    if a.quick and a.backends is None:
        notes.append("--quick skips vLLM: two engine start-ups (~30 s each on CPU) would dominate a smoke run")

    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    models = prepare_models(a.model_shape, a.models_dir or work / "models")
    model = models["policy"]
    prompts = _fitting_prompts(model, a.prompts, a.max_tokens, a.max_model_len)
    pfile = work / "prompts.json"
    pfile.write_text(json.dumps(prompts), encoding="utf-8")
    base = ["--model", model, "--prompts-file", str(pfile), "--k", str(a.k), "--max-tokens", str(a.max_tokens),
            "--max-model-len", str(a.max_model_len), *(["--batch-size", str(a.batch_size)] if a.batch_size else []),
            "--dtype", a.dtype,
            "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--actor-cpus", str(a.actor_cpus)]
    res: dict[str, dict] = {}
    try:
        for name in wanted:
            print(f"[bench_generate] {name} ...", file=sys.stderr, flush=True)
            res[name] = run_contender(Path(__file__).resolve(), [*base, "--contender", name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Every contender answers every request. Seeded per request, raw and pipeline vLLM usually emit the same
    # tokens, but other batch compositions may round differently, so that one is informational only.
    check = {"samples_expected": len(prompts) * a.k,
             "all_samples": all(r["samples"] == len(prompts) * a.k for r in res.values())}
    if "raw-vllm" in res and "vllm" in res:
        check["vllm_tokens_equal_raw"] = res["vllm"]["tokens"] == res["raw-vllm"]["tokens"]

    labels = {"raw-vllm": "raw vllm.LLM.generate", "raw-vllm-actor": "raw vllm.LLM.generate in a Ray actor",
              "vllm": "prefsift Generator (vllm) on Ray Data",
              "hf": "prefsift Generator (hf) on Ray Data"}
    rows = [[labels[n], r["tokens"], r["samples"], r["seconds"], r["tok_s"], r.get("steady_tok_s"),
             r["startup_s"]] for n, r in res.items()]
    table = markdown_table(["contender", "tokens", "samples", "seconds (excl. start-up)", "tokens/s",
                            "tokens/s, batches only", "engine start-up s (excluded)"], rows)
    raw = res.get("raw-vllm", {}).get("tok_s")
    ratios = {
        "pipeline_vllm_over_raw_vllm": ratio(res.get("vllm", {}).get("tok_s"), raw),
        "pipeline_vllm_steady_over_raw_vllm": ratio(res.get("vllm", {}).get("steady_tok_s"), raw),
        "pipeline_hf_over_raw_vllm": ratio(res.get("hf", {}).get("tok_s"), raw),
        # The share of the gap that is Ray itself on this machine, and the share that is Ray Data + prefsift.
        "raw_in_ray_actor_over_raw_vllm": ratio(res.get("raw-vllm-actor", {}).get("tok_s"), raw),
        "pipeline_vllm_over_raw_in_ray_actor": ratio(res.get("vllm", {}).get("tok_s"),
                                                     res.get("raw-vllm-actor", {}).get("tok_s")),
    }
    emit("generation", clean({"prompts": len(prompts), "k": a.k, **res, "check": check}), ratios, table=table, notes=notes,
         targets={"pipeline_vllm_over_raw_vllm": ">= 0.95"},
         config={"model_shape": a.model_shape, "prompts": len(prompts), "k": a.k, "max_tokens": a.max_tokens,
                 "max_model_len": a.max_model_len, "actor_cpus": a.actor_cpus,
                 "batch_size": {b: GenerateCfg(backend=b, batch_size=a.batch_size).prompts_per_call() for b in ("vllm", "hf")},
                 "dtype": a.dtype, "temperature": TEMPERATURE, "top_p": TOP_P, "quick": a.quick,
                 "startup": "excluded from both"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
