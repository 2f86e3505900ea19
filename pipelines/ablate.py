"""Show that selection trains better models: several selection rules at the same budget, each trained and
evaluated against the same reference, on the same held-out prompts, with the same judge, over seeds.

    python -m pipelines.ablate --config pipelines/configs/ablate_demo_cpu.yaml
    python -m pipelines.ablate --config pipelines/configs/ablate_demo_cpu.yaml 'seeds=[0,1,2]' train.optim.max_steps=40

Reads one curation run folder's stats/ (nothing is regenerated or rescored) and writes into its ablate/:
  <rule>-s<seed>/               selection/ and pairs/ for that rule and seed (the rule's tie-break seed)
  <rule>-<loss>-s<seed>/        a train_dpo run folder (pairs_ref/, train/ with checkpoints and metrics.jsonl)
  eval/                         the evaluation stages: the reference's samples are made once (their stage
                                fingerprint is the same for every cell), each policy's replace the last one's
  cells.json                    each finished training and evaluation, with the fingerprint it ran under
and the side-by-side table (win rate, bootstrap 95% CI) with the training curves into <run>/report/ablate.html.
A rerun skips every training and evaluation whose fingerprint is recorded in cells.json, and every selection
stage whose _SUCCESS holds its fingerprint.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from operators.base import InputError
from pipelines import evaluate, train_dpo
from pipelines.evaluate import EvaluateConfig
from pipelines.runtime.config import (
    ConfigError,
    CurateConfig,
    RayCfg,
    RunCfg,
    SelectCfg,
    check_choice,
    fingerprint,
    resolve_path,
    to_dict,
)
from pipelines.runtime.console import say
from pipelines.runtime.manifest import SUCCESS, RunDir
from pipelines.train_dpo import TrainConfig

ATTEMPT = "ablate_attempt"  # in a cell's training folder: the fingerprint it was (or is being) trained under


@dataclass(frozen=True)
class RuleCfg:
    rule: str = "pvar_top"
    name: str | None = None  # the row label; null: the rule's name
    losses: list[str] | None = None  # this rule's losses (margin_curriculum: [mixdpo]); null: the ablation's
    margin_tau: float | None = None
    sft_quantile: float | None = None
    stratify_by: str | None = None
    column: str | None = None
    min: float | None = None
    max: float | None = None


def _default_rules() -> list[RuleCfg]:
    return [RuleCfg("pvar_top"), RuleCfg("random"), RuleCfg("pvar_bottom")]


@dataclass(frozen=True)
class AblateConfig:
    run_dir: str = ""  # a curation run folder with a complete stats/
    rules: list[RuleCfg] = field(default_factory=_default_rules)
    # The one budget every rule selects: a fraction of the prompts, or a count (exclusive).
    fraction: float | None = None
    count: int | None = None
    losses: list[str] = field(default_factory=lambda: ["sigmoid"])
    seeds: list[int] = field(default_factory=lambda: [0])  # selection tie-break and training seed
    train: TrainConfig = field(default_factory=TrainConfig)  # input, output, run and loss.name are set per cell
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # reference: null is train.model.policy
    ray: RayCfg = field(default_factory=RayCfg)


@dataclass(frozen=True)
class Cell:
    rule: RuleCfg
    loss: str
    seed: int

    @property
    def label(self) -> str:
        return self.rule.name or self.rule.rule

    @property
    def selection(self) -> str:
        return f"{self.label}-s{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.label}-{self.loss}-s{self.seed}"


def cells(cfg: AblateConfig) -> list[Cell]:
    return [Cell(r, loss, seed) for r in cfg.rules for loss in (r.losses or cfg.losses) for seed in cfg.seeds]


CONFIG = AblateConfig  # `prefsift ablate` parses this (pipelines/tools/cli.py)


def validate(cfg: AblateConfig) -> None:
    """Everything checkable before Ray starts."""
    from operators.select import SELECTORS
    from pipelines.training.losses import LOSSES

    if not cfg.run_dir:
        raise ConfigError("run_dir: is empty; name a curation run folder (its stats/ is read)")
    if "://" not in cfg.run_dir and not Path(resolve_path(cfg.run_dir), "stats", SUCCESS).exists():
        raise FileNotFoundError(f"{cfg.run_dir} has no complete stats/ stage; run `prefsift curate` first")
    if not cfg.rules or not cfg.seeds:
        raise ConfigError("rules and seeds: each needs at least one entry")
    if (cfg.fraction is None) == (cfg.count is None):
        raise ConfigError("fraction and count: set exactly one, the budget every rule selects")
    if cfg.fraction is not None and not 0.0 < cfg.fraction <= 1.0:
        raise ConfigError(f"fraction: {cfg.fraction} is not allowed (a fraction in (0, 1])")
    for i, r in enumerate(cfg.rules):
        check_choice(f"rules[{i}].rule", r.rule, SELECTORS)
        for loss in r.losses or cfg.losses:
            check_choice(f"rules[{i}].losses" if r.losses else "losses", loss, LOSSES)
    names = [c.name for c in cells(cfg)]
    if len(set(names)) != len(names):
        raise ConfigError("rules: two rules share a label; give one a `name`")
    train_dpo.validate(replace(cfg.train, input=replace(cfg.train.input, path=cfg.run_dir)))
    if not cfg.evaluate.input.path or not cfg.evaluate.score.models:
        raise ConfigError("evaluate.input.path and evaluate.score.models: held-out prompts and a judge are needed")
    if not (cfg.evaluate.reference or cfg.train.model.policy):
        raise ConfigError("evaluate.reference: is empty and so is train.model.policy")


def select_cfg(cfg: AblateConfig, cell: Cell) -> CurateConfig:
    r = cell.rule
    sc = SelectCfg(rule=r.rule, fraction=cfg.fraction, count=cfg.count, stratify_by=r.stratify_by,
                   seed=cell.seed, margin_tau=r.margin_tau, sft_quantile=r.sft_quantile, column=r.column,
                   min=r.min, max=r.max)
    return CurateConfig(run=RunCfg(seed=cell.seed), select=sc)


class Ledger:
    """cells.json: each finished training or evaluation under the fingerprint it ran with. Written whole
    after each one (RunDir.write_text is atomic), so a killed run keeps everything finished before it."""

    def __init__(self, run: RunDir):
        self.run = run
        self.data: dict[str, Any] = json.loads(run.read_text("cells.json")) if run.exists("cells.json") else {}

    def done(self, key: str, fp: str) -> dict[str, Any] | None:
        rec = self.data.get(key)
        return rec["summary"] if rec and rec.get("fingerprint") == fp else None

    def commit(self, key: str, fp: str, summary: dict[str, Any]) -> None:
        self.data[key] = {"fingerprint": fp, "summary": summary}
        self.run.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str), "cells.json")


def train_cell(cfg: AblateConfig, cell: Cell, src: RunDir, stats_fp: str, abl: RunDir,
               ledger: Ledger) -> tuple[dict[str, Any], str]:
    """One cell's selection, pairs and training (skipped when cells.json holds it under the same
    fingerprint): (train_dpo's summary, the training fingerprint). Also the study with a known ground truth
    (benchmarks/study_ground_truth.py), which judges the policies with its own gold reward."""
    from pipelines.select import run_selection

    # --- selection -> pairs for this rule and seed, from the run's statistics ------------------------------
    sel_run = RunDir(abl.uri_of(cell.selection))
    sel = run_selection(sel_run, select_cfg(cfg, cell), stats_fp, stats_run=src)
    pairs_fp = sel_run.read_text("pairs", SUCCESS).strip()
    if sel["pairs"].rows_out == 0:
        # Ray Train would fail deep inside a worker ("rank 0 holds 0 pairs"); the cause is the data.
        raise InputError(f"ablate {cell.name}: rule {cell.label} keeps {sel['pairs'].rows_in} prompts at this "
                         f"budget and none of them has two responses with different scores, so it leaves no pair "
                         f"to train on; raise fraction/count or leave the rule out (selection: {sel_run.uri})")

    # --- train: one train_dpo run folder per cell -----------------------------------------------------------
    tc = cfg.train
    tcfg = replace(tc, run=replace(tc.run, name=cell.name, seed=cell.seed),
                   input=replace(tc.input, path=sel_run.uri), output=replace(tc.output, dir=abl.uri_of(cell.name)),
                   loss=replace(tc.loss, name=cell.loss, weights=None), ray=cfg.ray)
    train_fp = fingerprint(tcfg, pairs_fp)
    trained = ledger.done(f"{cell.name}/train", train_fp)
    if trained is None:
        # train_dpo resumes from the last checkpoint under its run name: right for a killed attempt of the
        # same cell, wrong for one trained under another config, whose folder is cleared first.
        if abl.exists(cell.name, ATTEMPT) and abl.read_text(cell.name, ATTEMPT).strip() != train_fp:
            abl.remove(cell.name)
        abl.fs.create_dir(abl.path(cell.name), recursive=True)
        abl.write_text(train_fp, cell.name, ATTEMPT)
        say(f"ablate {cell.name}: training on {sel['pairs'].rows_out} pairs")
        trained = train_dpo.main(tcfg)
        ledger.commit(f"{cell.name}/train", train_fp, trained)
    else:
        say(f"ablate {cell.name}: trained already, skipped")
    return trained, train_fp


def main(cfg: AblateConfig) -> dict[str, Any]:
    from pipelines.runtime.ray_start import init_ray

    # --- setup: check everything, start (or join, RAY_ADDRESS) Ray -----------------------------------------
    validate(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    src = RunDir(resolve_path(cfg.run_dir))
    if not src.exists("stats", SUCCESS):
        raise FileNotFoundError(f"{cfg.run_dir} has no complete stats/ stage; run `prefsift curate` first")
    stats_fp = src.read_text("stats", SUCCESS).strip()
    abl = RunDir(src.uri_of("ablate"))
    abl.start("ablate", to_dict(cfg))
    ledger = Ledger(abl)
    reference = cfg.evaluate.reference or cfg.train.model.policy
    eval_base = replace(cfg.evaluate, output=replace(cfg.evaluate.output, dir=abl.uri_of("eval")),
                        reference=reference, ray=cfg.ray)

    rows = []
    for cell in cells(cfg):
        trained, train_fp = train_cell(cfg, cell, src, stats_fp, abl, ledger)

        # --- evaluate against the same reference, prompts and judge ------------------------------------------
        ecfg = replace(eval_base, policy=trained["checkpoint"])
        eval_fp = fingerprint(ecfg, train_fp)
        ev = ledger.done(f"{cell.name}/evaluate", eval_fp)
        if ev is None:
            ev = evaluate.main(ecfg)
            ledger.commit(f"{cell.name}/evaluate", eval_fp, ev)
        else:
            say(f"ablate {cell.name}: evaluated already, skipped")
        rows.append({"rule": cell.label, "loss": cell.loss, "seed": cell.seed, "pairs": trained["pairs"],
                     "steps": trained["steps"], "win_rate": ev["win_rate"], "ci95": ev["ci95"],
                     "prompts": ev["prompts"], "train_dir": abl.uri_of(cell.name)})

    page = write_page(src, rows, cfg)
    abl.set("table", rows)
    say(f"ablation: {len(rows)} trained policies; table in {page}")
    return {"table": rows, "page": page, "ablate_dir": abl.uri}


# ----------------------------------------------------------------------------------------------------------
# The report page: the side-by-side table and the training curves
# ----------------------------------------------------------------------------------------------------------


def table_text(rows: list[dict[str, Any]]) -> str:
    head = f"{'rule':<20} {'loss':<8} {'seed':>4} {'pairs':>6} {'win rate':>9}  95% CI"
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"{r['rule']:<20} {r['loss']:<8} {r['seed']:>4} {r['pairs']:>6} {r['win_rate']:>9.3f}  "
                     f"[{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> str | None:
    """Training loss against step, one line per cell: a colour per rule, a line style per seed."""
    from matplotlib.figure import Figure

    from pipelines.reporting.plots import read_metrics

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    colours = {}
    drawn = 0
    for r in rows:
        metrics = [m for m in read_metrics(RunDir(r["train_dir"])) if isinstance(m.get("loss"), (int, float))]
        if not metrics:
            continue
        key = (r["rule"], r["loss"])
        colours.setdefault(key, f"C{len(colours) % 10}")
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color=colours[key],
                ls=("-", "--", ":", "-.")[r["seed"] % 4], lw=1.4, label=f"{r['rule']} {r['loss']} s{r['seed']}")
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablate_training.png", dpi=100)
    return "ablate_training.png"


def write_page(src: RunDir, rows: list[dict[str, Any]], cfg: AblateConfig) -> str:
    """report/ablate.html (a page of its own beside the run's report, which pipelines.reporting writes),
    ablate.json and ablate.txt; drawn in a local folder, then copied when the run folder is a URI."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(src.path("report")) if "://" not in src.uri else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        curves = plot_curves(rows, out)
        files = {"ablate.html": page_html(src, rows, cfg, curves), "ablate.txt": table_text(rows) + "\n",
                 "ablate.json": json.dumps(rows, indent=2)}
        for name, body in files.items():
            (out / name).write_text(body)
        if "://" in src.uri:
            for name in [*files, *([curves] if curves else [])]:
                with src.fs.open_output_stream(src.path("report", name)) as dst:
                    dst.write((out / name).read_bytes())
    print(table_text(rows))
    return src.uri_of("report", "ablate.html")


def page_html(src: RunDir, rows: list[dict[str, Any]], cfg: AblateConfig, curves: str | None) -> str:
    budget = f"fraction {cfg.fraction}" if cfg.fraction is not None else f"count {cfg.count}"
    reference = cfg.evaluate.reference or cfg.train.model.policy
    judges = ", ".join(m.path for m in cfg.evaluate.score.models)
    body = "".join(
        f"<tr><td>{html.escape(r['rule'])}</td><td>{html.escape(r['loss'])}</td><td>{r['seed']}</td>"
        f"<td>{r['pairs']}</td><td>{r['steps']}</td><td><b>{r['win_rate']:.3f}</b></td>"
        f"<td>[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]</td><td>{r['prompts']}</td></tr>" for r in rows)
    return (
        "<!doctype html><meta charset='utf-8'><title>prefsift ablation</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .8em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}</style>"
        f"<h1>Selection rules side by side</h1><p>Budget: {html.escape(budget)} of the prompts of "
        f"{html.escape(src.uri)}. Each policy against the reference {html.escape(reference)} on the same "
        f"held-out prompts, judged by {html.escape(judges)}. Win rate: 1 a win, 0.5 a tie, per prompt "
        "averaged over its samples; 95% CI: percentile bootstrap over prompts.</p>"
        "<table><tr><th>rule</th><th>loss</th><th>seed</th><th>pairs</th><th>steps</th><th>win rate</th>"
        f"<th>95% CI</th><th>prompts</th></tr>{body}</table>"
        + (f"<h2>Training curves</h2><img src='{curves}' alt='training loss per cell'>" if curves else "")
    )


if __name__ == "__main__":
    # The same path as `prefsift ablate`: the same checks before Ray, the same one-line errors.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["ablate", *sys.argv[1:]]))
