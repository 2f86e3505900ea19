"""Selection rules side by side on the same statistics: overlap, distributions of what each keeps, source mix.

    python -m pipelines.reporting.compare runs/real --rules pvar_top,random,margin_curriculum,pd_consensus
    python -m pipelines.reporting.compare runs/real --rules pvar_top,pd_consensus --fraction 0.3 --stratify-by source

Each rule of `operators.select.SELECTORS` runs on the run's `stats/` as they are (read-only: nothing is
recomputed, regenerated or rescored). Every rule gets the same budget so that overlaps compare like with like
(`--rule-defaults` gives each its own default instead). A rule that cannot apply to these statistics, such as
`pd_consensus` without multi-aspect scores, is reported as skipped with its reason. Writes
`compare/compare.json` and `compare/index.html` (with two PNGs) and prints a table.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from operators.select import (
    DEFAULT_FRACTION,
    SELECT_COLUMNS,
    SELECTORS,
    Budget,
    RuleParams,
    SelectionError,
    select,
)
from pipelines.reporting.plots import RULE_CUT, values
from pipelines.reporting.report import CSS, open_run, publish, read_columns, staging_dir

COMPARE_DIR = "compare"
STATS = ("pvar", "margin", "pd", "len_corr")
DEFAULT_RULES = "pvar_top,random,margin_curriculum,pd_consensus"


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two selections (masks over the same prompts); two empty sets are equal."""
    union = int(np.sum(a | b))
    return 1.0 if union == 0 else float(np.sum(a & b)) / union


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def summarize(table: pa.Table, mask: np.ndarray) -> dict[str, Any]:
    """Count, mean/median of each statistic and the source mix of the rows in `mask`."""
    out: dict[str, Any] = {"selected": int(mask.sum()), "fraction": _num(mask.mean()) if mask.size else None}
    dist = {}
    for col in STATS:
        v = values(table, col)[mask]
        v = v[np.isfinite(v)]
        dist[col] = {"mean": _num(v.mean()) if v.size else None,
                     "median": _num(np.median(v)) if v.size else None}
    out["stats"] = dist
    if "source" in table.column_names:
        src = np.array([str(s) for s in table.column("source").to_pylist()], dtype=object)[mask]
        names, counts = np.unique(src, return_counts=True)
        by_count = sorted(zip(names, counts, strict=True), key=lambda t: -t[1])
        out["sources"] = {str(n): int(c) for n, c in by_count}
    return out


def ties_at_cut(table: pa.Table, rule: str, mask: np.ndarray) -> dict[str, Any] | None:
    """Prompts that share the cut value with the last one kept, when only some of them were kept. The seed's
    hash then decided, the same hash that orders `random`, so overlaps with `random` come out inflated."""
    if rule not in RULE_CUT:
        return None
    col, side = RULE_CUT[rule]
    v = values(table, col)
    kept = v[mask & np.isfinite(v)]
    if not kept.size:
        return None
    cut = float(kept.min() if side == "min" else kept.max())
    tied = np.isfinite(v) & (v == cut)
    if int(tied.sum()) == int((tied & mask).sum()):
        return None
    return {"column": col, "value": cut, "tied": int(tied.sum()), "kept": int((tied & mask).sum())}


def apply_rules(table: pa.Table, rules: list[str], budget: Budget | None, params: RuleParams,
                stratify_by: str | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Selected masks per rule that applies, and the reason for each rule that does not."""
    chosen: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for rule in rules:
        b = budget or Budget(fraction=DEFAULT_FRACTION[rule])
        if rule == "threshold" and not params.column:
            skipped[rule] = "rule 'threshold' needs --column (and --min and/or --max)"
            continue
        try:
            decision = select(table, rule, b, params, stratify_by=stratify_by)
        except SelectionError as e:
            skipped[rule] = str(e)
            continue
        # select() returns rows in the input's order, so masks line up with `table`.
        chosen[rule] = values(decision, "selected") > 0
    return chosen, skipped


def compare(run_dir: str | Path, rules: list[str], fraction: float | None = 0.1, count: int | None = None,
            seed: int | None = None, stratify_by: str | None = None, rule_defaults: bool = False,
            threshold: tuple[str | None, float | None, float | None] = (None, None, None)) -> dict[str, Any]:
    """Apply `rules` to the run's stats/ and write compare/; returns what compare.json holds plus `html`."""
    run = open_run(run_dir)
    cols = list(dict.fromkeys([*SELECT_COLUMNS, "len_corr", *(c for c in (stratify_by, threshold[0]) if c)]))
    table = read_columns(run, "stats", cols)
    if table is None:
        raise FileNotFoundError(f"{run.uri} has no stats/ stage; run `python -m pipelines.curate` first")
    if seed is None:  # the run's own tie-break seed, so `pvar_top` here matches the run's selection/
        sc = run.manifest.get("configs", {}).get("curate", {})
        seed = sc.get("select", {}).get("seed")
        seed = sc.get("run", {}).get("seed", 0) if seed is None else seed
    budget = None if rule_defaults else Budget(fraction=None if count is not None else fraction, count=count)
    params = RuleParams(seed=int(seed), column=threshold[0], min=threshold[1], max=threshold[2])
    chosen, skipped = apply_rules(table, rules, budget, params, stratify_by)
    names = list(chosen)
    result = {
        "run_dir": run.uri, "prompts": table.num_rows, "seed": int(seed), "stratify_by": stratify_by,
        "budget": "rule defaults" if budget is None else {"fraction": budget.fraction, "count": budget.count},
        "all": summarize(table, np.ones(table.num_rows, bool)),
        "rules": {r: {**summarize(table, m), "ties_at_cut": ties_at_cut(table, r, m)}
                  for r, m in chosen.items()},
        "skipped": skipped,
        "jaccard": {a: {b: round(jaccard(chosen[a], chosen[b]), 6) for b in names} for a in names},
    }
    out = staging_dir(run, COMPARE_DIR)
    images = [plot_jaccard(result, out), plot_distributions(table, chosen, out)]
    (out / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "index.html").write_text(render_html(result, [i for i in images if i]), encoding="utf-8")
    result["html"] = str(publish(run, out, COMPARE_DIR))
    return result


# ----------------------------------------------------------------------------------------------------------
# Plots and page
# ----------------------------------------------------------------------------------------------------------


def plot_jaccard(result: dict[str, Any], out: Path) -> str | None:
    names = list(result["jaccard"])
    if not names:
        return None
    m = np.array([[result["jaccard"][a][b] for b in names] for a in names])
    fig = Figure(figsize=(1.8 + 0.85 * len(names), 1.3 + 0.7 * len(names)))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if m[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("Jaccard overlap of selected prompts", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "jaccard.png", dpi=100)
    return "jaccard.png"


def plot_distributions(table: pa.Table, chosen: dict[str, np.ndarray], out: Path) -> str | None:
    cols = [c for c in STATS if np.isfinite(values(table, c)).any()]
    if not chosen or not cols:
        return None
    groups = {"(all)": np.ones(table.num_rows, bool), **chosen}
    ncol = min(2, len(cols))
    nrow = -(-len(cols) // ncol)
    fig = Figure(figsize=(max(3.2, 1.0 + 0.5 * len(groups)) * ncol, 0.6 + 3.0 * nrow))
    for i, col in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        v = values(table, col)
        data = [v[m & np.isfinite(v)] for m in groups.values()]
        ax.boxplot([d if d.size else [np.nan] for d in data], widths=0.6, showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=30, ha="right", fontsize=8)
        ax.set_title(col, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("selected prompts per rule (box: quartiles, whiskers: 1.5 IQR)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "distributions.png", dpi=100)
    return "distributions.png"


def _fmt(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.3g} / {d['median']:.3g}"


def _short(name: str, n: int = 32) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def rows(result: dict[str, Any], top_sources: int = 3) -> list[list[str]]:
    """One row per rule (and the whole set first): count, mean / median per statistic, leading sources."""
    header = ["rule", "selected", *[f"{c} mean/med" for c in STATS], "sources (share)"]
    body = [header]
    for name, s in [("(all)", result["all"]), *result["rules"].items()]:
        src = s.get("sources", {})
        mix = ", ".join(f"{_short(k)} {100 * v / max(s['selected'], 1):.0f}%"
                        for k, v in list(src.items())[:top_sources])
        if len(src) > top_sources:
            mix += f", +{len(src) - top_sources} more"
        body.append([name, str(s["selected"]), *[_fmt(s["stats"][c]) for c in STATS], mix or "-"])
    return body


def format_table(result: dict[str, Any]) -> str:
    body = rows(result)
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
    names = list(result["jaccard"])
    if names:
        w = max(len(n) for n in names)
        lines += ["", "Jaccard overlap", " " * (w + 2) + "  ".join(n.rjust(max(6, len(n))) for n in names)]
        for a in names:
            lines.append(a.ljust(w + 2) + "  ".join(f"{result['jaccard'][a][b]:.3f}".rjust(max(6, len(b)))
                                                    for b in names))
    lines += [f"skipped {rule}: {why}" for rule, why in result["skipped"].items()]
    lines += [f"note: {n}" for n in tie_notes(result)]
    return "\n".join(lines)


def tie_notes(result: dict[str, Any]) -> list[str]:
    return [f"{r}: {t['tied']} prompts tie at the cut {t['column']} = {t['value']:.4g}; the seed's hash "
            f"kept {t['kept']} of them (the hash that orders `random`, so overlap with random is inflated)"
            for r, s in result["rules"].items() if (t := s.get("ties_at_cut"))]


def render_html(result: dict[str, Any], images: list[str]) -> str:
    e = html.escape
    body = rows(result, top_sources=6)
    table = "<table>" + "".join(
        "<tr>" + "".join(f"<{tag}>{e(c)}</{tag}>" for c in r) + "</tr>"
        for tag, r in zip(["th"] + ["td"] * (len(body) - 1), body, strict=True)) + "</table>"
    skipped = "".join(f"<p class=note>skipped <code>{e(r)}</code>: {e(w)}</p>"
                      for r, w in result["skipped"].items())
    budget = result["budget"] if isinstance(result["budget"], str) else \
        ", ".join(f"{k} {v}" for k, v in result["budget"].items() if v is not None)
    imgs = "".join(f'<img src="{e(i)}" alt="{e(i[:-4])}">' for i in images)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>prefsift compare: {e(result['run_dir'])}"
            f"</title><style>{CSS}</style></head><body><h1>Selection rules side by side</h1>"
            f"<p>{e(result['run_dir'])}: {result['prompts']} prompts, budget {e(budget)}, "
            f"seed {result['seed']}"
            + (f", stratified by {e(result['stratify_by'])}" if result["stratify_by"] else "")
            + f"</p><div class=grid>{imgs}</div><h2>Per rule</h2>{table}{skipped}"
            + "".join(f"<p class=note>{e(n)}</p>" for n in tie_notes(result))
            + "<p class=note>The statistics are read from stats/ as they are; nothing is recomputed.</p>"
            "</body></html>")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Apply several selection rules to a run's statistics; compare.")
    ap.add_argument("run_dir", help="a run folder with a complete stats/ stage")
    ap.add_argument("--rules", default=DEFAULT_RULES, help=f"comma-separated, from: {', '.join(SELECTORS)}")
    ap.add_argument("--fraction", type=float, default=0.1, help="one budget for every rule (default 0.1)")
    ap.add_argument("--count", type=int, default=None, help="a budget in prompts instead of a fraction")
    ap.add_argument("--rule-defaults", action="store_true", help="each rule's own default budget instead")
    ap.add_argument("--seed", type=int, default=None, help="tie-break seed (default: the run's)")
    ap.add_argument("--stratify-by", default=None, help="apply the budget within each value of a column")
    ap.add_argument("--column", default=None, help="for the threshold rule: the statistic it bounds")
    ap.add_argument("--min", type=float, default=None, help="for the threshold rule")
    ap.add_argument("--max", type=float, default=None, help="for the threshold rule")
    args = ap.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for r in rules:
        if r not in SELECTORS:
            close = difflib.get_close_matches(r, list(SELECTORS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"--rules: unknown rule {r!r}{hint} (choose from {', '.join(SELECTORS)})", file=sys.stderr)
            return 2
    if not 0.0 <= args.fraction <= 1.0:
        print(f"--fraction: {args.fraction} is not in [0, 1]", file=sys.stderr)
        return 2
    try:
        result = compare(args.run_dir, list(dict.fromkeys(rules)), args.fraction, args.count, args.seed,
                         args.stratify_by, args.rule_defaults, (args.column, args.min, args.max))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(result["html"])
    return 0


if __name__ == "__main__":
    from pipelines.runtime.entry import run_cli

    sys.exit(run_cli(main))
