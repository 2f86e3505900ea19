"""A selection study with a known ground truth, on CPU: does training on the top-PVar prompts give a better
policy than random or bottom-PVar prompts at the same budget, and MixDPO better than DPO on the margin
curriculum, when "better" is a reward we wrote down? (Not part of CI; minutes on 2 cores.)

    python benchmarks/study_ground_truth.py                      # the full study, results into --out
    python benchmarks/study_ground_truth.py --seeds 1 --pool 120 --heldout 24 --quick   # a smoke run

1. Tiny policy with a reason for PVar to vary: the tiny random Llama (pipelines.tools.tiny_models) trained
   briefly by a plain next-token loop (benchmarks/study_gold.py) on two prompt families: "Recite line N about
   TOPIC." has one fixed answer per topic (near-deterministic samples, low PVar), "Write line N about TOPIC."
   any sentence of a small grammar (diverse samples, high PVar).
2. Curation, the real pipeline (pipelines.curate): vLLM generation on CPU, K samples a prompt, scored by the
   gold function reward `benchmarks.study_gold:gold_reward` (score.functions), statistics, every prompt paired.
3. `prefsift ablate`'s cells (pipelines.ablate.train_cell: selection -> pairs -> train_dpo on Ray Train) at
   one budget, 10% of the prompts: pvar_top, random, pvar_bottom with DPO, and margin_curriculum with MixDPO
   and with DPO, each over the seeds (selection tie-break and training seed).
4. Each trained policy and the starting one generate on held-out prompts of both families (the Generator
   operator, the same per-sample seeds for every policy) and the gold function scores them: mean gold reward
   with a percentile bootstrap 95% CI over prompts, per policy and per arm (seeds pooled), and each arm's
   paired difference from random.
5. `prefsift audit` on a top-PVar policy: per-prompt DPO gradient norm against the policy-implied PVar.

Writes <out>/study.json and the plot; --save copies them to benchmarks/results/<date>-study-<hardware>.*.
Run it on an otherwise quiet machine when its wall time matters (it is not a speed benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# benchmarks.* for this driver. Ray's actors import the gold reward through the working directory that Ray
# adds to their path: run the script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, study_gold  # common sets the offline, quiet environment

GOLD = "benchmarks.study_gold:gold_reward"
ARMS = [("pvar_top", "sigmoid"), ("random", "sigmoid"), ("pvar_bottom", "sigmoid"),
        ("margin_curriculum", "mixdpo"), ("margin_curriculum", "sigmoid")]


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def curate(a: argparse.Namespace, out: Path, policy: str, pool: Path) -> dict:
    from pipelines import curate as curate_recipe
    from pipelines.runtime.config import (
        CurateConfig,
        GenerateCfg,
        InputCfg,
        OutputCfg,
        RayCfg,
        RunCfg,
        ScoreCfg,
        SelectCfg,
        StatsCfg,
    )

    gen = GenerateCfg(backend=a.gen_backend, model=policy, num_samples=a.k, temperature=a.temperature, top_p=1.0,
                      max_tokens=a.max_tokens, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                      num_cpus=1.0)
    cfg = CurateConfig(run=RunCfg(name="study", seed=0), input=InputCfg(path=str(pool)),
                       output=OutputCfg(dir=str(out / "run")), generate=gen,
                       score=ScoreCfg(functions=[GOLD], num_cpus=0.5), stats=StatsCfg(tau=1.0),
                       # Every prompt paired: the audit samples prompts across the whole PVar range.
                       select=SelectCfg(rule="pvar_top", fraction=1.0),
                       ray=RayCfg(num_cpus=2, object_store_memory_gb=1.0, progress=False))
    return curate_recipe.main(cfg)


def ablate_cfg(a: argparse.Namespace, out: Path, policy: str):
    from pipelines.ablate import AblateConfig, RuleCfg
    from pipelines.runtime.config import RayCfg
    from pipelines.train_dpo import (
        CheckpointCfg,
        LossCfg,
        ModelCfg,
        OptimCfg,
        ReferenceCfg,
        ScalingCfg,
        TrainConfig,
        TrainInputCfg,
    )

    train = TrainConfig(
        input=TrainInputCfg(max_length=128), model=ModelCfg(policy=policy),
        reference=ReferenceCfg(micro_batch_size=16, num_cpus=1.0), loss=LossCfg(beta=a.beta),
        optim=OptimCfg(lr=a.lr, warmup_steps=1, epochs=a.epochs, per_device_batch_size=8),
        scaling=ScalingCfg(num_workers=1, cpus_per_worker=1.0), checkpoint=CheckpointCfg(every_n_steps=0, keep=1))
    rules = [RuleCfg("pvar_top"), RuleCfg("random"), RuleCfg("pvar_bottom"),
             # MixDPO's curriculum: the smallest-margin quarter of the selected pairs trains with SFT.
             RuleCfg("margin_curriculum", losses=["mixdpo", "sigmoid"], sft_quantile=0.25)]
    return AblateConfig(run_dir=str(out / "run"), rules=rules, fraction=a.fraction, losses=["sigmoid"],
                        seeds=list(range(a.seeds)), train=train,
                        ray=RayCfg(num_cpus=2, object_store_memory_gb=1.0, progress=False))


def train_cells(cfg, stop_at: float):
    """Every cell through prefsift ablate's own selection and training (resumable via ablate/cells.json; not
    ablate.validate, which asks for ablate's model judge: the gold function judges here),
    seed by seed so that each seed's round is a complete comparison; yields (cell name, record). No round
    after the first starts past `stop_at` (time.perf_counter)."""
    from pipelines import ablate, train_dpo
    from pipelines.runtime.config import resolve_path
    from pipelines.runtime.manifest import SUCCESS, RunDir
    from pipelines.runtime.ray_start import init_ray
    from pipelines.select import run_selection

    train_dpo.validate(replace(cfg.train, input=replace(cfg.train.input, path=cfg.run_dir)))
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    src = RunDir(resolve_path(cfg.run_dir))
    stats_fp = src.read_text("stats", SUCCESS).strip()
    abl = RunDir(src.uri_of("ablate"))
    abl.start("ablate", {"study": True})
    ledger = ablate.Ledger(abl)
    started: set[int] = set()
    for cell in sorted(ablate.cells(cfg), key=lambda c: c.seed):
        t0 = time.perf_counter()
        if cell.seed not in started and started and t0 > stop_at:
            print(f"study: no round for seed {cell.seed}, past --stop-after-min", flush=True)
            return
        started.add(cell.seed)
        # The selection stage first (train_cell then finds it done): a budget of prompts whose samples all
        # scored the same leaves no pair (all_rewards_equal), nothing to train; the arm is the start policy.
        sel = run_selection(RunDir(abl.uri_of(cell.selection)), ablate.select_cfg(cfg, cell), stats_fp,
                            stats_run=src)
        rec = {"rule": cell.label, "loss": cell.loss, "seed": cell.seed, "pairs": 0, "steps": 0,
               "checkpoint": cfg.train.model.policy}
        if sel["pairs"].rows_out > 0:
            trained, _ = ablate.train_cell(cfg, cell, src, stats_fp, abl, ledger)
            rec.update(pairs=trained["pairs"], steps=trained["steps"], checkpoint=trained["checkpoint"])
        rec["train_s"] = round(time.perf_counter() - t0, 1)
        yield cell.name, rec


def gold_eval(policy: str, prompts: list[dict], a: argparse.Namespace, seed: int) -> np.ndarray:
    """(prompts,) mean gold reward of each held-out prompt's k samples from `policy`: the Generator and the
    FunctionScorer operators called in this process, the same per-sample seeds for every policy."""
    import pyarrow as pa

    from operators.generate import GenerateCfg, Generator
    from operators.reward_functions import FunctionScorer
    from operators.score import ScoreCfg

    gen = Generator(GenerateCfg(backend="hf", model=policy, num_samples=a.eval_k, temperature=a.temperature,
                                top_p=1.0, max_tokens=a.max_tokens, dtype="float32", max_model_len=256), seed=seed)
    scorer = FunctionScorer(ScoreCfg(functions=[GOLD]))
    table = pa.Table.from_pylist(prompts)

    async def run() -> list[pa.Table]:
        return [await gen(table.slice(i, 16)) for i in range(0, table.num_rows, 16)]

    rows = [r for t in asyncio.run(run()) for r in scorer(t).to_pylist()]
    by_id = {r["prompt_id"]: np.mean([s["overall"] for s in r["responses"]]) for r in rows}
    return np.array([by_id[p["prompt_id"]] for p in prompts])


def bootstrap_ci(x: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """Percentile bootstrap 95% CI of the mean of x over its last axis (prompts), resampling prompts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[-1], size=(n_boot, x.shape[-1]))
    boots = x[..., idx].mean(axis=-1)
    return [float(v) for v in np.quantile(boots, [0.025, 0.975])]


def summarise(rewards: dict[str, np.ndarray], cells: dict[str, dict], families: np.ndarray,
              n_boot: int) -> list[dict]:
    """One row per arm: mean gold reward over its seeds (each seed's mean too), CIs over prompts, the paired
    difference from random (same prompts, same sample seeds), and the mean on each prompt family."""
    keys = dict.fromkeys(f"{c['rule']} {c['loss']}" for c in cells.values())
    arms = {"start": np.stack([rewards["start"]])}
    for key in keys:
        arms[key] = np.stack([rewards[n] for n, c in cells.items() if f"{c['rule']} {c['loss']}" == key])
    base = arms.get("random sigmoid")
    rows = []
    for key, x in arms.items():
        per_prompt = x.mean(axis=0)
        row = {"arm": key, "seeds": x.shape[0], "mean": float(per_prompt.mean()),
               "ci95": bootstrap_ci(per_prompt, n_boot, 0),
               "seed_means": [round(float(v), 4) for v in x.mean(axis=1)],
               **{f"mean_{f}": float(per_prompt[families == f].mean()) for f in ("fixed", "open")}}
        if base is not None:
            d = per_prompt - base.mean(axis=0)
            row["minus_random"], row["minus_random_ci95"] = float(d.mean()), bootstrap_ci(d, n_boot, 1)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Left: each arm's mean gold reward (95% CI over prompts; dots: seeds). Right: its paired difference
    from random on the same prompts and sample seeds, where the prompts' own spread cancels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 3.8))
    panels = [("mean", "ci95", "mean gold reward, held-out"), ("minus_random", "minus_random_ci95",
                                                                 "gold reward minus random's (paired)")]
    for p, (key, ci, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        for i, r in enumerate(rows):
            lo, hi = r[ci]
            ax.errorbar([i], [r[key]], yerr=[[r[key] - lo], [hi - r[key]]], fmt="o", color=f"C{i}", capsize=4)
            if key == "mean":
                ax.scatter([i + 0.15] * len(r["seed_means"]), r["seed_means"], s=10, color=f"C{i}", alpha=0.6)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(range(len(rows)), [r["arm"].replace("_curriculum", "_curr.").replace(" ", "\n")
                                         for r in rows], fontsize=7)
        ax.set_ylabel(label, fontsize=9)
    fig.suptitle("Gold reward by selection arm, 10% of prompts (95% bootstrap CIs over prompts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--pool", type=int, default=400, help="curated prompts, half of each family")
    ap.add_argument("--heldout", type=int, default=64, help="held-out prompts, half of each family")
    ap.add_argument("--k", type=int, default=8, help="samples a prompt in curation")
    ap.add_argument("--eval-k", type=int, default=4, help="samples a held-out prompt")
    ap.add_argument("--max-tokens", type=int, default=24)
    # Below 1, the fixed answers' rare slips fade while the open family's near-uniform word choices stay
    # diverse: a sharper contrast in PVar between the families. Curation and evaluation alike.
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--gen-backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--bootstrap", type=int, default=5000)
    ap.add_argument("--stop-after-min", type=float, default=1e9,
                    help="start no further seed round after this many minutes (a round once started finishes)")
    ap.add_argument("--quick", action="store_true", help="fewer SFT steps (a smoke run)")
    ap.add_argument("--save", action="store_true", help="copy the results to benchmarks/results/")
    a = ap.parse_args()
    if a.quick:
        a.sft_steps = min(a.sft_steps, 60)
    from pipelines.tools.tiny_models import build_tiny_models

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hw, t_start, phases = common.hardware(), time.perf_counter(), {}
    loads = {"start": load()}

    # --- 1. the starting policy: tiny random Llama + a short supervised run on the two families -------------
    t0 = time.perf_counter()
    base = build_tiny_models(out / "tiny_models")["policy"]
    policy = str(out / "policy_sft")
    sft_file = out / "policy_sft.json"
    if not sft_file.exists():
        sft = study_gold.supervised_policy(base, policy, a.sft_steps, 16, a.sft_lr, seed=0)
        sft_file.write_text(json.dumps(sft))
    sft = json.loads(sft_file.read_text())
    phases["sft_s"] = round(time.perf_counter() - t0, 1)
    pool, held = out / "pool.jsonl", study_gold.prompt_rows(a.heldout // 2, 500, "heldout")
    text = "".join(json.dumps(r) + "\n" for r in study_gold.prompt_rows(a.pool // 2, 0, "pool"))
    if not pool.exists() or pool.read_text() != text:  # rewritten, it would look new to a rerun's stages
        pool.write_text(text)

    # --- 2. curation with the gold reward ---------------------------------------------------------------------
    t0 = time.perf_counter()
    cur = curate(a, out, policy, pool)
    phases["curate_s"], loads["after_curate"] = round(time.perf_counter() - t0, 1), load()
    stats = stats_by_family(out / "run")

    # --- 3 and 4. each cell trained, then its policy's gold reward on the held-out prompts ------------------
    families = np.array([p["family"] for p in held])
    rewards = {"start": gold_eval(policy, held, a, seed=7)}
    cells: dict[str, dict] = {}
    phases["train_s"] = phases["eval_s"] = 0.0
    for name, c in train_cells(ablate_cfg(a, out, policy), t_start + 60 * a.stop_after_min):
        t0 = time.perf_counter()
        rewards[name] = gold_eval(c["checkpoint"], held, a, seed=7)
        c.update(gold_mean=float(rewards[name].mean()), ci95=bootstrap_ci(rewards[name], a.bootstrap, 0),
                 eval_s=round(time.perf_counter() - t0, 1))
        phases["train_s"] += c["train_s"]
        phases["eval_s"] += c["eval_s"]
        cells[name] = c
        print(f"study {name}: {c['pairs']} pairs, {c['steps']} steps, gold {c['gold_mean']:.3f} "
              f"(start {rewards['start'].mean():.3f}); load {load()}", flush=True)
    loads["after_train_eval"] = load()
    arms = summarise(rewards, cells, families, a.bootstrap)

    # --- 5. the gradient-norm audit on the first top-PVar policy ----------------------------------------------
    t0 = time.perf_counter()
    top = next(c for c in cells.values() if c["rule"] == "pvar_top")
    audit = run_audit(out, top["checkpoint"], policy, a.beta)
    phases["audit_s"], loads["end"] = round(time.perf_counter() - t0, 1), load()
    phases["total_s"] = round(time.perf_counter() - t_start, 1)

    plot(arms, out / "study.png")
    record = {"bench": "study_ground_truth", "date": common.today(), "hardware": hw, "versions": common.versions(),
              "config": vars(a), "load": loads, "phases": phases, "sft": sft, "stats_by_family": stats,
              "curation": {k: cur.get(k) for k in ("run_dir", "stages") if k in cur},
              "arms": arms, "cells": cells, "audit": audit,
              "heldout_rewards": {k: [round(float(v), 4) for v in x] for k, x in rewards.items() if k == "start" or k in cells}}
    (out / "study.json").write_text(json.dumps(record, indent=1, default=common._json_default))
    table = common.markdown_table(
        ["arm", "seeds", "gold mean", "95% CI", "minus random [95% CI]", "fixed", "open", "seed means"],
        [[r["arm"], r["seeds"], round(r["mean"], 3), f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
          f"{r.get('minus_random', float('nan')):+.3f} [{r.get('minus_random_ci95', [np.nan] * 2)[0]:+.3f}, "
          f"{r.get('minus_random_ci95', [np.nan] * 2)[1]:+.3f}]", round(r["mean_fixed"], 3),
          round(r["mean_open"], 3), " ".join(f"{v:.3f}" for v in r["seed_means"])] for r in arms])
    print(f"\n{table}\n\nphases {phases}\nload {loads}\naudit {audit}", flush=True)
    if a.save:
        stem = Path(__file__).resolve().parent / "results" / f"{common.today()}-study-{common.hardware_slug(hw)}"
        shutil.copyfile(out / "study.json", stem.with_suffix(".json"))
        shutil.copyfile(out / "study.png", stem.with_suffix(".png"))
        if audit.get("plot"):
            shutil.copyfile(audit["plot"], f"{stem}-audit.png")
    return 0


def stats_by_family(run: Path) -> dict:
    """PVar and margin quartiles of each prompt family, from the curation's statistics."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(run / "stats"), format="parquet").to_table(columns=["family", "pvar", "margin"])
    out = {}
    for fam in ("fixed", "open"):
        sub = t.filter(pads.field("family") == fam) if "family" in t.column_names else t
        pv, mg = (np.asarray(sub.column(c).to_numpy(zero_copy_only=False), float) for c in ("pvar", "margin"))
        out[fam] = {"prompts": int(sub.num_rows), "pvar_quartiles": np.nanquantile(pv, [.25, .5, .75]).round(4).tolist(),
                    "margin_mean": float(np.nanmean(mg)), "pvar_zero": int((pv == 0).sum())}
    return out


def run_audit(out: Path, policy: str, reference: str, beta: float) -> dict:
    from pipelines import audit
    from pipelines.audit import AuditCfg, AuditConfig, AuditInputCfg, AuditModelCfg, AuditOutputCfg
    from pipelines.runtime.config import RunCfg

    cfg = AuditConfig(run=RunCfg(name="study-audit", seed=0),
                      input=AuditInputCfg(run=str(out / "run"), sample=48, max_length=128),
                      model=AuditModelCfg(policy=policy, reference=reference), audit=AuditCfg(beta=beta),
                      output=AuditOutputCfg(dir=str(out / "report")))
    s = audit.main(cfg)
    return {k: s[k] for k in ("prompts", "spearman", "spearman_rm", "constant", "exponent", "flagged", "plot")}


if __name__ == "__main__":
    sys.exit(main())
