"""Preference pairs in TRL's schema from selected prompts' statistics.

The statistics table already carries each prompt's best and worst response (or the labelled pair for
already-paired data), and the selection stage holds only keys and decisions, so pairing is a map over the
statistics with the selected keys as a filter: no shuffle, no join against the responses.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE
from operators.responses import one_array
from operators.stats import STATS_TABLE_COLUMNS

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_id", "score_chosen", "score_rejected", "margin", "pvar",
                "route", "order")


DECISION_COLUMNS = ("selected", "rank", "selector", "route", "order")


def join_selection(batch: pa.Table, selection: pa.Table) -> pa.Table:
    """The statistics rows of the selected prompts, with `rank`, `selector`, `route`, `order` attached by
    prompt_id. `selection` holds the selection stage's key rows (only selected ones need be there)."""
    chosen = selection.filter(pc.fill_null(selection.column("selected"), False))
    idx = pc.index_in(pc.cast(batch.column("prompt_id"), pa.string()), value_set=chosen.column("prompt_id"))
    hit = pc.is_valid(idx)
    batch, picked = batch.filter(hit), chosen.take(idx.filter(hit))
    for name in DECISION_COLUMNS:
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, picked.column(name))
    return batch


def selected_pairs(batch: pa.Table, selection: pa.Table) -> pa.Table:
    """The pairs of a batch of statistics rows, for the selected prompts among them."""
    return build_pairs(join_selection(batch, selection))


def build_pairs(batch: pa.Table) -> pa.Table:
    """Selected statistics rows -> pair rows. A prompt whose responses all scored the same has no preference
    to learn from; it is quarantined (`all_rewards_equal`) rather than paired with itself. So is a pair whose
    two texts are the same string with different scores (`identical_chosen_rejected`, e.g. two models that
    both answered "negative"): DPO's loss is constant on it, so it would only take a place in the budget.
    Prompt-level input columns the statistics carried (`source`, any extra input column) are kept."""
    same = (batch.column("best_idx").to_numpy(zero_copy_only=False)
            == batch.column("worst_idx").to_numpy(zero_copy_only=False))
    chosen, rejected = batch.column("best_response"), batch.column("worst_response")
    identical = pc.fill_null(pc.equal(chosen, rejected), False).to_numpy(zero_copy_only=False)
    if "messages" in batch.column_names:
        # Conversational input stays conversational (TRL's message-list schema) on every side; in a file that
        # mixes message rows with plain-prompt rows, a plain prompt becomes one user turn.
        prompt = _conversations(batch)
        chosen, rejected = _as_assistant_turn(chosen), _as_assistant_turn(rejected)
    else:
        prompt = batch.column("prompt")
    cols = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "prompt_id": batch.column("prompt_id"),
        "score_chosen": batch.column("score_best"),
        "score_rejected": batch.column("score_worst"),
        "margin": batch.column("margin"),
        "pvar": batch.column("pvar"),
        "route": batch.column("route"),
        "order": batch.column("order"),
    }
    for extra in ("source", "pd", "rank", "selector"):
        if extra in batch.column_names:
            cols[extra] = batch.column(extra)
    for extra in batch.column_names:  # carried input columns
        if extra not in cols and extra not in NOT_CARRIED:
            cols[extra] = batch.column(extra)
    reason = np.where(same, "all_rewards_equal", np.where(identical, "identical_chosen_rejected", None))
    cols[QUARANTINE] = pa.array(reason, type=pa.string())
    return pa.table(cols)


NOT_CARRIED = {*STATS_TABLE_COLUMNS, "prompt", "selected", "route", "order", QUARANTINE}


def _conversations(batch: pa.Table) -> pa.Array:
    msgs = batch.column("messages")
    if "prompt" not in batch.column_names or not pc.any(pc.is_null(msgs)).as_py():
        return one_array(msgs)
    prompts = batch.column("prompt").to_pylist()
    rows = [m if m is not None else [{"role": "user", "content": p}] for m, p in zip(msgs.to_pylist(), prompts,
                                                                                    strict=True)]
    return pa.array(rows, type=msgs.type)


def _as_assistant_turn(texts) -> pa.Array:
    return pa.array([[{"role": "assistant", "content": t}] for t in texts.to_pylist()])
