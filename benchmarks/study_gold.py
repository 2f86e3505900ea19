"""The ground truth of the selection study (benchmarks/study_ground_truth.py): its prompts, its gold reward and
the short supervised run that gives the tiny policy a reason for PVar to vary across prompts.

Two families of prompts, both about one of twelve topics:
* "Recite line N about TOPIC." has one right answer, a fixed sentence per topic. After the supervised run the
  policy repeats it almost every time, so its K samples mostly score the same: low PVar.
* "Write line N about TOPIC." takes any sentence of the grammar SUBJECT VERB OBJECT ENDING, drawn at random
  in the supervised data. The policy's samples differ in their words, and so in gold reward: high PVar.

The gold reward is a fixed function of the response's words: 4 x (good words - bad words) / words. A third of
each slot's choices is good, a third bad. A sentence with one more good word than another of 8 words scores
0.5 higher, the Bradley-Terry scale of PVar's tau = 1. It is the reward selection curates with and the one the
trained policies are judged by, so "better" has a known meaning.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

SUBJECTS = ["the teacher", "a scientist", "the author", "my friend", "our team", "the user",
            "the robot", "the cat", "this program"]
VERBS = ["explains", "solves", "checks", "writes", "compares", "describes", "reads", "lists", "translates"]
OBJECTS = ["the poem", "the recipe", "the story", "the question", "a travel plan", "the code",
           "the email", "the data", "the error"]
ENDINGS = ["with care.", "step by step.", "in plain English.", "for a beginner.", "in one sentence.",
           "before lunch.", "again.", "quickly.", "somehow."]
TOPICS = ["sorting", "water", "plants", "rain", "search", "history", "breakfast", "primes", "letters",
          "gravity", "learning", "cities"]
# In each slot the first three choices are good and the last three bad, by the word that tells them apart.
GOOD = {"teacher", "scientist", "author", "explains", "solves", "checks", "poem", "recipe", "story", "care",
        "step", "plain"}
BAD = {"robot", "cat", "program", "reads", "lists", "translates", "email", "data", "error", "again",
       "quickly", "somehow"}
SCALE = 4.0
_WORD = re.compile(r"[a-z]+")


def gold_reward(prompt: str, response: str) -> float:
    """4 x (good words - bad words) / words of the response; 0 for a response with no word."""
    words = _WORD.findall(response.lower())
    if not words:
        return 0.0
    net = sum(w in GOOD for w in words) - sum(w in BAD for w in words)
    return SCALE * net / len(words)


def fixed_answer(topic_idx: int) -> str:
    """The one right answer of 'Recite line N about TOPIC': a sentence chosen by the topic, so that the fixed
    answers span the gold reward from bad to good."""
    rng = random.Random(1000 + topic_idx)
    return sentence(rng)


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}".capitalize()


def prompt_text(family: str, n: int, topic_idx: int) -> str:
    verb = {"fixed": "Recite", "open": "Write"}[family]
    return f"{verb} line {n} about {TOPICS[topic_idx]}."


def prompt_rows(per_family: int, first_n: int, split: str) -> list[dict]:
    """`per_family` prompts of each family, numbered from first_n (pool and held-out numbers do not meet)."""
    rows = []
    for family in ("fixed", "open"):
        for i in range(per_family):
            n, t = first_n + i // len(TOPICS), i % len(TOPICS)
            rows.append({"prompt_id": f"{split}-{family}-{i:04d}", "prompt": prompt_text(family, n, t),
                         "family": family})
    return rows


def sft_examples(count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs of both families, half each, with line numbers the pool and held-out use."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        t, n = rng.randrange(len(TOPICS)), rng.randrange(200)
        if i % 2:
            out.append((prompt_text("fixed", n, t), fixed_answer(t)))
        else:
            out.append((prompt_text("open", n, t), sentence(rng)))
    return out


def supervised_policy(base: str, out: str, steps: int, batch: int, lr: float, seed: int) -> dict:
    """A plain next-token loop over the family data (prompt tokens masked, the eos after the answer
    learned), from the tiny random policy at `base`; saves model, tokenizer and generation config to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a 2-layer model: more threads only spin against Ray's processes on 2 cores
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    data = sft_examples(steps * batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    losses = []
    for step in range(steps):
        seqs, masks = [], []
        for prompt, answer in data[step * batch:(step + 1) * batch]:
            p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p_ids + a_ids)
            masks.append([0] * len(p_ids) + [1] * len(a_ids))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.where(torch.tensor([m + [0] * (width - len(m)) for m in masks]) == 1, ids, -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"steps": steps, "batch": batch, "lr": lr, "first_loss": losses[0],
            "last_loss": sum(losses[-20:]) / min(20, len(losses))}
