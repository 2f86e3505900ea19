"""`prefsift`: one console script over the pipelines, which keep working as `python -m pipelines.<name>`.

    prefsift curate   --config pipelines/configs/real_rated.yaml output.dir=runs/real [--dry-run]
    prefsift select   --config pipelines/configs/real_rated.yaml output.dir=runs/real select.rule=random
    prefsift train    --config pipelines/configs/train_demo_cpu.yaml
    prefsift evaluate --config FILE policy=... reference=...
    prefsift run      --config pipelines/configs/demo_cpu.yaml [--dry-run]
    prefsift report   runs/real
    prefsift compare  runs/real --rules pvar_top,random,margin_curriculum,pd_consensus
    prefsift simulate-adaptive --input rated.jsonl.gz adaptive.rule=ucb

`--dry-run` prints the resolved config, the stage plan with each stage's resources and the tokens to be
generated, then exits without starting Ray. A config mistake is one line naming the key, the bad value and
the allowed values, with exit code 2. A pipeline ends with the run's summary table and report path.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.runtime.config import (
    ConfigError,
    CurateConfig,
    check_choice,
    load_config,
    resolve_path,
    to_dict,
)
from pipelines.runtime.entry import run_cli

COMMANDS = {
    "curate": "read -> (generate -> score | ingest) -> stats -> selection -> pairs",
    "select": "re-run selection and pairing over a run's stats/",
    "train": "DPO / IPO / SFT / MixDPO on curated pairs (Ray Train)",
    "evaluate": "RM-judged win rate of a policy against its reference",
    "run": "curate -> train -> evaluate -> report in one run folder",
    "report": "(re)write a run folder's report/index.html",
    "compare": "several selection rules side by side on a run's statistics",
    "simulate-adaptive": "adaptive sampling replayed over rated data: recall of the PVar selection vs samples",
    "audit": "per-prompt DPO gradient norm against PVar at a policy (the PVar paper's bound), with a plot",
    "ablate": "selection rules at one budget: train each, win rates side by side (pipelines/ablate.py)",
}


def check_curate(cfg: CurateConfig) -> None:
    """What the typed parse cannot see, checked before Ray starts rather than after minutes of scoring."""
    from operators.select import SELECTORS

    if not cfg.input.path:
        raise ConfigError("input.path: is empty; set it in the config or with input.path=...")
    check_choice("select.rule", cfg.select.rule, SELECTORS)
    if cfg.select.fraction is not None and not 0.0 <= cfg.select.fraction <= 1.0:
        raise ConfigError(f"select.fraction: {cfg.select.fraction} is not allowed (a fraction in [0, 1])")
    if cfg.select.fraction is not None and cfg.select.count is not None:
        raise ConfigError("select.fraction and select.count: set one of them, not both")
    if cfg.generate.num_samples < 1:
        raise ConfigError(f"generate.num_samples: {cfg.generate.num_samples} is not allowed (at least 1)")


# ----------------------------------------------------------------------------------------------------------
# Dry run: what would run, on what resources, and how many tokens it would generate
# ----------------------------------------------------------------------------------------------------------


@dataclass
class InputInfo:
    path: str
    prompts: int | None  # None: not countable without reading the data (remote input)
    schema: str  # prompts | rated | binarized | unknown
    note: str = ""


def _count_records(path: str) -> int:
    """The rows a JSONL read makes: its own files, decompression and record rules (operators.jsonl: every
    compression it detects, blank lines skipped, BOM and CRLF stripped, a JSON array's items); a bad line
    still counts, as the read turns it into a quarantined row."""
    from operators.jsonl import list_files, read_records

    n = 0
    for fs, file in list_files(path):
        with fs.open_input_stream(file, compression="detect") as f:
            n += sum(1 for _ in read_records(f, file))
    return n


def inspect_input(path: str, fmt: str, schema: str, limit: int | None,
                  peek_lines: int | None = None) -> InputInfo:
    """Prompt count and schema as the reader (operators.read.read_input) will see them, without Ray: parquet
    row counts from the footers, JSONL records counted and columns peeked by the JSONL reader's functions,
    a saved data set's split as read_input picks it. A count reads every JSONL line once."""
    from operators.jsonl import PEEK_LINES, peek_columns
    from operators.read import detect_format, detect_schema, load_hf_disk

    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        if fmt == "parquet":
            import pyarrow.dataset as pads

            ds = pads.dataset(path, format="parquet")
            n, cols = ds.count_rows(), ds.schema.names  # row counts come from the footers
        elif fmt == "jsonl" and "://" not in path:
            cols = peek_columns(path, PEEK_LINES if peek_lines is None else peek_lines)[0]
            n = _count_records(path)
        elif fmt == "hf_disk":
            hf = load_hf_disk(path)
            n, cols = len(hf), hf.column_names
        else:
            return InputInfo(path, None, schema if schema != "auto" else "unknown", "remote: not counted")
    except Exception as e:  # a dry run reports what it cannot see instead of failing on it
        return InputInfo(path, None, schema if schema != "auto" else "unknown", f"could not inspect: {e}")
    n = n if limit is None else min(n, limit)
    return InputInfo(path, n, detect_schema(cols) if schema == "auto" else schema)


def _resources(module: str, fn: str, section: Any, fallback: Callable[[Any], dict[str, Any]]) -> str:
    """An operator's declared resources through its own function, or the config's numbers if it is missing."""
    try:
        res = getattr(importlib.import_module(module), fn)(section)
        r = {"cpus": res.num_cpus, "gpus": res.num_gpus, "actors": res.concurrency, "batch": res.batch_size}
        note = ""
    except Exception as e:  # the operator module may not have landed, or may need an absent extra
        r, note = fallback(section), f"  (from config: {module}.{fn} unavailable: {type(e).__name__})"
    return f"{r['actors']} actor(s) x {r['cpus']:g} CPU, {r['gpus']:g} GPU, batch {r['batch']}{note}"


def _gen_fallback(g: Any) -> dict[str, Any]:
    gpus = g.tensor_parallel_size * g.pipeline_parallel_size if g.backend == "vllm" else g.num_gpus_per_worker
    return {"cpus": g.num_cpus, "gpus": float(gpus), "actors": g.concurrency, "batch": g.prompts_per_call()}


def _score_fallback(s: Any) -> dict[str, Any]:
    return {"cpus": s.num_cpus, "gpus": s.num_gpus, "actors": s.concurrency, "batch": s.batch_size}


def generation_plan(inp: InputInfo, gen: Any, score: Any,
                    model: str | None = None) -> tuple[list[tuple[str, str, str]], int | None]:
    model = model or gen.model or "(unset)"
    rows = [("samples", f"{gen.backend} generate, {gen.num_samples} per prompt, model {model}",
             _resources("operators.generate", "generator_resources", gen, _gen_fallback)),
            ("scored", f"reward models: {', '.join(m.path for m in score.models) or '(none set)'}",
             _resources("operators.score", "scorer_resources", score, _score_fallback))]
    tokens = None if inp.prompts is None else inp.prompts * gen.num_samples * gen.max_tokens
    return rows, tokens


def curate_plan(cfg: CurateConfig) -> tuple[list[tuple[str, str, str]], InputInfo, int | None]:
    inp = inspect_input(resolve_path(cfg.input.path), cfg.input.format, cfg.input.schema, cfg.input.limit,
                        cfg.input.peek_lines)
    rows = [("prompts", "read, validate, set aside empty prompts and duplicate ids", "Ray tasks, 1 CPU each")]
    tokens: int | None = 0
    if inp.schema in ("prompts", "unknown"):
        gen_rows, tokens = generation_plan(inp, cfg.generate, cfg.score)
        rows += gen_rows
    else:
        rows.append(("scored", "ingest the ratings that came with the data (no generation)", "Ray tasks"))
    sc = cfg.select
    budget = f"count {sc.count}" if sc.count is not None else f"fraction {sc.fraction or 'rule default'}"
    rows += [("stats", f"PVar / margin / PD per prompt, tau {cfg.stats.tau:g}, length_debias "
                       f"{cfg.stats.length_debias}", "a map over prompt rows, no shuffle"),
             ("selection", f"rule {cfg.select.rule}, {budget}", "driver, key columns only"),
             ("pairs", "TRL prompt / chosen / rejected", "Ray tasks")]
    return rows, inp, tokens


def _print_plan(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n# stage plan: {title}")
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for stage, what, res in rows:
        print(f"  {stage.ljust(w0)}  {what.ljust(w1)}  {res}")


def _print_input(inp: InputInfo) -> None:
    count = f"{inp.prompts:,} prompts" if inp.prompts is not None else f"prompts not counted ({inp.note})"
    print(f"\n# input: {inp.path}: {count}, schema {inp.schema}")


def _print_tokens(label: str, inp: InputInfo, gen: Any, tokens: int | None) -> None:
    if tokens is None:
        print(f"# tokens to generate ({label}): unknown ({inp.note})")
    elif tokens == 0:
        print(f"# tokens to generate ({label}): 0 (the input is already {inp.schema})")
    else:
        print(f"# tokens to generate ({label}): {inp.prompts:,} prompts x {gen.num_samples} samples x "
              f"{gen.max_tokens} max_tokens = {tokens:,} (at most)")


def dry_run_curate(cfg: CurateConfig) -> None:
    print("# resolved config (curate)")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    rows, inp, tokens = curate_plan(cfg)
    _print_input(inp)
    _print_plan(f"curate -> {cfg.output.dir}", rows)
    _print_tokens("curate", inp, cfg.generate, tokens)
    if cfg.generate.adaptive is not None and inp.schema in ("prompts", "unknown"):
        _print_adaptive(cfg, inp)
    print("# dry run: nothing was started or written")


def _print_adaptive(cfg: CurateConfig, inp: InputInfo) -> None:
    from pipelines.runtime.rounds import adaptive_cfg, planned_samples

    a, k = adaptive_cfg(cfg), cfg.generate.num_samples
    if inp.prompts is None:
        print(f"# adaptive sampling ({a.rule}): samples not estimated, prompts not counted")
        return
    low, high, exact = planned_samples(inp.prompts, a, k)
    full, tok = inp.prompts * k, cfg.generate.max_tokens
    span = f"{low:,} ({low / full:.0%})" if exact else f"{low:,} to {high:,} ({low / full:.0%} to {high / full:.0%})"
    fewest = ("k0 each (z_in: a prompt sure to make the cut may stop there too)" if a.z_in is not None
              else "k0 each, the selected fraction on to num_samples")
    how = "exact for rank" if exact else f"{fewest}; at most a full run"
    print(f"# adaptive sampling ({a.rule}, k0 {a.k0}, step {a.step}): samples {span} of {full:,} for a full "
          f"run ({how}); tokens at most {low * tok:,}" + ("" if exact else f" to {high * tok:,}"))


def dry_run_run(cfg: Any) -> None:
    from dataclasses import replace

    out = cfg.output.dir or cfg.curate.output.dir
    cur = replace(cfg.curate, output=replace(cfg.curate.output, dir=out))
    print("# resolved config (run)")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    rows, inp, tokens = curate_plan(cur)
    total = tokens
    if not cfg.skip_train:
        t = cfg.train
        ref = t.reference
        steps = f"{t.optim.max_steps} steps" if t.optim.max_steps else f"{t.optim.epochs:g} epochs"
        gpu = f", {t.scaling.gpus_per_worker:g} GPU" if t.scaling.use_gpu else ""
        rows += [("pairs_ref", f"reference log-probs of {ref.model or t.model.policy or '(policy)'}",
                  f"{ref.concurrency} actor(s) x {ref.num_cpus:g} CPU, {ref.num_gpus:g} GPU"),
                 ("train", f"loss {t.loss.name}, beta {t.loss.beta:g}, {steps}, batch "
                           f"{t.optim.per_device_batch_size}x{t.optim.grad_accum} per worker",
                  f"{t.scaling.num_workers} worker(s) x {t.scaling.cpus_per_worker:g} CPU{gpu}")]
        if not cfg.skip_evaluate:
            ev = cfg.evaluate
            einp = inspect_input(resolve_path(ev.input.path), ev.input.format, "prompts", ev.input.limit)
            models = {"policy": "(the final train checkpoint)", "reference": ev.reference or t.model.policy}
            for who, model in models.items():
                gen_rows, etok = generation_plan(einp, ev.generate, ev.score, model)
                rows += [(f"eval_{who}", what, res) for _, what, res in gen_rows]
            total = None if tokens is None or etok is None else tokens + 2 * etok
    _print_input(inp)
    _print_plan(f"run -> {out}", rows)
    _print_tokens("curate", inp, cur.generate, tokens)
    if total is not None and total != tokens:
        print(f"# tokens to generate (curate + evaluation of policy and reference): {total:,} (at most)")
    print("# dry run: nothing was started or written")


# ----------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------


def _finish(run_dir: str) -> None:
    """The end of every pipeline: a fresh report and the summary table."""
    from pipelines.reporting.report import print_summary, write_report

    path = write_report(run_dir)
    print_summary(run_dir)
    print(f"report: {path}")


# The override example each command's --help shows.
EXAMPLES = {"audit": "input.sample=64", "ablate": "'seeds=[0,1]'"}
# Commands whose module holds its typed config (CONFIG), validate() and main(), and prints its own result.
SELF_CONTAINED = ("audit", "ablate")


def config_command(name: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"prefsift {name}", description=COMMANDS[name],
                                 epilog=f"overrides: key.sub=value (YAML values), e.g. "
                                        f"{EXAMPLES.get(name, 'select.fraction=0.1')}")
    ap.add_argument("--config", help="YAML config file")
    if name in ("curate", "run"):
        ap.add_argument("--dry-run", action="store_true",
                        help="print the config, the stage plan and the token count; run nothing")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(argv)

    # Everything that can be checked without Ray is checked here, so that a mistake neither starts Ray nor
    # leaves an empty run folder. Errors are printed by pipelines.runtime.entry, one way for every entry point.
    if name in ("curate", "select"):
        cfg = load_config(CurateConfig, args.config, args.overrides)
        check_curate(cfg)
        marker = os.path.join(cfg.output.dir, "stats", "_SUCCESS")
        if name == "select" and "://" not in marker and not os.path.exists(marker):
            raise FileNotFoundError(f"{cfg.output.dir} has no complete stats/ stage; "
                                    "run `prefsift curate` first")
    elif name == "run":
        from pipelines.run import RunConfig  # lazily: it imports the training stack

        cfg = load_config(RunConfig, args.config, args.overrides)
        check_curate(cfg.curate)
    elif name in SELF_CONTAINED:
        module = importlib.import_module(f"pipelines.{name}")
        cfg = load_config(module.CONFIG, args.config, args.overrides)
        module.validate(cfg)
        module.main(cfg)
        return 0
    elif name == "train":
        from pipelines import train_dpo

        cfg = load_config(train_dpo.TrainConfig, args.config, args.overrides)
        train_dpo.validate(cfg)
    else:
        from pipelines.evaluate import EvaluateConfig

        cfg = load_config(EvaluateConfig, args.config, args.overrides)
    if getattr(args, "dry_run", False):
        (dry_run_curate if name == "curate" else dry_run_run)(cfg)
        return 0
    module = importlib.import_module(f"pipelines.{'train_dpo' if name == 'train' else name}")
    module.main(cfg)
    if name == "run":
        if not cfg.report:  # with report on, pipelines.run prints the summary and report itself
            from pipelines.reporting.report import print_summary

            print_summary(cfg.output.dir or cfg.curate.output.dir)
    else:
        _finish(cfg.output.dir)
    return 0


def usage() -> str:
    lines = ["usage: prefsift COMMAND [--config FILE] [key.sub=value ...]", "", "commands:"]
    lines += [f"  {k:<9} {v}" for k, v in COMMANDS.items()]
    lines += ["", "`prefsift COMMAND --help` for a command's options."]
    return "\n".join(lines)


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"prefsift: unknown command {cmd!r}{hint} (choose one of {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    if cmd == "simulate-adaptive":
        return importlib.import_module("pipelines.tools.simulate_adaptive").main(rest)
    if cmd in ("report", "compare"):
        return importlib.import_module(f"pipelines.reporting.{cmd}").main(rest)
    return config_command(cmd, rest)


def main(argv: list[str] | None = None) -> int:
    """The console script, and what each `python -m pipelines.<recipe>` runs: one way to end on an error."""
    return run_cli(dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
