"""Function rewards: Python callables `(prompt, response) -> float` as a scorer backend on CPU actors.

Verifiable rewards (an exact-match answer, unit tests, a format or length rule) need no model. `score.functions`
names them as `module:function` strings:
* a list: each function scores one aspect named by the function (`exact_match`); a single function with no
  reward model is a scalar reward (`overall` is its value, no `scores` struct);
* a mapping `{aspect: "module:function"}` names the aspects itself.
They mix with reward-model aspects: after the model scorer, the function aspects join the `scores` struct it
wrote and `overall` is formed again over all of them (`score.overall`: `mean`, or one aspect's name).

A callable that declares a third parameter named `row` gets the prompt row's other columns as a dict, e.g. a
`reference` answer to compare with. A callable that raises, or returns a non-number or a non-finite value,
sets that response aside on its own: `problem` is `reward_function_error` or `non_finite_reward` and
`problem_detail` says which function and what it raised or returned (statistics copy it into quarantine/).
The other responses of the prompt keep their scores.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE, Operator, Resources, with_quarantine
from operators.score import ScoreCfg, nest_responses, overall_reward, to_score

# Python callables are light: half a core lets a function actor share a core with the generator or the model
# scorer on a small machine, and a pool of them spreads over a cluster's CPUs.
FUNCTION_CPUS = 0.5
FUNCTION_FIELDS = ("overall", "len", "scores", "problem", "problem_detail")


class FunctionSpecError(ValueError):
    """A `score.functions` entry that does not name a callable; the message names the entry."""


@dataclass(frozen=True)
class RewardFunction:
    aspect: str
    spec: str
    fn: Callable[..., Any]
    wants_row: bool  # declares a `row` parameter: gets the prompt row's other columns


def function_specs(functions: list[str] | dict[str, str] | None) -> dict[str, str]:
    """{aspect: "module:function"}; a list names each aspect by its function. Checks the shape, not imports."""
    if not functions:
        return {}
    if isinstance(functions, dict):
        pairs = [(str(k), v) for k, v in functions.items()]
    else:
        pairs = [(v.rsplit(":", 1)[-1] if isinstance(v, str) else "", v) for v in functions]
    out: dict[str, str] = {}
    for aspect, spec in pairs:
        if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
            raise FunctionSpecError(f"score.functions: {spec!r} is not of the form 'module:function'")
        if aspect in out:
            raise FunctionSpecError(f"score.functions: aspect {aspect!r} is named twice ({out[aspect]} and "
                                    f"{spec}); use the mapping form {{aspect: 'module:function'}}")
        out[aspect] = spec
    return out


def load_function(aspect: str, spec: str) -> RewardFunction:
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FunctionSpecError(f"score.functions: {spec}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise FunctionSpecError(f"score.functions: {spec}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise FunctionSpecError(f"score.functions: {spec}: {attr!r} is a {type(fn).__name__}, not a callable")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    return RewardFunction(aspect, spec, fn, "row" in params)


def load_functions(functions: list[str] | dict[str, str] | None) -> list[RewardFunction]:
    """Import every `score.functions` entry; the driver calls this before Ray starts, each actor again."""
    return [load_function(a, s) for a, s in function_specs(functions).items()]


def function_aspects(cfg: ScoreCfg) -> list[str] | None:
    """The aspects the functions add; None for a lone list function without reward models (a scalar)."""
    specs = function_specs(cfg.functions)
    if not specs:
        return []
    if isinstance(cfg.functions, list) and len(specs) == 1 and not cfg.models:
        return None
    return list(specs)


def model_score_cfg(cfg: ScoreCfg) -> ScoreCfg:
    """The config the model scorer runs with: when `score.overall` names a function aspect, the models form a
    provisional mean that the function scorer replaces."""
    if cfg.overall != "mean" and cfg.overall in function_specs(cfg.functions):
        return replace(cfg, overall="mean")
    return cfg


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def apply_functions(functions: list[RewardFunction], prompts: list[str], responses: list[str],
                    rows: list[dict[str, Any]] | None = None
                    ) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """(values (responses, functions) float64, problem, detail) per response. The first function that fails
    a response sets its problem; its values are NaN from there on."""
    n = len(responses)
    values = np.full((n, len(functions)), np.nan)
    problems: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    for i in range(n):
        for j, f in enumerate(functions):
            try:
                raw = f.fn(prompts[i], responses[i], row=rows[i] if rows else {}) if f.wants_row \
                    else f.fn(prompts[i], responses[i])
            except Exception as e:  # a user's function: any error is that response's problem, not the run's
                problems[i], details[i] = "reward_function_error", f"{f.spec}: {type(e).__name__}: {e}"
                break
            value = _number(raw)
            if value is None:
                problems[i] = "reward_function_error"
                details[i] = f"{f.spec}: returned {raw!r} ({type(raw).__name__}), expected a number"
                break
            if not math.isfinite(value):
                problems[i], details[i] = "non_finite_reward", f"{f.spec}: returned {value}"
                break
            values[i, j] = value
    return values, problems, details


class FunctionScorer(Operator):
    """One prompt row in, one out: each response struct gains the function aspects (in `scores`), `overall`,
    `len`, `problem` and `problem_detail`. After a model scorer it merges with the aspects already there."""

    name = "score_functions"
    requires = ("responses",)
    requires_any = (("prompt", "messages"),)
    adds = ("responses",)

    def __init__(self, cfg: ScoreCfg):
        self.cfg = cfg
        self.functions = load_functions(cfg.functions)
        if not self.functions:
            raise FunctionSpecError("score.functions is empty: name at least one 'module:function'")
        self.aspects = function_aspects(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        b = to_score(batch)
        flat, names, texts, problems, todo = b.flat, b.names, b.texts, b.problems, b.todo
        m = len(texts)
        details = flat.field("problem_detail").to_pylist() if "problem_detail" in names else [None] * m

        other = [c for c in batch.column_names if c not in ("responses", QUARANTINE)]
        row_dicts = batch.select(other).to_pylist() if any(f.wants_row for f in self.functions) else None
        values, probs, dets = apply_functions(self.functions, [b.prompt_text[b.rows[f]] for f in todo],
                                              [texts[f] for f in todo],
                                              [row_dicts[b.rows[f]] for f in todo] if row_dicts else None)
        fvalues = np.full((m, len(self.functions)), np.nan)
        fvalues[todo] = values
        for k, f in enumerate(todo):
            if probs[k] is not None:
                problems[f], details[f] = probs[k], dets[k]
        ok = np.zeros(m, dtype=bool)
        ok[todo] = True
        ok &= np.array([p is None for p in problems], dtype=bool)

        fields = {name: flat.field(name) for name in names if name not in FUNCTION_FIELDS}
        if self.aspects is None:  # a lone function and no model: a scalar reward
            overall = fvalues[:, 0]
            scores = None
        else:
            model_names, model_values = self._model_aspects(flat, names, m)
            aspects = model_names + self.aspects
            if self.cfg.overall != "mean" and self.cfg.overall not in aspects:
                raise FunctionSpecError(f"score.overall: {self.cfg.overall!r} is not an aspect; choose mean "
                                        f"or one of {aspects}")
            all_values = np.concatenate([model_values, fvalues], axis=1)
            overall = overall_reward(all_values, aspects, self.cfg.overall)
            scores = pa.StructArray.from_arrays(
                [pa.array(all_values[:, j], type=pa.float64(), mask=~ok) for j in range(len(aspects))],
                names=aspects)
        fields["overall"] = pa.array(overall, type=pa.float64(), mask=~ok)
        fields["len"] = (flat.field("len") if "len" in names else
                         pc.fill_null(pc.utf8_length(flat.field("text").cast(pa.string())), 0).cast(pa.int64()))
        if scores is not None:
            fields["scores"] = scores
        fields["problem"] = pa.array(problems, type=pa.string())
        fields["problem_detail"] = pa.array(details, type=pa.string())
        new_flat = pa.StructArray.from_arrays(list(fields.values()), names=list(fields))
        out = batch.set_column(batch.column_names.index("responses"), "responses",
                               nest_responses(b.responses, new_flat, b.offsets))
        return with_quarantine(out, b.row_reasons)

    def _model_aspects(self, flat: pa.StructArray, names: list[str], m: int) -> tuple[list[str], np.ndarray]:
        """The aspects a model scorer already wrote into the structs, as (names, (responses, aspects)); a
        function aspect of the same name replaces the old one (a run's scored/ read again as rated input)."""
        if "scores" not in names:
            if "overall" in names and self.cfg.models:
                raise FunctionSpecError("score.functions: the reward model is a scalar one with no aspect "
                                        "name; to mix it with functions, name its aspect (score.models[0]."
                                        "aspects: [reward])")
            return [], np.empty((m, 0))
        scores = flat.field("scores")
        model_names = [t.name for t in scores.type if t.name not in self.aspects]
        cols = [pc.fill_null(pc.struct_field(scores, [scores.type.get_field_index(a)]).cast(pa.float64()), np.nan)
                .to_numpy(zero_copy_only=False) for a in model_names]
        return model_names, np.stack(cols, axis=1) if cols else np.empty((m, 0))


def function_scorer_resources(cfg: ScoreCfg) -> Resources:
    return Resources(num_cpus=FUNCTION_CPUS, concurrency=cfg.concurrency, batch_size=cfg.batch_size)


# ----------------------------------------------------------------------------------------------------------
# Example functions that ship: `operators.reward_functions:length_penalty` and friends.
# ----------------------------------------------------------------------------------------------------------


def length_penalty(prompt: str, response: str) -> float:
    """Minus the response's length in thousands of characters: shorter is better, 0 for an empty response."""
    return -len(response) / 1000.0


_ANSWER = re.compile(r"(?:answer\s*(?:is|:)\s*)([^\n]+?)\s*\.?\s*$", re.IGNORECASE)


def final_answer(response: str) -> str:
    """The text after the last 'answer is' / 'answer:', else the last non-empty line; lowercased, inner
    whitespace collapsed, trailing period dropped."""
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    match = _ANSWER.search(last)
    text = match.group(1) if match else last
    return " ".join(text.strip().rstrip(".").split()).lower()


def exact_match(prompt: str, response: str, row: dict[str, Any]) -> float:
    """1.0 when the response's final answer equals the row's `reference` (normalised as `final_answer`),
    else 0.0. A row without a `reference` raises, which sets the response aside with the message."""
    if row.get("reference") is None:
        raise KeyError("exact_match needs a 'reference' column in the input (the expected answer)")
    return float(final_answer(response) == final_answer(str(row["reference"])))


def ends_with_sentence(prompt: str, response: str) -> float:
    """A format rule: 1.0 when the response ends with . ! ? (a closed sentence, not a truncated one)."""
    return float(response.rstrip().endswith((".", "!", "?")))
