"""Structural-schema checks of Kubernetes manifests, offline, as the API server would apply them.

`jsonschema` alone does not read Kubernetes' extensions (`x-kubernetes-int-or-string`,
`x-kubernetes-preserve-unknown-fields`) and accepts unknown fields unless every object says otherwise, while
the API server rejects them (field validation Strict, the kubectl default). So KubeRay's fields are walked
here against tests/cluster/kuberay_schema.yaml, and the core types inside them (pod templates, env vars) and
core kinds (PersistentVolumeClaim) go to kubernetes-validate's strict schemas of Kubernetes itself.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

SCHEMA_FILE = Path(__file__).with_name("kuberay_schema.yaml")
K8S_VERSION = "1.33.0"  # schemas shipped by kubernetes-validate; pod-template fields used here exist since 1.2x
CORE_KINDS = {"PersistentVolumeClaim", "Secret", "ConfigMap", "Service", "NetworkPolicy"}

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


@cache
def kuberay_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_FILE.read_text(encoding="utf-8"))


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Every way `doc` (one parsed YAML document) breaks its kind's schema; [] when the API server takes it."""
    kind = doc.get("kind")
    if kind in CORE_KINDS:
        return core_errors(doc, kind)
    kinds = kuberay_schema()["kinds"]
    if kind not in kinds:
        return [f"kind {kind!r}: no schema known here (add it to {SCHEMA_FILE.name} or CORE_KINDS)"]
    return structural_errors(doc, kinds[kind], kind)


def structural_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if "$ref" in schema:
        schema = kuberay_schema()["definitions"][schema["$ref"]]
    if "k8s" in schema:
        return core_type_errors(value, schema["k8s"], path)
    if schema.get("x-kubernetes-int-or-string"):
        ok = TYPES["integer"](value) or TYPES["string"](value)
        return [] if ok else [f"{path}: {value!r} is neither an integer nor a string"]
    kind = schema.get("type")
    if kind is not None and not TYPES[kind](value):
        return [f"{path}: expected {kind}, got {type(value).__name__} {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict) and (kind == "object" or "properties" in schema):
        props = schema.get("properties", {})
        errors += [f"{path}.{key}: required field missing" for key in schema.get("required", []) if key not in value]
        for key, sub in value.items():
            if key in props:
                errors += structural_errors(sub, props[key], f"{path}.{key}")
            elif "additionalProperties" in schema:
                errors += structural_errors(sub, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += structural_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def core_type_errors(value: Any, core_type: str, path: str) -> list[str]:
    """A core type embedded in a CRD, checked inside the smallest core object that holds it."""
    if core_type == "PodTemplateSpec":
        holder = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": value}
    elif core_type == "EnvVarList":
        container = {"name": "check", "image": "check", "env": value}
        holder = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                  "template": {"spec": {"containers": [container]}}}
    else:
        raise AssertionError(f"no holder for core type {core_type}")
    return [f"{path}: {e}" for e in core_errors(holder, core_type)]


def core_errors(doc: dict[str, Any], what: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return [f"{what} {where}: {e.message}"]
    return []
