"""Bad input: a clear error naming the problem, or quarantined rows counted in the manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.base import ColumnError
from operators.read import InputError
from pipelines import curate
from pipelines.config import ConfigError, CurateConfig, load_config


def resp(text, overall, **scores):
    return {"text": text, "model": None, "overall": overall, "scores": scores or {"q": overall}}


def write_jsonl(path, rows):
    # json.dumps writes NaN / Infinity literals, which pyarrow's reader accepts, as real corpora contain.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path, out, *extra) -> CurateConfig:
    return load_config(CurateConfig, "pipelines/configs/real_rated.yaml",
                       [f"input.path={path}", f"output.dir={out}", "ray.progress=false", "select.fraction=1.0",
                        *extra])


def test_quarantine_reasons_are_counted_and_balanced(ray_local, tmp_path):
    good = [resp("a", 1.0, q=1.0), resp("bb", 3.0, q=2.0), resp("ccc", 2.0, q=2.5)]
    rows = [
        {"prompt_id": "ok1", "prompt": "fine", "responses": good},
        {"prompt_id": "ok2", "prompt": "also fine", "responses": good[:2]},
        {"prompt_id": "dup", "prompt": "same", "responses": good[:2]},
        {"prompt_id": "dup", "prompt": "same", "responses": good[:2]},  # exact copy: one kept
        {"prompt_id": "clash", "prompt": "one", "responses": good[:2]},
        {"prompt_id": "clash", "prompt": "two", "responses": good[:2]},  # conflicting: both out
        {"prompt_id": "empty", "prompt": "   ", "responses": good[:2]},
        {"prompt_id": "single", "prompt": "one answer", "responses": good[:1]},
        {"prompt_id": "nan", "prompt": "nan score", "responses": [resp("x", float("nan")), resp("y", 1.0),
                                                                  resp("z", 2.0)]},
        {"prompt_id": "inf", "prompt": "inf aspect", "responses": [resp("x", 1.0, q=float("inf")),
                                                                   resp("y", 2.0, q=1.0)]},
        {"prompt_id": "nullr", "prompt": "no reward", "responses": [resp("x", None), resp("y", 2.0)]},
        {"prompt_id": "tied", "prompt": "all equal", "responses": [resp("x", 5.0), resp("y", 5.0)]},
    ]
    # Parquet keeps NaN apart from null (Ray's JSON reader turns a NaN literal into null: "missing_reward").
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "run"
    curate.main(cfg_for(path, out))
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"]
    assert st["prompts"]["quarantined"] == {"duplicate_prompt_id": 1, "conflicting_duplicate_prompt_id": 2,
                                            "empty_prompt": 1, "fewer_than_2_responses": 1}
    assert st["scored"]["quarantined"] == {"non_finite_reward": 1, "non_finite_aspect_score": 1,
                                           "missing_reward": 1}
    # inf and nullr are left with one response each
    assert st["stats"]["quarantined"] == {"fewer_than_2_responses": 2}
    assert st["pairs"]["quarantined"] == {"all_rewards_equal": 1}
    for name, s in st.items():
        assert s["rows_in"] == s["rows_out_as_input"] + sum(s["quarantined"].values()), name
    stats = {r["prompt_id"] for r in pq.read_table(out / "stats").to_pylist()}
    assert stats == {"ok1", "ok2", "dup", "nan", "tied"}
    q = pq.read_table(out / "quarantine" / "prompts").to_pylist()
    assert {r["reason"] for r in q} >= {"empty_prompt", "conflicting_duplicate_prompt_id"}
    assert {r["prompt_id"] for r in pq.read_table(out / "pairs").to_pylist()} == {"ok1", "ok2", "dup", "nan"}


def test_missing_columns_named(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "nocols.jsonl", [{"id": "a", "text": "hello"}])
    with pytest.raises(ColumnError, match=r"prompt_id.*prompt or messages"):
        curate.main(cfg_for(path, tmp_path / "run", "input.schema=prompts"))


def test_empty_file_is_a_clear_error(ray_local, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises((InputError, ValueError), match=r"(no rows|empty)"):
        curate.main(cfg_for(path, tmp_path / "run"))


def test_missing_input_path_named(tmp_path):
    with pytest.raises(InputError, match="does not exist: .*nowhere.jsonl"):
        curate.main(cfg_for(tmp_path / "nowhere.jsonl", tmp_path / "run"))


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
