"""Typed configuration: frozen dataclasses, parsed once from YAML with `key.sub=value` overrides.

Errors name the key, the bad value and the allowed values; an unknown key suggests the closest valid one.
YAML is always safe-loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from operators.generate import GenerateCfg
from operators.score import ScoreCfg


class ConfigError(ValueError):
    """A config problem, always naming the key."""


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCfg:
    name: str = "prefsift"
    seed: int = 0


@dataclass(frozen=True)
class InputCfg:
    path: str = ""
    # File format; `auto` decides from the path (.parquet / .jsonl[.gz] / a `datasets.save_to_disk` folder).
    format: Literal["auto", "parquet", "jsonl", "hf_disk"] = "auto"
    # What the rows hold. `auto` decides from the columns:
    #   `responses` (list of {text, scores, overall}) -> rated  (the shared real-data schema)
    #   `chosen` + `rejected`                          -> binarized (UltraFeedback-binarized style)
    #   otherwise                                      -> prompts (generate, then score)
    schema: Literal["auto", "prompts", "rated", "binarized"] = "auto"
    limit: int | None = None  # keep the first N rows of the input (demo / smoke runs)
    # JSONL: lines read up front to fix the columns; a later line with a field they did not show is
    # quarantined (field_not_in_schema). 0 reads every line first (one more pass over the input).
    peek_lines: int = 1000


@dataclass(frozen=True)
class OutputCfg:
    dir: str = "runs/prefsift"


@dataclass(frozen=True)
class StatsCfg:
    tau: float = 1.0  # Bradley-Terry temperature: p_ij = sigmoid((r_i - r_j) / tau)
    length_debias: Literal["none", "penalty", "residual"] = "none"
    debias_rho: float = 1.0  # penalty strength for length_debias=penalty
    pd_target: str = "overall"  # aspect that chose the pair, or `overall` for the aggregate reward


@dataclass(frozen=True)
class SelectCfg:
    rule: str = "pvar_top"
    fraction: float | None = None  # budget as a fraction of prompts; null uses the rule's default
    count: int | None = None  # budget as a count (exclusive with fraction)
    stratify_by: str | None = None  # e.g. `source`: apply the budget within each stratum
    seed: int | None = None  # tie-break seed; null uses run.seed
    # margin_curriculum: route = sft where margin < margin_tau (strict, as the MixDPO paper's code: 0.5 on
    # UltraFeedback's 1-10 ratings), or for the hardest sft_quantile of pairs (prefsift's own option, not in
    # the paper). Both null routes every pair to dpo, which train_dpo refuses for loss mixdpo.
    margin_tau: float | None = None
    sft_quantile: float | None = None
    # threshold: keep rows with min <= column <= max.
    column: str | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class RayCfg:
    address: str | None = None  # null: an embedded local Ray; `auto`: the cluster this job runs on
    num_cpus: int | None = None
    object_store_memory_gb: float | None = None
    progress: bool = True


@dataclass(frozen=True)
class CurateConfig:
    run: RunCfg = field(default_factory=RunCfg)
    input: InputCfg = field(default_factory=InputCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    generate: GenerateCfg = field(default_factory=GenerateCfg)
    score: ScoreCfg = field(default_factory=ScoreCfg)
    stats: StatsCfg = field(default_factory=StatsCfg)
    select: SelectCfg = field(default_factory=SelectCfg)
    ray: RayCfg = field(default_factory=RayCfg)


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def check_choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise a ConfigError naming the key, the bad value, the closest allowed value and all of them."""
    allowed = list(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not allowed{hint} (choose one of {', '.join(map(repr, allowed))})")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        check_choice(key, value, args)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has a malformed key {key!r}")
    try:
        value = yaml.load(raw, Loader=ConfigSafeLoader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)  # a JSON round trip would fail on a set and turn int keys into strings
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


class ConfigSafeLoader(yaml.SafeLoader):
    """safe_load, except for two things a config should not inherit from plain YAML:
    - a key given twice in one mapping is an error: plain YAML keeps the last one, so a second `select:`
      section would silently replace the first;
    - a date or timestamp (`run.name: 2024-01-01`) stays the text as written: a run name or path that looks
      like a date is still a string, and a field that wants a number names the key and the value."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own construct_mapping names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


ConfigSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_scalar)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=ConfigSafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(*parts: Any) -> str:
    """A stable hash of config sections (and upstream fingerprints) that decides whether a stage reruns."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str, base: Path | None = None) -> str:
    """Local relative paths resolve against the working directory; URIs (s3://, gs://, ...) pass through."""
    if "://" in path or not path:
        return path
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p.resolve())


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_dir(path: str, key: str) -> None:
    """A local model must be a `save_pretrained` folder: a config.json that parses, with a model_type, and
    tokenizer files. Checked here, before Ray starts, because inside an actor the same mistake surfaces as
    a transformers traceback from a worker, after the input has been read."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{key}: {path} is not a model folder: {why} (expected the output of save_pretrained: "
                          "config.json, weights and tokenizer files)")

    if not os.path.isdir(path):
        raise bad("it is a file")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise bad("it has no config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"config.json cannot be read as JSON ({e})") from e
    if not isinstance(data, dict) or not data.get("model_type"):
        raise bad("config.json has no model_type")
    if not any(os.path.isfile(os.path.join(path, t)) for t in TOKENIZER_FILES):
        raise bad(f"it has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def model_path(path: str, key: str) -> str:
    """A local model folder becomes absolute (actors may run in another directory or on another node); a
    hub id (`org/name`) or a URI passes through; anything else that does not exist is a config error."""
    if not path or "://" in path:
        return path
    if os.path.exists(os.path.expanduser(path)):
        resolved = resolve_path(path)
        check_model_dir(resolved, key)
        return resolved
    if HUB_ID.match(path):
        return path
    raise FileNotFoundError(f"{key}: model path does not exist: {path}")
