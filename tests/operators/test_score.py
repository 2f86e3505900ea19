"""RewardScorer on the tiny reward models: every score equals an un-batched forward of the same text, and
lands in the right response struct of the right prompt row."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from operators.base import QUARANTINE, apply
from operators.score import (
    RewardModelCfg,
    RewardScorer,
    ScoreCfg,
    combine_aspects,
    flatten_responses,
    length_buckets,
    model_aspects,
    nest_responses,
    overall_reward,
    scorer_resources,
    truncate_keep_end,
)
from tests.operators.helpers import priority_probe

# Lengths differ a lot, so sorting by length reorders rows across micro-batches of 2.
PROMPTS = ["What is gravity?", "Hi", "Write a long story about a cat", "Summarize the data", "x", "Why?"]
RESPONSES = ["It is a force.", "Hello there, how can I help you today? " * 3, "Once upon a time " * 12, "",
             "ok", "Because the sky is blue and the grass is green, h\u00e9h\u00e9."]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Two OpenMP threads beside busy Ray workers on 2 cores spin against each other (see test_generate).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


K = 2


def _text(i: int, j: int) -> str:
    """Prompt i's response j: each prompt row holds K of the responses, so lengths mix within a row."""
    return RESPONSES[(i + j) % len(RESPONSES)]


def _batch(texts=None, **extra) -> pa.Table:
    texts = texts or [[_text(i, j) for j in range(K)] for i in range(len(PROMPTS))]
    responses = [[{"text": t, "sample_idx": j} for j, t in enumerate(row)] for row in texts]
    return pa.table({"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                     "responses": responses, **extra})


def _score(scorer: RewardScorer, batch: pa.Table) -> pa.Table:
    """One call, as Ray Data makes it: the scorer's __call__ is a coroutine."""
    return asyncio.run(scorer(batch))


def _flat(table: pa.Table, field: str, sub: str | None = None) -> list:
    """One value per response, rows in order, responses in order."""
    out = [s[field] for r in table.to_pylist() for s in r["responses"]]
    return [v[sub] for v in out] if sub else out


def _direct(path: str, convs: list[list[dict]]) -> np.ndarray:
    """The reference: one plain forward per text, no padding, no batching."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for conv in convs:
            text = tok.apply_chat_template(conv, tokenize=False)
            out.append(model(**tok(text, return_tensors="pt")).logits[0].double().numpy())
    return np.stack(out)


def _convs() -> list[list[dict]]:
    """Every (prompt, response) conversation, in _flat's order."""
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": _text(i, j)}]
            for i, p in enumerate(PROMPTS) for j in range(K)]


def _col(table: pa.Table, field: str, sub: str | None = None) -> np.ndarray:
    return np.asarray(_flat(table, field, sub), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------


def test_aspect_names():
    assert model_aspects(1, None, {0: "LABEL_0"}, "m") is None
    assert model_aspects(1, ["helpfulness"], None, "m") == ["helpfulness"]
    assert model_aspects(2, None, {0: "a", 1: "b"}, "m") == ["a", "b"]
    assert model_aspects(2, ["x", "y"], {0: "a", 1: "b"}, "m") == ["x", "y"]
    with pytest.raises(ValueError, match="2 output"):
        model_aspects(2, ["x"], None, "m")


def test_combine_aspects_rules():
    assert combine_aspects([None], ["m"], "mean") == []
    assert combine_aspects([["a"], ["b", "c"]], ["m1", "m2"], "b") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no aspect name"):
        combine_aspects([None, ["a"]], ["m1", "m2"], "mean")
    with pytest.raises(ValueError, match="more than one model"):
        combine_aspects([["a"], ["a"]], ["m1", "m2"], "mean")
    with pytest.raises(ValueError, match="score.overall"):
        combine_aspects([["a"]], ["m1"], "b")


def test_overall_reward_and_helpers():
    v = np.array([[1.0, 3.0], [2.0, np.nan]])
    assert overall_reward(v, ["a", "b"], "mean")[0] == 2.0
    assert np.isnan(overall_reward(v, ["a", "b"], "mean")[1])
    assert overall_reward(v, ["a", "b"], "a").tolist() == [1.0, 2.0]
    assert truncate_keep_end([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert truncate_keep_end([4, 5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert truncate_keep_end([4, 5], 3, bos_id=1) == [4, 5]
    assert length_buckets([5, 1, 3, 1, 9], 2) == [[1, 3], [2, 0], [4]]


def test_flatten_and_nest_responses_keep_rows_and_nulls():
    col = pa.array([[{"t": "a"}, {"t": "b"}], None, [], [{"t": "c"}]],
                   type=pa.list_(pa.struct([("t", pa.string())])))
    for arr in (col, col.slice(1)):  # a sliced column (offsets not starting at 0) too
        flat, rows, offsets = flatten_responses(arr)
        n = len(arr)
        assert flat.field("t").to_pylist() == ["a", "b", "c"][3 - len(flat):]
        assert rows.tolist() == ([0, 0, 3] if n == 4 else [2])
        assert offsets.tolist() == ([0, 2, 2, 2, 3] if n == 4 else [0, 0, 0, 1])
        new = pa.StructArray.from_arrays([flat.field("t"), pa.array(range(len(flat)))], names=["t", "i"])
        nested = nest_responses(arr, new, offsets).to_pylist()
        want = [[{"t": "a", "i": 0}, {"t": "b", "i": 1}], None, [], [{"t": "c", "i": 2}]]
        assert nested == (want if n == 4 else [None, [], [{"t": "c", "i": 0}]])


# ----------------------------------------------------------------------------------------------------------
# Real models
# ----------------------------------------------------------------------------------------------------------


def test_scalar_model_equals_unbatched_forward(tiny_models):
    cfg = ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward"])], micro_batch_size=2)
    out = _score(RewardScorer(cfg), _batch())
    assert out.column("prompt_id").to_pylist() == [f"p{i}" for i in range(len(PROMPTS))]  # order kept
    struct = out.schema.field("responses").type.value_type
    assert [f.name for f in struct] == ["text", "sample_idx", "overall", "len", "problem"]  # no `scores`
    assert struct.field("overall").type == pa.float64() and struct.field("len").type == pa.int64()
    expected = _direct(tiny_models["reward"], _convs())[:, 0]
    np.testing.assert_allclose(_col(out, "overall"), expected, atol=1e-5, rtol=0)
    assert np.std(expected) > 0.05  # the rewards differ between responses (not all one value)
    assert _flat(out, "len") == [len(_text(i, j)) for i in range(len(PROMPTS)) for j in range(K)]  # characters
    assert _flat(out, "sample_idx") == [0, 1] * len(PROMPTS) and _flat(out, "problem") == [None] * len(PROMPTS) * K
    assert out.column(QUARANTINE).null_count == len(PROMPTS)


def test_multi_head_model_names_aspects_from_id2label(tiny_models):
    cfg = ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward_multi"])], micro_batch_size=4)
    out = _score(RewardScorer(cfg), _batch())
    expected = _direct(tiny_models["reward_multi"], _convs())
    np.testing.assert_allclose(_col(out, "scores", "helpfulness"), expected[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "scores", "correctness"), expected[:, 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "overall"), expected.mean(axis=1), atol=1e-5, rtol=0)


def test_single_aspect_models_combine(tiny_models):
    models = [RewardModelCfg(tiny_models["reward_helpfulness"], aspects=["helpfulness"]),
              RewardModelCfg(tiny_models["reward_correctness"], aspects=["correctness"])]
    out = _score(RewardScorer(ScoreCfg(backend="hf", models=models, overall="correctness", micro_batch_size=3)),
                 _batch())
    help_ = _direct(tiny_models["reward_helpfulness"], _convs())[:, 0]
    corr = _direct(tiny_models["reward_correctness"], _convs())[:, 0]
    np.testing.assert_allclose(_col(out, "scores", "helpfulness"), help_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "scores", "correctness"), corr, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "overall"), corr, atol=1e-5, rtol=0)  # overall names one aspect


def test_messages_missing_response_and_truncation(tiny_models):
    path = tiny_models["reward"]
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
    texts = [[_text(i, j) for j in range(K)] for i in range(len(PROMPTS))]
    texts[1][0] = None
    out = _score(RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(path)], max_length=24,
                                       micro_batch_size=2)), _batch(texts, messages=msgs))
    rows = out.to_pylist()
    # A missing response is a problem of that response alone; its prompt row and sibling stay good.
    assert rows[1][QUARANTINE] is None
    missing = rows[1]["responses"][0]
    assert (missing["problem"], missing["overall"], missing["len"]) == ("missing_response", None, 0)
    # Reference: template the messages + response, keep the first token (bos) and the last 23.
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for i, r in enumerate(rows):
        for j, resp in enumerate(r["responses"]):
            if (i, j) == (1, 0):
                continue
            conv = msgs[i] + [{"role": "assistant", "content": texts[i][j]}]
            ids = tok(tok.apply_chat_template(conv, tokenize=False))["input_ids"]
            assert len(ids) > 24 and ids[0] == tok.bos_token_id
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids[:1] + ids[-23:]])).logits[0, 0].item()
            assert resp["problem"] is None
            assert abs(resp["overall"] - want) < 1e-5


def test_missing_prompt_quarantines_the_row_and_upstream_reasons_pass(tiny_models):
    scorer = RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward"])]))
    batch = _batch().set_column(1, "prompt", pa.array([None, *PROMPTS[1:]], pa.string()))
    batch = batch.append_column(QUARANTINE, pa.array([None, "prompt_too_long", *[None] * (len(PROMPTS) - 2)]))
    batch = batch.set_column(2, "responses", pa.array([*batch.column("responses").to_pylist()[:2], None,
                                                       *batch.column("responses").to_pylist()[3:]],
                                                      batch.schema.field("responses").type))
    rows = _score(scorer, batch).to_pylist()
    assert [r[QUARANTINE] for r in rows] == ["missing_prompt", "prompt_too_long", "no_responses",
                                            *[None] * (len(PROMPTS) - 3)]
    assert all(s["overall"] is None and s["problem"] is None for r in rows[:2] for s in r["responses"])
    assert rows[2]["responses"] is None
    assert all(s["overall"] is not None for r in rows[3:] for s in r["responses"])


def test_non_finite_reward_is_quarantined(tiny_models, tmp_path):
    # A real model whose head is broken: its scores are NaN.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    with torch.no_grad():
        model.score.weight[0, :4] = float("nan")
    model.save_pretrained(tmp_path / "nan_rm")
    AutoTokenizer.from_pretrained(tiny_models["reward"]).save_pretrained(tmp_path / "nan_rm")
    out = _score(RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(str(tmp_path / "nan_rm"))])), _batch())
    assert _flat(out, "problem") == ["non_finite_reward"] * len(PROMPTS) * K
    assert out.column(QUARANTINE).null_count == len(PROMPTS)  # per response, not per prompt


def test_bad_config_is_named(tiny_models):
    with pytest.raises(ValueError, match="score.models is empty"):
        RewardScorer(ScoreCfg())
    with pytest.raises(ValueError, match="score.overall"):
        RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward_multi"])], overall="honesty"))


def test_scorer_through_ray_data(ray_local, tiny_models):
    cfg = ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward_multi"])], num_cpus=0.5, batch_size=2,
                   micro_batch_size=3)
    items = _batch().to_pylist()
    ds = apply(ray_local.data.from_items(items), RewardScorer, scorer_resources(cfg), cfg=cfg)
    rows = {r["prompt_id"]: r for r in ds.take_all()}
    expected = _direct(tiny_models["reward_multi"], _convs()).reshape(len(PROMPTS), K, 2)
    for i in range(len(PROMPTS)):
        r = rows[f"p{i}"]
        assert r[QUARANTINE] is None
        for j, resp in enumerate(r["responses"]):
            assert resp["text"] == _text(i, j) and resp["problem"] is None
            assert abs(resp["scores"]["helpfulness"] - expected[i, j, 0]) < 1e-5
            assert abs(resp["scores"]["correctness"] - expected[i, j, 1]) < 1e-5
            assert abs(resp["overall"] - expected[i, j].mean()) < 1e-5


def test_calls_from_one_input_block_overlap(ray_local, tiny_models, tmp_path):
    """A Ray Data task carries every batch of its input block, and runs a synchronous UDF's batches one after
    another: the scorer's "tokenize the next call while the models score this one" held only across blocks.
    With one block of 3 batches, the first call's models wait (up to 30 s) until a second call has
    templated and tokenized its texts; a scorer whose calls ran in turn would never see it."""
    log = tmp_path / "overlap.json"

    class FirstCallWaits(RewardScorer):
        def __init__(self, cfg: ScoreCfg):
            super().__init__(cfg)
            self.encoded, self.second_encoded, self.first, self.guard = 0, threading.Event(), True, threading.Lock()

        def encode(self, batch):
            out = super().encode(batch)
            with self.guard:
                self.encoded += 1
                if self.encoded == 2:
                    self.second_encoded.set()
            return out

        def run_models(self, encoded):
            with self.guard:
                first, self.first = self.first, False
            if first:
                log.write_text(json.dumps({"second_call_encoded_meanwhile": self.second_encoded.wait(timeout=30)}))
            return super().run_models(encoded)

    cfg = ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward"])], num_cpus=0.5, batch_size=2,
                   max_concurrent_batches=2)
    ds = ray_local.data.from_arrow(_batch())  # one block
    assert ds.materialize().num_blocks() == 1
    rows = apply(ds, FirstCallWaits, scorer_resources(cfg), cfg=cfg).take_all()
    assert json.loads(log.read_text()) == {"second_call_encoded_meanwhile": True}
    assert sorted(r["prompt_id"] for r in rows) == [f"p{i}" for i in range(len(PROMPTS))]
    expected = _direct(tiny_models["reward"], _convs())[:, 0].reshape(len(PROMPTS), K)
    for r in rows:
        got = [s["overall"] for s in r["responses"]]
        np.testing.assert_allclose(got, expected[int(r["prompt_id"][1:])], atol=1e-5, rtol=0)


def test_backend_choice(monkeypatch):
    import operators.score as score

    assert score.resolve_backend(ScoreCfg(backend="hf"), cuda=True) == "hf"
    assert score.resolve_backend(ScoreCfg(backend="vllm"), cuda=False) == "vllm"
    assert score.resolve_backend(ScoreCfg(), cuda=True) in ("vllm", "hf")
    assert score.resolve_backend(ScoreCfg(), cuda=False) == score.AUTO_CPU_BACKEND
    monkeypatch.setattr(score.importlib.util, "find_spec", lambda name: None)  # no vLLM installed
    assert score.resolve_backend(ScoreCfg(), cuda=True) == "hf"
    assert scorer_resources(ScoreCfg(max_concurrent_batches=3)).max_concurrency == 3


@pytest.mark.slow
def test_vllm_pooling_backend_gives_raw_logits(tiny_models):
    """vLLM's classify applies a sigmoid (one label) or softmax (several) unless told not to; the rewards
    must be the raw logits the transformers forward gives, for a scalar and a two-head model."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    for name, micro, kv in (("reward", 2, None), ("reward_multi", 4, 1 / 64)):
        # 16 MiB of KV cache holds 8k tokens of the tiny model, more than one call has. The scalar model
        # takes the CPU default: 16,384 tokens of 2 layers x (keys, values) x 4 heads x 32 x 4 bytes, 32 MiB.
        scorer = RewardScorer(ScoreCfg(models=[RewardModelCfg(tiny_models[name])], backend="vllm",
                                       micro_batch_size=micro, max_length=256, kv_cache_gib=kv))
        try:
            engine = scorer.models[0].model
            assert engine.kv_cache_gib == (1 / 32 if kv is None else kv)
            assert engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == \
                int(engine.kv_cache_gib * 2**30)
            out = _score(scorer, _batch())
        finally:
            scorer.close()
        expected = _direct(tiny_models[name], _convs())
        assert (expected < 0).any()  # a sigmoid or softmax output could not match these
        got = _col(out, "overall") if name == "reward" else \
            np.stack([_col(out, "scores", "helpfulness"), _col(out, "scores", "correctness")], axis=1)
        np.testing.assert_allclose(got, expected[:, 0] if name == "reward" else expected, atol=1e-4, rtol=0)


def test_pooling_kv_cache_on_cpu_is_sized_for_the_model_not_the_machine(tiny_models):
    """score.kv_cache_gib null on CPU: room for 16,384 tokens (or 4 x max_length) of keys and values of every
    layer, from the model's config; None (vLLM's memory share) where the config does not say."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from operators.vllm_engines import pooling_kv_cache_gib

    tiny = AutoConfig.from_pretrained(tiny_models["reward"])  # 2 layers, 4 heads (all kv) of 32: 2,048 B/token
    assert pooling_kv_cache_gib(tiny, "float32", 256) == 16384 * 2048 / 2**30 == 1 / 32
    assert pooling_kv_cache_gib(tiny, "bfloat16", 256) == 1 / 64
    assert pooling_kv_cache_gib(tiny, "float32", 8192) == 4 * 8192 * 2048 / 2**30  # long texts: 4 of them
    gqa = SimpleNamespace(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896)
    assert pooling_kv_cache_gib(gqa, "bfloat16", 1024) == 16384 * 2 * 24 * 2 * 64 * 2 / 2**30  # head_dim 896/14
    assert pooling_kv_cache_gib(SimpleNamespace(hidden_size=64), "float32", 256) is None
    assert pooling_kv_cache_gib(tiny, "float64", 256) is None


@pytest.mark.slow
def test_vllm_scorer_through_ray_data_runs_its_engines_first(ray_local, tiny_models):
    """Two reward models on vLLM in one actor (a scalar one named as an aspect, and a two-head one), calls in
    flight: the rewards equal the plain forward's; both engines' processes run at score.niceness (0), the
    second one's too (forked after the first engine had started), and the actor's own threads (templating,
    tokenizing) at Ray's 15, so that they do not take the model worker's core from it."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    cfg = ScoreCfg(backend="vllm", models=[RewardModelCfg(tiny_models["reward"], aspects=["harmlessness"]),
                                           RewardModelCfg(tiny_models["reward_multi"])],
                   num_cpus=0.5, batch_size=2, micro_batch_size=3, max_length=256, kv_cache_gib=1 / 64)
    assert scorer_resources(cfg).niceness == 0 and scorer_resources(cfg).closes_children
    assert scorer_resources(ScoreCfg(backend="hf")).niceness is None  # its model runs in the actor's threads
    ds = apply(ray_local.data.from_items(_batch().to_pylist()), priority_probe(RewardScorer), scorer_resources(cfg),
               cfg=cfg)
    out = pa.Table.from_pylist(sorted(ds.take_all(), key=lambda r: int(r["prompt_id"][1:])))
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the raylet's, inherited from this driver
    assert {tuple(v) for v in out.column("engine_nice").to_pylist()} == {(base,)}
    assert {tuple(v) for v in out.column("thread_nice").to_pylist()} == {(min(base + 15, 19),)}
    assert out.column(QUARANTINE).null_count == len(PROMPTS)
    scalar, multi = _direct(tiny_models["reward"], _convs()), _direct(tiny_models["reward_multi"], _convs())
    got = np.stack([_col(out, "scores", a) for a in ("harmlessness", "helpfulness", "correctness")], axis=1)
    np.testing.assert_allclose(got, np.concatenate([scalar, multi], axis=1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_col(out, "overall"), got.mean(axis=1), atol=1e-12, rtol=0)


def test_scorer_niceness_out_of_range_names_its_key(tiny_models):
    with pytest.raises(ValueError, match=r"score.niceness must be in 0..19 or null \(Ray's 15\), got 20"):
        RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(tiny_models["reward"])], niceness=20))
    with pytest.raises(ValueError, match=r"score.niceness must be in 0..19"):
        scorer_resources(ScoreCfg(niceness=-1))


_SHUT_DOWN = """
import json, sys
import psutil
import ray
from operators.base import apply
from operators.score import RewardModelCfg, RewardScorer, ScoreCfg, scorer_resources
from pipelines.runtime.ray_start import init_ray
scalar, multi = sys.argv[1:3]
cfg = ScoreCfg(backend="vllm", models=[RewardModelCfg(scalar, aspects=["harmlessness"]), RewardModelCfg(multi)],
               num_cpus=0.5, batch_size=2, max_length=256, kv_cache_gib=1 / 64)
init_ray(num_cpus=2, object_store_gb=0.5, progress=False)
rows = [{"prompt_id": f"p{i}", "prompt": f"Say {i}", "responses": [{"text": "hi", "sample_idx": 0}]} for i in range(8)]
ds = apply(ray.data.from_items(rows), RewardScorer, scorer_resources(cfg), cfg=cfg)
scored = len(ds.take_all())
kids = psutil.Process().children(recursive=True)
engine = [(p.pid, p.create_time()) for p in kids if p.name().startswith("VLLM::")]
reapers = [p.pid for p in kids if "prefsift-reaper" in " ".join(p.cmdline())]
ray.shutdown()  # the dataset, and so its actor with both engines, still alive
print("seen:", json.dumps({"scored": scored, "engine": engine, "reapers": reapers}), flush=True)
"""


@pytest.mark.slow
def test_ray_shut_down_under_a_live_vllm_scorer_leaves_no_engine_process(tiny_models, tmp_path):
    """A driver that shuts its Ray down while a dataset still holds the scorer's actor (an error that ends
    the script, or ray.shutdown() in a notebook). Before the reaper, one of the two engines' core and worker
    ran on as orphans, holding their memory (on a GPU, the card's): vLLM's engine core does not watch its
    parent, and Ray does not kill the children of an actor that closes its engines itself
    (Resources.closes_children). Each engine process must be gone within the reaper's poll and grace."""
    import subprocess
    import time

    import psutil

    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    script = tmp_path / "shut_down.py"
    script.write_text(_SHUT_DOWN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, str(script), tiny_models["reward"], tiny_models["reward_multi"]], env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(next(line[6:] for line in run.stdout.splitlines() if line.startswith("seen: ")))
    assert seen["scored"] == 8 and len(seen["engine"]) >= 2 and len(seen["reapers"]) == 1

    def alive(pid: int, created: float) -> bool:
        try:
            p = psutil.Process(pid)
            return abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(*p) for p in seen["engine"]):
        time.sleep(0.5)
    left = [p for p in seen["engine"] if alive(*p)]
    for pid, _ in left:  # not left running under the rest of the suite
        psutil.Process(pid).kill()
    assert left == []
