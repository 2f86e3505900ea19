"""Re-run only selection and pairing over an existing run's statistics; nothing is regenerated or rescored.

    python -m pipelines.select --config pipelines/configs/real_rated.yaml output.dir=runs/real \\
        select.rule=margin_curriculum select.sft_quantile=0.1
"""

from __future__ import annotations

import os
import sys
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from operators.pairs import DECISION_COLUMNS, selected_pairs
from operators.select import SELECT_COLUMNS, Budget, RuleParams, select
from pipelines.runtime.config import CurateConfig, SelectCfg, fingerprint, to_dict
from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir
from pipelines.runtime.shards import PerShard
from pipelines.runtime.stages import read_columns, run_stage


def key_columns(run: RunDir, cfg: SelectCfg) -> pa.Table:
    """Only the columns a rule decides on reach the driver (a few numbers per prompt, never the texts)."""
    cols = [c for c in (*SELECT_COLUMNS, cfg.column, cfg.stratify_by) if c]
    return read_columns(run, "stats", sorted(set(cols)))


def run_selection(run: RunDir, cfg: CurateConfig, stats_fp: str, stats_run: RunDir | None = None) -> dict:
    """select -> pairs, two stages of the run folder. selection/ holds keys and decisions only. `stats_run`:
    the run whose stats/ to select from, when not `run` (prefsift ablate: one folder per rule and seed)."""
    src = stats_run or run

    sc = cfg.select
    seed = cfg.run.seed if sc.seed is None else sc.seed
    select_fp = fingerprint(stats_fp, sc, seed, "keys-v1")

    def build_selection():
        keys = key_columns(src, sc)
        decision = select(keys, sc.rule, Budget(sc.fraction, sc.count),
                          RuleParams(seed=seed, margin_tau=sc.margin_tau, sft_quantile=sc.sft_quantile,
                                     column=sc.column, min=sc.min, max=sc.max),
                          stratify_by=sc.stratify_by)
        return decision  # keys and decisions, on the driver already: written from there, no Ray Data execution

    sel = run_stage(run, "selection", select_fp, build_selection, rows_in=lambda: src.stage_record("stats").rows_out,
                    unit_in="prompt", unit_out="prompt")
    chosen: dict[str, pa.Table] = {}

    def build_pairs_ds():
        keys = read_columns(run, "selection", ["prompt_id", *DECISION_COLUMNS])
        chosen["keys"] = keys.filter(pc.fill_null(keys.column("selected"), False)) if keys.num_rows else keys
        # One Ray task per statistics shard pairs the selected prompts' rows and writes them: a map over a few
        # large shards, without a Ray Data execution's fixed cost; no text reaches the driver.
        return PerShard(src, "stats", partial(selected_pairs, selection=chosen["keys"]))

    pairs = run_stage(run, "pairs", fingerprint(select_fp, "pairs-v1"), build_pairs_ds,
                      rows_in=lambda: chosen["keys"].num_rows, unit_in="selected prompt", unit_out="pair")
    return {"selection": sel, "pairs": pairs}


def main(cfg: CurateConfig) -> dict:
    from pipelines.runtime.ray_start import init_ray

    local = "://" not in cfg.output.dir
    if local and not os.path.exists(os.path.join(cfg.output.dir, "stats", "_SUCCESS")):
        raise FileNotFoundError(
            f"{cfg.output.dir} has no complete stats/ stage; run `python -m pipelines.curate` first"
        )
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    run = RunDir(cfg.output.dir)
    if not run.exists("stats", "_SUCCESS"):
        raise FileNotFoundError(
            f"{cfg.output.dir} has no complete stats/ stage; run `python -m pipelines.curate` first"
        )
    run.start("select", to_dict(cfg))
    stats_fp = run.read_text("stats", "_SUCCESS").strip()
    out = run_selection(run, cfg, stats_fp)
    say(f"pairs:    {run.uri_of('pairs')}  ({out['pairs'].rows_out} pairs, rule {cfg.select.rule})")
    say(f"manifest: {run.uri_of('manifest.json')}")
    return {"run_dir": run.uri, "pairs": run.uri_of("pairs"), "records": out}


if __name__ == "__main__":
    # The same path as `prefsift select`: the same checks before Ray, the same one-line errors, the same summary.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["select", *sys.argv[1:]]))
