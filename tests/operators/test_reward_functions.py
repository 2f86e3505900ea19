"""Function rewards: values by hand, a failing function sets its response aside with the message as detail,
loading errors name the entry, and the FunctionScorer runs on Ray Data over per-prompt rows."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from operators.base import QUARANTINE, QUARANTINE_DETAIL, apply
from operators.reward_functions import (
    FunctionScorer,
    FunctionSpecError,
    apply_functions,
    exact_match,
    final_answer,
    function_scorer_resources,
    function_specs,
    length_penalty,
    load_functions,
    model_score_cfg,
)
from operators.score import RewardModelCfg, ScoreCfg
from operators.stats import QUARANTINE_SAMPLE, StatsParams, prompt_stats

HERE = "tests.operators.test_reward_functions"
NOT_A_FUNCTION = 3


def word_count(prompt: str, response: str) -> float:
    return float(len(response.split()))


def shares_prompt_word(prompt: str, response: str) -> bool:
    return bool(set(prompt.lower().split()) & set(response.lower().split()))


def picky(prompt: str, response: str) -> float:
    """Fails on purpose: raises for 'boom', NaN for 'nan', a string for 'str'."""
    if "boom" in response:
        raise RuntimeError("cannot grade this")
    if "nan" in response:
        return math.nan
    if "str" in response:
        return "high"  # type: ignore[return-value]
    return 1.0


def topic(prompt: str, response: str, row: dict) -> float:
    return float(row["topic"] in response)


def test_specs_list_and_mapping():
    assert function_specs(["a.b:f", "a.c:g"]) == {"f": "a.b:f", "g": "a.c:g"}
    assert function_specs({"fmt": "a.b:f"}) == {"fmt": "a.b:f"}
    assert function_specs(None) == {} and function_specs([]) == {}
    with pytest.raises(FunctionSpecError, match="'a.b.f' is not of the form 'module:function'"):
        function_specs(["a.b.f"])
    with pytest.raises(FunctionSpecError, match="aspect 'f' is named twice"):
        function_specs(["a.b:f", "a.c:f"])


def test_loading_errors_name_the_entry():
    with pytest.raises(FunctionSpecError, match="no_such_module_xyz:f: cannot import module 'no_such_module_xyz'"):
        load_functions(["no_such_module_xyz:f"])
    with pytest.raises(FunctionSpecError, match=f"{HERE}:missing: module '{HERE}' has no attribute 'missing'"):
        load_functions([f"{HERE}:missing"])
    with pytest.raises(FunctionSpecError, match="'NOT_A_FUNCTION' is a int, not a callable"):
        load_functions([f"{HERE}:NOT_A_FUNCTION"])
    fns = load_functions({"words": f"{HERE}:word_count", "topic": f"{HERE}:topic"})
    assert [(f.aspect, f.wants_row) for f in fns] == [("words", False), ("topic", True)]


def test_apply_functions_by_hand():
    fns = load_functions([f"{HERE}:word_count", f"{HERE}:shares_prompt_word"])
    values, problems, details = apply_functions(fns, ["Name a cat", "Why?"], ["A cat named Tom", "no idea"])
    np.testing.assert_array_equal(values, [[4.0, 1.0], [2.0, 0.0]])  # a bool counts as 1.0 / 0.0
    assert problems == [None, None] and details == [None, None]


def test_failures_are_per_response_with_the_message():
    fns = load_functions([f"{HERE}:word_count", f"{HERE}:picky"])
    values, problems, details = apply_functions(fns, ["p"] * 4, ["fine one", "boom", "a nan", "str"])
    assert problems == [None, "reward_function_error", "non_finite_reward", "reward_function_error"]
    assert details[0] is None
    assert details[1] == f"{HERE}:picky: RuntimeError: cannot grade this"
    assert details[2] == f"{HERE}:picky: returned nan"
    assert details[3] == f"{HERE}:picky: returned 'high' (str), expected a number"
    np.testing.assert_array_equal(values[0], [2.0, 1.0])
    assert values[1, 0] == 1.0 and np.isnan(values[1, 1])  # the failing function's value stays NaN


def test_shipped_examples():
    assert length_penalty("q", "x" * 250) == -0.25
    assert final_answer("Let me think.\nThe answer is  42.") == "42"
    assert exact_match("q", "steps...\nAnswer: Paris", {"reference": "paris"}) == 1.0
    assert exact_match("q", "The answer is Lyon", {"reference": "Paris."}) == 0.0
    with pytest.raises(KeyError, match="needs a 'reference' column"):
        exact_match("q", "Paris", {})


def _rows(texts: list[list[str | None]], **extra) -> pa.Table:
    responses = [[{"text": t, "sample_idx": j} for j, t in enumerate(row)] for row in texts]
    return pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))],
                     "prompt": [f"prompt {i}" for i in range(len(texts))], "responses": responses, **extra})


def test_lone_function_is_a_scalar_reward():
    scorer = FunctionScorer(ScoreCfg(functions=[f"{HERE}:word_count"]))
    out = scorer(_rows([["one two", "one two three"], ["a", None]])).to_pylist()
    r0, r1 = out[0]["responses"], out[1]["responses"]
    assert [s["overall"] for s in r0] == [2.0, 3.0] and [s["len"] for s in r0] == [7, 13]
    assert "scores" not in r0[0]
    assert r1[0]["overall"] == 1.0 and r1[1]["problem"] == "missing_response" and r1[1]["overall"] is None


def test_aspects_mean_and_named_overall_with_a_failure_quarantined_by_statistics():
    cfg = ScoreCfg(functions={"words": f"{HERE}:word_count", "ok": f"{HERE}:picky"})
    table = _rows([["w x y z", "boom here", "v w"], ["a b", "c"]])
    out = FunctionScorer(cfg)(table)
    rows = out.to_pylist()
    r0 = rows[0]["responses"]
    assert r0[0]["scores"] == {"words": 4.0, "ok": 1.0} and r0[0]["overall"] == 2.5  # (4 + 1) / 2
    assert r0[1]["problem"] == "reward_function_error" and r0[1]["overall"] is None
    assert r0[1]["problem_detail"] == f"{HERE}:picky: RuntimeError: cannot grade this"
    assert r0[2]["overall"] == 1.5 and rows[1]["responses"][1]["overall"] == 1.0
    named = FunctionScorer(ScoreCfg(functions=cfg.functions, overall="words"))(table).to_pylist()
    assert [s["overall"] for s in named[0]["responses"]] == [4.0, None, 2.0]

    # Statistics set the failed response aside on its own, with the function's message as the detail.
    stats = prompt_stats(out, StatsParams(tau=1.0, pd_target="overall", norms=None, carry=()))
    bad = stats.filter(pa.compute.equal(stats.column(QUARANTINE), "reward_function_error")).to_pylist()
    assert [(b["prompt_id"], b[QUARANTINE_SAMPLE], b[QUARANTINE_DETAIL]) for b in bad] == [
        ("p0", 1, f"{HERE}:picky: RuntimeError: cannot grade this")]
    good = {r["prompt_id"]: r for r in stats.to_pylist() if r[QUARANTINE] is None}
    assert good["p0"]["n"] == 2 and good["p0"]["margin"] == pytest.approx(2.5 - 1.5)


def test_merges_with_model_aspects_and_row_columns():
    """Responses as the model scorer leaves them (aspect `helpfulness`, one unscorable), then a row-aware
    function: overall is the mean over the model's and the function's aspects."""
    responses = [[{"text": "about cats", "sample_idx": 0, "overall": 0.5, "len": 10, "scores": {"helpfulness": 0.5},
                   "problem": None},
                  {"text": "about dogs", "sample_idx": 1, "overall": -1.0, "len": 10,
                   "scores": {"helpfulness": -1.0}, "problem": None},
                  {"text": "x", "sample_idx": 2, "overall": None, "len": 1, "scores": {"helpfulness": None},
                   "problem": "non_finite_reward"}]]
    table = pa.table({"prompt_id": ["p0"], "prompt": ["pets?"], "topic": ["cats"], "responses": responses})
    cfg = ScoreCfg(models=[RewardModelCfg("rm", aspects=["helpfulness"])], functions=[f"{HERE}:topic"])
    out = FunctionScorer(cfg)(table).to_pylist()[0]["responses"]
    assert out[0]["scores"] == {"helpfulness": 0.5, "topic": 1.0} and out[0]["overall"] == 0.75
    assert out[1]["scores"] == {"helpfulness": -1.0, "topic": 0.0} and out[1]["overall"] == -0.5
    assert out[2]["problem"] == "non_finite_reward" and out[2]["overall"] is None  # left as it was
    # score.overall naming a function aspect: the model scorer forms a provisional mean.
    assert model_score_cfg(ScoreCfg(overall="topic", functions=[f"{HERE}:topic"])).overall == "mean"
    scalar = [[{k: v for k, v in r.items() if k != "scores"} for r in responses[0]]]
    with pytest.raises(FunctionSpecError, match="scalar one with no aspect name"):
        FunctionScorer(ScoreCfg(models=[RewardModelCfg("rm")], functions=[f"{HERE}:topic"]))(
            table.set_column(3, "responses", pa.array(scalar)))


def test_row_quarantine_rules():
    table = _rows([["a", "b"], ["c", "d"], []]).set_column(1, "prompt", pa.array([None, "q", "r"]))
    table = table.append_column(QUARANTINE, pa.array([None, "prompt_too_long", None], pa.string()))
    out = FunctionScorer(ScoreCfg(functions=[f"{HERE}:word_count"]))(table).to_pylist()
    assert [r[QUARANTINE] for r in out] == ["missing_prompt", "prompt_too_long", "no_responses"]
    assert all(s["overall"] is None for r in out[:2] for s in r["responses"])


def test_function_scorer_through_ray_data(ray_local):
    cfg = ScoreCfg(functions={"words": f"{HERE}:word_count", "ok": f"{HERE}:picky"}, batch_size=2)
    texts = [[f"w{i} " * (i + 1), f"v{i} " * (2 * i + 1)] for i in range(5)] + [["boom", "a b"]]
    ds = apply(ray_local.data.from_items(_rows(texts).to_pylist()), FunctionScorer,
               function_scorer_resources(cfg), cfg=cfg)
    assert function_scorer_resources(cfg).num_cpus == 0.5
    rows = {r["prompt_id"]: r for r in ds.take_all()}
    assert len(rows) == 6
    for i in range(5):
        got = [s["overall"] for s in rows[f"p{i}"]["responses"]]
        assert got == [((i + 1) + 1) / 2, ((2 * i + 1) + 1) / 2]
    last = rows["p5"]["responses"]
    assert last[0]["problem"] == "reward_function_error" and "cannot grade this" in last[0]["problem_detail"]
    assert last[1]["overall"] == 1.5


def odd_length_fails(prompt: str, response: str) -> float:
    if len(response) % 2:
        raise ValueError(f"odd length {len(response)}")
    return 1.0


def test_curation_mixes_functions_with_model_aspects(ray_local, tiny_models, tmp_path):
    """prefsift curate on tiny models with a 2-aspect reward model and two function aspects: overall is the
    mean of the four, each failed response is quarantined by the statistics with its message, counts balance."""
    import json

    import pyarrow.parquet as pq

    from pipelines import curate
    from pipelines.runtime.config import CurateConfig, from_dict, load_yaml

    data = load_yaml("pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"]["limit"] = 5
    data["generate"].update(model=tiny_models["policy"], num_samples=3, max_tokens=10, max_model_len=256)
    data["score"].update(models=[{"path": tiny_models["reward_multi"]}],
                         functions={"short": "operators.reward_functions:length_penalty",
                                    "even": f"{HERE}:odd_length_fails"})
    data["output"] = {"dir": str(tmp_path)}
    data["select"] = {"rule": "pvar_top", "fraction": 1.0}
    data["ray"]["progress"] = False
    curate.main(from_dict(CurateConfig, data))

    scored = [r for row in pq.read_table(tmp_path / "scored").to_pylist() for r in row["responses"]]
    odd = [r for r in scored if len(r["text"]) % 2]
    for r in scored:
        if len(r["text"]) % 2:
            assert r["problem"] == "reward_function_error" and r["overall"] is None
            assert r["problem_detail"].endswith(f"ValueError: odd length {len(r['text'])}")
        else:
            s = r["scores"]
            assert set(s) == {"helpfulness", "correctness", "short", "even"} and s["even"] == 1.0
            assert s["short"] == -len(r["text"]) / 1000
            assert r["overall"] == pytest.approx(sum(s.values()) / 4)
    st = json.loads((tmp_path / "manifest.json").read_text())["stages"]["stats"]
    assert st["rows_in"] == len(scored)
    assert st["quarantined"].get("reward_function_error", 0) == len(odd)
    assert st["rows_in"] == st["rows_out_as_input"] + sum(st["quarantined"].values())
    if odd:
        q = [r for r in pq.read_table(tmp_path / "quarantine" / "stats").to_pylist()
             if r["reason"] == "reward_function_error"]
        assert sorted(r["detail"] for r in q) == sorted(r["problem_detail"] for r in odd)
