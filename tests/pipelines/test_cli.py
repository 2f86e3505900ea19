"""The `prefsift` console script: dry runs, one-line config errors, report, compare, one real curate run."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.tools.cli import main
from tests.pipelines.test_report import check_page, make_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "pipelines/configs/real_rated.yaml")
PROMPTS = REPO / "pipelines/data/arena_hard_prompts_200.jsonl.gz"
RATED = REPO / "pipelines/data/ultrafeedback_binarized_sample_300.jsonl.gz"


@pytest.fixture
def no_ray(monkeypatch):
    """A dry run or a config error must not start Ray."""
    import ray

    def refuse(*_a, **_k):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)


def resolved_yaml(out: str) -> dict:
    block = out.split("# resolved config")[1].split("\n# ")[0]
    return yaml.safe_load(block.split("\n", 1)[1])


def test_dry_run_curate_prompts(tmp_path, capsys, no_ray):
    out_dir = tmp_path / "never"
    rc = main(["curate", "--config", CONFIG, f"input.path={PROMPTS}", "generate.num_samples=4",
               "generate.max_tokens=32", "generate.model=runs/tiny_models/policy", f"output.dir={out_dir}",
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert not out_dir.exists()
    cfg = resolved_yaml(out)
    assert cfg["generate"]["num_samples"] == 4 and cfg["output"]["dir"] == str(out_dir)
    n = sum(1 for line in gzip.open(PROMPTS, "rt") if line.strip())
    assert f"{n:,} prompts, schema prompts" in out
    for stage in ("prompts", "samples", "scored", "stats", "selection", "pairs"):
        assert re.search(rf"^  {stage}\s", out, re.M), stage
    assert re.search(r"^  samples .*1 actor\(s\) x 1 CPU, 0 GPU, batch 16", out, re.M)
    assert f"{n:,} prompts x 4 samples x 32 max_tokens = {n * 4 * 32:,}" in out


@pytest.mark.parametrize("z_in, fewest", [(None, "k0 each, the selected fraction on to num_samples"),
                                           ("1.0", "k0 each (z_in: a prompt sure to make the cut may stop there too)")])
def test_dry_run_adaptive_estimate(tmp_path, capsys, no_ray, z_in, fewest):
    extra = [] if z_in is None else [f"generate.adaptive.z_in={z_in}"]
    assert main(["curate", "--config", CONFIG, f"input.path={PROMPTS}", "input.limit=100", "generate.num_samples=8",
                 "generate.max_tokens=10", "generate.model=runs/tiny_models/policy", "select.rule=pvar_top",
                 "select.fraction=0.1", "generate.adaptive.rule=ucb", "generate.adaptive.k0=2",
                 "generate.adaptive.step=2", *extra, f"output.dir={tmp_path / 'never'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 100 prompts x 8 = 800 for a full run; the fewest: 2 each (200), or with the selected 10 on to 8 (260)
    low = 200 if z_in else 260
    assert f"samples {low:,} to 800 ({low / 800:.0%} to 100%) of 800 for a full run ({fewest}; at most a full run)" in out, out
    assert f"tokens at most {low * 10:,} to 8,000" in out


def test_dry_run_curate_limit_and_rated_input(tmp_path, capsys, no_ray):
    assert main(["curate", "--config", CONFIG, f"input.path={RATED}", "input.limit=120",
                 f"output.dir={tmp_path / 'never'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "120 prompts, schema rated" in out
    assert "tokens to generate (curate): 0" in out
    assert re.search(r"^  scored\s+ingest", out, re.M) and not re.search(r"^  samples\s", out, re.M)
    assert not (tmp_path / "never").exists()


def test_dry_run_whole_job(tmp_path, capsys, no_ray):
    rc = main(["run", "--config", str(REPO / "pipelines/configs/demo_cpu.yaml"),
               f"output.dir={tmp_path / 'x'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "x").exists()
    for stage in ("samples", "scored", "pairs_ref", "train", "eval_policy", "eval_reference"):
        assert re.search(rf"^  {stage}\s", out, re.M), stage
    curate_tokens = 96 * 4 * 32  # demo_cpu.yaml: 96 prompts, K = 4, 32 tokens
    eval_tokens = 2 * 32 * 2 * 32  # two models, 32 held-out prompts, 2 samples, 32 tokens
    assert f"= {curate_tokens:,}" in out and f"{curate_tokens + eval_tokens:,}" in out


@pytest.mark.parametrize("override, expected", [
    ("selct.rule=pvar_top", "unknown config key 'selct'; did you mean 'select'?"),
    ("select.fracton=0.1", "unknown config key 'select.fracton'; did you mean 'select.fraction'?"),
    ("select.rule=pvar_tp", "select.rule: 'pvar_tp' is not allowed; did you mean 'pvar_top'?"),
    ("stats.length_debias=lenght", "stats.length_debias: 'lenght' is not allowed; did you mean 'length'"),
    ("select.fraction=1.5", "select.fraction: 1.5 is not allowed"),
    ("generate.num_samples=four", "generate.num_samples: expected an integer, got 'four'"),
])
def test_config_errors_are_one_line_exit_2(override, expected, tmp_path, capsys, no_ray):
    rc = main(["curate", "--config", CONFIG, override, f"output.dir={tmp_path / 'never'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("config error: "), err
    if "did you mean 'length'" in expected:  # the Literal's values are listed in full
        assert "'residual'" in err and "'lenght'" in err
    else:
        assert expected in err, err
    assert not (tmp_path / "never").exists()


def test_missing_input_is_one_line(tmp_path, capsys, no_ray):
    rc = main(["curate", "--config", CONFIG, "input.path=", f"output.dir={tmp_path / 'never'}"])
    assert rc == 2 and "input.path" in capsys.readouterr().err


@pytest.mark.parametrize("command, example", [("ablate", "'seeds=[0,1]'"), ("audit", "input.sample=64")])
def test_ablate_and_audit_parse_like_every_command(command, example, capsys, no_ray):
    """The same --help shape, and an unknown key is one line with exit code 2, before Ray."""
    with pytest.raises(SystemExit) as exit_help:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_help.value.code == 0 and f"prefsift {command}" in out and example in out
    assert main([command, "no.such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no" in err[0] and "Traceback" not in err[0]


def test_unknown_command(capsys):
    assert main(["curat"]) == 2
    assert "did you mean 'curate'?" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0 and "compare" in capsys.readouterr().out


def test_report_and_compare_subcommands(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert page == run / "report" / "index.html"
    check_page(page)
    assert main(["compare", str(run), "--rules", "pvar_top,random"]) == 0
    assert (run / "compare" / "compare.json").is_file()


def test_console_script_dry_run(tmp_path):
    exe = Path(sys.executable).parent / "prefsift"
    if not exe.exists():
        pytest.skip("the prefsift console script is not installed (pip install -e .)")
    res = subprocess.run([str(exe), "curate", "--config", CONFIG, f"input.path={PROMPTS}", "input.limit=10",
                          "generate.num_samples=2", "generate.max_tokens=8", f"output.dir={tmp_path / 'n'}",
                          "--dry-run"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "10 prompts x 2 samples x 8 max_tokens = 160" in res.stdout
    assert not (tmp_path / "n").exists()


def test_curate_then_select_end_to_end(ray_local, tmp_path, capsys):
    """The one real run: `prefsift curate` then `prefsift select`, each ending with the summary and report."""
    out = tmp_path / "run"
    common = ["--config", CONFIG, f"input.path={RATED}", "input.limit=120", f"output.dir={out}",
              "ray.progress=false"]
    assert main(["curate", *common]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^prompts\s+120 prompt\s+120 prompt\s+0\s+[\d.]+\s+yes$", text, re.M), text
    assert re.search(r"^pairs\s+12 selected prompt\s+12 pair", text, re.M)
    assert text.strip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"
    assert {"pvar_hist.png", "margin_hist.png", "sources.png", "reward_vs_length.png"} <= \
        set(check_page(out / "report" / "index.html"))

    stats_before = {p: p.stat().st_mtime_ns for p in (out / "stats").rglob("*")}
    assert main(["select", *common, "select.rule=margin_curriculum", "select.fraction=null",
                 "select.sft_quantile=0.25"]) == 0
    capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in (out / "stats").rglob("*")} == stats_before
    page = (out / "report" / "index.html").read_text()
    assert "margin_curriculum" in page and "sft route" not in page  # the route line lives in the PNG
    pairs = pq.read_table(out / "pairs", columns=["route"]).column("route").to_pylist()
    assert len(pairs) == 120 and pairs.count("sft") == 30  # every pair by default; the hardest quarter to SFT
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(st["balanced"] for st in manifest["stages"].values())

    assert main(["compare", str(out)]) == 0
    assert "Jaccard overlap" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "stats").rglob("*")} == stats_before


def test_select_without_stats_is_one_line(tmp_path, capsys, no_ray):
    rc = main(["select", "--config", CONFIG, f"output.dir={tmp_path / 'typo'}"])
    assert rc == 2 and "has no complete stats/ stage" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
