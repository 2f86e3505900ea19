"""End to end: the whole curation (pipelines.curate) on N prompts x K samples with the tiny models, on CPU.

    python benchmarks/bench_e2e.py --quick                  # 40 prompts x 4 (CI smoke)
    python benchmarks/bench_e2e.py                          # 2,000 prompts x 4
    python benchmarks/bench_e2e.py --prompts 2000 --train   # and the demo's DPO training on the pairs

The config is the `curate` section of pipelines/configs/demo_cpu.yaml as shipped (HF backend, K = 4, 32 new
tokens, the 2-head tiny reward model, residual length debias, pvar_top 50%), with only the paths, the
input size and `input.limit` changed. There is no baseline: the figures are the wall time and each stage's
seconds and rows from the run's manifest.json.

Prompts. The shipped files hold 550 distinct prompts (arena_hard_prompts_200, arena_hard_heldout_50 and the
300 prompts of ultrafeedback_binarized_sample_300, in that order). Prompt i is base prompt i mod 550, as is
in the first pass; in pass r = i // 550 >= 1 it gets the r-th instruction of `VARIANTS` in front (and, past
the last one, a "(variant r)" tag), and its prompt_id is `<base id>-v<r>`. So all N prompts are distinct,
deterministic, and have the real prompts' length mix; prompts too long for max_model_len are quarantined
by the generator as in any run and counted in the manifest.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO,
    MemorySampler,
    clean,
    emit,
    init_local_ray,
    markdown_table,
    result,
    run_contender,
)
from benchmarks.models import prepare_models

DATA = REPO / "pipelines" / "data"
PROMPT_FILES = ("arena_hard_prompts_200.jsonl.gz", "arena_hard_heldout_50.jsonl.gz",
                "ultrafeedback_binarized_sample_300.jsonl.gz")
DEMO_CONFIG = REPO / "pipelines" / "configs" / "demo_cpu.yaml"
TINY_PREFIX = "runs/tiny_models/"  # how the demo config names the tiny models
VARIANTS = ("Answer briefly.", "Explain step by step.", "Answer for a beginner.", "Be precise.",
            "Use plain English.", "Give an example.", "Answer in a friendly tone.", "Be concise and formal.")
STAGES = ("prompts", "samples", "scored", "stats", "selection", "pairs")


def build_prompts(n: int) -> list[dict[str, str]]:
    base = []
    for name in PROMPT_FILES:
        with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
            base += [{"prompt_id": r["prompt_id"], "prompt": r["prompt"]} for r in map(json.loads, f)]
    out = []
    for i in range(n):
        r, row = divmod(i, len(base))
        row = base[row]
        if r == 0:
            out.append({**row, "source": "shipped"})
            continue
        prefix = VARIANTS[(r - 1) % len(VARIANTS)] + (f" (variant {r})" if r > len(VARIANTS) else "")
        out.append({"prompt_id": f"{row['prompt_id']}-v{r}", "prompt": f"{prefix} {row['prompt']}",
                    "source": "shipped-variant"})
    return out


def _models(section: dict, models: dict[str, str]) -> dict:
    """The demo's runs/tiny_models/<name> paths -> the freshly built ones."""
    def fix(p: str) -> str:
        return models[p[len(TINY_PREFIX):]] if p.startswith(TINY_PREFIX) else p

    if "generate" in section:
        section["generate"]["model"] = fix(section["generate"]["model"])
    if "score" in section:
        section["score"]["models"] = [{**m, "path": fix(m["path"])} for m in section["score"]["models"]]
    if "model" in section:
        section["model"]["policy"] = fix(section["model"]["policy"])
    return section


def run_e2e(a: argparse.Namespace) -> dict:
    from pipelines import curate
    from pipelines.runtime.config import CurateConfig, from_dict, load_yaml

    models = json.loads(a.models_json)
    demo = load_yaml(DEMO_CONFIG)
    cur = _models(demo["curate"], models)
    cur["input"] = {**cur["input"], "path": a.prompts_file, "limit": None}
    cur["output"] = {"dir": str(Path(a.work) / "run")}
    cur["ray"] = {**cur.get("ray", {}), "progress": False}
    cfg = from_dict(CurateConfig, cur)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        init_s = init_local_ray(cfg.ray.num_cpus, cfg.ray.object_store_memory_gb or 1.0)
        out = curate.main(cfg)
        curate_s = time.perf_counter() - t0
        train: dict = {}
        if a.train:
            from pipelines import train_dpo
            from pipelines.train_dpo import TrainConfig

            tr = _models(demo["train"], models)
            tr["input"] = {**tr.get("input", {}), "path": out["run_dir"]}
            tr["output"] = {"dir": out["run_dir"]}
            tr["ray"] = {**tr.get("ray", {}), "progress": False}
            t1 = time.perf_counter()
            summary = train_dpo.main(from_dict(TrainConfig, tr))
            train = {"seconds": time.perf_counter() - t1, "fit_s": summary["seconds"], "steps": summary["steps"],
                     "pairs": summary["pairs"], "final_loss": (summary.get("final_metrics") or {}).get("loss")}
        wall = time.perf_counter() - t0
    with open(out["manifest"], encoding="utf-8") as f:
        manifest = json.load(f)
    stages = {name: {k: rec[k] for k in ("seconds", "rows_in", "rows_out", "quarantined", "quarantined_total",
                                         "unit_in", "unit_out", "balanced", "skipped")}
              for name, rec in manifest["stages"].items()}
    if a.train and "pairs_ref" in stages:
        train["reference_s"] = stages["pairs_ref"]["seconds"]
    return {"k": cfg.generate.num_samples, "wall_s": wall, "curate_s": curate_s, "ray_init_s": init_s, "stages": stages,
            "num_pairs": out["num_pairs"], "train": train, **mem.figures()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None, help="default 2000; 40 with --quick")
    ap.add_argument("--models-dir", default=None, help="build/reuse the tiny models here (default: a temp dir)")
    ap.add_argument("--train", action="store_true", help="also run the demo's train section on the pairs")
    ap.add_argument("--contender", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--models-json", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.prompts = a.prompts or (40 if a.quick else 2000)
    if a.contender:
        result(run_e2e(a))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    try:
        models = prepare_models("tiny", a.models_dir or work / "models")
        prompts = build_prompts(a.prompts)
        pfile = work / "prompts.jsonl"
        pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
        print(f"[bench_e2e] curate {len(prompts)} prompts ...", file=sys.stderr, flush=True)
        r = run_contender(Path(__file__).resolve(), ["--contender", "--prompts-file", str(pfile), "--models-json",
                                                     json.dumps(models), "--work", str(work),
                                                     *(["--train"] if a.train else [])])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    st = {name: r["stages"][name] for name in STAGES if name in r["stages"]}  # curate's, in pipeline order
    rows = [[name, s["seconds"], s["rows_in"], s["unit_in"], s["rows_out"], s["unit_out"], s["quarantined_total"],
             ", ".join(f"{k}: {v}" for k, v in s["quarantined"].items()) or "-"] for name, s in st.items()]
    staged = sum(s["seconds"] for s in st.values() if not s["skipped"])
    rows.append(["(ray.init, reads between stages, config)", r["curate_s"] - staged, None, "", None, "", None, ""])
    if r["train"]:
        t = r["train"]
        rows.append(["train: reference log-probs (stage pairs_ref)", t.get("reference_s"), t["pairs"], "pair", None,
                     "", None, ""])
        rows.append(["train: Ray Train fit (demo section)", t["fit_s"], t["pairs"], "pair", t["steps"], "step", None,
                     ""])
    rows.append(["**total wall**", r["wall_s"], len(prompts), "prompt", r["num_pairs"], "pair", None, ""])
    table = markdown_table(["stage", "seconds", "rows in", "unit", "rows out", "unit", "quarantined", "reasons"],
                           rows)
    gen = st.get("samples", {})
    check = {"stages_present": [s for s in STAGES if s in st], "all_stages": all(s in st for s in STAGES),
             "all_balanced": all(s["balanced"] for s in st.values()),
             "prompts_in": st.get("prompts", {}).get("rows_in"), "samples_out": gen.get("rows_out")}
    figures = {"prompts": len(prompts), **r, "check": check,
               "samples_per_s": (gen.get("rows_out") or 0) / gen["seconds"] if gen.get("seconds") else None}
    emit("end to end", clean(figures), {"prompts_per_s_wall": round(len(prompts) / r["curate_s"], 3),
                                        "generate_share_of_curate": round(gen.get("seconds", 0) / r["curate_s"], 3)},
         table=table, targets={"prompts_per_s_wall": "— (no baseline; wall time and per-stage breakdown)"},
         notes=["stage seconds from the run's manifest.json; the remainder row is curate's time outside stages"],
         config={"prompts": len(prompts), "k": r["k"], "config": "pipelines/configs/demo_cpu.yaml (curate)",
                 "quick": a.quick, "train": a.train, "prompt_build": "shipped 550 prompts, then instruction-"
                 "prefixed variants (bench_e2e.VARIANTS)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
