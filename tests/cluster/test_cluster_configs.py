"""Every shipped YAML parses, and the keys that decide cost, reachability and correctness say what they should:
GPU groups ask for GPUs and scale from 0, images are Ray 2.60.0, entrypoints name real modules and configs
that load through their pipeline's typed config, and no job-API or client port is published.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.helpers import REPO

CLUSTER = REPO / "cluster"
CLUSTER_YAML = sorted(CLUSTER.rglob("*.yaml"))
PIPELINE_YAML = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
RAY_VERSION = "2.60.0"
PRIVATE_PORTS = {8265, 10001, 6379}


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def config_class(module: str):
    from pipelines.runtime.config import CurateConfig

    if module in ("curate", "select"):
        return CurateConfig
    if module == "train_dpo":
        from pipelines.train_dpo import TrainConfig

        return TrainConfig
    if module == "evaluate":
        from pipelines.evaluate import EvaluateConfig

        return EvaluateConfig
    if module == "run":
        from pipelines.run import RunConfig

        return RunConfig
    raise AssertionError(f"no typed config known for pipelines.{module}")


def check_entrypoint(command: str, where: str) -> tuple[str, Any]:
    """`python -m pipelines.X [--config FILE] [key=value ...]`: a real module, an existing config, and the
    whole command line parses into the pipeline's typed config."""
    from pipelines.runtime.config import load_config

    args = shlex.split(command)
    i = args.index("-m")
    module = args[i + 1]
    assert module.startswith("pipelines."), (where, module)
    assert importlib.util.find_spec(module) is not None, (where, module)
    rest = args[i + 2:]
    path = None
    if "--config" in rest:
        j = rest.index("--config")
        path = REPO / rest[j + 1]
        assert path.is_file(), f"{where}: config {rest[j + 1]} does not exist"
        rest = rest[:j] + rest[j + 2:]
    cfg = load_config(config_class(module.split(".", 1)[1]), path, rest)
    return module, cfg


# ----------------------------------------------------------------------------------------------------------
# Every YAML
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_YAML + PIPELINE_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_safe_loads(path):
    assert docs(path), path


@pytest.mark.parametrize("path", PIPELINE_YAML, ids=lambda p: p.name)
def test_pipeline_config_loads_through_its_typed_config(path):
    """The module comes from the file's own header (`python -m pipelines.X --config pipelines/configs/F`)."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip().rstrip("\\"))
    text = " ".join(header)
    m = re.search(rf"python -m pipelines\.(\w+)\s+--config\s+pipelines/configs/{re.escape(path.name)}", text)
    assert m, f"{path.name} does not open with a comment showing how to run it"
    from pipelines.runtime.config import load_config

    cfg = load_config(config_class(m.group(1)), path)
    if m.group(1) == "train_dpo":
        from pipelines.train_dpo import validate

        validate(cfg)


def test_every_cluster_image_is_ray_2_60():
    images = [(p.name, v) for p in CLUSTER_YAML for d in docs(p) for k, v in walk(d) if k == "image"]
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    images += [("Dockerfile", m) for m in re.findall(r"RAY_IMAGE=(\S+)", dockerfile)]
    assert len(images) >= 5, images
    for where, image in images:
        assert ":" in image, (where, image)
        tag = image.rsplit(":", 1)[1]
        assert RAY_VERSION in tag, f"{where}: {image} is not tagged with Ray {RAY_VERSION}"
        assert "latest" not in tag and "nightly" not in tag, (where, image)


def test_no_public_service_for_job_api_or_client():
    for path in CLUSTER_YAML:
        for d in docs(path):
            assert d.get("kind") not in ("Ingress", "Route", "Gateway"), path
            for key, value in walk(d):
                if key in ("type", "serviceType"):
                    assert value not in ("LoadBalancer", "NodePort"), f"{path.name}: {key}: {value}"
                if key == "hostPort":
                    assert value not in PRIVATE_PORTS, f"{path.name}: hostPort {value}"


# ----------------------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------------------


def kind(path: Path, name: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == name]
    assert len(found) == 1, (path, name)
    return found[0]


def container_env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_raycluster_head_is_cpu_and_private_gpu_groups_scale_from_zero():
    rc = kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    assert int(head["rayStartParams"]["num-cpus"]) < int(head_c["resources"]["limits"]["cpu"])

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-infer", "gpu-train"}
    for name, g in groups.items():
        c = g["template"]["spec"]["containers"][0]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus, name
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1, name
    # Training wants all its GPUs in one pod (NCCL over NVLink), as train_gpu_template.yaml sizes it.
    from pipelines.runtime.config import load_config
    from pipelines.train_dpo import TrainConfig

    train = load_config(TrainConfig, REPO / "pipelines/configs/train_gpu_template.yaml")
    train_c = groups["gpu-train"]["template"]["spec"]["containers"][0]
    assert int(train_c["resources"]["limits"]["nvidia.com/gpu"]) == train.scaling.num_workers
    assert float(train_c["resources"]["limits"]["cpu"]) >= train.scaling.num_workers * train.scaling.cpus_per_worker

    # Token authentication on every Ray container, the token from a Secret (never a literal in the repo).
    ray_containers = [head_c] + [g["template"]["spec"]["containers"][0] for g in groups.values()]
    for c in ray_containers:
        env = container_env(c)
        assert env.get("RAY_AUTH_MODE") == "token", c["name"]
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}), c["name"]


def test_rayjob_targets_the_cluster_and_runs_a_real_pipeline():
    job = kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    rc = kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    module, cfg = check_entrypoint(spec["entrypoint"], "rayjob.yaml")
    assert module == "pipelines.curate" and cfg.generate.backend == "vllm"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "pip" not in runtime_env and "conda" not in runtime_env
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    env = container_env(submitter)
    assert env.get("RAY_AUTH_MODE") == "token" and "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {})


# ----------------------------------------------------------------------------------------------------------
# Cluster launcher, runtime env, README
# ----------------------------------------------------------------------------------------------------------


def test_launcher_validates_against_ray_schema_and_keeps_dashboard_local():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (raw,) = docs(CLUSTER / "launcher" / "aws.yaml")
    cfg = prepare_config(raw)  # fills Ray's defaults, offline
    validate_config(cfg)  # Ray's own JSON schema for cluster-launcher files
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "0.0.0.0" not in head_cmd
    for cmd in (head_cmd, " ".join(cfg["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in cmd
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head"
    for name in ("gpu_infer", "gpu_train"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1, name
    assert cfg["idle_timeout_minutes"] <= 10
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_runtime_env_is_a_valid_ray_runtime_env_without_installs():
    from ray.runtime_env import RuntimeEnv

    (env,) = docs(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert "pip" not in env and "conda" not in env and "uv" not in env
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def readme_submit_lines() -> list[str]:
    text = (CLUSTER / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("ray job submit")]
    return lines


def test_readme_submits_every_pipeline_with_real_modules_and_configs():
    lines = readme_submit_lines()
    seen = set()
    for line in lines:
        submit, _, command = line.partition(" -- ")
        assert "--working-dir ." in submit and "--runtime-env cluster/runtime_env.yaml" in submit, line
        module, _ = check_entrypoint(command, "cluster/README.md")
        seen.add(module)
    assert seen == {f"pipelines.{m}" for m in ("curate", "select", "train_dpo", "evaluate", "run")}, seen
