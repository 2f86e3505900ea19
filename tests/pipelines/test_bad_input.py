"""Bad input, one class per test: a clear error naming the problem, or quarantined rows with a reason that
the manifest counts, with in = out + quarantined at every stage.

Two curate runs carry most classes: `rated_run` over one gzipped JSONL file of rated rows (one or more bad
rows per class, among good ones), and `gen_run` over a prompts file through the tiny models. Each test
below asserts on one class in those runs' manifests and quarantine folders.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.base import QUARANTINE, QUARANTINE_DETAIL, ColumnError, InputError
from operators.read import read_input, validate_prompts
from pipelines import curate
from pipelines.runtime.config import (
    ConfigError,
    CurateConfig,
    check_model_dir,
    from_dict,
    load_config,
    load_yaml,
)


def resp(text, overall, **scores):
    return {"text": text, "model": None, "overall": overall, "scores": scores or {"q": overall}}


def line(**row) -> bytes:
    # json.dumps writes NaN / Infinity literals, which real corpora contain.
    return json.dumps(row).encode()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path, out, *extra) -> CurateConfig:
    return load_config(CurateConfig, "pipelines/configs/real_rated.yaml",
                       [f"input.path={path}", f"output.dir={out}", "ray.progress=false", "select.fraction=1.0",
                        *extra])


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def quarantine(out, stage) -> list[dict]:
    path = out / "quarantine" / stage
    return pq.read_table(path).to_pylist() if path.exists() else []


def reasons_by_id(out, stage) -> dict[str, set[str]]:
    got: dict[str, set[str]] = {}
    for r in quarantine(out, stage):
        got.setdefault(r["prompt_id"], set()).add(r["reason"])
    return got


def check_balance(m):
    for name, s in m["stages"].items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
        assert s["balanced"], name


GOOD = [resp("a", 1.0, q=1.0), resp("bb", 3.0, q=2.0), resp("ccc", 2.0, q=2.5)]
EXTRA = {"lang": "en", "meta": {"k": 1}, "n": 7}  # `n` collides with a statistics column

# (line, what it is). Line 1 starts with a BOM; every other line ends in CRLF; blank lines sit between.
RATED = [
    (b"\xef\xbb\xbf" + line(prompt_id="ok1", prompt="fine", responses=GOOD, **EXTRA), "good, BOM"),
    (line(prompt_id="ok2", prompt="also fine", responses=GOOD[:2], lang="fr"), "good"),
    (line(prompt_id=42, prompt="int id", responses=GOOD[:2]), "int prompt_id"),
    (line(prompt_id=1.5, prompt="float id", responses=GOOD[:2]), "float prompt_id"),
    (line(prompt_id="pnum", prompt=5, responses=GOOD[:2]), "prompt a number"),
    (line(prompt_id="plist", prompt=["a", "b"], responses=GOOD[:2]), "prompt a list"),
    (line(prompt_id="rstr", prompt="p", responses="oops"), "responses not a list"),
    (line(prompt_id="ostr", prompt="p", responses=[resp("x", "7"), resp("y", "good"), *GOOD[:2]]),
     "overall as strings"),
    (line(prompt_id="sbad", prompt="p", responses=[{"text": "x", "overall": 1, "scores": {"q": "hi"}},
                                                    "plain string", {"text": 12, "overall": 2}, *GOOD[:2]]),
     "scores, response, text of wrong types"),
    (b'{"prompt_id": "utf", "prompt": "caf\xe9", "responses": []}', "invalid UTF-8"),
    (b'{"prompt_id": "cut", "prompt": "trunc', "invalid JSON"),
    (b'["an", "array"]', "not an object"),
    (b'{"prompt_id": "sur", "prompt": "\\ud800 half", "responses": []}', "lone surrogate"),
    (line(prompt_id="emoji", prompt="\U0001F600 fine", responses=GOOD[:2]), "surrogate pair: good"),
    (line(prompt_id="dup", prompt="same", responses=GOOD[:2]), "duplicate id"),
    (line(prompt_id="dup", prompt="same", responses=GOOD[:2]), "exact copy: one kept"),
    (line(prompt_id="clash", prompt="one", responses=GOOD[:2]), "conflicting duplicate"),
    (line(prompt_id="clash", prompt="two", responses=GOOD[:2]), "conflicting duplicate"),
    (line(prompt_id="blank", prompt="   \n\t", responses=GOOD[:2]), "whitespace prompt"),
    (line(prompt_id="pnull", prompt=None, responses=GOOD[:2]), "null prompt"),
    (line(prompt_id=None, prompt="no id", responses=GOOD[:2]), "null prompt_id"),
    (line(prompt_id="  ", prompt="blank id", responses=GOOD[:2]), "whitespace prompt_id"),
    (line(prompt="id missing", responses=GOOD[:2]), "no prompt_id"),
    (line(prompt_id="single", prompt="one answer", responses=GOOD[:1]), "one response"),
    (line(prompt_id="rnull", prompt="null responses", responses=None), "null responses"),
    (line(prompt_id="rnone", prompt="empty responses", responses=[]), "empty responses list"),
    (line(prompt_id="tnull", prompt="null text", responses=[{"text": None, "overall": 1.0}, *GOOD]), "null text"),
    (line(prompt_id="tempty", prompt="empty text", responses=[resp("", 0.5), resp("real", 2.0)]), "empty text"),
    (line(prompt_id="nan", prompt="nan score", responses=[resp("x", float("nan")), *GOOD[:2]]), "NaN overall"),
    (line(prompt_id="inf", prompt="inf score", responses=[resp("x", float("inf")), resp("y", 1.0)]), "inf"),
    (line(prompt_id="nanasp", prompt="nan aspect", responses=[resp("x", 1.0, q=float("nan")), *GOOD[:2]]),
     "NaN aspect"),
    (line(prompt_id="rmiss", prompt="no reward", responses=[resp("x", None), *GOOD[:2]]), "null overall"),
    (line(prompt_id="tied", prompt="all equal", responses=[resp("x", 5.0), resp("y", 5.0)]), "equal rewards"),
    (line(prompt_id="same_text", prompt="p", responses=[resp("negative", 9.5), resp("negative", 8.0)]),
     "identical chosen and rejected"),
    (line(prompt_id="dupresp", prompt="p", responses=[resp("twin", 3.0), resp("twin", 3.0), resp("other", 1.0)]),
     "duplicate responses in one prompt"),
    (line(prompt_id="long", prompt="p", responses=[resp("long " * 40_000, 2.0), resp("short", 1.0)]),
     "a 200k-character response"),
    (line(prompt_id="huge", prompt="p", responses=[resp("x", 1e308), resp("y", -1e308, q=1.0), *GOOD[:2]]),
     "finite rewards too large to square"),
]
def file_line(i: int) -> int:
    return i + 1 + i // 5  # a blank line follows every fifth row


WHERE = {what: file_line(i) for i, (_, what) in enumerate(RATED)}
GOOD_IDS = {"ok1", "ok2", "42", "emoji", "dup", "ostr", "sbad", "tnull", "tempty", "nan", "nanasp", "rmiss",
            "dupresp", "long", "huge"}


@pytest.fixture(scope="module")
def rated_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_rated")
    body = b"".join(raw + (b"\n" if i == 0 else b"\r\n") + (b"\n" if i % 5 == 4 else b"")
                    for i, (raw, _) in enumerate(RATED))
    path = tmp / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(body))
    out = tmp / "run"
    curate.main(cfg_for(path, out))
    return out, path


# --- reading the file ----------------------------------------------------------------------------------------


def test_manifest_balances_and_counts_every_line(rated_run):
    out, _ = rated_run
    m = manifest(out)
    check_balance(m)
    assert m["stages"]["prompts"]["rows_in"] == len(RATED)  # blank lines are not rows


def test_bom_crlf_and_blank_lines_are_read(rated_run):
    out, _ = rated_run
    prompts = {r["prompt_id"]: r for r in pq.read_table(out / "prompts").to_pylist()}
    assert "ok1" in prompts and prompts["ok1"]["prompt"] == "fine"
    assert not any(p["prompt"].endswith("\r") for p in prompts.values())


def test_invalid_utf8_line_quarantined_with_file_and_line(rated_run):
    out, path = rated_run
    (bad,) = [r for r in quarantine(out, "prompts") if r["reason"] == "invalid_utf8"]
    assert bad["detail"].startswith(f"{path}:{WHERE['invalid UTF-8']}: invalid UTF-8: byte 0xe9")
    assert "caf" in bad["detail"]  # the start of the line, for finding it


def test_invalid_json_and_non_object_lines(rated_run):
    out, path = rated_run
    q = {r["reason"]: r["detail"] for r in quarantine(out, "prompts")}
    assert q["invalid_json"].startswith(f"{path}:{WHERE['invalid JSON']}: invalid JSON")
    assert q["not_a_json_object"].startswith(f"{path}:{WHERE['not an object']}: a JSON list")


def test_lone_surrogate_quarantined_and_a_pair_kept(rated_run):
    out, _ = rated_run
    q = {r["reason"]: r["detail"] for r in quarantine(out, "prompts")}
    assert "surrogate" in q["invalid_unicode"]
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    assert stats["emoji"]["prompt"] == "\U0001F600 fine"


def test_extra_columns_are_carried_to_the_outputs(rated_run):
    out, _ = rated_run
    for stage in ("prompts", "stats", "pairs"):
        rows = {r["prompt_id"]: r for r in pq.read_table(out / stage).to_pylist()}
        assert rows["ok1"]["lang"] == "en" and rows["ok2"]["lang"] == "fr", stage
        assert json.loads(rows["ok1"]["meta"]) == {"k": 1}, stage  # non-text values as JSON text
    prompts = {r["prompt_id"]: r for r in pq.read_table(out / "prompts").to_pylist()}
    stats = {r["prompt_id"]: r for r in pq.read_table(out / "stats").to_pylist()}
    assert prompts["ok1"]["n"] == "7" and stats["ok1"]["n"] == 3  # a clashing name is not carried past prompts/


# --- wrong types ---------------------------------------------------------------------------------------------


def test_int_prompt_id_is_cast_to_string(rated_run):
    out, _ = rated_run
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    assert "42" in stats
    assert pq.read_table(out / "stats").schema.field("prompt_id").type == pa.string()


def test_wrong_type_prompt_id_and_prompt_quarantined_with_type(rated_run):
    out, path = rated_run
    q = {int(r["detail"][len(str(path)) + 1:].split(":")[0]): r for r in quarantine(out, "prompts")
         if r["reason"].startswith("wrong_type")}
    fid, pnum, plist = q[WHERE["float prompt_id"]], q[WHERE["prompt a number"]], q[WHERE["prompt a list"]]
    assert fid["reason"] == "wrong_type_prompt_id" and "prompt_id is float 1.5, expected" in fid["detail"]
    assert pnum["reason"] == "wrong_type_prompt" and "prompt is int 5, expected a string" in pnum["detail"]
    assert plist["reason"] == "wrong_type_prompt" and plist["prompt_id"] == "plist"


def test_responses_not_a_list_quarantined(rated_run):
    out, _ = rated_run
    assert reasons_by_id(out, "prompts")["rstr"] == {"wrong_type_responses"}


def test_string_scores_quarantine_their_responses_only(rated_run):
    out, _ = rated_run
    scored_q = [r for r in quarantine(out, "stats") if r["prompt_id"] == "ostr"]
    assert sorted(r["sample_idx"] for r in scored_q) == [0, 1]  # "7" and "good": a score is a JSON number
    assert {r["reason"] for r in scored_q} == {"wrong_type_overall"}
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    assert stats["ostr"]["n"] == 2


def test_wrong_type_scores_response_and_text(rated_run):
    out, _ = rated_run
    q = {r["sample_idx"]: r["reason"] for r in quarantine(out, "stats") if r["prompt_id"] == "sbad"}
    assert q == {0: "wrong_type_scores", 1: "wrong_type_response", 2: "wrong_type_text"}


# --- prompts -------------------------------------------------------------------------------------------------


def test_duplicate_prompt_id(rated_run):
    out, _ = rated_run
    q = reasons_by_id(out, "prompts")
    assert q["dup"] == {"duplicate_prompt_id"} and q["clash"] == {"conflicting_duplicate_prompt_id"}
    assert manifest(out)["stages"]["prompts"]["quarantined"]["conflicting_duplicate_prompt_id"] == 2
    assert "dup" in {s["prompt_id"] for s in pq.read_table(out / "stats").to_pylist()}


def test_empty_or_null_prompt(rated_run):
    out, _ = rated_run
    q = reasons_by_id(out, "prompts")
    assert q["blank"] == {"empty_prompt"} and q["pnull"] == {"empty_prompt"}


def test_missing_null_or_blank_prompt_id(rated_run):
    out, _ = rated_run
    q = [r for r in quarantine(out, "prompts") if r["reason"] == "missing_prompt_id"]
    assert sorted(r["prompt"] for r in q) == ["blank id", "id missing", "no id"]


# --- responses and scores ------------------------------------------------------------------------------------


def test_fewer_than_two_responses(rated_run):
    out, _ = rated_run
    q = reasons_by_id(out, "prompts")
    assert q["single"] == q["rnull"] == q["rnone"] == {"fewer_than_2_responses"}
    # left with one valid response: set aside at the statistics, beside its quarantined response
    prompt_level = {r["prompt_id"]: r["reason"] for r in quarantine(out, "stats") if r["sample_idx"] is None}
    assert prompt_level == {"inf": "fewer_than_2_responses"}
    assert reasons_by_id(out, "stats")["inf"] == {"fewer_than_2_responses", "non_finite_reward"}


def test_null_text_quarantined_and_empty_text_kept(rated_run):
    out, _ = rated_run
    assert [r["reason"] for r in quarantine(out, "stats") if r["prompt_id"] == "tnull"] == ["missing_response"]
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    # an empty answer that was rated is a real (bad) answer: it stays and loses the pair
    assert stats["tempty"]["n"] == 2 and stats["tempty"]["worst_response"] == ""


def test_nan_and_inf_scores(rated_run):
    out, _ = rated_run
    q = {(r["prompt_id"], r["reason"]) for r in quarantine(out, "stats")}
    assert {("nan", "non_finite_reward"), ("inf", "non_finite_reward"), ("nanasp", "non_finite_aspect_score")} <= q


def test_rewards_too_large_to_square_are_quarantined(rated_run):
    out, _ = rated_run
    q = {r["sample_idx"]: r["reason"] for r in quarantine(out, "stats") if r["prompt_id"] == "huge"}
    assert q == {0: "reward_out_of_range", 1: "reward_out_of_range"}
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    assert stats["huge"]["n"] == 2 and math.isfinite(stats["huge"]["reward_std"])
    assert all(math.isfinite(s["reward_std"]) and math.isfinite(s["margin"]) for s in stats.values())


def test_missing_reward(rated_run):
    out, _ = rated_run
    assert [r["reason"] for r in quarantine(out, "stats") if r["prompt_id"] == "rmiss"] == ["missing_reward"]


def test_all_equal_rewards(rated_run):
    out, _ = rated_run
    assert reasons_by_id(out, "pairs")["tied"] == {"all_rewards_equal"}


def test_identical_chosen_and_rejected_text(rated_run):
    out, _ = rated_run
    assert reasons_by_id(out, "pairs")["same_text"] == {"identical_chosen_rejected"}
    assert set(reasons_by_id(out, "pairs")) == {"tied", "same_text"}


def test_duplicate_responses_within_a_prompt_are_kept(rated_run):
    out, _ = rated_run
    stats = {s["prompt_id"]: s for s in pq.read_table(out / "stats").to_pylist()}
    assert stats["dupresp"]["n"] == 3  # repeated answers are draws from the same distribution: PVar counts them
    pairs = {p["prompt_id"]: p for p in pq.read_table(out / "pairs").to_pylist()}
    assert (pairs["dupresp"]["chosen"], pairs["dupresp"]["rejected"]) == ("twin", "other")


def test_very_long_response_passes_through(rated_run):
    out, _ = rated_run
    (row,) = [r for r in pq.read_table(out / "prompts").to_pylist() if r["prompt_id"] == "long"]
    assert max(r["len"] for r in row["responses"]) == 200_000
    pairs = {p["prompt_id"]: p for p in pq.read_table(out / "pairs").to_pylist()}
    assert len(pairs["long"]["chosen"]) == 200_000


def test_the_good_rows_all_reach_the_pairs(rated_run):
    out, _ = rated_run
    assert {p["prompt_id"] for p in pq.read_table(out / "pairs").to_pylist()} == GOOD_IDS


# --- the generation path: prompts through the tiny models ---------------------------------------------------


GEN_ROWS = [
    {"prompt_id": "g1", "prompt": "What is gravity?", "lang": "en"},
    {"prompt_id": "g2", "prompt": "Write a haiku about rain.", "lang": "en"},
    {"prompt_id": "m1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt_id": "m_empty", "messages": []},
    {"prompt_id": "m_bad", "messages": ["hi"]},
    {"prompt_id": "too_long", "prompt": "word " * 600, "lang": "en"},
    {"prompt_id": "p_null", "prompt": None},
]


@pytest.fixture(scope="module")
def gen_run(ray_local, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_gen")
    path = write_jsonl(tmp / "prompts.jsonl", GEN_ROWS)
    data = load_yaml("pipelines/configs/demo_cpu.yaml")["curate"]
    data["input"] = {"path": str(path)}
    data["generate"].update(model=tiny_models["policy"], num_samples=2, max_tokens=8, max_model_len=256)
    # score.max_length far below prompt + response: every scored text is cut to its last 24 tokens
    data["score"].update(models=[{"path": tiny_models["reward_multi"]}], max_length=24)
    data["output"] = {"dir": str(tmp / "run")}
    data["select"] = {"rule": "pvar_top", "fraction": 1.0}
    data["ray"]["progress"] = False
    curate.main(from_dict(CurateConfig, data))
    return tmp / "run"


def test_prompt_over_the_context_length_through_curate(gen_run):
    m = manifest(gen_run)
    check_balance(m)
    s = m["stages"]["samples"]
    assert s["quarantined"] == {"prompt_too_long": 1}
    assert s["rows_in"] == 4 and s["rows_out"] == 3  # g1, g2, m1 and too_long in; too_long set aside (prompts)
    assert reasons_by_id(gen_run, "samples") == {"too_long": {"prompt_too_long"}}


def test_mixed_messages_and_prompt_rows(gen_run):
    pairs = {p["prompt_id"]: p for p in pq.read_table(gen_run / "pairs").to_pylist()}
    pairs.update({r["prompt_id"]: r for r in quarantine(gen_run, "pairs")})
    assert set(pairs) == {"g1", "g2", "m1"}
    # one column type for all rows: conversational, a plain prompt as one user turn
    assert pairs["g1"]["prompt"] == [{"role": "user", "content": "What is gravity?"}]
    assert pairs["m1"]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert pairs["m1"]["chosen"][0]["role"] == "assistant"


def test_empty_or_wrong_type_messages(gen_run):
    q = reasons_by_id(gen_run, "prompts")
    assert q == {"m_empty": {"empty_prompt"}, "m_bad": {"wrong_type_messages"}, "p_null": {"empty_prompt"}}


def test_extra_columns_on_the_generation_path(gen_run):
    for stage in ("samples", "scored", "stats", "pairs"):
        rows = {r["prompt_id"]: r for r in [*pq.read_table(gen_run / stage).to_pylist(), *quarantine(gen_run, stage)]}
        assert rows["g1"]["lang"] == "en" and rows["m1"]["lang"] is None, stage


def test_a_response_far_past_the_reward_models_context_is_scored(tiny_models):
    """The reward model keeps the end of a long text (operators.score): 300k characters, far past its 2048
    positions, score like any other response instead of failing the batch."""
    from operators.score import RewardModelCfg, RewardScorer, ScoreCfg

    scorer = RewardScorer(ScoreCfg(backend="hf", models=[RewardModelCfg(path=tiny_models["reward"])], max_length=64))
    batch = pa.table({"prompt_id": ["a"], "prompt": ["Tell me a story."],
                      "responses": [[{"text": "Once upon a time " * 17_647, "sample_idx": 0},
                                     {"text": "Short.", "sample_idx": 1}]]})
    out = asyncio.run(scorer(batch)).to_pylist()[0]  # one call, as Ray Data makes it
    assert out[QUARANTINE] is None and [r["problem"] for r in out["responses"]] == [None, None]
    assert all(math.isfinite(r["overall"]) for r in out["responses"]) and out["responses"][0]["len"] == 299_999


def test_scoring_truncates_long_texts(gen_run):
    m = manifest(gen_run)
    assert m["stages"]["scored"]["quarantined"] == {}
    scored = [r for row in pq.read_table(gen_run / "scored").to_pylist() for r in row["responses"]]
    assert len(scored) == 6 and all(math.isfinite(r["overall"]) and r["problem"] is None for r in scored)


# --- errors before anything runs ----------------------------------------------------------------------------


def test_invalid_utf8_in_plain_jsonl_is_a_quarantined_row(ray_local, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt_id": "a", "prompt": "ok"}\n{"prompt_id": "b", "prompt": "\xff\xfe"}\n')
    rows = {r["prompt_id"]: r for r in read_input(str(path)).take_all()}
    assert rows["a"][QUARANTINE] is None
    assert rows[None][QUARANTINE] == "invalid_utf8"
    assert rows[None][QUARANTINE_DETAIL].startswith(f"{path}:2: invalid UTF-8: byte 0xff")


def test_a_field_first_seen_after_the_peeked_lines_is_never_lost(ray_local, tmp_path):
    rows_ = [{"prompt_id": f"p{i}", "prompt": f"q{i}", "responses": GOOD} for i in range(4)]
    rows_.append({"prompt_id": "late", "prompt": "q", "responses": GOOD, "lang": "en"})
    path = write_jsonl(tmp_path / "late.jsonl", rows_)
    curate.main(cfg_for(path, tmp_path / "peek2", "input.peek_lines=2"))
    m = manifest(tmp_path / "peek2")
    assert m["stages"]["prompts"]["quarantined"] == {"field_not_in_schema": 1}
    (q,) = quarantine(tmp_path / "peek2", "prompts")
    assert "'lang'" in q["detail"] and q["detail"].startswith(f"{path}:5: ")
    check_balance(m)
    curate.main(cfg_for(path, tmp_path / "all", "input.peek_lines=0"))  # every line fixes the columns
    assert manifest(tmp_path / "all")["stages"]["prompts"]["quarantined"] == {}
    stats = {r["prompt_id"]: r for r in pq.read_table(tmp_path / "all" / "stats").to_pylist()}
    assert stats["late"]["lang"] == "en" and stats["p0"]["lang"] is None


def test_truncated_gzip_is_an_error_naming_the_file(ray_local, tmp_path):
    # Poorly compressible text, 4 MB of it: the damage lies past the lines the driver peeks at, so the read
    # task in a Ray worker meets it and its error has to come back to the driver intact.
    rng = random.Random(0)
    body = gzip.compress(b"".join(
        line(prompt_id=f"p{i}", prompt="".join(rng.choices("abcdefgh ", k=400)), responses=GOOD) + b"\n"
        for i in range(8000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(body[: len(body) // 2])
    with pytest.raises(InputError, match=r"^input file .*cut\.jsonl\.gz: read failed after line \d+: .*[Tt]runcated") \
            as err:
        curate.main(cfg_for(path, tmp_path / "run"))
    assert "Traceback" not in str(err.value)


def test_empty_file_is_a_clear_error(ray_local, tmp_path):
    for name, data in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \r\n\n"), ("bom.jsonl", b"\xef\xbb\xbf\n")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match=r"holds no rows \(empty or blank\)"):
            curate.main(cfg_for(path, tmp_path / "run"))


def test_no_readable_line_is_a_clear_error(ray_local, tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"not json\n{also not\n")
    with pytest.raises(InputError, match=r"holds no readable rows: .*junk.jsonl:1: invalid JSON"):
        curate.main(cfg_for(path, tmp_path / "run"))


def test_every_row_quarantined_is_a_clear_error(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt_id": "a", "prompt": " ", "responses": GOOD},
                                                    {"prompt_id": "b", "prompt": "x", "responses": []}])
    with pytest.raises(InputError, match=r"no usable rows; all 2 were quarantined \(.*empty_prompt: 1"):
        curate.main(cfg_for(path, tmp_path / "run"))


def test_missing_columns_named(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "nocols.jsonl", [{"id": "a", "text": "hello"}])
    with pytest.raises(ColumnError, match=r"prompt_id.*prompt or messages.*it has: id, text$"):
        curate.main(cfg_for(path, tmp_path / "run", "input.schema=prompts"))


def test_wrong_column_types_in_parquet_named(ray_local, tmp_path):
    cases = {
        "prompt": (pa.table({"prompt_id": ["a"], "prompt": [5]}), r"column 'prompt' has type int64; expected a string"),
        "prompt_id": (pa.table({"prompt_id": [1.5], "prompt": ["x"]}), r"column 'prompt_id' has type double"),
        "responses": (pa.table({"prompt_id": ["a"], "prompt": ["x"], "responses": ["oops"]}),
                      r"column 'responses' has type string; expected a list"),
        "overall": (pa.table({"prompt_id": ["a"], "prompt": ["x"],
                              "responses": [[{"text": "t", "overall": "7"}, {"text": "u", "overall": "8"}]]}),
                    r"column 'responses' field 'overall' has type string; expected a number"),
    }
    for name, (table, pattern) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path)
        with pytest.raises(ColumnError, match=pattern):
            curate.main(cfg_for(path, tmp_path / f"run_{name}"))


def test_int_prompt_id_column_cast_to_string():
    batch = pa.table({"prompt_id": [1, 2], "prompt": ["a", "b"], "source": [3, 4]})
    out = validate_prompts(batch, "prompts", "src")
    assert out.column("prompt_id").to_pylist() == ["1", "2"] and out.column("source").to_pylist() == ["3", "4"]


def test_missing_input_path_named(tmp_path):
    with pytest.raises(InputError, match="does not exist: .*nowhere.jsonl"):
        curate.main(cfg_for(tmp_path / "nowhere.jsonl", tmp_path / "run"))


@pytest.fixture
def no_ray(monkeypatch):
    """Model paths are checked before Ray starts: starting it here fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("Ray was started before the model paths were checked")

    from pipelines import evaluate
    from pipelines.runtime import ray_start

    for module in (curate, evaluate, ray_start):  # train_dpo imports it from ray_start when main() runs
        monkeypatch.setattr(module, "init_ray", refuse)


def test_unreadable_model_folder_named_before_ray(no_ray, tiny_models, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"\0" * 16)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    typeless = tmp_path / "typeless"
    typeless.mkdir()
    (typeless / "config.json").write_text('{"hidden_size": 8}')
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text('{"model_type": "llama"}')
    cases = [(no_config, "it has no config.json"), (garbage, "config.json cannot be read as JSON"),
             (typeless, "config.json has no model_type"), (no_tok, "it has no tokenizer files"),
             (no_config / "model.safetensors", "it is a file")]
    prompts = "pipelines/data/arena_hard_prompts_200.jsonl.gz"
    for folder, why in cases:
        for key, override in (("generate.model", f"generate.model={folder}"),
                              ("score.models[0].path", f"score.models=[{{path: {folder}}}]")):
            cfg = cfg_for(prompts, tmp_path / "run", override)
            with pytest.raises(ValueError, match=rf"^{re.escape(key)}: {re.escape(str(folder))} is not a model "
                                                 rf"folder: {why}"):
                curate.main(cfg)
    assert not (tmp_path / "run").exists()
    # the real tiny models pass the same check
    check_model_dir(tiny_models["policy"], "generate.model")
    check_model_dir(tiny_models["reward_multi"], "score.models[0].path")


def test_unreadable_model_folder_in_training_and_evaluation_named_before_ray(no_ray, tiny_models, tmp_path):
    from pipelines import evaluate, train_dpo

    not_a_model = tmp_path / "checkpoint_000012"
    not_a_model.mkdir()  # e.g. a checkpoint folder whose upload did not finish
    (not_a_model / "config.json").write_text("{truncated")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for key, override in (("model.policy", f"model.policy={not_a_model}"),
                          ("reference.model", f"reference.model={not_a_model}")):
        cfg = load_config(train_dpo.TrainConfig, "pipelines/configs/train_demo_cpu.yaml", [
            f"input.path={pairs}", f"output.dir={tmp_path / 'train'}", f"model.policy={tiny_models['policy']}",
            override])
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: .*is not a model folder: config.json cannot"):
            train_dpo.main(cfg)
    for key, override in (("policy", f"policy={not_a_model}"), ("reference", f"reference={not_a_model}")):
        cfg = load_config(evaluate.EvaluateConfig, None, [
            "input.path=pipelines/data/arena_hard_heldout_50.jsonl.gz", f"output.dir={tmp_path / 'eval'}",
            f"policy={tiny_models['policy']}", f"reference={tiny_models['policy']}",
            f"score.models=[{{path: {tiny_models['reward_multi']}}}]", override])
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: .*is not a model folder: config.json cannot"):
            evaluate.main(cfg)
    assert not (tmp_path / "train").exists() and not (tmp_path / "eval").exists()


def test_one_sample_per_prompt_is_a_config_error(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "x"}])
    with pytest.raises(ConfigError, match=r"generate.num_samples: .*at least 2 per prompt, got 1"):
        curate.main(cfg_for(path, tmp_path / "run", "generate.num_samples=1"))


def test_malformed_config_key_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'select.fractoin'; did you mean 'select.fraction'"):
        load_config(CurateConfig, "pipelines/configs/real_rated.yaml", ["select.fractoin=0.2"])
    with pytest.raises(ConfigError, match=r"stats.length_debias: 'lenght' is not allowed.*'residual'"):
        load_config(CurateConfig, None, ["stats.length_debias=lenght"])
    with pytest.raises(ConfigError, match=r"select.fraction: expected a number, got 'ten'"):
        load_config(CurateConfig, None, ["select.fraction=ten"])
    with pytest.raises(ConfigError, match="malformed key"):
        load_config(CurateConfig, None, ["select..rule=x"])


def test_malformed_yaml_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CurateConfig, bad)
    obj = tmp_path / "obj.yaml"
    obj.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):  # safe_load refuses to build Python objects
        load_config(CurateConfig, obj)
    dup = tmp_path / "dup.yaml"
    dup.write_text("select:\n  fraction: 0.1\ninput: {path: x}\nselect:\n  rule: random\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'select' \(first on line 1\)"):
        load_config(CurateConfig, dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(CurateConfig, latin)


# --- parquet keeps NaN apart from null: the combined run of the original suite ------------------------------


def test_quarantine_reasons_are_counted_and_balanced_for_parquet(ray_local, tmp_path):
    good = [resp("a", 1.0, q=1.0), resp("bb", 3.0, q=2.0), resp("ccc", 2.0, q=2.5)]
    rows = [
        {"prompt_id": "ok1", "prompt": "fine", "responses": good},
        {"prompt_id": "empty", "prompt": "   ", "responses": good[:2]},
        {"prompt_id": "nan", "prompt": "nan score", "responses": [resp("x", float("nan")), resp("y", 1.0),
                                                                  resp("z", 2.0)]},
        {"prompt_id": "nullr", "prompt": "no reward", "responses": [resp("x", None), resp("y", 2.0)]},
    ]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "run"
    curate.main(cfg_for(path, out))
    m = manifest(out)
    check_balance(m)
    assert m["stages"]["prompts"]["quarantined"] == {"empty_prompt": 1}
    assert m["stages"]["stats"]["quarantined"] == {"non_finite_reward": 1, "missing_reward": 1,
                                                   "fewer_than_2_responses": 1}
    assert m["stages"]["stats"]["rows_in"] == 3 + 3 + 2  # responses of the prompts past the read
