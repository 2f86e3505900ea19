"""Evaluate a trained policy against its reference: same held-out prompts, same generation operator, same
per-sample seeds, one reward model as the judge. Reports the RM-judged win rate with a bootstrap 95% CI.

    python -m pipelines.evaluate --config eval.yaml policy=runs/demo/train/final

(the `evaluate:` section of pipelines/configs/demo_cpu.yaml is a complete eval.yaml; `pipelines.run` runs it
after training).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

import numpy as np

from operators.base import QUARANTINE, QUARANTINE_DETAIL, apply
from operators.dedupe import dedupe_prompts
from operators.read import detect_schema, read_input, validate_prompts
from pipelines.runtime.config import (
    GenerateCfg,
    InputCfg,
    OutputCfg,
    RayCfg,
    RunCfg,
    ScoreCfg,
    fingerprint,
    model_path,
    resolve_path,
    to_dict,
)
from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir
from pipelines.runtime.ray_start import init_ray
from pipelines.runtime.stages import read_stage, run_stage


@dataclass(frozen=True)
class EvaluateConfig:
    run: RunCfg = field(default_factory=RunCfg)
    input: InputCfg = field(default_factory=InputCfg)  # held-out prompts
    output: OutputCfg = field(default_factory=OutputCfg)
    policy: str = ""  # the trained checkpoint (a Hugging Face folder)
    reference: str = ""  # the model it started from
    generate: GenerateCfg = field(default_factory=lambda: GenerateCfg(num_samples=1))
    score: ScoreCfg = field(default_factory=ScoreCfg)
    bootstrap: int = 2000
    ray: RayCfg = field(default_factory=RayCfg)


def win_rate_ci(wins: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean win (1 win, 0.5 tie, 0 loss) over prompts, with a percentile bootstrap CI that resamples prompts."""
    w = np.asarray(wins, dtype=np.float64)
    if w.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = w[rng.integers(0, w.size, size=(n_boot, w.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(w.mean()), float(lo), float(hi)


def sample_rewards(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(prompt_id, sample_idx) -> overall reward, from scored prompt rows; a response the scorer could not
    score (its `problem` set) has no reward and so no pair."""
    return {(r["prompt_id"], s["sample_idx"]): s["overall"] for r in rows for s in r["responses"] or []
            if s["problem"] is None}


def paired_wins(policy: dict, reference: dict) -> np.ndarray:
    """Per-prompt mean of sample-level wins; samples are paired by (prompt_id, sample_idx), i.e. same seed."""
    per_prompt: dict[str, list[float]] = {}
    for key, r_pol in policy.items():
        if key not in reference:
            continue
        r_ref = reference[key]
        per_prompt.setdefault(key[0], []).append(1.0 if r_pol > r_ref else 0.5 if r_pol == r_ref else 0.0)
    return np.array([np.mean(v) for _, v in sorted(per_prompt.items())])


def main(cfg: EvaluateConfig) -> dict:
    if not cfg.policy or not cfg.reference:
        raise ValueError("evaluate needs both `policy` (the trained checkpoint) and `reference` model paths")
    if not cfg.score.models:
        raise ValueError("evaluate needs a judge: score.models must name at least one reward model")
    # Model folders are checked before Ray starts (a wrong checkpoint path is the common mistake here).
    models = {"policy": model_path(cfg.policy, "policy"), "reference": model_path(cfg.reference, "reference")}
    judges = [replace(m, path=model_path(m.path, f"score.models[{i}].path")) for i, m in enumerate(cfg.score.models)]
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    run = RunDir(cfg.output.dir)
    run.start("evaluate", to_dict(cfg))
    in_path = resolve_path(cfg.input.path)
    raw = read_input(in_path, cfg.input.format, cfg.input.limit, cfg.input.peek_lines)
    if detect_schema(raw.schema().names) != "prompts" and cfg.input.schema == "auto":
        say("evaluate uses only the prompts of the held-out input")
    k = cfg.generate.num_samples
    score_cfg = replace(cfg.score, models=judges)

    rewards = {}
    for who, model in models.items():
        gen = replace(cfg.generate, model=model)
        stage = f"eval_{who}"

        def build(gen=gen):
            # The quarantine columns keep the reason the JSONL reader gave a bad line.
            ds = raw.select_columns([c for c in ("prompt_id", "prompt", "messages", "source", QUARANTINE,
                                                 QUARANTINE_DETAIL) if c in raw.schema().names])
            ds = ds.map_batches(validate_prompts, fn_kwargs={"schema": "prompts", "source": "heldout"},
                                batch_format="pyarrow")
            # Samples are paired by (prompt_id, sample_idx): two prompts under one id would overwrite each
            # other, so duplicate ids are set aside as in curation.
            ds = dedupe_prompts(ds)
            # Same run seed for both models: sample i of a prompt uses the same seed under either policy.
            ds = apply(ds, _generator(), _gen_resources(gen), cfg=gen, seed=cfg.run.seed)
            return apply(ds, _scorer(), _score_resources(score_cfg), cfg=score_cfg)

        rec = run_stage(run, stage, fingerprint(cfg.input, gen, score_cfg, cfg.run.seed), build,
                        rows_in=raw.count, unit_in="prompt", unit_out="prompt")
        rewards[who] = sample_rewards(read_stage(run, stage, columns=["prompt_id", "responses"]).take_all())
        say(f"{who}: {rec.rows_out} prompts, {len(rewards[who])} scored samples, "
            f"mean reward {np.mean(list(rewards[who].values())):.4f}")

    wins = paired_wins(rewards["policy"], rewards["reference"])
    rate, lo, hi = win_rate_ci(wins, cfg.bootstrap, cfg.run.seed)
    summary = {
        "win_rate": rate, "ci95": [lo, hi], "prompts": int(wins.size), "samples_per_prompt": k,
        "policy": cfg.policy, "reference": cfg.reference,
        "judge": [m.path for m in cfg.score.models],
        "mean_reward_policy": float(np.mean(list(rewards["policy"].values()))),
        "mean_reward_reference": float(np.mean(list(rewards["reference"].values()))),
    }
    run.write_text(json.dumps(summary, indent=2), "eval_summary.json")
    run.set("evaluation", summary)
    say(f"win rate of policy over reference (RM-judged): {rate:.3f}  95% CI [{lo:.3f}, {hi:.3f}]  "
        f"over {wins.size} prompts")
    return summary


# Late imports keep `import pipelines.evaluate` light.
def _generator():
    from operators.generate import Generator

    return Generator


def _scorer():
    from operators.score import RewardScorer

    return RewardScorer


def _gen_resources(gen):
    from operators.generate import generator_resources

    return generator_resources(gen)


def _score_resources(sc):
    from operators.score import scorer_resources

    return scorer_resources(sc)


if __name__ == "__main__":
    # The same path as `prefsift evaluate`: the same checks before Ray, the same one-line errors, the same summary.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["evaluate", *sys.argv[1:]]))
