"""Every entry point ends an error one way: `prefsift X` and `python -m pipelines.<recipe>` print the same
line with the same exit code; PREFSIFT_DEBUG=1 adds the traceback; errors from Ray tasks are unwrapped."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from operators.base import InputError
from pipelines.runtime.entry import DEBUG_ENV, report, root_cause, run_cli
from pipelines.tools.cli import main as prefsift

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pipelines" / "configs"
RATED = str(CONFIGS / "real_rated.yaml")

# (module, prefsift command, config): every recipe that `ray job submit` runs
ENTRY_POINTS = [
    ("pipelines.curate", "curate", RATED),
    ("pipelines.select", "select", RATED),
    ("pipelines.train_dpo", "train", str(CONFIGS / "train_demo_cpu.yaml")),
    ("pipelines.evaluate", "evaluate", None),
    ("pipelines.run", "run", str(CONFIGS / "demo_cpu.yaml")),
]


def python_m(module: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(DEBUG_ENV, None)
    if debug:
        env[DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)


def in_process(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    capsys.readouterr()
    rc = prefsift(list(argv))
    return rc, capsys.readouterr().err


def run_as_main(module: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`python -m module args` in this process (runpy runs the module's `__main__` block as Python would),
    without an interpreter start-up per entry point."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [module, *args])
    capsys.readouterr()
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("module, command, config", ENTRY_POINTS, ids=[e[1] for e in ENTRY_POINTS])
def test_config_error_is_one_line_exit_2_from_every_entry_point(module, command, config, capsys, monkeypatch,
                                                                 tmp_path):
    args = (["--config", config] if config else []) + ["nosuch.key=1", f"output.dir={tmp_path / 'never'}"]
    code, out, err_m = run_as_main(module, args, capsys, monkeypatch)
    rc, err = in_process(capsys, monkeypatch, command, *args)
    assert code == rc == 2, err_m
    assert err_m == err, (err_m, err)
    assert len(err.splitlines()) == 1 and err.startswith("config error: unknown config key 'nosuch'"), err
    assert out == "" and not (tmp_path / "never").exists()


def test_missing_input_same_line_both_ways_and_traceback_on_request(capsys, monkeypatch, tmp_path):
    args = ["--config", RATED, f"input.path={tmp_path / 'nope.jsonl'}", f"output.dir={tmp_path / 'run'}"]
    res = python_m("pipelines.curate", *args)
    rc, err = in_process(capsys, monkeypatch, "curate", *args)
    assert res.returncode == rc == 2
    assert res.stderr == err == f"error: input path does not exist: {tmp_path / 'nope.jsonl'}\n"

    debug = python_m("pipelines.curate", *args, debug=True)
    assert debug.returncode == 2
    assert debug.stderr.startswith("Traceback (most recent call last):"), debug.stderr
    assert "raise InputError" in debug.stderr and debug.stderr.endswith(err)


def test_reporting_mains_end_errors_the_same_way(capsys, monkeypatch, tmp_path):
    for module, command in (("pipelines.reporting.report", "report"), ("pipelines.reporting.compare", "compare")):
        code, _, err_m = run_as_main(module, [str(tmp_path / "no_run")], capsys, monkeypatch)
        rc, err = in_process(capsys, monkeypatch, command, str(tmp_path / "no_run"))
        assert code == rc == 2, (module, err_m)
        assert err_m == err and len(err.splitlines()) == 1 and err.startswith("error: "), (module, err)
        assert str(tmp_path / "no_run") in err


@pytest.mark.slow  # two Ray start-ups; the same-line property without Ray is tested above
def test_every_row_quarantined_same_line_from_prefsift_and_python_m(ray_local, capsys, monkeypatch, tmp_path):
    """The case from the issue: a bad input seen only after Ray has read it."""
    path = tmp_path / "empty_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": " "}) + "\n" for i in range(16)))
    args = ["--config", RATED, f"input.path={path}", "ray.progress=false"]
    rc, err = in_process(capsys, monkeypatch, "curate", *args, f"output.dir={tmp_path / 'a'}")
    res = python_m("pipelines.curate", *args, f"output.dir={tmp_path / 'b'}")
    assert rc == res.returncode == 2
    last = err.splitlines()[-1]
    assert last.startswith(f"error: input {path}: no usable rows; all 16 were quarantined (empty_prompt: 16)")
    assert res.stderr.splitlines()[-1] == last.replace(f"{tmp_path / 'a'}", f"{tmp_path / 'b'}"), res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# Unwrapping: what reaches the driver from a Ray task or a Ray Train worker
# ----------------------------------------------------------------------------------------------------------


def test_ray_task_error_unwraps_to_the_input_error(capsys):
    from ray.exceptions import RayTaskError

    cause = InputError("input data.jsonl.gz: truncated gzip stream")
    wrapped = RayTaskError("ReadJSONL", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    assert isinstance(wrapped, InputError)  # Ray's dual class, whose text is the worker's traceback
    assert root_cause(wrapped) is cause
    assert report(wrapped) == 2
    assert capsys.readouterr().err == "error: input data.jsonl.gz: truncated gzip stream\n"


def _fails_with(exc: Exception):
    def fn(batch):
        raise exc

    return fn


def test_error_in_a_map_function_is_reported_by_its_cause(ray_local, capsys, monkeypatch):
    """Ray Data wraps it in UserCodeException inside the worker; only the worker's traceback names it."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    ds = ray_local.data.range(4)
    capsys.readouterr()
    assert run_cli(lambda: ds.map_batches(_fails_with(InputError("input x.jsonl:3: truncated"))).materialize()) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: input x.jsonl:3: truncated" and "Traceback" not in err, err
    assert run_cli(lambda: ds.map_batches(_fails_with(RuntimeError("boom"))).materialize()) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-2] == "error: RuntimeError: boom" and "Traceback" not in err, err


def test_train_worker_error_unwraps_to_the_rank_error(capsys):
    from ray.train import WorkerGroupError

    from pipelines.training.losses import get_loss

    with pytest.raises(ValueError) as info:
        get_loss("dpoo")
    assert report(WorkerGroupError("Training failed on 1 worker", {1: info.value})) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown loss 'dpoo'") and len(err.splitlines()) == 1, err


def test_unexpected_error_names_itself_with_a_hint_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_cli(lambda: int("four")) == 1
    first, hint = capsys.readouterr().err.splitlines()
    assert first == "error: ValueError: invalid literal for int() with base 10: 'four'"
    assert DEBUG_ENV in hint
    assert run_cli(lambda: 3) == 3 and run_cli(lambda: None) == 0
