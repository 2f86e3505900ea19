"""Curate preference data: read -> (generate -> score | ingest) -> stats -> selection -> pairs.

    python -m pipelines.curate --config pipelines/configs/demo_cpu.yaml
    python -m pipelines.curate --config pipelines/configs/real_rated.yaml input.path=data.jsonl.gz select.fraction=0.1

Each stage writes parquet shards to its own folder under output.dir and its counts to manifest.json; a
rerun with the same config skips the stages that are already complete.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from functools import partial

from operators.base import InputError, apply
from operators.dedupe import (
    HELD,
    ROW_ID,
    dedupe_prompts,
    hold_duplicates,
    parquet_ids,
    read_parquet_keyed,
    settle_duplicates,
)
from operators.ingest import ingest_rated
from operators.norms import PD_PRIVATE, block_sums, fill_pd, norms_from_sums, response_pass, sums_aspects
from operators.read import (
    binarized_to_rated,
    check_input_columns,
    check_input_types,
    check_local_path,
    detect_format,
    detect_schema,
    input_errors,
    read_input,
    validate_prompts,
)
from operators.reward_functions import (
    FunctionScorer,
    function_scorer_resources,
    load_functions,
    model_score_cfg,
)
from operators.stats import (
    StatsParams,
    aspect_names,
    block_stats,
    carry_columns,
    stats_map,
)
from pipelines.runtime.config import ConfigError, CurateConfig, fingerprint, model_path, resolve_path, to_dict
from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir, filesystem_of
from pipelines.runtime.ray_start import init_ray
from pipelines.runtime.shards import rewrite_shards, stage_files
from pipelines.runtime.stages import Aside, Then, read_stage, run_stage
from pipelines.select import run_selection


def input_stamp(path: str) -> list:
    """Size and mtime of the input's files, so that an edited input file reruns the stages."""
    if "://" in path:
        return [path] + object_stamps(path)
    if not os.path.exists(path):
        return [path]
    if os.path.isfile(path):
        st = os.stat(path)
        return [path, st.st_size, int(st.st_mtime)]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [path] + [[f, os.stat(f).st_size, int(os.stat(f).st_mtime)] for f in files]


def object_stamps(uri: str) -> list:
    """[key, size, mtime] of each object under an s3:// or gs:// input (its listing only, no object read)."""
    import pyarrow.fs as pafs

    fs, root = filesystem_of(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        found = [info]
    elif info.type == pafs.FileType.Directory:
        found = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                        if i.type == pafs.FileType.File), key=lambda i: i.path)
    else:
        return []
    return [[i.path, i.size, int(i.mtime.timestamp()) if i.mtime else None] for i in found]


def resolve_models(cfg: CurateConfig) -> CurateConfig:
    gen = replace(cfg.generate, model=model_path(cfg.generate.model, "generate.model"))
    models = [replace(m, path=model_path(m.path, f"score.models[{i}].path")) for i, m in enumerate(cfg.score.models)]
    return replace(cfg, generate=gen, score=replace(cfg.score, models=models))


def stats_in_read_pass(run: RunDir, cfg: CurateConfig, stats_fp: str) -> Then:
    """The statistics stage as the read's second output (`Then`): each block of validated prompts gives its
    statistics rows (PD's parts instead of PD) and its sums (response count, PD's norms); once the pass and the
    settlement are over, the norms come from the sums and PD from its parts, before the stage commits."""
    params = StatsParams(tau=cfg.stats.tau, pd_target=cfg.stats.pd_target, pd_parts=True)

    def finish(sink) -> None:
        aspects = sums_aspects(sink.sums)
        norms = norms_from_sums(sink.sums, aspects, cfg.stats.length_debias, cfg.stats.debias_rho) \
            if aspects else None
        run.set("stats_params", {"tau": cfg.stats.tau, "pd_target": cfg.stats.pd_target, "aspects": aspects,
                                 "norms": asdict(norms) if norms else None})
        if aspects:  # else no block wrote PD's parts
            rewrite_shards(run, "stats", partial(fill_pd, norms=norms, target=cfg.stats.pd_target))

    return Then("stats", stats_fp, partial(block_stats, params=params), sums=block_sums, finish=finish,
                private_prefix=PD_PRIVATE, rows_in="responses", out_as_input="n", unit_in="response",
                unit_out="prompt")


def main(cfg: CurateConfig) -> dict:
    # --- setup: validate paths before any heavy work, then start (or join) Ray --------------------------
    in_path = resolve_path(cfg.input.path)
    check_local_path(in_path)
    cfg = resolve_models(cfg)
    load_functions(cfg.score.functions)  # a bad `module:function` is named before Ray starts
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    run = RunDir(cfg.output.dir)
    run.start("curate", to_dict(cfg))

    # --- read: validate rows, set aside empty prompts and duplicate ids ---------------------------------
    with input_errors():  # the schema comes from the first block, which a read task makes
        raw = read_input(in_path, cfg.input.format, cfg.input.limit, cfg.input.peek_lines)
        raw_schema = raw.schema()
    if raw_schema is None or not raw_schema.names:
        raise InputError(f"input {in_path} holds no rows")
    columns = list(raw_schema.names)
    schema = detect_schema(columns) if cfg.input.schema == "auto" else cfg.input.schema
    check_input_types(raw_schema, in_path)
    say(f"input {in_path}: {schema} schema")
    if schema == "prompts" and cfg.generate.num_samples < 2:
        raise ConfigError(f"generate.num_samples: curation compares responses, so it needs at least 2 per "
                          f"prompt, got {cfg.generate.num_samples}")
    source = os.path.basename(in_path.rstrip("/"))
    fmt = detect_format(in_path) if cfg.input.format == "auto" else cfg.input.format
    # The keyed read adds its row ids as a column of their own name; binarized rows get ids from
    # their text.
    keyed = fmt == "parquet" and schema != "binarized" and ROW_ID not in columns

    row_schema = "rated" if schema == "binarized" else schema
    check_input_columns(columns if schema != "binarized" else ["prompt_id", "prompt", "responses"],
                        row_schema, in_path)

    def prepare(ds):
        if schema == "binarized":
            ds = ds.map_batches(binarized_to_rated, batch_format="pyarrow")
        ds = ds.map_batches(validate_prompts, fn_kwargs={"schema": row_schema, "source": source},
                            batch_format="pyarrow")
        if row_schema == "rated":  # the shared rated schema, validated in place: statistics read it directly
            ds = ds.map_batches(ingest_rated, batch_format="pyarrow")
        return ds

    def build_read():
        # Parquet: the ids alone on the driver, then one pass streaming the rows from the files to prompts/,
        # the rows with a repeated id held aside and judged after it. Other formats are held once instead.
        if keyed:
            return hold_duplicates(read_parquet_keyed(in_path, cfg.input.limit), prepare, parquet_ids(in_path))
        return dedupe_prompts(raw, prepare)

    read_fp = fingerprint(cfg.input, input_stamp(in_path), "per-prompt-v1")
    stats_fp = fingerprint(read_fp, cfg.stats)
    # Rated parquet: the statistics come out of the read's own pass (`Then`), the held rows' at their
    # settlement, and PD (its norms are sums over every kept prompt) from its parts once the pass is over. A
    # rerun whose prompts/ is complete computes them from prompts/ below. PD against one aspect picks its pair
    # by a norm-dependent rule, so it keeps that path.
    fused = keyed and row_schema == "rated" and cfg.stats.pd_target == "overall"
    with input_errors():
        read = run_stage(run, "prompts", read_fp, build_read, rows_in=None, unit_in="prompt", unit_out="prompt",
                         aside=Aside(HELD, settle_duplicates, private=(ROW_ID,)) if keyed else None,
                         then=stats_in_read_pass(run, cfg, stats_fp) if fused else None)
    if read.rows_out == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in read.quarantined.items())
        raise InputError(f"input {in_path}: no usable rows; all {read.rows_in} were quarantined ({reasons}), "
                         f"see {run.uri_of('quarantine', 'prompts')}")

    # --- generate -> score (one row per prompt, K responses in a list); rated data is scored already -----
    if schema == "prompts" and cfg.generate.adaptive is not None:  # in rounds: pipelines/runtime/rounds.py
        from pipelines.runtime.rounds import run_rounds

        scored_fp, rated_stage = run_rounds(run, cfg, read_fp, read.rows_out), "scored"
    elif schema == "prompts":
        from operators.generate import Generator, generator_resources
        from operators.score import RewardScorer, scorer_resources

        gen_fp = fingerprint(read_fp, cfg.generate, cfg.run.seed)
        run_stage(
            run, "samples", gen_fp,
            lambda: apply(read_stage(run, "prompts"), Generator, generator_resources(cfg.generate),
                          cfg=cfg.generate, seed=cfg.run.seed),
            rows_in=read.rows_out, unit_in="prompt", unit_out="prompt",
        )
        scored_fp = fingerprint(gen_fp, cfg.score)

        def build_scored():
            ds = read_stage(run, "samples")
            if cfg.score.models or not cfg.score.functions:  # neither: the model scorer says what is missing
                ds = apply(ds, RewardScorer, scorer_resources(cfg.score), cfg=model_score_cfg(cfg.score))
            if cfg.score.functions:  # function rewards: alone, or aspects merged with the models' ones
                ds = apply(ds, FunctionScorer, function_scorer_resources(cfg.score), cfg=cfg.score)
            return ds

        run_stage(
            run, "scored", scored_fp, build_scored,
            rows_in=run.stage_record("samples").rows_out, unit_in="prompt", unit_out="prompt",
        )
        rated_stage = "scored"
    else:
        scored_fp, rated_stage = read_fp, "prompts"

    # --- statistics per prompt: a map over whole prompt rows, no shuffle --------------------------------
    stats_fp = fingerprint(scored_fp, cfg.stats)
    responses_in: dict[str, float] = {}

    def build_stats():
        ds = read_stage(run, rated_stage)
        schema = ds.schema()
        aspects = aspect_names(schema)
        # One pass over the score leaves only: the response count and, with aspects, PD's data-set-wide sums.
        sums = response_pass(run.fs, stage_files(run, rated_stage), schema, aspects,
                             with_length=bool(aspects) and cfg.stats.length_debias != "none")
        responses_in["n"] = sums.get("responses", 0.0)
        norms = norms_from_sums(sums, aspects, cfg.stats.length_debias, cfg.stats.debias_rho) if aspects else None
        run.set("stats_params", {"tau": cfg.stats.tau, "pd_target": cfg.stats.pd_target, "aspects": aspects,
                                 "norms": asdict(norms) if norms else None})
        params = StatsParams(tau=cfg.stats.tau, pd_target=cfg.stats.pd_target, norms=norms,
                             carry=carry_columns(schema.names))
        return stats_map(ds, params)

    if not (fused and not read.skipped):  # else written by the read's pass
        run_stage(run, "stats", stats_fp, build_stats, rows_in=lambda: int(responses_in["n"]), out_as_input="n",
                  unit_in="response", unit_out="prompt")

    # --- selection and pairs ------------------------------------------------------------------------------
    out = run_selection(run, cfg, stats_fp)
    result = {
        "run_dir": run.uri,
        "stats": run.uri_of("stats"),
        "pairs": run.uri_of("pairs"),
        "manifest": run.uri_of("manifest.json"),
        "num_pairs": out["pairs"].rows_out,
    }
    run.set("outputs", result)
    say(f"statistics: {result['stats']}")
    say(f"pairs:      {result['pairs']}  ({result['num_pairs']} pairs, rule {cfg.select.rule})")
    say(f"manifest:   {result['manifest']}")
    return result


if __name__ == "__main__":
    # The same path as `prefsift curate`: the same checks before Ray, the same one-line errors, the same summary.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["curate", *sys.argv[1:]]))
