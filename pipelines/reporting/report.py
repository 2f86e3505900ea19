"""The run report: a static `report/index.html` with PNG plots, written into the run folder.

    python -m pipelines.reporting.report runs/demo        # (re)writes runs/demo/report/index.html and prints its path

A curator decides from pictures: the PVar, margin and PD distributions with the cut the selection made,
what it kept from each source, whether reward tracks length, the row accounting of every stage, and the
training curves and win rate when present. The page has no JS and no CDN: it opens from a laptop or a
bucket browser. Tables are read with pyarrow directly (per-prompt tables, only the columns a plot needs).
"""

from __future__ import annotations

import html
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.reporting.plots import plot_hist, plot_length, plot_sources, plot_training, read_metrics
from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir

REPORT_DIR = "report"
STAGE_ORDER = ("prompts", "samples", "scored", "stats", "selection", "pairs", "pairs_ref",
               "eval_policy", "eval_reference")
T = TypeVar("T")


def open_run(run_dir: str | Path) -> RunDir:
    uri = str(run_dir)
    fs, root = pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    if fs.get_file_info(root + "/manifest.json").type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no manifest.json)")
    return RunDir(uri)


def read_columns(run: RunDir, stage: str, columns: list[str]) -> pa.Table | None:
    """The named columns that the stage has (others are left out); None when the stage is absent."""
    from pipelines.runtime import stages  # lazily: it imports Ray Data, which a report does not need

    return stages.read_columns(run, stage, columns) if run.exists(stage) else None


def stats_with_selection(run: RunDir) -> pa.Table | None:
    """The statistics the plots need, with the selection's decisions joined on prompt_id when a selection
    was made (selection/ holds the keys and decisions only, not a copy of the statistics)."""
    stats = read_columns(run, "stats", ["prompt_id", "source", "pvar", "margin", "pd", "len_corr"])
    decisions = read_columns(run, "selection", ["prompt_id", "selected", "selector", "route"])
    if stats is None or decisions is None:
        return stats
    return stats.join(decisions, "prompt_id", join_type="left outer")


def isolated(name: str, part: Callable[[], T], notes: list[str]) -> T | None:
    """Make one part of the page (a plot, or the table the plots read) on its own: a part that fails leaves
    a warning and a note naming it and the cause, and the rest of the page is still written. The report
    comes after the data stages, so it must never fail a run whose stages completed."""
    try:
        return part()
    except Exception as e:  # any plot bug or data surprise: the rest of the page and the summary matter more
        cause = f"{type(e).__name__}: {e}"
        say(f"warning: report: {name} failed and is left out ({cause})")
        notes.append(f"{name} failed and is left out: {cause}")
        return None


def select_cfg(manifest: dict[str, Any], rule: str | None) -> dict[str, Any]:
    """The select section that made the current selection: a later `pipelines.select` rerun wins."""
    configs = manifest.get("configs", {})
    for name in ("select", "curate"):
        sc = configs.get(name, {}).get("select", {})
        if sc and (rule is None or sc.get("rule") == rule):
            return sc
    return configs.get("curate", {}).get("select", {})


def staging_dir(run: RunDir, sub: str) -> Path:
    """Where the page is rendered: `<run>/<sub>/` itself for a local run, a temp folder for a bucket."""
    out = Path(tempfile.mkdtemp(prefix=f"prefsift-{sub}-")) if "://" in run.uri else Path(run.path(sub))
    if out.exists():  # plots from an earlier render (e.g. of training since removed) must not linger
        for old in out.glob("*.png"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def publish(run: RunDir, out: Path, sub: str) -> Path | str:
    """Copy a staged page into a remote run folder; returns the page's path or URI."""
    if "://" not in run.uri:
        return out / "index.html"
    run.fs.create_dir(run.path(sub), recursive=True)
    for f in out.iterdir():
        with open(f, "rb") as src, run.fs.open_output_stream(run.path(sub, f.name)) as dst:
            dst.write(src.read())
    shutil.rmtree(out, ignore_errors=True)
    return run.uri_of(sub, "index.html")


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------


def ordered_stages(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    stages = manifest.get("stages", {})
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def stage_table(manifest: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for name, st in ordered_stages(manifest):
        q = st.get("quarantined") or {}
        reasons = ", ".join(f"{e(str(k))}: {v}" for k, v in sorted(q.items(), key=lambda kv: -kv[1])) or "-"
        ok = st.get("balanced", True)
        cells = [e(name), f"{st.get('rows_in', '')} {e(st.get('unit_in', ''))}",
                 f"{st.get('rows_out', '')} {e(st.get('unit_out', ''))}", str(st.get("quarantined_total", 0)),
                 reasons, f"{st.get('seconds', 0):.1f}", "yes" if ok else "NO: in != out + quarantined"]
        rows.append(f"<tr{'' if ok else ' class=bad'}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>stage</th><th>in</th><th>out</th><th>quarantined</th><th>reasons</th><th>seconds</th>" \
           "<th>balanced</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>" if rows else "<p>no stages recorded</p>"


def evaluation_html(manifest: dict[str, Any]) -> str:
    ev = manifest.get("evaluation")
    if not ev:
        return ""
    lo, hi = (ev.get("ci95") or [float("nan")] * 2)[:2]
    verdict = "above 0.5" if lo > 0.5 else "below 0.5" if hi < 0.5 else "includes 0.5"
    return (f"<h2>Evaluation</h2><p class=big>win rate {ev.get('win_rate', float('nan')):.3f} "
            f"&nbsp; 95% CI [{lo:.3f}, {hi:.3f}] ({verdict})</p><p>policy vs reference over "
            f"{ev.get('prompts', '?')} held-out prompts, {ev.get('samples_per_prompt', '?')} samples each, "
            f"judged by {html.escape(', '.join(map(str, ev.get('judge', []))) or 'a reward model')}</p>")


CSS = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
       "color:#1f2328}table{border-collapse:collapse;margin:.5em 0}"
       "td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}tr.bad{background:#ffebe9}"
       ".big{font-size:1.3em}img{max-width:100%;margin:.3em .3em .3em 0}"
       ".grid{display:flex;flex-wrap:wrap;align-items:flex-start}.note{color:#656d76}"
       "code{background:#f6f8fa;padding:0 3px}")


def render_html(run: RunDir, manifest: dict[str, Any], images: dict[str, str | None], notes: list[str],
                head: dict[str, Any]) -> str:
    e = html.escape

    def img(key: str, alt: str) -> str:
        return f'<img src="{e(images[key] or "")}" alt="{e(alt)}">' if images.get(key) else ""

    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in head.items())
    hists = "".join(img(f"{c}_hist", f"{c} histogram") for c in ("pvar", "margin", "pd"))
    train = manifest.get("train") or manifest.get("training")
    train_html = ""
    if train or images.get("training"):
        facts_t = ", ".join(f"{k} {train[k]}" for k in ("loss", "steps", "pairs", "seconds")
                            if train and k in train)
        train_html = f"<h2>Training</h2><p>{e(facts_t)}</p>{img('training', 'training curves')}"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>prefsift report: {e(run.uri)}</title>"
            f"<style>{CSS}</style></head><body><h1>prefsift run report</h1><table>{facts}</table>"
            f"<h2>Statistics and selection</h2>"
            f"<div class=grid>{hists}{img('sources', 'source composition')}</div>"
            f"<h2>Reward vs length</h2>{img('length', 'reward vs length')}"
            f"<h2>Stages</h2>{stage_table(manifest)}{train_html}{evaluation_html(manifest)}"
            + "".join(f"<p class=note>{e(n)}</p>" for n in notes)
            + f"<p class=note>versions: {e(versions)}</p></body></html>")


def write_report(run_dir: str | Path) -> Path | str:
    """Write `<run>/report/index.html` and its PNGs; returns the page's path (a URI for a remote run)."""
    run = open_run(run_dir)
    manifest = run.manifest
    out = staging_dir(run, REPORT_DIR)

    notes: list[str] = []
    stats = isolated("reading stats/ and selection/", lambda: stats_with_selection(run), notes)
    rule = None
    if stats is not None and "selector" in stats.column_names and stats.num_rows:
        rule = stats.column("selector")[0].as_py()
    sc = select_cfg(manifest, rule)
    images: dict[str, str | None] = {}
    if stats is None:
        notes.append("No readable stats/ stage: statistics plots are left out.")
    else:
        for col in ("pvar", "margin", "pd"):
            images[f"{col}_hist"] = isolated(f"the {col}_hist plot",
                                             lambda c=col: plot_hist(stats, c, rule, sc, out, notes), notes)
        if "pd" not in stats.column_names or stats.column("pd").null_count == stats.num_rows:
            notes.append("pd is empty: the scores have one aspect, so there is no preference divergence.")
        images["sources"] = isolated("the sources plot", lambda: plot_sources(stats, out), notes)
    images["length"] = isolated("the reward_vs_length plot", lambda: plot_length(run, stats, out, notes), notes)
    images["training"] = isolated("the training plot", lambda: plot_training(read_metrics(run), out), notes)

    n_sel = int(pc.sum(stats.column("selected")).as_py() or 0) if stats is not None and "selected" in \
        stats.column_names else None
    budget = sc.get("fraction") if sc.get("fraction") is not None else sc.get("count")
    head = {"run folder": run.uri, "updated": manifest.get("updated", "?"),
            "prompts": stats.num_rows if stats is not None else "?",
            "selection": f"{rule or 'none yet'}" + (f", budget {budget}" if budget is not None else "")
            + (f", stratified by {sc['stratify_by']}" if sc.get("stratify_by") else ""),
            "selected": n_sel if n_sel is not None else "-",
            "pairs": (manifest.get("stages", {}).get("pairs") or {}).get("rows_out", "-")}
    bad = [s for s, st in manifest.get("stages", {}).items() if not st.get("balanced", True)]
    if bad:
        head["UNBALANCED STAGES"] = ", ".join(bad)
    (out / "index.html").write_text(render_html(run, manifest, images, notes, head), encoding="utf-8")
    return publish(run, out, REPORT_DIR)


def print_summary(run_dir: str | Path, file=None) -> None:
    """The end-of-run table: rows per stage, quarantined, seconds, and where the outputs are."""
    file = file or sys.stdout
    run = open_run(run_dir)
    m = run.manifest
    rows = [("stage", "in", "out", "quarantined", "seconds", "ok")]
    for name, st in ordered_stages(m):
        q = st.get("quarantined_total", 0)
        why = ", ".join(f"{k}: {v}" for k, v in (st.get("quarantined") or {}).items())
        rows.append((name, f"{st.get('rows_in', '')} {st.get('unit_in', '')}",
                     f"{st.get('rows_out', '')} {st.get('unit_out', '')}", f"{q} ({why})" if q else "0",
                     f"{st.get('seconds', 0):.1f}", "yes" if st.get("balanced", True) else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=file)
    where = {k: v for k, v in (m.get("outputs") or {}).items() if isinstance(v, str) and k != "run_dir"}
    if (m.get("train") or {}).get("checkpoint"):
        where["checkpoint"] = m["train"]["checkpoint"]
    if m.get("evaluation"):
        ev = m["evaluation"]
        lo, hi = ev.get("ci95", [float("nan")] * 2)
        where["win rate"] = f"{ev.get('win_rate', float('nan')):.3f} [{lo:.3f}, {hi:.3f}]"
    if run.exists(REPORT_DIR, "index.html"):
        where["report"] = run.uri_of(REPORT_DIR, "index.html")
    print(f"outputs in {run.uri}:", file=file)
    for k, v in where.items():
        print(f"  {k:<11}{v}", file=file)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Write a run folder's report/index.html and print its path.")
    ap.add_argument("run_dir", help="a run folder (holding manifest.json)")
    ap.add_argument("--summary", action="store_true", help="also print the per-stage summary table")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.summary:
        print_summary(args.run_dir)
    print(path)
    return 0


if __name__ == "__main__":
    from pipelines.runtime.entry import run_cli

    sys.exit(run_cli(main))
