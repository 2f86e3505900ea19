"""Adaptive sampling inside curation (`generate.adaptive`): rounds of generate -> score, each its own stage.

    round_0/   every prompt with k0 samples, scored
    round_r/   the prompts that continue after round r-1, each with `step` more samples appended to its
               `responses` (sample_idx len(responses) .. target-1), the earlier samples and scores kept
    scored/    every prompt's last row (the round it last drew in): the input statistics read as usual

Between rounds the driver reads the key columns of the round just written (prompt_id and each response's
`overall` and `problem`, parquet leaves, never the texts) and asks `operators.adaptive.decide` which prompts
draw again. With `adaptive.resume` a prompt that stopped can come back, so a round's input is the union of
the rows, from whichever round folder holds a continuing prompt's latest row, filtered by an `is_in` on the
ids (one id array in the object store, read by every block). Nothing is shuffled.

The generator and the model scorer are residents (operators/resident.py): their actors are made when the
first round runs, serve every round, and end after the last one, so each round costs no engine or model
start-up. Round 0 asks the generator for sample_idx 0 .. k0-1 through the same per-row columns as later
rounds, so one generator (configured for k_max) serves them all.

Each round has its own fingerprint, chained from the one before: a rerun skips the completed rounds and
rebuilds the decisions from their key columns, and starts no resident if every round is done. Sample j
has the seed sample_seed(run seed, prompt_id, j) whichever round draws it, so a prompt that reaches k_max
has the samples a full run would give it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.adaptive import AdaptiveCfg, check_cfg, decide
from operators.base import apply
from operators.generate import N_TARGET, SAMPLE_START, Generator, generator_resources
from operators.resident import Residents
from operators.responses import one_array
from operators.reward_functions import FunctionScorer, function_scorer_resources, model_score_cfg
from operators.score import RewardScorer, ScoreCfg, flatten_responses, scorer_resources
from operators.select import DEFAULT_FRACTION
from pipelines.runtime.config import ConfigError, CurateConfig, fingerprint
from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir
from pipelines.runtime.shards import stage_files
from pipelines.runtime.stages import read_stage, run_stage

PRIOR = "_prior"  # a continuing prompt's earlier responses while the new ones are drawn and scored
SUPPORTED_RULES = ("pvar_top",)  # the selection whose cut `decide` estimates


def adaptive_cfg(cfg: CurateConfig) -> AdaptiveCfg:
    """generate.adaptive with `fraction`, `tau` and `k_max` taken from the sections that own them
    (select.fraction, stats.tau, generate.num_samples); a value set in both places that differs is refused."""
    a = cfg.generate.adaptive
    assert a is not None
    if cfg.select.rule not in SUPPORTED_RULES:
        raise ConfigError(f"generate.adaptive: stops the prompts that cannot make a pvar_top selection, so it "
                          f"needs select.rule pvar_top, got {cfg.select.rule!r}")
    if cfg.select.count is not None:
        raise ConfigError("generate.adaptive: the rounds' cut is a fraction of the prompts; use select.fraction "
                          "instead of select.count")
    fraction = cfg.select.fraction if cfg.select.fraction is not None else DEFAULT_FRACTION[cfg.select.rule]
    default = AdaptiveCfg()
    for key, own, owner in (("fraction", fraction, "select.fraction"), ("tau", cfg.stats.tau, "stats.tau"),
                            ("k_max", cfg.generate.num_samples, "generate.num_samples")):
        value = getattr(a, key)
        if value is not None and value != getattr(default, key) and value != own:
            raise ConfigError(f"generate.adaptive.{key}: {value} contradicts {owner}: {own} (leave "
                              f"generate.adaptive.{key} unset, it follows {owner})")
    a = replace(a, fraction=fraction, tau=cfg.stats.tau, k_max=cfg.generate.num_samples)
    try:
        check_cfg(a, "generate.adaptive")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return a


def planned_samples(prompts: int, a: AdaptiveCfg, k_max: int) -> tuple[int, int, bool]:
    """(fewest, most, exact) samples adaptive sampling can draw for `prompts` prompts, before any reward is
    seen. `rank` is exact: the top `keep` of the prompts in play continue each round (Budget's rounding).
    `ucb` depends on the rewards: at fewest every prompt gets k0 and only the selected `fraction` draws on
    to k_max (with `z_in` the selected can stop at k0 too); at most every prompt draws k_max (a full run)."""
    from operators.select import Budget

    k0 = min(a.k0, k_max)
    if a.rule == "rank":
        total, play, k = prompts * k0, prompts, k0
        while k < k_max and play:
            play = Budget(fraction=a.keep).size(play)
            total += play * min(a.step, k_max - k)
            k += a.step
        return total, total, True
    selected = 0 if a.z_in is not None else Budget(fraction=a.fraction).size(prompts)
    return prompts * k0 + selected * (k_max - k0), prompts * k_max, False


@dataclass
class Play:
    """What the driver knows between rounds: per prompt its rewards so far (NaN for a sample without a
    valid reward) and the round folder holding its latest row."""

    rewards: dict[str, list[float]] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    def update(self, run: RunDir, stage: str, r: int, sent: set[str]) -> None:
        """Read a round's keys; a prompt sent into the round that did not come out was quarantined there."""
        seen = set()
        for pid, rewards in round_keys(run, stage):
            self.rewards[pid], self.last[pid] = rewards, r
            seen.add(pid)
        for pid in sent - seen:
            del self.rewards[pid], self.last[pid]


def round_keys(run: RunDir, stage: str):
    """(prompt_id, rewards) per row of a round folder, from the parquet leaves alone."""
    leaves = ["prompt_id", "responses.list.element.overall", "responses.list.element.problem"]
    for path in stage_files(run, stage):
        with run.fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read(columns=leaves)
        if not table.num_rows:
            continue
        responses = one_array(table.column("responses"))
        flat, _, offsets = flatten_responses(responses)
        overall = pc.fill_null(flat.field("overall"), float("nan")).to_numpy(zero_copy_only=False)
        bad = pc.is_valid(flat.field("problem")).to_numpy(zero_copy_only=False)
        rewards = np.where(bad | ~np.isfinite(overall), np.nan, overall)
        for i, pid in enumerate(table.column("prompt_id").to_pylist()):
            yield str(pid), rewards[offsets[i]:offsets[i + 1]].tolist()


def keep_ids(table: pa.Table, ids_ref) -> pa.Table:
    import ray

    return table.filter(pc.is_in(table.column("prompt_id"), value_set=ray.get(ids_ref)))


def to_next_round(table: pa.Table, step: int, k_max: int) -> pa.Table:
    """Earlier responses aside as `_prior`; draw sample_idx len(responses) .. min(len + step, k_max) - 1."""
    start = pc.fill_null(pc.list_value_length(table.column("responses")), 0).cast(pa.int64())
    target = pc.min_element_wise(pc.add(start, step), pa.scalar(k_max, pa.int64()))
    names = [PRIOR if c == "responses" else c for c in table.column_names]
    return table.rename_columns(names).append_column(SAMPLE_START, start).append_column(N_TARGET, target)


def merge_prior(table: pa.Table) -> pa.Table:
    """`responses` = the earlier responses then the new ones, per row (the same scorer built both structs)."""
    prior = one_array(table.column(PRIOR))
    new = one_array(table.column("responses"))
    pf, _, po = flatten_responses(prior)
    nf, _, no = flatten_responses(new)
    lp, ln = np.diff(po), np.diff(no)
    rows = np.arange(table.num_rows)
    # Stable sort by (row, old before new) interleaves the two flat arrays back into rows.
    order = np.argsort(np.concatenate([np.repeat(rows, lp) * 2, np.repeat(rows, ln) * 2 + 1]), kind="stable")
    flat = pa.concat_arrays([pf, nf.cast(pf.type)]).take(pa.array(order))
    offsets = np.concatenate([[0], np.cumsum(lp + ln)])
    merged = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat)
    out = table.drop_columns([PRIOR, SAMPLE_START, N_TARGET, "responses"])
    return out.append_column("responses", merged)


def to_first_round(table: pa.Table, k0: int) -> pa.Table:
    """Round 0 draws sample_idx 0 .. k0-1 of every prompt."""
    n = table.num_rows
    return table.append_column(SAMPLE_START, pa.array([0] * n, pa.int64())).append_column(
        N_TARGET, pa.array([k0] * n, pa.int64()))


def drop_sample_range(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in (SAMPLE_START, N_TARGET) if c in table.column_names])


def generate(ds, cfg: CurateConfig, residents: Residents):
    gen = cfg.generate
    return residents.get(Generator, generator_resources(gen), cfg=gen, seed=cfg.run.seed).apply(ds)


def score(ds, cfg: ScoreCfg, residents: Residents):
    if cfg.models or not cfg.functions:  # neither: the model scorer says what is missing
        ds = residents.get(RewardScorer, scorer_resources(cfg), cfg=model_score_cfg(cfg)).apply(ds)
    if cfg.functions:
        ds = apply(ds, FunctionScorer, function_scorer_resources(cfg), cfg=cfg)
    return ds


def rows_of(run: RunDir, by_round: dict[int, list[str]]):
    """The rows of these prompts, each from the round folder named for it: filtered unions, no shuffle."""
    import ray

    parts = []
    for r, ids in sorted(by_round.items()):
        ref = ray.put(pa.array(sorted(ids), type=pa.string()))
        parts.append(read_stage(run, f"round_{r}").map_batches(keep_ids, fn_kwargs={"ids_ref": ref},
                                                                batch_format="pyarrow", batch_size=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_rounds(run: RunDir, cfg: CurateConfig, read_fp: str, prompts_in: int) -> str:
    """Write round_0/ .. round_R/ and scored/; returns scored/'s fingerprint."""
    a = adaptive_cfg(cfg)
    k_max = cfg.generate.num_samples
    play = Play()
    rounds: list[dict] = []
    served_by: dict[str, dict] = {}  # resident name -> constructions and calls per round that ran
    pids: dict[str, set[int]] = {}
    with Residents() as residents:
        fp = fingerprint(read_fp, cfg.generate, cfg.run.seed, cfg.score, "round", 0)
        rec = run_stage(run, "round_0", fp, lambda: _first_round(run, cfg, min(a.k0, k_max), residents),
                        rows_in=prompts_in, unit_in="prompt", unit_out="prompt")
        _count_served(residents, served_by, 0, rec.skipped, pids)
        play.update(run, "round_0", 0, set())
        served = len(play.rewards)
        rounds.append({"round": 0, "prompts": rec.rows_in, "samples": sum(map(len, play.rewards.values()))})
        active = dict.fromkeys(play.rewards, True)
        r = 0
        while True:
            ids = sorted(play.rewards)  # sorted: `rank` breaks ties by position
            drawn = np.array([len(play.rewards[p]) for p in ids])
            go = decide([play.rewards[p] for p in ids], drawn, np.array([active.get(p, False) for p in ids]),
                        a, k_max=k_max) if ids else np.zeros(0, bool)
            say(f"round {r}: {rounds[-1]['prompts']} prompts drew {rounds[-1]['samples']} samples; "
                f"{int(go.sum())} continue")
            if not go.any():
                break
            sent = [p for p, g in zip(ids, go, strict=True) if g]
            by_round: dict[int, list[str]] = {}
            for p in sent:
                by_round.setdefault(play.last[p], []).append(p)
            before = sum(len(play.rewards[p]) for p in sent)
            r += 1
            fp = fingerprint(fp, "round", r)
            rec = run_stage(run, f"round_{r}", fp, lambda by_round=by_round: _next_round(
                                run, cfg, by_round, a.step, k_max, residents),
                            rows_in=len(sent), unit_in="prompt", unit_out="prompt")
            _count_served(residents, served_by, r, rec.skipped, pids)
            play.update(run, f"round_{r}", r, set(sent))
            after = sum(len(play.rewards[p]) for p in sent if p in play.rewards)
            rounds.append({"round": r, "prompts": len(sent), "samples": after - before})
            active = dict.fromkeys(sent, True)
    for name, s in served_by.items():
        say(f"resident {name}: {s['constructions']} construction(s) served rounds "
            f"{', '.join(map(str, s['rounds']))} ({sum(s['calls'])} batches)")

    by_last: dict[int, list[str]] = {}
    for p, j in play.last.items():
        by_last.setdefault(j, []).append(p)
    scored_fp = fingerprint(fp, "final")
    run_stage(run, "scored", scored_fp, lambda: rows_of(run, by_last), rows_in=len(play.last),
              unit_in="prompt", unit_out="prompt")
    generated = sum(x["samples"] for x in rounds)
    full = k_max * served
    summary = {"cfg": {k: getattr(a, k) for k in ("k0", "step", "k_max", "rule", "keep", "z", "resume",
                                                  "fraction", "tau")},
               "rounds": rounds, "samples_generated": generated, "samples_full_run": full,
               "share": round(generated / full, 4) if full else math.nan,
               "prompts_at_k_max": sum(len(v) >= k_max for v in play.rewards.values())}
    run.set("adaptive", summary)
    if served_by:  # absent when a rerun found every round done
        run.set("residents", served_by)
    say(f"adaptive sampling: {generated} samples generated of {full} for a full run "
        f"({summary['share']:.0%}) in {len(rounds)} rounds; {summary['prompts_at_k_max']} prompts reached "
        f"k_max {k_max}")
    return scored_fp


def _count_served(residents: Residents, served_by: dict[str, dict], r: int, skipped: bool,
                  pids: dict[str, set[int]]) -> None:
    """After a round that ran: the batches each resident served in it, and its constructions so far (the
    processes that served any round: one per actor, and one more per restart)."""
    if skipped:
        return
    for name, s in residents.served().items():
        entry = served_by.setdefault(name, {"rounds": [], "calls": []})
        entry["rounds"].append(r)
        entry["calls"].append(s["calls"])
        pids.setdefault(name, set()).update(s["pids"])
        entry["constructions"] = len(pids[name])


def _first_round(run: RunDir, cfg: CurateConfig, k0: int, residents: Residents):
    ds = read_stage(run, "prompts").map_batches(to_first_round, fn_kwargs={"k0": k0}, batch_format="pyarrow",
                                                batch_size=None)
    ds = score(generate(ds, cfg, residents), cfg.score, residents)
    return ds.map_batches(drop_sample_range, batch_format="pyarrow", batch_size=None)


def _next_round(run: RunDir, cfg: CurateConfig, by_round: dict[int, list[str]], step: int, k_max: int,
                residents: Residents):
    ds = rows_of(run, by_round).map_batches(to_next_round, fn_kwargs={"step": step, "k_max": k_max},
                                            batch_format="pyarrow", batch_size=None)
    ds = score(generate(ds, cfg, residents), cfg.score, residents)
    return ds.map_batches(merge_prior, batch_format="pyarrow", batch_size=None)
