"""RewardScorer on the tiny reward models: every score equals an un-batched forward of the same text."""

from __future__ import annotations

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
    length_buckets,
    model_aspects,
    overall_reward,
    scorer_resources,
    truncate_keep_end,
)

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


def _batch(**extra) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "sample_idx": [0] * len(PROMPTS),
                     "prompt": PROMPTS, "response": RESPONSES, **extra})


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


def _convs(prompts=PROMPTS, responses=RESPONSES) -> list[list[dict]]:
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, responses, strict=True)]


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist(), dtype=np.float64)


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


# ----------------------------------------------------------------------------------------------------------
# Real models
# ----------------------------------------------------------------------------------------------------------


def test_scalar_model_equals_unbatched_forward(tiny_models):
    cfg = ScoreCfg(models=[RewardModelCfg(tiny_models["reward"])], micro_batch_size=2)
    out = RewardScorer(cfg)(_batch())
    assert out.column("prompt_id").to_pylist() == [f"p{i}" for i in range(len(PROMPTS))]  # order kept
    assert not [c for c in out.column_names if c.startswith("reward__")]
    assert out.schema.field("reward").type == pa.float64()
    expected = _direct(tiny_models["reward"], _convs())[:, 0]
    np.testing.assert_allclose(_col(out, "reward"), expected, atol=1e-5, rtol=0)
    assert np.std(expected) > 0.05  # the rewards differ between responses (not all one value)
    assert out.column("response_len").to_pylist() == [len(r) for r in RESPONSES]  # characters
    assert out.schema.field("response_len").type == pa.int64()
    assert out.column(QUARANTINE).null_count == len(PROMPTS)


def test_multi_head_model_names_aspects_from_id2label(tiny_models):
    cfg = ScoreCfg(models=[RewardModelCfg(tiny_models["reward_multi"])], micro_batch_size=4)
    out = RewardScorer(cfg)(_batch())
    expected = _direct(tiny_models["reward_multi"], _convs())
    np.testing.assert_allclose(_col(out, "reward__helpfulness"), expected[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "reward__correctness"), expected[:, 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "reward"), expected.mean(axis=1), atol=1e-5, rtol=0)


def test_single_aspect_models_combine(tiny_models):
    models = [RewardModelCfg(tiny_models["reward_helpfulness"], aspects=["helpfulness"]),
              RewardModelCfg(tiny_models["reward_correctness"], aspects=["correctness"])]
    out = RewardScorer(ScoreCfg(models=models, overall="correctness", micro_batch_size=3))(_batch())
    help_ = _direct(tiny_models["reward_helpfulness"], _convs())[:, 0]
    corr = _direct(tiny_models["reward_correctness"], _convs())[:, 0]
    np.testing.assert_allclose(_col(out, "reward__helpfulness"), help_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "reward__correctness"), corr, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_col(out, "reward"), corr, atol=1e-5, rtol=0)  # overall names one aspect


def test_messages_missing_response_and_truncation(tiny_models):
    path = tiny_models["reward"]
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
    responses = list(RESPONSES)
    responses[1] = None
    out = RewardScorer(ScoreCfg(models=[RewardModelCfg(path)], max_length=24, micro_batch_size=2))(
        _batch(messages=msgs).set_column(3, "response", pa.array(responses, pa.string())))
    rows = out.to_pylist()
    assert rows[1][QUARANTINE] == "missing_response" and rows[1]["reward"] is None
    assert rows[1]["response_len"] == 0
    # Reference: template the messages + response, keep the first token (bos) and the last 23.
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for i, r in enumerate(rows):
        if i == 1:
            continue
        text = tok.apply_chat_template(msgs[i] + [{"role": "assistant", "content": responses[i]}], tokenize=False)
        ids = tok(text)["input_ids"]
        assert len(ids) > 24 and ids[0] == tok.bos_token_id
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids[:1] + ids[-23:]])).logits[0, 0].item()
        assert r[QUARANTINE] is None
        assert abs(r["reward"] - want) < 1e-5


def test_non_finite_reward_is_quarantined(tiny_models, tmp_path):
    # A real model whose head is broken: its scores are NaN.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    with torch.no_grad():
        model.score.weight[0, :4] = float("nan")
    model.save_pretrained(tmp_path / "nan_rm")
    AutoTokenizer.from_pretrained(tiny_models["reward"]).save_pretrained(tmp_path / "nan_rm")
    out = RewardScorer(ScoreCfg(models=[RewardModelCfg(str(tmp_path / "nan_rm"))]))(_batch())
    assert out.column(QUARANTINE).to_pylist() == ["non_finite_reward"] * len(PROMPTS)


def test_bad_config_is_named(tiny_models):
    with pytest.raises(ValueError, match="score.models is empty"):
        RewardScorer(ScoreCfg())
    with pytest.raises(ValueError, match="score.overall"):
        RewardScorer(ScoreCfg(models=[RewardModelCfg(tiny_models["reward_multi"])], overall="honesty"))


def test_scorer_through_ray_data(ray_local, tiny_models):
    cfg = ScoreCfg(models=[RewardModelCfg(tiny_models["reward_multi"])], num_cpus=0.5, batch_size=4,
                   micro_batch_size=2)
    items = [{"prompt_id": f"p{i}", "sample_idx": 0, "prompt": p, "response": r}
             for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))]
    ds = apply(ray_local.data.from_items(items), RewardScorer, scorer_resources(cfg), cfg=cfg)
    rows = {r["prompt_id"]: r for r in ds.take_all()}
    expected = _direct(tiny_models["reward_multi"], _convs())
    for i in range(len(PROMPTS)):
        r = rows[f"p{i}"]
        assert r[QUARANTINE] is None
        assert abs(r["reward__helpfulness"] - expected[i, 0]) < 1e-5
        assert abs(r["reward__correctness"] - expected[i, 1]) < 1e-5
        assert abs(r["reward"] - expected[i].mean()) < 1e-5
