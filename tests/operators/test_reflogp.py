"""ReferenceLogProbs: values against an independent per-row computation, quarantine reasons, and the Ray stage."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from operators.base import QUARANTINE, ColumnError, Resources, apply
from operators.logprobs import encode_pairs, render_prompts
from operators.reflogp import ReferenceLogProbs

PROMPTS = ["What is gravity?", "Write a haiku about rain", "How do I sort a list?", "Tell me about prime numbers",
           "Summarize the water cycle", "Give me a healthy breakfast"]
CHOSEN = ["Gravity pulls things down.", "Rain falls softly.", "Use sorted() on it.", "Primes have two divisors.",
          "Water evaporates, condenses and falls.", "Oats with fruit."]
REJECTED = ["No idea.", "Sun.", "You cannot.", "Numbers are numbers are numbers.", "Water.", "Cake, every day."]


def pairs_table(n: int = len(PROMPTS)) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(n)], "prompt": PROMPTS[:n], "chosen": CHOSEN[:n],
                     "rejected": REJECTED[:n]})


def naive_logp(model, tok, prompt: str, completion: str) -> tuple[float, int]:
    """Unbatched, full logits, log_softmax + gather: nothing shared with operators.logprobs but the template."""
    text = render_prompts(tok, [prompt])[0]
    p_ids = tok(text, add_special_tokens=False).input_ids
    ids = tok(text + completion + tok.eos_token, add_special_tokens=False).input_ids
    assert ids[: len(p_ids)] == p_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(lp[len(p_ids) - 1:].sum()), len(ids) - len(p_ids)


@pytest.fixture(scope="module")
def op(tiny_models):
    return ReferenceLogProbs(tiny_models["policy"], max_length=1024, micro_batch_size=4)


def test_encode_pairs_completion_is_response_plus_eos(op):
    tok = op.tokenizer
    ex = encode_pairs(tok, PROMPTS[:2], CHOSEN[:2], [REJECTED[0], REJECTED[1] + tok.eos_token])
    for e, p in zip(ex, PROMPTS[:2], strict=True):
        assert e["prompt_ids"] == tok(render_prompts(tok, [p])[0], add_special_tokens=False).input_ids
        assert e["chosen_ids"][-1] == tok.eos_token_id and e["rejected_ids"][-1] == tok.eos_token_id
        assert e["rejected_ids"].count(tok.eos_token_id) == 1  # an eos already there is not doubled
    assert tok.decode(ex[0]["chosen_ids"]) == CHOSEN[0] + tok.eos_token
    # Conversational pairs (message lists) give the same tokens as their string form.
    conv = encode_pairs(tok, [[{"role": "user", "content": PROMPTS[0]}]],
                        [[{"role": "assistant", "content": CHOSEN[0]}]], [[{"role": "assistant", "content": "x"}]])
    assert conv[0]["prompt_ids"] == ex[0]["prompt_ids"] and conv[0]["chosen_ids"] == ex[0]["chosen_ids"]


def test_values_match_an_independent_per_row_computation(op):
    out = op(pairs_table())
    assert out.column_names[:4] == ["prompt_id", "prompt", "chosen", "rejected"]  # inputs carried through
    assert out.column(QUARANTINE).null_count == out.num_rows
    for i in range(out.num_rows):
        for side, texts in (("chosen", CHOSEN), ("rejected", REJECTED)):
            want, n_tok = naive_logp(op.model, op.tokenizer, PROMPTS[i], texts[i])
            assert out.column(f"ref_{side}_logp")[i].as_py() == pytest.approx(want, abs=1e-4)
            assert out.column(f"{side}_tokens")[i].as_py() == n_tok


def test_micro_batching_does_not_change_values(tiny_models, op):
    one = ReferenceLogProbs(tiny_models["policy"], max_length=1024, micro_batch_size=1)(pairs_table())
    many = op(pairs_table())
    for col in ("ref_chosen_logp", "ref_rejected_logp"):
        assert one.column(col).to_pylist() == pytest.approx(many.column(col).to_pylist(), abs=1e-4)


def test_quarantines_rows_it_cannot_score(tiny_models):
    table = pa.table({"prompt": [PROMPTS[0], "word " * 60, PROMPTS[2]], "chosen": [CHOSEN[0], "a", None],
                      "rejected": [REJECTED[0], "b", "c"]})
    out = ReferenceLogProbs(tiny_models["policy"], max_length=32)(table)
    assert out.column(QUARANTINE).to_pylist() == [None, "prompt_exceeds_max_length", "null_text"]
    assert out.column("ref_chosen_logp").to_pylist()[1:] == [None, None]
    assert out.column("chosen_tokens")[0].as_py() > 0


def test_ray_stage_over_sharded_pairs(ray_local, tiny_models, op, tmp_path):
    full = pairs_table()
    for k in range(3):  # three parquet shards, two rows each
        pq.write_table(full.slice(2 * k, 2), tmp_path / f"part-{k}.parquet")
    ds = ray_local.data.read_parquet(str(tmp_path))
    res = Resources(num_cpus=0.5, batch_size=4, concurrency=1)
    out = apply(ds, ReferenceLogProbs, res, model=tiny_models["policy"], max_length=1024,
                micro_batch_size=2).to_arrow_refs()
    got = pa.concat_tables(ray_local.get(out)).sort_by("prompt_id")
    want = op(full).sort_by("prompt_id")
    assert got.num_rows == full.num_rows
    for col in ("ref_chosen_logp", "ref_rejected_logp"):
        assert got.column(col).to_pylist() == pytest.approx(want.column(col).to_pylist(), abs=1e-4)
    assert got.column("chosen_tokens").to_pylist() == want.column("chosen_tokens").to_pylist()

    with pytest.raises(ColumnError, match="'rejected'"):
        apply(ds.drop_columns(["rejected"]), ReferenceLogProbs, res, model=tiny_models["policy"])


def test_prompt_keeps_its_end_and_max_length_cuts_the_completion():
    from operators.logprobs import collate, completion_lengths, prompt_tail

    assert prompt_tail([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert prompt_tail([1, 2], 3) == [1, 2] and prompt_tail([1, 2, 3], None) == [1, 2, 3]
    # prompt 3 ids, chosen 5, rejected 2; max_length 6 leaves 3 completion tokens for chosen, 2 for rejected.
    ex = {"prompt_ids": [7, 8, 9], "chosen_ids": [1, 2, 3, 4, 5], "rejected_ids": [6, 2]}
    assert completion_lengths(ex, 6) == (3, 2)
    assert completion_lengths(ex, 3) == (0, 0)  # the prompt alone fills max_length
    assert completion_lengths(ex, None) == (5, 2)
    b = collate([ex], pad_id=0, max_length=6)
    assert b["input_ids"].tolist() == [[7, 8, 9, 1, 2, 3], [7, 8, 9, 6, 2, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]


def test_encode_pairs_max_prompt_length_keeps_the_prompt_end(op):
    tok = op.tokenizer
    full = encode_pairs(tok, PROMPTS[:2], CHOSEN[:2], REJECTED[:2])
    cut = encode_pairs(tok, PROMPTS[:2], CHOSEN[:2], REJECTED[:2], max_prompt_length=5)
    for f, c in zip(full, cut, strict=True):
        assert len(f["prompt_ids"]) > 5
        assert c["prompt_ids"] == f["prompt_ids"][-5:]  # the end: the generation prompt next to the answer
        assert c["chosen_ids"] == f["chosen_ids"] and c["rejected_ids"] == f["rejected_ids"]


def test_long_prompt_is_cut_to_its_end_instead_of_quarantined(tiny_models):
    """The row the plain max_length quarantines is scored on the prompt's last 16 tokens plus up to 16
    completion tokens; the value matches an unbatched forward pass over exactly those ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    long_prompt = "word " * 60 + "what is rain?"
    table = pa.table({"prompt": [long_prompt, PROMPTS[0]], "chosen": [CHOSEN[1] * 3, CHOSEN[0]],
                      "rejected": ["b", REJECTED[0]]})
    assert ReferenceLogProbs(tiny_models["policy"], max_length=32)(table).column(QUARANTINE)[0].as_py() == \
        "prompt_exceeds_max_length"
    out = ReferenceLogProbs(tiny_models["policy"], max_length=32, max_prompt_length=16)(table)
    assert out.column(QUARANTINE).to_pylist() == [None, None]
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    ex = encode_pairs(tok, [long_prompt], [CHOSEN[1] * 3], ["b"])[0]
    prompt, completion = ex["prompt_ids"][-16:], ex["chosen_ids"][:16]
    assert len(ex["chosen_ids"]) > 16  # so max_length really cut the completion
    assert out.column("chosen_tokens")[0].as_py() == 16
    ids = prompt + completion
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = sum(float(lp[t - 1, ids[t]]) for t in range(16, 32))
    assert out.column("ref_chosen_logp")[0].as_py() == pytest.approx(want, abs=1e-4)
