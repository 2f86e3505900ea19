"""The papers' presets (pipelines/configs/presets/): each parses as a run config, validates, cites its source,
and holds the settings its paper or code uses; with the CPU demo's paths they still parse and validate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from operators.select import SELECTORS
from pipelines.run import RunConfig
from pipelines.runtime.config import load_config, load_yaml
from pipelines.train_dpo import validate

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))


def demo_path_overrides() -> list[str]:
    demo = load_yaml(CONFIGS / "demo_cpu.yaml")
    return [f"output.dir={demo['output']['dir']}",
            f"curate.input.path={demo['curate']['input']['path']}",
            f"train.model.policy={demo['train']['model']['policy']}"]


def test_the_three_presets_are_there():
    assert [p.stem for p in PRESETS] == ["mixdpo_paper", "pd_paper", "pvar_paper"]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_validates_and_says_where_it_comes_from(path):
    text = path.read_text()
    header = text[: text.index("\noutput:")]
    assert all(line.startswith("#") for line in header.splitlines())
    assert "python -m pipelines.run --config pipelines/configs/presets/" + path.name in header
    assert "Guessed" in header  # every preset says what it had to guess
    for overrides in ([], demo_path_overrides()):
        cfg = load_config(RunConfig, path, overrides)
        validate_as_run(cfg)
        assert cfg.curate.select.rule in SELECTORS
        assert cfg.skip_evaluate is True
    cfg = load_config(RunConfig, path, demo_path_overrides())
    assert cfg.curate.input.path == "pipelines/data/arena_hard_prompts_200.jsonl.gz"
    assert cfg.train.model.policy == "runs/tiny_models/policy"


def validate_as_run(cfg: RunConfig) -> None:
    """pipelines.run fills train.input.path with the run folder when it is empty."""
    validate(replace(cfg.train, input=replace(cfg.train.input, path=cfg.train.input.path or str(cfg.output.dir))))


def global_batch(cfg: RunConfig) -> int:
    return cfg.train.scaling.num_workers * cfg.train.optim.per_device_batch_size * cfg.train.optim.grad_accum


def test_mixdpo_paper_is_the_authors_launch_config():
    cfg = load_config(RunConfig, CONFIGS / "presets" / "mixdpo_paper.yaml")
    sel, tr = cfg.curate.select, cfg.train
    assert (sel.rule, sel.margin_tau, sel.sft_quantile) == ("margin_curriculum", 0.5, None)
    assert (tr.loss.name, tr.loss.beta, tr.loss.label_smoothing) == ("mixdpo", 0.01, 0.1)
    assert (tr.optim.lr, tr.optim.warmup_ratio, tr.optim.warmup_steps, tr.optim.epochs) == (1e-6, 0.1, 0, 1.0)
    assert tr.optim.max_steps is None and tr.optim.drop_last is False
    assert global_batch(cfg) == 160
    assert (tr.input.max_length, tr.input.max_prompt_length) == (1024, 512)


def test_pvar_and_pd_presets_select_as_their_papers():
    pvar = load_config(RunConfig, CONFIGS / "presets" / "pvar_paper.yaml")
    assert (pvar.curate.select.rule, pvar.curate.select.fraction) == ("pvar_top", 0.1)
    assert pvar.train.loss.name == "sigmoid"
    pd = load_config(RunConfig, CONFIGS / "presets" / "pd_paper.yaml")
    assert (pd.curate.select.rule, pd.curate.select.fraction) == ("pd_consensus", 0.3)
    assert pd.curate.stats.length_debias != "none"
    assert pd.train.loss.name == "sigmoid"


@pytest.mark.slow
def test_mixdpo_paper_runs_end_to_end_on_tiny_models(ray_local, tiny_models, tmp_path):
    """The authors' preset, with only sizes and paths scaled to 2 CPUs: 60 UltraFeedback pairs (6 with a
    margin below 0.5), 2 workers x 4 pairs, so 8 steps with the last one partial and SFT-heavy."""
    import json

    from pipelines.run import main

    sample = CONFIGS.parent / "data" / "ultrafeedback_binarized_sample_300.jsonl.gz"
    cpu = [f"output.dir={tmp_path / 'run'}", f"curate.input.path={sample}", "curate.input.limit=60",
           "curate.ray.num_cpus=2", "curate.ray.object_store_memory_gb=1.0", "curate.ray.progress=false",
           f"train.model.policy={tiny_models['policy']}", "train.input.max_length=256",
           "train.input.max_prompt_length=128", "train.reference.dtype=float32", "train.reference.num_gpus=0",
           "train.reference.concurrency=1", "train.reference.num_cpus=0.5", "train.scaling.num_workers=2",
           "train.scaling.use_gpu=false", "train.scaling.fsdp=false", "train.scaling.cpus_per_worker=0.5",
           "train.optim.per_device_batch_size=4", "train.optim.grad_accum=1", "train.optim.bf16=false",
           "train.optim.gradient_checkpointing=false", "train.checkpoint.every_n_steps=0", "train.ray.address=null",
           "train.ray.num_cpus=2", "train.ray.object_store_memory_gb=1.0", "train.ray.progress=false",
           "report=false"]
    cfg = load_config(RunConfig, CONFIGS / "presets" / "mixdpo_paper.yaml", cpu)
    result = main(cfg)
    train = result["train"]
    assert (train["pairs"], train["global_batch"], train["steps"], train["loss"]) == (60, 8, 8, "mixdpo")
    rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rows] == [8] * 7 + [4]  # the last partial batch is trained
    assert rows[0]["lr"] == 0.0  # warmup_ratio 0.1 of 8 steps: one warmup step
    # Easy to hard: the 6 pairs below the margin come last, so SFT shows only at the end.
    sft = [r["sft_fraction"] * r["pairs"] for r in rows]
    assert sum(sft) == pytest.approx(6) and sft[0] == 0 and sft[-1] > 0
