"""The ground truth of benchmarks/study_ground_truth.py: the gold reward's arithmetic and the prompt split."""

from __future__ import annotations

import pytest

from benchmarks.study_gold import BAD, GOOD, TOPICS, fixed_answer, gold_reward, prompt_rows, sft_examples


def test_gold_reward_is_four_times_net_good_words_over_words():
    # teacher, explains, poem, care are good; 7 words: 4 * 4 / 7
    assert gold_reward("p", "The teacher explains the poem with care.") == pytest.approx(16 / 7)
    # robot, lists, data, again are bad; 6 words: 4 * -4 / 6
    assert gold_reward("p", "The robot lists the data again.") == pytest.approx(-8 / 3)
    # one good (author), one bad (email) cancel: 0 whatever the length
    assert gold_reward("p", "My author writes the email.") == 0.0
    # case and punctuation do not matter; a response with no word scores 0
    assert gold_reward("p", "TEACHER!!") == pytest.approx(4.0)
    assert gold_reward("p", "") == 0.0
    assert gold_reward("p", " 42 ... ") == 0.0


def test_good_and_bad_words_are_disjoint_and_each_slot_has_both():
    assert not GOOD & BAD
    assert {"teacher", "explains", "poem", "care"} <= GOOD
    assert {"robot", "reads", "email", "again"} <= BAD


def test_fixed_answers_are_one_per_topic_and_pool_and_heldout_prompts_do_not_meet():
    assert fixed_answer(3) == fixed_answer(3)
    answers = {fixed_answer(t) for t in range(12)}
    assert len(answers) > 6  # topics mostly have answers of their own
    rewards = [gold_reward("", a) for a in answers]
    assert min(rewards) < 0 < max(rewards)  # the fixed answers span bad to good

    pool, held = prompt_rows(150, 0, "pool"), prompt_rows(24, 500, "heldout")
    assert len(pool) == 300 and len(held) == 48
    assert {r["family"] for r in pool} == {"fixed", "open"}
    assert not {r["prompt"] for r in pool} & {r["prompt"] for r in held}
    assert len({r["prompt_id"] for r in pool}) == 300
    # the supervised data teaches each family its form: a fixed prompt always gets its topic's answer
    topic_of = {t: i for i, t in enumerate(TOPICS)}
    fixed = [(p, a) for p, a in sft_examples(40, 0) if p.startswith("Recite")]
    assert len(fixed) == 20
    assert all(a == fixed_answer(topic_of[p.rsplit(" ", 1)[-1].rstrip(".")]) for p, a in fixed)
