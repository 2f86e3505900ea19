"""Ray Data's execution stats (`Dataset.stats()` text) as records: what each operator of an execution did,
and whether it was a shuffle. bench_curate shows with them that no shuffle runs in a curation."""

from __future__ import annotations

import re

# Ray Data's all-to-all operators, as their names appear in the stats; each moves every column it is given.
SHUFFLE_OPS = {"Repartition", "RandomShuffle", "HashShuffle", "Sort", "Aggregate", "HashAggregate", "Join", "Zip",
               "GroupBy", "Unique"}
OPERATOR = re.compile(r"^Operator \d+ (?P<name>.+?): (?:(?P<tasks>\d+) tasks executed, )?(?:(?P<blocks>\d+) blocks "
                      r"produced(?: in (?P<seconds>[\d.]+)s)?|executed in (?P<executed>[\d.]+)s)")
TOTAL = re.compile(r"\* Output (?P<what>num rows|size bytes) per block: .* (?P<total>\d+) total")
REMOTE = re.compile(r"\* Remote wall time: .* (?P<total>[\d.]+)(?P<unit>us|ms|s) total")


def operator_stats(text: str) -> list[dict]:
    """Ray Data's execution stats (`Dataset.stats()`), one dict per operator: its name, the seconds from its
    first task's start to its last one's end, the remote wall time its tasks summed, and its output rows and
    bytes. A shuffle shows up as its own operator (Repartition, HashShuffle, Aggregate, Sort, ...)."""
    ops: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if m := OPERATOR.match(line):
            ops.append({"op": m["name"], "tasks": int(m["tasks"] or 0),
                        "seconds": float(m["seconds"] or m["executed"] or 0.0)})
        elif ops and (m := TOTAL.match(line)):
            ops[-1]["rows" if m["what"] == "num rows" else "bytes"] = int(m["total"])
        elif ops and (m := REMOTE.match(line)):
            ops[-1]["task_s"] = round(float(m["total"]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m["unit"]], 3)
    for op in ops:
        op["shuffle"] = any(part.split("(")[0] in SHUFFLE_OPS for part in op["op"].split("->"))
    return ops
