"""The whole job in one run folder: curate -> train (DPO / MixDPO on Ray Train) -> evaluate -> report.

    python -m pipelines.run --config pipelines/configs/run_demo_cpu.yaml
    python -m pipelines.run --config pipelines/configs/run_demo_cpu.yaml output.dir=runs/x curate.select.fraction=0.5

The three sections are the configs of `pipelines.curate`, `pipelines.train_dpo` and `pipelines.evaluate`.
Wiring, so that nothing is typed twice: training reads the curation's pairs and writes into the same run
folder; evaluation compares the final checkpoint against the policy training started from.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

from pipelines import curate, evaluate, train_dpo
from pipelines.evaluate import EvaluateConfig
from pipelines.runtime.config import CurateConfig
from pipelines.runtime.console import say
from pipelines.train_dpo import TrainConfig


@dataclass(frozen=True)
class RunOutputCfg:
    dir: str | None = None  # one folder for all three stages; null keeps curate.output.dir


@dataclass(frozen=True)
class RunConfig:
    output: RunOutputCfg = field(default_factory=RunOutputCfg)
    curate: CurateConfig = field(default_factory=CurateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    skip_train: bool = False
    skip_evaluate: bool = False
    report: bool = True


def main(cfg: RunConfig) -> dict:
    out = cfg.output.dir or cfg.curate.output.dir
    cur = replace(cfg.curate, output=replace(cfg.curate.output, dir=out))
    result: dict = {"curate": curate.main(cur)}

    if not cfg.skip_train:
        tr = replace(cfg.train, input=replace(cfg.train.input, path=cfg.train.input.path or out),
                     output=replace(cfg.train.output, dir=out))
        result["train"] = train_dpo.main(tr)

        if not cfg.skip_evaluate:
            ev = replace(cfg.evaluate, output=replace(cfg.evaluate.output, dir=out),
                         policy=result["train"]["checkpoint"],
                         reference=cfg.evaluate.reference or cfg.train.model.policy)
            result["evaluate"] = evaluate.main(ev)

    if cfg.report:
        try:
            from pipelines.reporting.report import print_summary, write_report
        except ImportError:  # the report module is optional for the job itself
            pass
        else:
            path = write_report(out)
            print_summary(out)
            say(f"report:     {path}")
            result["report"] = str(path)
    return result


if __name__ == "__main__":
    # The same path as `prefsift run`: the same checks before Ray, the same one-line errors, the same summary.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["run", *sys.argv[1:]]))
