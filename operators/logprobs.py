"""Tokenization, batching and completion log-probs, shared by the reference stage and the training loop.

One code path for both sides means the reference log-probs carried as columns are, at step 0, the numbers
the policy computes itself (up to float reductions over different batch shapes).

The recipe mirrors TRL 1.16's DPOTrainer for non-conversational data, so losses cross-check against it:
- the prompt is rendered with the tokenizer's chat template, `[{"role": "user", "content": prompt}]` with
  `add_generation_prompt=True`; the completion is the response + eos (added when missing, as TRL's `add_eos`);
- `prompt` and `prompt + completion` are tokenized separately, and the completion starts where the two token
  sequences diverge (TRL's `common_prefix_length`, which handles merges across the boundary);
- with `max_prompt_length`, the prompt keeps its LAST tokens (`prompt_ids[-max_prompt_length:]`, as TRL's
  `tokenize_row` and the MixDPO authors' `scripts/dpo_trainer.py`): the question sits at the end of a long
  prompt, next to the completion;
- sequences are then truncated to `max_length` from the end (TRL's `keep_start`), which only ever cuts the
  completion once the prompt is capped below `max_length`; then right-padded with chosen rows first and
  rejected rows after (TRL's `DataCollatorForPreference`).
A pair whose prompt alone fills `max_length` has no completion token left: the reference stage quarantines it
(`prompt_exceeds_max_length`) and the training loop refuses it (`completion_lengths` says 0).
Deliberate differences: we tokenize with `add_special_tokens=False`, because the chat template already
renders the special tokens (TRL's plain-string path would add a BOS twice for tokenizers that add one); and
conversational pairs (message lists, as curation emits for `messages` input) keep the same completion =
assistant content + eos, where TRL would render the assistant turn with the template's trailing tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Logps(NamedTuple):
    chosen: Tensor  # (B,) summed log-prob of the chosen completion tokens (response + eos)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) number of completion tokens, after truncation
    rejected_tokens: Tensor  # (B,)

    @property
    def chosen_mean(self) -> Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)




def render_prompts(tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]]) -> list[str]:
    """A string prompt becomes one user turn; a message list (conversational pairs) is rendered as is."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; prompts are rendered with it")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                                          tokenize=False, add_generation_prompt=True) for p in prompts]


def completion_text(c: str | list[dict[str, str]]) -> str:
    """A completion string, or the content of a conversational completion's assistant turn(s)."""
    return c if isinstance(c, str) else "".join(m["content"] for m in c)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_pairs(tokenizer: Any, prompts: Sequence[Any], chosen: Sequence[Any],
                 rejected: Sequence[Any], max_prompt_length: int | None = None) -> list[dict[str, list[int]]]:
    """Token ids per pair: `prompt_ids`, `chosen_ids`, `rejected_ids` (completions include the eos).

    `max_prompt_length` left-truncates the prompt ids after the prompt/completion boundary is found, so the
    completions are the same tokens whatever the cap."""
    eos = tokenizer.eos_token
    texts = render_prompts(tokenizer, prompts)
    chosen = [c if c.endswith(eos) else c + eos for c in map(completion_text, chosen)]
    rejected = [r if r.endswith(eos) else r + eos for r in map(completion_text, rejected)]
    enc = tokenizer(texts + [p + c for p, c in zip(texts, chosen, strict=True)]
                    + [p + r for p, r in zip(texts, rejected, strict=True)], add_special_tokens=False)["input_ids"]
    n = len(texts)
    out = []
    for i in range(n):
        p, pc, pr = enc[i], enc[n + i], enc[2 * n + i]
        cut = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out.append({"prompt_ids": prompt_tail(p[:cut], max_prompt_length), "chosen_ids": pc[cut:],
                    "rejected_ids": pr[cut:]})
    return out


def prompt_tail(ids: list[int], limit: int | None) -> list[int]:
    """The last `limit` ids (all of them when limit is None)."""
    return ids[-limit:] if limit and len(ids) > limit else ids


def completion_lengths(example: dict[str, list[int]], max_length: int | None) -> tuple[int, int]:
    """Completion tokens that survive `keep_start` truncation; 0 when the prompt alone fills max_length."""
    p = len(example["prompt_ids"])
    keep = (lambda n: max(0, min(n, max_length - p))) if max_length else (lambda n: n)
    return keep(len(example["chosen_ids"])), keep(len(example["rejected_ids"]))


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int, max_length: int | None) -> dict[str, Tensor]:
    """[chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1], right-padded, with a completion mask."""
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = ex["prompt_ids"] + ex[side]
            mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])
            if max_length:
                ids, mask = ids[:max_length], mask[:max_length]
            seqs.append(ids)
            masks.append(mask)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        completion[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the HF model in .module
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the completion tokens of each row, and their count.

    Logits are only kept from the first completion position on (`logits_to_keep`), which saves the
    (rows x prompt length x vocab) part of the logits, the largest activation for long prompts and big vocabs.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    completion = batch["completion_mask"].to(device)
    width = input_ids.size(1)
    has_completion = completion.any(dim=1)
    first = int(completion.float().argmax(dim=1)[has_completion].min().item()) if has_completion.any() else width - 1
    first = max(first, 1)  # the first token of a sequence has no prediction
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "use_cache": False}
    keep = width - first + 1  # positions first-1 .. width-1; the last one predicts past the end
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits[:, -keep:-1]
    labels = input_ids[:, first:].masked_fill(completion[:, first:] == 0, -100)
    token_logps = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100, reduction="none").view(labels.shape)
    return token_logps.sum(dim=1), (labels != -100).sum(dim=1)


def pair_logps(model: torch.nn.Module, examples: Sequence[dict[str, list[int]]], pad_id: int,
               max_length: int | None) -> Logps:
    batch = collate(examples, pad_id, max_length)
    sums, counts = sequence_logps(model, batch)
    n = len(examples)
    return Logps(sums[:n], sums[n:], counts[:n].to(sums.dtype), counts[n:].to(sums.dtype))


def pad_token_id(tokenizer: Any) -> int:
    """TRL's fallback: the pad token, else the eos token."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    return int(pid)
