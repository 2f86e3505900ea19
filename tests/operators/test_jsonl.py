"""The JSONL reader's pure parts: one line -> one typed row or one quarantine reason; no Ray needed."""

from __future__ import annotations

import io
import math

import pyarrow as pa

from operators.base import QUARANTINE, QUARANTINE_DETAIL
from operators.jsonl import (
    CONTRACT,
    iter_lines,
    iter_records,
    normalize_field,
    parse_line,
    parse_lines,
    peek_columns,
)


def rows(lines: list[bytes], columns: list[str]) -> list[dict]:
    return parse_lines(list(enumerate(lines, 1)), "in.jsonl", columns).to_pylist()


def test_bad_lines_get_a_reason_and_a_file_and_line():
    got = rows([b'{"prompt_id": "a", "prompt": "ok"}', b'{"prompt_id": "b", "prompt": "caf\xe9"}', b'{"prompt_id": "c",',
                b'"just a string"', b'{"prompt_id": "d", "prompt": "\\udc00"}'], ["prompt_id", "prompt"])
    assert [r[QUARANTINE] for r in got] == [None, "invalid_utf8", "invalid_json", "not_a_json_object", "invalid_unicode"]
    assert got[1][QUARANTINE_DETAIL].startswith("in.jsonl:2: invalid UTF-8: byte 0xe9")
    assert got[2][QUARANTINE_DETAIL].startswith("in.jsonl:3: invalid JSON")
    assert all(r["prompt_id"] is None for r in got[1:])


def test_bom_crlf_and_surrogate_pairs_are_fine():
    obj, reason, _ = parse_line(b'\xef\xbb\xbf{"prompt": "\\ud83d\\ude00"}\r')
    assert reason is None and obj == {"prompt": "\U0001F600"}


def test_contract_types_and_casts():
    assert normalize_field("prompt_id", 7) == "7"
    assert normalize_field("chosen", "text") == [{"role": "assistant", "content": "text"}]
    assert normalize_field("meta", {"k": [1, 2]}) == '{"k": [1, 2]}'  # extra fields: JSON text
    assert normalize_field("origin", "uf") == "uf"
    got = rows([b'{"prompt_id": 1.5}', b'{"prompt_id": true}', b'{"prompt_id": "x", "prompt": ["a"]}',
                b'{"prompt_id": "y", "messages": [{"role": "user", "content": 3}]}',
                b'{"prompt_id": "z", "responses": {"text": "a"}}'], ["prompt_id", "prompt", "messages", "responses"])
    assert [r[QUARANTINE] for r in got] == ["wrong_type_prompt_id", "wrong_type_prompt_id", "wrong_type_prompt",
                                            "wrong_type_messages", "wrong_type_responses"]
    assert got[2][QUARANTINE_DETAIL] == "in.jsonl:3: prompt is list ['a'], expected a string"
    assert got[2]["prompt_id"] == "x"  # the other fields of a wrong-typed row stay, for the quarantine file


def test_a_bad_response_keeps_its_prompt_and_carries_a_problem():
    line = (b'{"prompt_id": "p", "prompt": "q", "responses": [{"text": "a", "overall": 1, "scores": {"h": 2}},'
            b' {"text": "b", "overall": "7"}, {"text": "c", "overall": NaN, "scores": {"h": "x"}}, "d",'
            b' {"text": 5, "overall": 1}, {"text": "e", "overall": true}]}')
    (row,) = rows([line], ["prompt_id", "prompt", "responses"])
    assert row[QUARANTINE] is None
    problems = [r["problem"] for r in row["responses"]]
    assert problems == [None, "wrong_type_overall", "wrong_type_scores", "wrong_type_response", "wrong_type_text",
                        "wrong_type_overall"]
    assert row["responses"][0]["scores"] == [("h", 2.0)] and math.isnan(row["responses"][2]["overall"])


def test_every_block_has_the_contract_schema():
    a = parse_lines([(1, b'{"prompt_id": "a"}')], "f", ["prompt_id", "responses", "messages", "lang"])
    b = parse_lines([(1, b'{"prompt_id": 1, "responses": [], "messages": null, "lang": 3}')], "f",
                    ["prompt_id", "responses", "messages", "lang"])
    assert a.schema == b.schema
    assert a.schema.field("responses").type == CONTRACT["responses"]
    assert pa.concat_tables([a, b]).num_rows == 2


def test_lines_split_across_reads_and_blank_lines():
    data = b'\n{"a": 1}\r\n\n   \n{"b": "' + b"x" * 5000 + b'"}\n{"c": 3}'
    got = list(iter_lines(io.BytesIO(data), block=64))  # small reads: lines straddle them
    assert [n for n, _ in got] == [2, 5, 6]
    assert got[1][1].endswith(b'x"}') and got[2][1] == b'{"c": 3}'


def test_a_json_array_file_is_read_item_by_item():
    got = list(iter_records(io.BytesIO(b'\xef\xbb\xbf\n [{"a": 1}, {"b": NaN}, 3]')))
    assert [n for n, _ in got] == [1, 2, 3]
    assert [parse_line(raw)[1] for _, raw in got] == [None, None, "not_a_json_object"]


def test_binarized_rows_string_or_message_sides():
    from operators.read import binarized_to_rated

    cols = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    block = parse_lines(list(enumerate([
        b'{"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 8, "score_rejected": 2}',
        b'{"prompt": "q2", "chosen": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "yes"}],'
        b' "rejected": [{"role": "assistant", "content": "no"}], "score_chosen": 3.5, "score_rejected": 1}',
        b'{"prompt": "q3", "chosen": "a", "rejected": "b", "score_chosen": "7", "score_rejected": 1}',
    ], 1)), "b.jsonl", cols)
    assert block.column(QUARANTINE).to_pylist() == [None, None, "wrong_type_score_chosen"]
    rated = binarized_to_rated(block).to_pylist()
    assert [[(r["text"], r["overall"]) for r in row["responses"]] for row in rated[:2]] == \
        [[("good", 8.0), ("bad", 2.0)], [("yes", 3.5), ("no", 1.0)]]
    assert rated[0]["prompt_id"] and rated[2][QUARANTINE] == "wrong_type_score_chosen"


def test_a_field_outside_the_peeked_columns_quarantines_its_line_naming_it():
    got = rows([b'{"prompt_id": "a", "prompt": "x"}', b'{"prompt_id": "b", "prompt": "y", "lang": "en", "m": 1}'],
               ["prompt_id", "prompt"])
    assert [r[QUARANTINE] for r in got] == [None, "field_not_in_schema"]
    assert got[1][QUARANTINE_DETAIL].startswith("in.jsonl:2: field(s) 'lang', 'm' first appear after")
    assert "input.peek_lines=0" in got[1][QUARANTINE_DETAIL]


def test_peek_columns_reads_the_first_lines_or_all(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"prompt_id": "p{i}", "prompt": "x"}}\n' for i in range(5)) + '{"prompt_id": "q", "late": 1}\n')
    assert peek_columns(str(path), 3) == (["prompt_id", "prompt"], 3, None)
    assert peek_columns(str(path), 0) == (["prompt_id", "prompt", "late"], 6, None)
