"""YAML values in configs: dates stay the text as written, via a file and via key=value overrides."""

from __future__ import annotations

import pytest

from pipelines.runtime.config import ConfigError, CurateConfig, apply_overrides, load_config, parse_override


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("value", ["2024-01-01", "2024-01-01 10:30:00", "2024-01-01T10:30:00Z"])
def test_a_date_in_a_file_is_its_text_for_a_string_field(tmp_path, value):
    # it crashed with TypeError in the overrides' JSON copy, even with no override given
    cfg = load_config(CurateConfig, write(tmp_path, f"run:\n  name: {value}\noutput:\n  dir: runs/{value}\n"))
    assert cfg.run.name == value and cfg.output.dir == f"runs/{value}"
    cfg = load_config(CurateConfig, write(tmp_path, f"run:\n  name: {value}\n"), ["run.seed=3"])
    assert cfg.run.name == value and cfg.run.seed == 3


@pytest.mark.parametrize("value", ["2024-01-01", "2024-01-01 10:30:00"])
def test_a_date_as_an_override_is_its_text_for_a_string_field(tmp_path, value):
    assert parse_override(f"run.name={value}") == (["run", "name"], value)
    cfg = load_config(CurateConfig, write(tmp_path, "run:\n  name: x\n"), [f"run.name={value}"])
    assert cfg.run.name == value


def test_a_date_for_a_number_field_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^run\.seed: expected an integer, got '2024-01-01'$"):
        load_config(CurateConfig, write(tmp_path, "run:\n  seed: 2024-01-01\n"))
    with pytest.raises(ConfigError, match=r"^stats\.tau: expected a number, got '2024-01-01'$"):
        load_config(CurateConfig, None, ["stats.tau=2024-01-01"])


def test_overrides_copy_leaves_the_loaded_data_alone():
    data = {"run": {"name": "a"}, "extra": {1: {"x"}}}  # int keys and a set survive (a JSON copy mangled them)
    out = apply_overrides(data, ["run.name=b"])
    assert out == {"run": {"name": "b"}, "extra": {1: {"x"}}} and data["run"]["name"] == "a"
