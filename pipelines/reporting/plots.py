"""The report's plots: each reads only the columns it needs and writes one PNG, returning its file name.

Values that cannot be drawn are left out with a note that counts them (`plotted`, `note_dropped`), and a span
no float64 holds is an error naming the column (`check_span`); `pipelines.reporting.report` draws each plot
on its own, so one that fails costs only itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from matplotlib.figure import Figure  # the OO API renders with Agg and leaves pyplot's global state alone

from pipelines.runtime.manifest import RunDir

MAX_POINTS = 20_000  # scatter points: enough to see the shape, small enough for a < 1 MB PNG
# The statistic a rule ranks by and the end it keeps: "min" keeps the largest; its cut is the smallest kept.
RULE_CUT = {"pvar_top": ("pvar", "min"), "pvar_bottom": ("pvar", "max"),
            "margin_curriculum": ("margin", "min"), "pd_consensus": ("pd", "max")}
TRAIN_PANELS = (("loss", ("loss",)), ("reward accuracy", ("rewards/accuracy", "reward_accuracy")),
                ("reward margin", ("rewards/margin", "reward_margin", "margin")), ("lr", ("lr",)),
                ("grad norm", ("grad_norm",)), ("sft fraction", ("sft_fraction",)))
ALL, SEL, CUT = "#9aa5b1", "#1f6feb", "#d1242f"


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
    read, never the texts. None without either. A rated run has no scored/: its prompts/ holds the same
    per-prompt rated schema."""
    stage = "scored" if run.exists("scored") else "prompts"
    if not run.exists(stage):
        return None
    ds = pads.dataset(run.path(stage), filesystem=run.fs, format="parquet")
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
