"""The run report on a hand-built run folder (no Ray): the plots exist, are PNGs, and the page links them."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.select import Budget, RuleParams, select
from pipelines.reporting.plots import Pearson, cut_values, response_batches
from pipelines.reporting.report import open_run, print_summary, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, *, prompts: int = 240, k: int = 4, aspects: bool = True, train: bool = True,
             evaluation: bool = True, rule: str = "pvar_top", fraction: float = 0.1, seed: int = 0,
             per_prompt: bool = False) -> Path:
    """A run folder with the layout curate writes: stats/, selection/, scored/, manifest.json (+ training).
    scored/ has a row per response, or with `per_prompt` a row per prompt holding its responses as a list."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"p{i:04d}" for i in range(prompts)]
    sources = rng.choice(["ultrafeedback", "arena", "helpsteer"], size=prompts, p=[0.6, 0.3, 0.1])
    stats = pa.table({
        "prompt_id": ids, "prompt": [f"prompt {i}" for i in range(prompts)], "source": sources.tolist(),
        "n": [k] * prompts, "pvar": rng.uniform(0, 0.25, prompts), "margin": rng.gamma(2.0, 1.5, prompts),
        "pd": pa.array(rng.normal(-0.5, 0.7, prompts) if aspects else [None] * prompts, pa.float64()),
        "len_corr": rng.uniform(-1, 1, prompts), "tau": [1.0] * prompts,
    })
    (root / "stats").mkdir()
    pq.write_table(stats, root / "stats" / "part-0.parquet")
    (root / "stats" / "_SUCCESS").write_text("fp")
    decision = select(stats, rule, Budget(fraction=fraction), RuleParams(seed=seed))
    selection = stats
    for name in ("selected", "rank", "selector", "route", "order"):
        selection = selection.append_column(name, decision.column(name))
    (root / "selection").mkdir()
    pq.write_table(selection, root / "selection" / "part-0.parquet")
    n = prompts * k
    lengths = rng.integers(1, 4000, n)
    scored = pa.table({"prompt_id": np.repeat(ids, k).tolist(), "sample_idx": np.tile(np.arange(k), prompts),
                       "response": ["x"] * n, "reward": 0.001 * lengths + rng.normal(0, 1, n),
                       "response_len": lengths})
    if per_prompt:
        responses = [{"text": "x", "sample_idx": j, "overall": r, "len": n}
                     for j, r, n in zip(scored.column("sample_idx").to_pylist(), scored.column("reward").to_pylist(),
                                        lengths.tolist(), strict=True)]
        scored = pa.table({"prompt_id": ids, "responses": [responses[i * k:(i + 1) * k] for i in range(prompts)]})
        n = prompts
    (root / "scored").mkdir()
    for i in range(2):  # two shards, so streaming over files and batches is exercised
        pq.write_table(scored.slice(i * n // 2, n // 2), root / "scored" / f"part-{i}.parquet")
    n_sel = int(np.sum(decision.column("selected").to_numpy(zero_copy_only=False)))
    stage = {"quarantined": {}, "quarantined_total": 0, "balanced": True, "seconds": 1.5}
    manifest = {
        "stages": {
            "stats": {**stage, "rows_in": n, "rows_out": prompts, "rows_out_as_input": n,
                      "unit_in": "response", "unit_out": "prompt"},
            "prompts": {**stage, "rows_in": prompts + 3, "rows_out": prompts, "rows_out_as_input": prompts,
                        "quarantined": {"empty_prompt": 2, "duplicate_prompt_id": 1}, "quarantined_total": 3,
                        "unit_in": "prompt", "unit_out": "prompt"},
            "pairs": {**stage, "rows_in": n_sel, "rows_out": n_sel, "rows_out_as_input": n_sel,
                      "unit_in": "selected prompt", "unit_out": "pair"},
        },
        "configs": {"curate": {"run": {"seed": seed},
                               "select": {"rule": rule, "fraction": fraction, "seed": None}}},
        "versions": {"python": "3.11", "ray": "2.60.0"},
        "outputs": {"stats": str(root / "stats"), "pairs": str(root / "pairs")},
    }
    if train:
        (root / "train").mkdir()
        with open(root / "train" / "metrics.jsonl", "w") as f:
            for step in range(1, 13):
                f.write(json.dumps({"step": step, "loss": 0.69 - 0.02 * step,
                                    "rewards/accuracy": 0.5 + 0.03 * step,
                                    "rewards/margin": 0.01 * step, "lr": 5e-5, "grad_norm": 1.0 / step,
                                    "sft_fraction": 0.0}) + "\n")
            f.write('{"step": 12, "loss": 0.4')  # torn last line of a killed run: skipped
        manifest["train"] = {"steps": 12, "pairs": n_sel, "loss": "sigmoid", "seconds": 30.0}
    if evaluation:
        manifest["evaluation"] = {"win_rate": 0.6125, "ci95": [0.52, 0.70], "prompts": 32,
                                  "samples_per_prompt": 2, "judge": ["runs/tiny_models/reward_multi"]}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def img_sources(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def check_page(page: Path) -> list[str]:
    srcs = img_sources(page)
    assert srcs, "the page shows no plots"
    for src in srcs:
        assert not src.startswith(("/", "http")), f"image path {src} is not relative"
        f = page.parent / src
        assert f.is_file(), f"{src} is referenced but missing"
        data = f.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), f"{src} is not a PNG"
    assert "<script" not in page.read_text() and "http" not in page.read_text().split("</style>")[0]
    return srcs


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, Path]:
    """One report of a run with everything (aspects, training, evaluation), shared by read-only tests."""
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    return run, write_report(run)


def test_report_full_run(full):
    run, page = full
    assert page == run / "report" / "index.html"
    srcs = check_page(page)
    assert set(srcs) == {"pvar_hist.png", "margin_hist.png", "pd_hist.png", "sources.png",
                         "reward_vs_length.png", "training.png"}
    text = page.read_text()
    assert "0.613" in text and "[0.520, 0.700]" in text and "above 0.5" in text  # win rate and its CI
    assert "empty_prompt: 2" in text and "duplicate_prompt_id: 1" in text
    # stages in pipeline order, whatever order the manifest keys are in
    assert text.index("<td>prompts</td>") < text.index("<td>stats</td>") < text.index("<td>pairs</td>")


def test_report_without_aspects_training_or_evaluation(tmp_path):
    run = make_run(tmp_path / "run", aspects=False, train=False, evaluation=False)
    page = write_report(run)
    srcs = check_page(page)
    assert "pd_hist.png" not in srcs and "training.png" not in srcs
    assert "pd is empty" in page.read_text() and "Evaluation" not in page.read_text()


def test_rerender_drops_stale_plots(tmp_path):
    run = make_run(tmp_path / "run")
    write_report(run)
    shutil.rmtree(run / "train")
    page = write_report(run)
    assert not (page.parent / "training.png").exists()
    check_page(page)


def test_unbalanced_stage_is_flagged(tmp_path):
    run = make_run(tmp_path / "run")
    m = json.loads((run / "manifest.json").read_text())
    m["stages"]["stats"]["balanced"] = False
    (run / "manifest.json").write_text(json.dumps(m))
    text = write_report(run).read_text()
    assert "UNBALANCED STAGES" in text and "class=bad" in text
    out = io.StringIO()
    print_summary(run, file=out)
    assert re.search(r"^stats .* NO$", out.getvalue(), re.M)


def test_summary_table(full):
    run, _ = full
    out = io.StringIO()
    print_summary(run, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["stage", "in", "out", "quarantined", "seconds", "ok"]
    assert lines[1].startswith("prompts") and "3 (empty_prompt: 2, duplicate_prompt_id: 1)" in lines[1]
    assert any(line.strip().startswith("report") and line.endswith("report/index.html") for line in lines)
    assert any("win rate" in line and "0.613 [0.520, 0.700]" in line for line in lines)


def test_cut_values_by_hand():
    x = np.array([0.05, 0.20, 0.10, np.nan, 0.24])
    sel = np.array([False, True, False, True, True])
    # pvar_top keeps the largest, so its cut is the smallest value it kept
    assert cut_values(x, sel, "pvar", "pvar_top") == [("min", 0.20)]
    assert cut_values(x, sel, "pvar", "pvar_bottom") == [("max", 0.24)]
    assert cut_values(x, sel, "pd", "pd_consensus") == [("max", 0.24)]
    assert cut_values(x, sel, "margin", "pvar_top") == []  # pvar_top does not cut on margin
    assert cut_values(x, sel, "pvar", "random") == []
    assert cut_values(x, sel, "pvar", "threshold", "pvar") == [("min", 0.20), ("max", 0.24)]
    assert cut_values(x, np.zeros(5, bool), "pvar", "pvar_top") == []


def test_streaming_pearson_matches_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.gamma(2, 300, 5000), rng.normal(size=5000)
    y += 0.002 * x
    p = Pearson()
    for lo in range(0, 5000, 1234):  # uneven batches
        p.add(x[lo:lo + 1234], y[lo:lo + 1234])
    assert p.n == 5000
    assert p.r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert np.isnan(Pearson().r)


def test_report_module_entry_point(tmp_path):
    run = make_run(tmp_path / "run", train=False)
    res = subprocess.run([sys.executable, "-m", "pipelines.reporting.report", str(run)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(run / "report" / "index.html")


def overwrite_head(run: Path, stage: str, col: str, head: list[float]) -> None:
    """Replace the first values of a column in every shard of a stage, as a buggy upstream would write them."""
    for shard in sorted((run / stage).glob("*.parquet")):
        t = pq.read_table(shard)
        x = t.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        x[:len(head)] = head
        pq.write_table(t.set_column(t.column_names.index(col), col, pa.array(x)), shard)


def test_infinite_values_are_left_out_with_a_note(tmp_path):
    """A prompt rated 1e308, -1e308, 0 had margin = inf in stats/: the plots drop it and say so."""
    run = make_run(tmp_path / "run", train=False)
    for stage in ("stats", "selection"):
        overwrite_head(run, stage, "margin", [np.inf, np.inf])
        overwrite_head(run, stage, "pvar", [np.nan])  # NaN (not null) is as wrong as inf
    overwrite_head(run, "scored", "reward", [-np.inf])  # one per shard, two in all
    page = write_report(run)
    assert {"pvar_hist.png", "margin_hist.png", "reward_vs_length.png"} <= set(check_page(page))
    text = page.read_text()
    assert "margin_hist: 2 non-finite margin value(s) (inf or NaN) left out of the plot." in text
    assert "pvar_hist: 1 non-finite pvar value(s)" in text
    assert "reward_vs_length: 2 non-finite reward value(s)" in text
    assert "failed" not in text


def test_a_failing_plot_leaves_the_rest_of_the_report(tmp_path):
    """Huge but finite values (a 1e308 - (-1e308) span overflows float64) crashed matplotlib after every data
    stage had completed, and the run exited 1. Now that plot is left out with a warning naming it and the
    cause; the other plots, the page, the summary table and exit code 0 remain."""
    run = make_run(tmp_path / "run")
    for stage in ("stats", "selection"):
        overwrite_head(run, stage, "margin", [1e308, -1e308, np.inf])
    overwrite_head(run, "scored", "reward", [1e308, -1e308])
    res = subprocess.run([sys.executable, "-m", "pipelines.reporting.report", str(run), "--summary"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    page = run / "report" / "index.html"
    assert res.stdout.strip().splitlines()[-1] == str(page)
    assert res.stdout.splitlines()[0].split() == ["stage", "in", "out", "quarantined", "seconds", "ok"]
    for plot, col in (("margin_hist", "margin"), ("reward_vs_length", "reward")):
        assert re.search(rf"warning: report: the {plot} plot failed .*ValueError: {col} spans -1e\+308 to "
                         r"1e\+308, wider than a float64 can hold", res.stderr), res.stderr
        assert f"the {plot} plot failed and is left out: ValueError: {col} spans" in page.read_text()
    assert set(check_page(page)) == {"pvar_hist.png", "pd_hist.png", "sources.png", "training.png"}
    assert "margin_hist: 1 non-finite margin value(s)" in page.read_text()
    assert "<td>stats</td>" in page.read_text()  # the stage table is still there


def test_responses_of_per_prompt_scored(tmp_path):
    """Read from the one-row-per-prompt layout: the `len` and `overall` leaves, one value per response."""
    run = tmp_path / "run"
    (run / "scored").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "responses": [
        [{"text": "abc", "overall": 1.0, "len": 3}, {"text": "abcde", "overall": -np.inf, "len": 5}],
        [{"text": "ab", "overall": None, "len": 2}]]}), run / "scored" / "part-0.parquet")
    total, batches = response_batches(open_run(run))
    t = pa.concat_tables(list(batches))
    assert total == 3 and t.column("response_len").to_pylist() == [3, 5, 2]
    assert t.column("reward").to_pylist() == [1.0, -np.inf, None]


def test_reward_vs_length_from_per_prompt_scored(tmp_path):
    run = make_run(tmp_path / "run", train=False, per_prompt=True)
    page = write_report(run)
    assert "reward_vs_length.png" in check_page(page)
    shards = sorted((run / "scored").glob("*.parquet"))
    t = pq.read_table(shards[0])
    first = t.column("responses").to_pylist()
    first[0][1]["overall"] = float("inf")
    pq.write_table(t.set_column(1, "responses", pa.array(first, t.schema.field("responses").type)), shards[0])
    text = write_report(run).read_text()
    assert "reward_vs_length: 1 non-finite reward value(s)" in text and "failed" not in text


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        write_report(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium")
def test_page_renders_in_headless_chromium(full, tmp_path):
    """Opens the page in Chromium: every image decodes (naturalWidth > 0) and the screenshot is not blank."""
    _, page = full
    # The report itself has no JS; this probe is a copy beside it, so relative image paths resolve the same.
    probe = page.parent / "probe.html"  # removed below: other tests read this folder
    probe.write_text(page.read_text().replace("</body>", (
        "<script>addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.complete||"
        "!i.naturalWidth);document.body.setAttribute('data-broken',b.length);"
        "document.body.setAttribute('data-images',document.images.length)})</script></body>")))
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert 'data-broken="0"' in dom.stdout, dom.stderr[-2000:]
    assert f'data-images="{len(img_sources(page))}"' in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # something was drawn, not a blank page
