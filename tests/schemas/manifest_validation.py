"""Offline validation of Kubernetes manifests for the deployment tests.

* RayJob / RayCluster: against the vendored KubeRay CRDs (kuberay/, see PROVENANCE.md).
* Core objects (Service, ConfigMap, Secret, Deployment, ...): kubernetes-validate's bundled
  upstream schemas, strict mode.

CRD schemas are *structural*: the API server prunes unknown fields instead of rejecting them, so a
plain JSON-Schema check would let `replica: 2` or `nodeSelecter:` through and the operator would
silently ignore it. We validate the way `kubectl apply --validate=strict` (server-side field
validation) does: every object schema that lists its properties, and does not ask to keep unknown
fields, rejects extra keys.

Loaded by file path from the tests (tests/ is not a package), so keep it import-light.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUBERAY_DIR = Path(__file__).resolve().parent / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RAY_API_VERSION = "ray.io/v1"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships; core objects must be valid on both.
KUBE_VERSIONS = ("1.27.0", "1.37.0")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB; libyaml is 10x faster


def _strictify(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _strictify(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strictify(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator for ``kind`` built from the v1 openAPIV3Schema of its CRD, made strict."""
    crd = yaml.load((KUBERAY_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strictify(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def ray_errors(obj: dict) -> list[str]:
    """Schema errors of a RayJob/RayCluster object, as 'path: message' strings (empty = valid)."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    errors = []
    if obj.get("apiVersion") != RAY_API_VERSION:
        errors.append(f"apiVersion: {obj.get('apiVersion')!r}, expected {RAY_API_VERSION!r}")
    for error in sorted(crd_validator(kind).iter_errors(obj), key=lambda e: list(e.absolute_path)):
        errors.append(f"{_where(error)}: {error.message}")
    return errors


def core_errors(obj: dict) -> list[str]:
    """Strict kubernetes-validate errors of a core object on every version in KUBE_VERSIONS."""
    import kubernetes_validate

    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"k8s {version}: {_where(error)}: {error.message}")
    return errors


def load_documents(text: str) -> list[dict]:
    """Non-empty YAML documents of a (rendered) manifest."""
    return [doc for doc in yaml.safe_load_all(text) if doc]
