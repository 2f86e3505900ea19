"""Security defaults: no remote code unless asked, YAML safe-loaded, no unpickling of user data, and config
paths checked before Ray (or any other heavy work) starts."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import textwrap

import pytest
import yaml

from tests.cluster.helpers import PYTHON, REPO, child_env


def test_trust_remote_code_is_off_by_default_everywhere():
    from operators.generate import GenerateCfg
    from operators.reflogp import ReferenceLogProbs
    from operators.score import ScoreCfg
    from pipelines.train_dpo import ModelCfg

    for cls in (GenerateCfg, ScoreCfg, ModelCfg):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert fields["trust_remote_code"] is False, cls.__name__
    assert inspect.signature(ReferenceLogProbs.__init__).parameters["trust_remote_code"].default is False
    # No shipped config turns it on.
    for path in [*(REPO / "pipelines" / "configs").glob("*.yaml"), *(REPO / "cluster").rglob("*.yaml")]:
        assert not re.search(r"trust_remote_code:\s*true", path.read_text(encoding="utf-8"), re.I), path


def test_yaml_with_python_tags_is_refused(tmp_path):
    from pipelines.runtime.config import ConfigError, load_yaml, parse_override

    canary = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'run: !!python/object/apply:os.system ["touch {canary}"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError):
        parse_override(f'run.name=!!python/object/apply:os.system ["touch {canary}"]')
    assert not canary.exists()
    with pytest.raises(yaml.constructor.ConstructorError):  # what safe_load itself does with the tag
        yaml.safe_load(bad.read_text(encoding="utf-8"))


UNSAFE = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\bcloudpickle\.loads?\(", "cloudpickle.load"),
    (r"\bdill\.loads?\(", "dill.load"),
    (r"\bjoblib\.load\(", "joblib.load"),
    (r"\bpd\.read_pickle\(|\bpandas\.read_pickle\(", "read_pickle"),
    (r"\byaml\.(unsafe_load|full_load|load_all)\(", "yaml unsafe/full load"),
    (r"\bnp\.load\([^)]*allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"\btrust_remote_code\s*=\s*True", "trust_remote_code=True"),
]


def _call_text(text: str, open_paren: int) -> str:
    """The source of a call from its opening parenthesis to the matching closing one."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren: i + 1]
    return text[open_paren:]


def test_no_unpickling_of_user_data_in_the_code():
    """torch.load must say weights_only=True: a checkpoint folder may come from shared storage that others
    can write, and a pickle there runs code in every training worker."""
    problems = []
    for path in sorted([*(REPO / "operators").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        for pattern, what in UNSAFE:
            for m in re.finditer(pattern, text):
                problems.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
        for m in re.finditer(r"\btorch\.load\(", text):
            call = _call_text(text, m.end() - 1)
            if "weights_only=True" not in call.replace(" ", ""):
                problems.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {call}")
        # yaml.load must name a SafeLoader or a subclass of it (test_yaml_with_python_tags_is_refused checks
        # that the config loader still refuses Python tags).
        for m in re.finditer(r"\byaml\.load\(", text):
            call = _call_text(text, m.end() - 1)
            if not re.search(r"Loader\s*=\s*\w*SafeLoader\b", call):
                problems.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {call}")
    assert not problems, "\n".join(problems)


def test_missing_paths_fail_before_ray_starts(tmp_path):
    """In a fresh interpreter: a missing input file, or a missing local model folder, is reported before
    `ray.init` runs and before the run folder is created."""
    script = textwrap.dedent(f"""
        import ray
        from pipelines import curate
        from pipelines.runtime.config import CurateConfig, load_config

        cases = {{
            "input": ["input.path={tmp_path}/nope.jsonl.gz"],
            "model": ["input.path=pipelines/data/arena_hard_prompts_200.jsonl.gz",
                      "generate.model={tmp_path}/no_such_model"],
        }}
        for name, overrides in cases.items():
            cfg = load_config(CurateConfig, "pipelines/configs/real_rated.yaml",
                              [*overrides, "output.dir={tmp_path}/run_" + name])
            try:
                curate.main(cfg)
            except (FileNotFoundError, ValueError) as e:
                print(name, type(e).__name__, "|", e, "| ray started:", ray.is_initialized())
            else:
                print(name, "NO ERROR")
    """)
    res = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-3000:]
    assert "input InputError | input path does not exist" in out and "nope.jsonl.gz" in out, out
    assert "model FileNotFoundError | generate.model: model path does not exist" in out, out
    assert out.count("ray started: False") == 2, out
    assert not list(tmp_path.glob("run_*")), "a run folder was created before the paths were checked"
