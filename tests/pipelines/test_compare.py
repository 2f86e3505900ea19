"""Selection rules side by side on a hand-built run folder: overlaps, per-rule summaries, stats/ untouched."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.reporting.compare import compare, jaccard, main, summarize, ties_at_cut
from tests.pipelines.test_report import check_page, make_run

RULES = ["pvar_top", "random", "margin_curriculum", "pd_consensus"]


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def test_jaccard_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 0], bool)
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 1.0  # two empty selections are the same set


def test_summarize_by_hand():
    t = pa.table({"pvar": [0.1, 0.2, 0.3, None], "margin": [1.0, 2.0, 4.0, 8.0],
                  "source": ["a", "b", "b", "a"]})
    s = summarize(t, np.array([True, True, True, False]))
    assert s["selected"] == 3 and s["fraction"] == 0.75
    assert s["stats"]["pvar"] == {"mean": 0.2, "median": 0.2}
    assert s["stats"]["margin"] == {"mean": pytest.approx(7 / 3, abs=1e-6), "median": 2.0}
    assert s["stats"]["pd"] == {"mean": None, "median": None}  # an absent statistic is None, not NaN
    assert s["sources"] == {"b": 2, "a": 1}


def test_compare_rules_on_the_same_stats(tmp_path):
    run = make_run(tmp_path / "run", prompts=300, train=False, evaluation=False)
    before = snapshot(run / "stats")
    res = compare(run, RULES + ["pvar_bottom"], fraction=0.2)
    assert snapshot(run / "stats") == before  # read, never rewritten
    assert res["skipped"] == {}
    names = list(res["jaccard"])
    assert names == RULES + ["pvar_bottom"]
    for a in names:
        assert res["jaccard"][a][a] == 1.0
        for b in names:
            assert 0.0 <= res["jaccard"][a][b] <= 1.0
            assert res["jaccard"][a][b] == res["jaccard"][b][a]
    assert res["jaccard"]["pvar_top"]["pvar_bottom"] == 0.0  # opposite ends of PVar
    for r in names:
        assert res["rules"][r]["selected"] == 60  # the same budget for every rule
    # pvar_top keeps the high-PVar prompts; their mean is above the whole set's and pvar_bottom's.
    def pvar_mean(s: dict) -> float:
        return s["stats"]["pvar"]["mean"]

    rules = res["rules"]
    assert pvar_mean(rules["pvar_top"]) > pvar_mean(res["all"]) > pvar_mean(rules["pvar_bottom"])
    assert sum(res["rules"]["random"]["sources"].values()) == 60

    out = run / "compare"
    assert json.loads((out / "compare.json").read_text())["jaccard"] == res["jaccard"]
    srcs = check_page(out / "index.html")
    assert set(srcs) == {"jaccard.png", "distributions.png"}


def test_pvar_top_matches_the_runs_selection(tmp_path):
    """With the run's seed and budget, a rule applied here picks exactly what the run's selection/ holds."""
    run = make_run(tmp_path / "run", prompts=200, rule="pvar_top", fraction=0.1, seed=7, train=False)
    res = compare(run, ["pvar_top"], fraction=0.1)
    assert res["seed"] == 7
    sel = pq.read_table(run / "selection", columns=["selected", "pvar", "source"]).to_pandas()
    kept = sel[sel["selected"]]
    assert res["rules"]["pvar_top"]["selected"] == len(kept)
    assert res["rules"]["pvar_top"]["stats"]["pvar"]["mean"] == pytest.approx(kept["pvar"].mean(), abs=1e-6)
    assert res["rules"]["pvar_top"]["sources"] == kept["source"].value_counts().to_dict()


def test_pd_consensus_without_aspects_is_skipped(tmp_path):
    run = make_run(tmp_path / "run", aspects=False, train=False, evaluation=False)
    res = compare(run, RULES)
    assert list(res["skipped"]) == ["pd_consensus"]
    assert "multi-aspect" in res["skipped"]["pd_consensus"]
    assert set(res["rules"]) == {"pvar_top", "random", "margin_curriculum"}
    html = (run / "compare" / "index.html").read_text()
    assert "skipped <code>pd_consensus</code>" in html


def test_threshold_needs_a_column(tmp_path):
    run = make_run(tmp_path / "run", train=False, evaluation=False)
    res = compare(run, ["threshold", "pvar_top"], fraction=1.0)
    assert "--column" in res["skipped"]["threshold"]
    res = compare(run, ["threshold", "pvar_top"], fraction=1.0, threshold=("margin", 2.0, None))
    stats = pq.read_table(run / "stats", columns=["margin"]).column("margin").to_numpy()
    assert res["rules"]["threshold"]["selected"] == int((stats >= 2.0).sum())


def test_stratified_budget(tmp_path):
    run = make_run(tmp_path / "run", prompts=300, train=False, evaluation=False)
    res = compare(run, ["pvar_top"], fraction=0.5, stratify_by="source")
    for src, n in res["all"]["sources"].items():
        assert res["rules"]["pvar_top"]["sources"][src] == int(np.floor(0.5 * n + 0.5))


def test_main_prints_table_and_exits_2_on_unknown_rule(tmp_path, capsys):
    run = make_run(tmp_path / "run", train=False, evaluation=False)
    assert main([str(run), "--rules", "pvar_top,random", "--fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^pvar_top\s+60\s", out, re.M) and "Jaccard overlap" in out
    assert out.strip().splitlines()[-1] == str(run / "compare" / "index.html")

    assert main([str(run), "--rules", "pvar_tp"]) == 2
    err = capsys.readouterr().err
    assert "'pvar_tp'" in err and "did you mean 'pvar_top'" in err
    assert main([str(tmp_path / "nowhere"), "--rules", "random"]) == 2
    assert not os.path.exists(tmp_path / "nowhere")


def test_ties_at_cut_by_hand():
    t = pa.table({"margin": [9.0, 9.0, 9.0, 9.0, 5.0, 1.0]})
    kept = np.array([True, True, False, False, False, False])
    assert ties_at_cut(t, "margin_curriculum", kept) == {"column": "margin", "value": 9.0, "tied": 4,
                                                         "kept": 2}
    assert ties_at_cut(t, "margin_curriculum", np.array([True] * 4 + [False] * 2)) is None  # no tie was split
    assert ties_at_cut(t, "random", kept) is None
