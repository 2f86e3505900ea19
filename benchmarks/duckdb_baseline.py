"""The DuckDB baselines that bench_curate and bench_stats time prefsift against: each job as one SQL script
(what a user would write by hand), how a script is timed (wall, CPU, memory of the process tree), and the
check that two statistics outputs agree on every prompt."""

from __future__ import annotations

import time

from benchmarks.common import MemorySampler, tree_cpu_seconds

# The statistics both benchmarks compare, prompt by prompt.
COMPARED = ("n", "reward_mean", "reward_std", "pvar", "margin", "best_idx", "worst_idx", "score_best",
            "score_worst", "len_corr", "pd")

# bench_curate: the whole rated curation. Three aspects (helpfulness, correctness, coherence), tau 1.
CURATE_SQL = """
CREATE TEMP TABLE raw AS
  SELECT prompt_id, prompt, source, responses, hash(prompt, source, responses) AS h
  FROM read_parquet('{data}/*.parquet');
-- Duplicate ids: an exact copy keeps one row; an id whose rows differ loses all of them.
CREATE TEMP TABLE kept AS
  SELECT DISTINCT ON (prompt_id) prompt_id, prompt, source, responses FROM raw
  WHERE prompt_id IN (SELECT prompt_id FROM raw GROUP BY prompt_id HAVING count(DISTINCT h) = 1);
CREATE TEMP TABLE resp AS
  SELECT prompt_id, i - 1 AS sample_idx, r.text AS text, length(r.text) AS len, r.overall AS reward,
         r.scores.helpfulness AS h, r.scores.correctness AS c, r.scores.coherence AS o
  FROM (SELECT prompt_id, unnest(responses) AS r, generate_subscripts(responses, 1) AS i FROM kept);
CREATE TEMP TABLE stats AS
  WITH norms AS (SELECT avg(h) mh, stddev_pop(h) sh, avg(c) mc, stddev_pop(c) sc, avg(o) mo, stddev_pop(o) so
                 FROM resp),
  g AS (
    SELECT prompt_id, count(*) AS n, avg(reward) AS reward_mean, stddev_pop(reward) AS reward_std,
           list(reward) AS rs, max(reward) AS score_best, min(reward) AS score_worst,
           arg_max(sample_idx, reward) AS best_idx, arg_min(sample_idx, reward) AS worst_idx,
           arg_max(text, reward) AS best_response, arg_min(text, reward) AS worst_response,
           corr(reward, len) AS len_corr,
           arg_max(h, reward) hb, arg_min(h, reward) hw, arg_max(c, reward) cb, arg_min(c, reward) cw,
           arg_max(o, reward) ob, arg_min(o, reward) ow
    FROM resp GROUP BY prompt_id)
  SELECT g.prompt_id, k.prompt, n, reward_mean, reward_std,
         list_sum(list_transform(rs, lambda x: list_sum(list_transform(rs, lambda y: tanh((x - y) / 2) ^ 2))))
           / 4 / (n * (n - 1)) AS pvar,
         score_best - score_worst AS margin, best_idx, worst_idx, score_best, score_worst,
         best_response, worst_response, len_corr,
         ((hw - hb) / sh + (cw - cb) / sc + (ow - ob) / so) / 3 AS pd
  FROM g JOIN kept k USING (prompt_id), norms;
COPY (SELECT * EXCLUDE (prompt) FROM stats) TO '{out}/stats' (FORMAT parquet, PER_THREAD_OUTPUT true);
CREATE TEMP TABLE selected AS
  SELECT * FROM stats ORDER BY pvar DESC
  LIMIT (SELECT greatest(1, floor({fraction} * count(*) + 0.5)) FROM stats);
COPY (SELECT prompt, best_response AS chosen, worst_response AS rejected, prompt_id, score_best AS score_chosen,
             score_worst AS score_rejected, margin, pvar
      FROM selected WHERE best_idx <> worst_idx AND best_response <> worst_response)
  TO '{out}/pairs' (FORMAT parquet, PER_THREAD_OUTPUT true);
COPY (SELECT prompt_id FROM selected) TO '{out}/selection' (FORMAT parquet, PER_THREAD_OUTPUT true);
"""

# bench_stats: the statistics alone, over scored rows with two aspects (helpfulness, correctness).
STATS_SQL = """
COPY (
  WITH resp AS (
    SELECT prompt_id, r.sample_idx AS sample_idx, r.text AS response, r.overall AS reward, r.len AS response_len,
           r.scores.helpfulness AS reward__helpfulness, r.scores.correctness AS reward__correctness
    FROM (SELECT prompt_id, unnest(responses) AS r FROM read_parquet('{data}/*.parquet'))
  ),
  norms AS (
    SELECT avg(reward__helpfulness) AS mh, stddev_pop(reward__helpfulness) AS sh,
           avg(reward__correctness) AS mc, stddev_pop(reward__correctness) AS sc
    FROM resp
  ),
  g AS (
    SELECT prompt_id,
           count(*) AS n,
           avg(reward) AS reward_mean,
           stddev_pop(reward) AS reward_std,
           list(reward) AS rs,
           max(reward) AS score_best, min(reward) AS score_worst,
           arg_max(sample_idx, reward) AS best_idx, arg_min(sample_idx, reward) AS worst_idx,
           arg_max(response, reward) AS best_response, arg_min(response, reward) AS worst_response,
           corr(reward, response_len) AS len_corr,
           arg_max(reward__helpfulness, reward) AS hb, arg_min(reward__helpfulness, reward) AS hw,
           arg_max(reward__correctness, reward) AS cb, arg_min(reward__correctness, reward) AS cw
    FROM resp
    GROUP BY prompt_id
  )
  SELECT prompt_id, n, reward_mean, reward_std,
         -- PVar U-statistic over ordered pairs: (sigmoid(d) - 1/2)^2 = tanh(d/2)^2 / 4; the diagonal is 0
         CASE WHEN n >= 2 THEN list_sum(list_transform(rs, lambda x:
              list_sum(list_transform(rs, lambda y: tanh((x - y) / (2 * {tau})) ^ 2)))) / 4 / (n * (n - 1))
         END AS pvar,
         score_best - score_worst AS margin, best_idx, worst_idx, score_best, score_worst,
         best_response, worst_response, len_corr,
         ((hw - hb) / sh + (cw - cb) / sc) / 2 AS pd
  FROM g, norms
) TO '{out}' (FORMAT parquet, PER_THREAD_OUTPUT true)
"""


def run_duckdb(sql: str, memory_gb: float | None = None, temp_dir: str | None = None) -> dict:
    """Run one script, timed: wall and CPU seconds, DuckDB's thread count and the memory of the process tree.
    `memory_gb`: DuckDB's memory_limit (it spills to `temp_dir` past it), for a shared machine."""
    import duckdb

    con = duckdb.connect()
    if memory_gb:
        con.execute(f"SET memory_limit = '{memory_gb}GB'")
        if temp_dir:
            con.execute(f"SET temp_directory = '{temp_dir}'")
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]  # type: ignore[index]
    with MemorySampler() as mem:
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        con.execute(sql)
        seconds = time.perf_counter() - t0
        cpu = tree_cpu_seconds() - c0
    return {"seconds": seconds, "cpu_s": cpu, "threads": threads, "memory_limit_gb": memory_gb, **mem.figures()}


def compare_stats(a: str, b: str) -> dict:
    """Max |difference| per statistic between two statistics outputs (parquet globs), joined on prompt_id
    (every prompt, not a sample), the best texts that differ, and the row counts on each side."""
    import duckdb

    con = duckdb.connect()
    diffs = ", ".join(f"max(abs(a.{c} - b.{c})) AS {c}" for c in COMPARED)
    row = con.execute(f"SELECT count(*), {diffs}, sum((a.best_response <> b.best_response)::INT) "
                      f"FROM read_parquet('{a}') a JOIN read_parquet('{b}') b USING (prompt_id)").fetchone()
    out = dict(zip(["joined", *COMPARED, "best_response_mismatch"], row, strict=True))  # type: ignore[arg-type]
    out["rows_a"] = con.execute(f"SELECT count(*) FROM read_parquet('{a}')").fetchone()[0]  # type: ignore[index]
    out["rows_b"] = con.execute(f"SELECT count(*) FROM read_parquet('{b}')").fetchone()[0]  # type: ignore[index]
    worst = max(float(out[c] or 0.0) for c in COMPARED)
    out["max_abs_diff"] = worst
    out["agree"] = bool(out["rows_a"] == out["rows_b"] == out["joined"] and worst < 1e-9
                        and out["best_response_mismatch"] == 0)
    return out
