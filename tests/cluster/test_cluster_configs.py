"""Every shipped YAML parses, and the keys that decide cost, reachability and correctness say what they should:
GPU groups ask for GPUs and scale from 0, images are Ray 2.60.0, entrypoints name real modules and configs
that load through their pipeline's typed config, and no job-API or client port is published. The KubeRay
manifests pass the API server's schema checks (tests/cluster/crd_schema.py), token authentication is on in
the operator too, a RayJob's time limit stops its work, and the shared claim cannot silently stay Pending.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.crd_schema import manifest_errors
from tests.cluster.helpers import REPO

CLUSTER = REPO / "cluster"
CLUSTER_YAML = sorted(CLUSTER.rglob("*.yaml"))
PIPELINE_YAML = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
RAY_VERSION = "2.60.0"
SECRET = "prefsift-ray-token"
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


# Each pipeline module's typed config, imported lazily (train_dpo pulls in torch).
CONFIG_CLASSES = {
    "curate": "pipelines.runtime.config:CurateConfig",
    "select": "pipelines.runtime.config:CurateConfig",
    "train_dpo": "pipelines.train_dpo:TrainConfig",
    "evaluate": "pipelines.evaluate:EvaluateConfig",
    "run": "pipelines.run:RunConfig",
    "audit": "pipelines.audit:AuditConfig",
    "ablate": "pipelines.ablate:AblateConfig",
}


def config_class(module: str):
    assert module in CONFIG_CLASSES, f"no typed config known for pipelines.{module}"
    path, name = CONFIG_CLASSES[module].split(":")
    return getattr(importlib.import_module(path), name)


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

    # Token authentication through the operator, the token from the Secret that the header's command creates
    # (never a literal in the repo).
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}
    header = (CLUSTER / "kuberay" / "raycluster.yaml").read_text(encoding="utf-8")
    assert f"kubectl create secret generic {SECRET} --from-literal=auth_token=" in header


def test_rayjob_targets_the_cluster_and_runs_a_real_pipeline():
    job = kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    rc = kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    module, cfg = check_entrypoint(spec["entrypoint"], "rayjob.yaml")
    assert module == "pipelines.curate" and cfg.generate.backend == "vllm"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "pip" not in runtime_env and "conda" not in runtime_env


def timeout_seconds(entrypoint: str) -> int:
    """The longest `timeout [--kill-after=S] N command ...` lets the command run, in seconds."""
    args = shlex.split(entrypoint)
    assert args[0] == "timeout", f"no `timeout` around the entrypoint: {entrypoint}"
    options = [a for a in args[1:] if a.startswith("-")]
    limit = int(next(a for a in args[1:] if not a.startswith("-")))
    return limit + sum(int(o.split("=", 1)[1]) for o in options if o.startswith("--kill-after="))


def test_rayjob_time_limit_stops_the_ray_job_before_the_operator_gives_up_on_it():
    """With clusterSelector, activeDeadlineSeconds only marks the RayJob Failed; the Ray job and its GPU
    workers run on. The limit that stops them is the entrypoint's own, and it must come first."""
    spec = kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")["spec"]
    assert "clusterSelector" in spec
    assert timeout_seconds(spec["entrypoint"]) < spec["activeDeadlineSeconds"]
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    assert "kubectl delete rayjob" in readme and "ray job stop" in readme


# Token authentication, schema, claim: each check is a function of the parsed documents, so that it can be
# shown to fail on a broken copy as well as to pass on the shipped files.

KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
# The shipped claim's class: uppercase makes it an invalid name, which the API server refuses at apply time.
CLASS_PLACEHOLDER = "SET-a-ReadWriteMany-class"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def kuberay_docs() -> list[dict]:
    return [d for path in KUBERAY for d in docs(path)]


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """The RayCluster specs a document defines: a RayCluster's own, or the one a RayJob creates."""
    if doc.get("kind") == "RayCluster":
        return [(doc["metadata"]["name"], doc["spec"])]
    if doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [(f"RayJob {doc['metadata']['name']}", doc["spec"]["rayClusterSpec"])]
    return []


def env_holders(spec: dict) -> list[dict]:
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    containers = [c for t in templates for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]
    return containers + [{"name": "autoscaler", **spec.get("autoscalerOptions", {})}]


def auth_problems(all_docs: list[dict]) -> list[str]:
    """Token authentication must be on through spec.authOptions (KubeRay >= 1.6.0). RAY_AUTH_MODE=token in the
    containers alone turns it on in Ray but not in the operator, whose job-API calls (a RayJob's status polls,
    StopJob) then carry no token and are refused: the RayJob never completes."""
    problems, clusters = [], set()
    for doc in all_docs:
        for name, spec in cluster_specs(doc):
            clusters.add(name)
            auth = spec.get("authOptions") or {}
            if auth.get("mode") != "token":
                problems.append(f"{name}: spec.authOptions.mode is {auth.get('mode')!r}, not 'token'")
            for holder in env_holders(spec):
                env = container_env(holder)
                if env.get("RAY_AUTH_MODE", "token") != "token":
                    problems.append(f"{name} {holder['name']}: RAY_AUTH_MODE={env['RAY_AUTH_MODE']}")
                token = env.get("RAY_AUTH_TOKEN")
                if isinstance(token, str):
                    problems.append(f"{name} {holder['name']}: a literal RAY_AUTH_TOKEN in the manifest")
                elif token is not None and auth.get("mode") == "token" \
                        and token["secretKeyRef"]["name"] != auth.get("secretName", name):
                    problems.append(f"{name} {holder['name']}: RAY_AUTH_TOKEN from another Secret than authOptions'")
    for doc in all_docs:
        target = doc.get("spec", {}).get("clusterSelector", {}).get("ray.io/cluster") if doc.get("kind") == "RayJob" \
            else None
        if target is not None and target not in clusters:
            problems.append(f"RayJob {doc['metadata']['name']}: selects {target!r}, which no manifest here defines")
    return problems


def claim_problems(pvc: dict) -> list[str]:
    spec, problems = pvc["spec"], []
    if spec.get("accessModes") != ["ReadWriteMany"]:
        problems.append(f"{pvc['metadata']['name']}: accessModes {spec.get('accessModes')}, pods on several nodes "
                        "need ReadWriteMany")
    if not spec.get("storageClassName"):
        problems.append(f"{pvc['metadata']['name']}: no storageClassName, so the default class (usually a "
                        "ReadWriteOnce disk) is used: the claim never binds and every pod stays Pending")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_passes_the_api_servers_schema(path):
    for doc in docs(path):
        assert manifest_errors(doc) == [], (path.name, doc.get("kind"))


def test_token_authentication_is_on_in_the_operator():
    assert auth_problems(kuberay_docs()) == []


def test_shared_claim_names_a_readwritemany_class():
    pvc = kind(CLUSTER / "kuberay" / "raycluster.yaml", "PersistentVolumeClaim")
    assert claim_problems(pvc) == []
    name = pvc["spec"]["storageClassName"]
    assert DNS_SUBDOMAIN.fullmatch(name) or name == CLASS_PLACEHOLDER, name
    assert not DNS_SUBDOMAIN.fullmatch(CLASS_PLACEHOLDER)  # so a forgotten placeholder fails `kubectl apply`
    assert CLASS_PLACEHOLDER in (CLUSTER / "README.md").read_text(encoding="utf-8")
    claims = {v["claimName"] for k, v in walk(kuberay_docs()) if k == "persistentVolumeClaim"}
    assert claims == {pvc["metadata"]["name"]}


def mutated(kind_name: str, change) -> dict:
    (doc,) = [copy.deepcopy(d) for d in kuberay_docs() if d["kind"] == kind_name]
    change(doc)
    return doc


def head(doc: dict) -> dict:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


# (kind, change, a piece of the expected error); each is something the API server refuses.
BROKEN = [
    ("RayCluster", lambda d: d["spec"].update(authOption={"mode": "token"}), "spec.authOption: unknown field"),
    ("RayCluster", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "is not one of ['disabled', 'token']"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="0"), "expected integer"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][1].pop("groupName"), "groupName: required field missing"),
    ("RayCluster", lambda d: d["spec"]["autoscalerOptions"].update(idleTimeout=60), "idleTimeout: unknown field"),
    ("RayCluster", lambda d: d["spec"]["autoscalerOptions"].update(env=[{"name": "A", "valueFrom": {"secret": {}}}]),
     "'secret' was unexpected"),
    ("RayCluster", lambda d: head(d).update(volumeMount=[]), "'volumeMount' was unexpected"),
    ("RayCluster", lambda d: head(d)["resources"]["limits"].update(cpu=[16]), "is not valid under any"),
    ("RayJob", lambda d: d["spec"].update(activeDeadline=60), "spec.activeDeadline: unknown field"),
    ("RayJob", lambda d: d["spec"].update(rayClusterSpec={}), "headGroupSpec: required field missing"),
    ("RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"].update(restartPolicy=0), "is not of type"),
    ("PersistentVolumeClaim", lambda d: d["spec"].update(storageClass="efs"), "'storageClass' was unexpected"),
]


@pytest.mark.parametrize("kind_name, change, expected", BROKEN, ids=[f"{k}-{e[:24]}" for k, _, e in BROKEN])
def test_schema_check_rejects_a_broken_copy(kind_name, change, expected):
    errors = manifest_errors(mutated(kind_name, change))
    assert any(expected in e for e in errors), errors


def test_auth_and_claim_checks_reject_a_broken_copy():
    def env_only(doc):  # the old shape: the variables on the containers, no authOptions
        token = {"secretKeyRef": {"name": SECRET, "key": "auth_token"}}
        for c in env_holders(doc["spec"]):
            c.setdefault("env", []).extend([{"name": "RAY_AUTH_MODE", "value": "token"},
                                            {"name": "RAY_AUTH_TOKEN", "valueFrom": token}])
        del doc["spec"]["authOptions"]

    cluster = mutated("RayCluster", env_only)
    assert auth_problems([cluster]) == ["prefsift: spec.authOptions.mode is None, not 'token'"]
    assert manifest_errors(cluster) == []  # schema-valid: only the auth check catches it
    literal = mutated("RayCluster", lambda d: head(d)["env"].append({"name": "RAY_AUTH_TOKEN", "value": "abc"}))
    assert auth_problems([literal]) == ["prefsift ray-head: a literal RAY_AUTH_TOKEN in the manifest"]
    job = mutated("RayJob", lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "other"}))
    assert auth_problems([job]) == ["RayJob prefsift-curate: selects 'other', which no manifest here defines"]
    own = mutated("RayJob", lambda d: d["spec"].update(rayClusterSpec=cluster["spec"]))
    assert "RayJob prefsift-curate: spec.authOptions.mode is None, not 'token'" in auth_problems([own])

    no_class = mutated("PersistentVolumeClaim", lambda d: d["spec"].pop("storageClassName"))
    assert manifest_errors(no_class) == []  # valid to the API server, and yet every pod would stay Pending
    assert len(claim_problems(no_class)) == 1 and "no storageClassName" in claim_problems(no_class)[0]
    rwo = mutated("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes=["ReadWriteOnce"]))
    assert "ReadWriteMany" in claim_problems(rwo)[0]


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
