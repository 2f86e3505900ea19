"""The run report: a static `report/index.html` with PNG plots, written into the run folder.

    python -m pipelines.reporting.report runs/demo        # (re)writes runs/demo/report/index.html and prints its path

A curator decides from pictures: the PVar, margin and PD distributions with the cut the selection made,
what it kept from each source, whether reward tracks length, the row accounting of every stage, and the
training curves and win rate when present. The page has no JS and no CDN: it opens from a laptop or a
bucket browser. Tables are read with pyarrow directly (per-prompt tables, only the columns a plot needs).
"""

from __future__ import annotations

import html
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.figure import Figure  # the OO API renders with Agg and leaves pyplot's global state alone

from pipelines.runtime.console import say
from pipelines.runtime.manifest import RunDir

REPORT_DIR = "report"
MAX_POINTS = 20_000  # scatter points: enough to see the shape, small enough for a < 1 MB PNG
STAGE_ORDER = ("prompts", "samples", "scored", "stats", "selection", "pairs", "pairs_ref",
               "eval_policy", "eval_reference")
# The statistic a rule ranks by and the end it keeps: "min" keeps the largest; its cut is the smallest kept.
RULE_CUT = {"pvar_top": ("pvar", "min"), "pvar_bottom": ("pvar", "max"),
            "margin_curriculum": ("margin", "min"), "pd_consensus": ("pd", "max")}
TRAIN_PANELS = (("loss", ("loss",)), ("reward accuracy", ("rewards/accuracy", "reward_accuracy")),
                ("reward margin", ("rewards/margin", "reward_margin", "margin")), ("lr", ("lr",)),
                ("grad norm", ("grad_norm",)), ("sft fraction", ("sft_fraction",)))
ALL, SEL, CUT = "#9aa5b1", "#1f6feb", "#d1242f"
T = TypeVar("T")


def open_run(run_dir: str | Path) -> RunDir:
    uri = str(run_dir)
    fs, root = pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    if fs.get_file_info(root + "/manifest.json").type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no manifest.json)")
    return RunDir(uri)


def read_columns(run: RunDir, stage: str, columns: list[str]) -> pa.Table | None:
    """The named columns that the stage has (others are left out); None when the stage is absent."""
    if not run.exists(stage):
        return None
    ds = pads.dataset(run.path(stage), filesystem=run.fs, format="parquet")
    return ds.to_table(columns=[c for c in columns if c in ds.schema.names])


def values(table: pa.Table, col: str) -> np.ndarray:
    if col not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.cast(table.column(col), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def plotted(table: pa.Table, col: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A column's values, the mask of those a plot draws, and how many non-finite values it leaves out.
    Nulls (a statistic that does not apply, such as pd without aspects) are not counted; inf and NaN are
    data gone wrong upstream, which a plot leaves out with a note instead of handing them to matplotlib."""
    x = values(table, col)
    ok = np.isfinite(x)
    nulls = table.column(col).null_count if col in table.column_names else x.size
    return x, ok, int((~ok).sum()) - nulls


def note_dropped(notes: list[str], plot: str, col: str, bad: int) -> None:
    if bad:
        notes.append(f"{plot}: {bad} non-finite {col} value(s) (inf or NaN) left out of the plot.")


def check_span(x: np.ndarray, col: str) -> None:
    """Finite values can still span more than a float64 holds (1e308 and -1e308); bins and axis ticks over
    that span overflow inside numpy or matplotlib with a message that names neither the column nor why."""
    if x.size and not np.isfinite(float(x.max()) - float(x.min())):
        raise ValueError(f"{col} spans {x.min():.4g} to {x.max():.4g}, wider than a float64 can hold")


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
# Plots: each writes one PNG into `out` and returns its file name
# ----------------------------------------------------------------------------------------------------------


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    return name


def cut_values(x: np.ndarray, selected: np.ndarray, col: str, rule: str | None,
               threshold_column: str | None = None) -> list[tuple[str, float]]:
    """The cut a rule made on `col`: the loosest value it kept ("min" for keep-the-largest rules). Several
    strata each have their own cut; the loosest one is drawn. Nothing for random or other columns."""
    side = "both" if rule == "threshold" and threshold_column == col else \
        RULE_CUT[rule][1] if rule in RULE_CUT and RULE_CUT[rule][0] == col else None
    kept = x[selected & np.isfinite(x)]
    if side is None or not kept.size:
        return []
    return [(s, float(kept.min() if s == "min" else kept.max())) for s in (("min", "max") if side == "both"
                                                                           else (side,))]


def plot_hist(stats: pa.Table, col: str, rule: str | None, sc: dict[str, Any], out: Path,
              notes: list[str]) -> str | None:
    x, ok, bad = plotted(stats, col)
    note_dropped(notes, f"{col}_hist", col, bad)
    if not ok.any():
        return None
    check_span(x[ok], col)
    sel = values(stats, "selected") > 0 if "selected" in stats.column_names else np.zeros(x.size, bool)
    fig = Figure(figsize=(5.3, 3.4))  # two side by side in the page's 1100 px
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(x[ok], bins=40)
    ax.hist(x[ok], bins=bins, color=ALL, label=f"all ({ok.sum()})")
    if sel.any():
        ax.hist(x[ok & sel], bins=bins, color=SEL, alpha=0.85, label=f"selected ({(ok & sel).sum()})")
    for side, v in cut_values(x, sel, col, rule, sc.get("column")):
        op = ">=" if side == "min" else "<="
        ax.axvline(v, color=CUT, ls="--", lw=1.5, label=f"cut: {col} {op} {v:.4g}")
    if col == "margin" and "route" in stats.column_names:
        route = np.array(stats.column("route").to_pylist(), dtype=object)
        sft = ok & sel & (route == "sft")
        if sft.any():
            ax.axvline(x[sft].max(), color="#bf8700", ls=":", lw=1.5,
                       label=f"sft route: margin <= {x[sft].max():.4g} ({sft.sum()})")
    ax.set_xlabel(col)
    ax.set_ylabel("prompts")
    ax.set_title(f"{col}: all vs selected" + (f" ({rule})" if rule else ""))
    ax.legend(fontsize=8)
    return _save(fig, out, f"{col}_hist.png")


def plot_sources(stats: pa.Table, out: Path, top: int = 12) -> str | None:
    if "source" not in stats.column_names or not stats.num_rows:
        return None
    src = np.array([str(s) for s in stats.column("source").to_pylist()], dtype=object)
    sel = values(stats, "selected") > 0
    names, counts = np.unique(src, return_counts=True)
    order = names[np.argsort(-counts, kind="stable")]
    shown = list(order[:top])
    if len(order) > top:  # the long tail of small sources shares one bar
        src = np.where(np.isin(src, shown), src, f"({len(order) - top} other sources)")
        shown.append(f"({len(order) - top} other sources)")
    n_all = np.array([(src == s).sum() for s in shown])
    n_sel = np.array([((src == s) & sel).sum() for s in shown])
    fig = Figure(figsize=(5.3, 1.6 + 0.42 * len(shown)))
    ax = fig.add_subplot()
    y = np.arange(len(shown))[::-1]
    ax.barh(y + 0.2, n_all, height=0.4, color=ALL, label="all")
    ax.barh(y - 0.2, n_sel, height=0.4, color=SEL, label="selected")
    for yi, a, s in zip(y, n_all, n_sel, strict=True):
        ax.text(max(a, s), yi, f"  {s}/{a} ({100 * s / max(a, 1):.0f}%)", va="center", fontsize=8)
    ax.set_yticks(y, [s if len(s) <= 40 else s[:37] + "..." for s in shown], fontsize=8)
    ax.set_xlim(0, n_all.max() * 1.45)
    ax.set_xlabel("prompts")
    ax.set_title("per source: selected (blue) of all (grey)", fontsize=10)
    return _save(fig, out, "sources.png")


class Pearson:
    """Streaming Pearson r (Chan et al.'s pairwise update), so the pooled value covers every response while
    only a sample is plotted."""

    def __init__(self) -> None:
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        m = x.size
        if not m:
            return
        mx, my = float(x.mean()), float(y.mean())
        dx, dy, n = mx - self.mx, my - self.my, self.n + m
        self.sxx += float(((x - mx) ** 2).sum()) + dx * dx * self.n * m / n
        self.syy += float(((y - my) ** 2).sum()) + dy * dy * self.n * m / n
        self.sxy += float(((x - mx) * (y - my)).sum()) + dx * dy * self.n * m / n
        self.mx += dx * m / n
        self.my += dy * m / n
        self.n = n

    @property
    def r(self) -> float:
        return self.sxy / np.sqrt(self.sxx * self.syy) if self.sxx > 0 and self.syy > 0 else float("nan")


def response_batches(run: RunDir) -> tuple[int, Iterator[pa.Table]] | None:
    """About how many responses scored/ holds (from the footers), and each response's (`response_len`,
    `reward`) in batches, from either layout: a row per response with those columns, or a row per prompt
    whose `responses` list holds structs with `len` and `overall`; of those only the two numeric leaves are
    read, never the texts. None without either."""
    if not run.exists("scored"):
        return None
    ds = pads.dataset(run.path("scored"), filesystem=run.fs, format="parquet")
    if {"response_len", "reward"} <= set(ds.schema.names):
        return ds.count_rows(), (pa.Table.from_batches([b]) for b in ds.to_batches(
            columns=["response_len", "reward"], batch_size=65_536))
    kind = ds.schema.field("responses").type if "responses" in ds.schema.names else pa.null()
    item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else pa.null()
    if not pa.types.is_struct(item) or item.get_field_index("len") < 0 or item.get_field_index("overall") < 0:
        return None

    def leaf(pf: pq.ParquetFile, name: str) -> int:
        return next(i for i in range(len(pf.schema)) if pf.schema.column(i).path.startswith("responses.")
                    and pf.schema.column(i).path.rsplit(".", 1)[-1] == name)

    def per_prompt() -> Iterator[pa.Table]:
        for file in ds.files:
            with run.fs.open_input_file(file) as f:
                pf = pq.ParquetFile(f)
                cols = [pf.schema.column(leaf(pf, name)).path for name in ("len", "overall")]
                for batch in pf.iter_batches(columns=cols, batch_size=8192):
                    flat = pc.list_flatten(batch.column("responses"))
                    yield pa.table({"response_len": flat.field("len"), "reward": flat.field("overall")})

    total = 0
    for file in ds.files:  # values of the `len` leaf: the responses, from the footers
        with run.fs.open_input_file(file) as f:
            pf = pq.ParquetFile(f)
            j = leaf(pf, "len")
            total += sum(pf.metadata.row_group(g).column(j).num_values for g in range(pf.num_row_groups))
    return total, per_prompt()


def plot_length(run: RunDir, stats: pa.Table | None, out: Path, notes: list[str], seed: int = 0) -> str | None:
    found = response_batches(run)
    if found is None:
        return None
    total, batches = found
    keep = min(1.0, MAX_POINTS / max(total, 1))
    rng = np.random.default_rng(seed)
    corr, xs, ys, bad = Pearson(), [], [], {"response_len": 0, "reward": 0}
    for t in batches:
        x, x_ok, x_bad = plotted(t, "response_len")
        y, y_ok, y_bad = plotted(t, "reward")
        bad["response_len"] += x_bad
        bad["reward"] += y_bad
        x, y = x[x_ok & y_ok], y[x_ok & y_ok]
        check_span(y, "reward")  # before the running sums, which would overflow on such a batch
        corr.add(x, y)
        pick = rng.random(x.size) < keep
        xs.append(x[pick])
        ys.append(y[pick])
    x, y = (np.concatenate(xs), np.concatenate(ys)) if xs else (np.array([]), np.array([]))
    for col, n in bad.items():
        note_dropped(notes, "reward_vs_length", col, n)
    if not x.size:
        return None
    check_span(x, "response_len")
    check_span(y, "reward")
    per_prompt = values(stats, "len_corr") if stats is not None else np.array([np.nan])
    mean_pp = float(np.nanmean(per_prompt)) if np.isfinite(per_prompt).any() else float("nan")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.scatter(np.maximum(x, 1), y, s=5, alpha=float(np.clip(1500 / x.size, 0.15, 0.6)), color=SEL, lw=0)
    edges = np.unique(np.quantile(np.maximum(x, 1), np.linspace(0, 1, 16)))
    if edges.size > 2:  # mean reward per length bin (equal counts): the trend without the cloud's noise
        idx = np.clip(np.searchsorted(edges, np.maximum(x, 1), side="right") - 1, 0, edges.size - 2)
        mids = [(np.sqrt(edges[i] * edges[i + 1]), y[idx == i].mean()) for i in range(edges.size - 1)
                if (idx == i).any()]
        ax.plot(*zip(*mids, strict=True), color=CUT, lw=2, marker="o", ms=3, label="mean per length bin")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("response length (chars)")
    ax.set_ylabel("reward")
    shown = f"{x.size} of {corr.n}" if x.size < corr.n else f"{x.size}"
    ax.set_title(f"reward vs length ({shown} responses)\npooled r = {corr.r:.3f}, "
                 f"mean per-prompt len_corr = {mean_pp:.3f}", fontsize=10)
    return _save(fig, out, "reward_vs_length.png")


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    if not run.exists("train", "metrics.jsonl"):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in run.read_text("train", "metrics.jsonl").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed run
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            by_step[int(rec["step"])] = rec  # a resumed run may log a step again; the last one wins
    return [by_step[s] for s in sorted(by_step)]


def plot_training(metrics: list[dict[str, Any]], out: Path) -> str | None:
    panels = []
    for title, keys in TRAIN_PANELS:
        key = next((k for k in keys if any(isinstance(m.get(k), (int, float)) for m in metrics)), None)
        if key:
            panels.append((title, key))
    if not metrics or not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.5 * rows))
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
        ax.plot(*zip(*pts, strict=True), color=SEL, lw=1.5, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    return _save(fig, out, "training.png")


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
    stage = "selection" if run.exists("selection") else "stats"
    stats = isolated(f"reading {stage}/", lambda: read_columns(
        run, stage, ["prompt_id", "source", "pvar", "margin", "pd", "len_corr", "selected", "selector", "route"]),
        notes)
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
