"""Reference log-probs, computed once over the pairs so that training never loads the reference model.

For each pair: the summed log-prob of the chosen and of the rejected completion (response + eos) under the
reference model, and the completion token counts, with exactly the tokenization and log-prob code the
training loop uses (`operators.logprobs`). Rows that cannot be scored are quarantined with a reason:
- `null_text`: prompt, chosen or rejected is null;
- `prompt_exceeds_max_length`: the rendered prompt alone (after `max_prompt_length` keeps its end) fills
  `max_length`, so truncation would leave no completion token (TRL drops these rows too). With
  `max_prompt_length < max_length`, as the MixDPO authors run (512 of 1024), no row can hit this.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

from operators.base import Operator, with_quarantine

DTYPES = ("float32", "bfloat16", "float16")


class ReferenceLogProbs(Operator):
    name: ClassVar[str] = "reference_logps"
    requires: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    adds: ClassVar[tuple[str, ...]] = ("ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens")

    def __init__(self, model: str, max_length: int | None = 1024, micro_batch_size: int = 8,
                 dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None,
                 max_prompt_length: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"reference dtype {dtype!r}: choose one of {DTYPES}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.micro_batch_size = micro_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from operators.logprobs import completion_lengths, encode_pairs, pad_token_id, pair_logps

        n = batch.num_rows
        cols = {c: batch.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")}
        reasons: list[str | None] = [None] * n
        ok = [i for i in range(n) if all(cols[c][i] is not None for c in cols)]
        for i in set(range(n)) - set(ok):
            reasons[i] = "null_text"
        encoded = encode_pairs(self.tokenizer, *[[cols[c][i] for i in ok] for c in ("prompt", "chosen", "rejected")],
                               max_prompt_length=self.max_prompt_length)
        examples: dict[int, dict[str, list[int]]] = {}
        for i, ex in zip(ok, encoded, strict=True):
            if min(completion_lengths(ex, self.max_length)) == 0:
                reasons[i] = "prompt_exceeds_max_length"
            else:
                examples[i] = ex

        chosen_lp: list[float | None] = [None] * n
        rejected_lp: list[float | None] = [None] * n
        chosen_tok: list[int | None] = [None] * n
        rejected_tok: list[int | None] = [None] * n
        # Longest first, in micro-batches of similar length: less padding, and an out-of-memory error shows
        # on the first micro-batch rather than late in the stage.
        order = sorted(examples, key=lambda i: -max(len(examples[i]["prompt_ids"]) + len(examples[i][s])
                                                     for s in ("chosen_ids", "rejected_ids")))
        pad = pad_token_id(self.tokenizer)
        with torch.inference_mode():
            for start in range(0, len(order), self.micro_batch_size):
                idx = order[start: start + self.micro_batch_size]
                lp = pair_logps(self.model, [examples[i] for i in idx], pad, self.max_length)
                for j, i in enumerate(idx):
                    chosen_lp[i] = float(lp.chosen[j])
                    rejected_lp[i] = float(lp.rejected[j])
                    chosen_tok[i] = int(lp.chosen_tokens[j])
                    rejected_tok[i] = int(lp.rejected_tokens[j])

        out = batch
        for name, values, typ in (("ref_chosen_logp", chosen_lp, pa.float64()),
                                  ("ref_rejected_logp", rejected_lp, pa.float64()),
                                  ("chosen_tokens", chosen_tok, pa.int64()),
                                  ("rejected_tokens", rejected_tok, pa.int64())):
            arr = pa.array(values, type=typ)
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        return with_quarantine(out, reasons)

