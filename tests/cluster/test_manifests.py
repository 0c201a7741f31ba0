"""Offline checks of the deployment files under cluster/.

* cluster/ray-cluster.yaml goes through Ray's own ``prepare_config`` (fills the
  AWS defaults; needs no cloud credentials or boto3) and ``validate_config``
  (Ray's JSON schema, ray/autoscaler/ray-schema.json, plus its cross checks).
* cluster/kuberay/*.yaml are validated against the openAPIV3Schema of the real
  KubeRay CRDs of every release vendored (unmodified) under tests/cluster/crds/,
  with Kubernetes' structural-schema semantics: a field the schema does not
  declare would be pruned by the API server, so it is an error here.
* On top of the schemas: the layout grade_ray relies on (a head that runs no
  work, a CPU node type/group offering the custom resource ``rollout``, a GPU
  one for the learner), token auth (and that an operator older than KubeRay
  v1.5.1 makes Ray refuse to start instead of running without it), shared
  checkpoint storage, the job entrypoint's config overrides, and the
  Dockerfile's inputs.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = Path(__file__).resolve().parent / "crds"
LAUNCHER_YAML = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER_YAML = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

RAY_VERSION = "2.60.0"
ROLLOUT_RESOURCE = "rollout"


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


# --------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------


def _prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return _load(LAUNCHER_YAML)


@pytest.fixture(scope="module")
def launcher_prepared(launcher) -> dict[str, Any]:
    return _prepare_and_validate(launcher)


def _types_offering(config: dict[str, Any], resource: str) -> list[str]:
    return [
        name
        for name, nt in config["available_node_types"].items()
        if nt.get("resources", {}).get(resource, 0) > 0
    ]


def test_launcher_passes_ray_validation(launcher_prepared):
    # prepare_config filled the AWS defaults and per-type min/max workers.
    assert launcher_prepared["provider"]["type"] in ("aws", "gcp")
    for nt in launcher_prepared["available_node_types"].values():
        assert "min_workers" in nt and "max_workers" in nt


def test_launcher_head_runs_no_work(launcher_prepared):
    head = launcher_prepared["head_node_type"]
    res = launcher_prepared["available_node_types"][head]["resources"]
    assert res.get("CPU") == 0, "the head must advertise CPU: 0 so no task lands on it"
    assert res.get("GPU", 0) == 0 and res.get(ROLLOUT_RESOURCE, 0) == 0
    start = " ".join(launcher_prepared["head_start_ray_commands"])
    assert "--head" in start and "--num-cpus=0" in start


def test_launcher_rollout_and_gpu_node_types(launcher_prepared):
    cfg = launcher_prepared
    head = cfg["head_node_type"]
    rollout = _types_offering(cfg, ROLLOUT_RESOURCE)
    gpu = _types_offering(cfg, "GPU")
    assert len(rollout) == 1, f"exactly one node type should offer `rollout`, got {rollout}"
    assert len(gpu) >= 1, "a GPU node type is needed for the learner"
    (rt,) = rollout
    assert rt != head and rt not in gpu, "rollout nodes are CPU nodes, apart from the learner's"
    r = cfg["available_node_types"][rt]
    assert r["resources"]["CPU"] > 0
    # Autoscaled from zero, bounded by the global cap.
    assert r["min_workers"] == 0 and 0 < r["max_workers"] <= cfg["max_workers"]
    for g in gpu:
        assert g != head
        assert cfg["available_node_types"][g]["max_workers"] >= 1


def test_launcher_setup_installs_the_mounted_project(launcher_prepared):
    """Every node type installs the checkout that file_mounts ships (the image brings
    Python, Ray and torch: see test_launcher_runs_every_node_in_the_project_image)."""
    cfg = launcher_prepared
    per_type = {}
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            per_type[name] = cfg["head_setup_commands"]
        else:
            # A node type's own worker_setup_commands replace the global ones.
            per_type[name] = nt.get("worker_setup_commands", cfg["worker_setup_commands"])
    for name, cmds in per_type.items():
        assert "pip install --no-deps ~/grade_ray" in "\n".join(cmds), name
    # The project source is shipped by file_mounts from the repo root.
    mounts = cfg["file_mounts"]
    assert mounts.get("~/grade_ray") == "."
    assert (REPO / "pyproject.toml").exists()
    # run_dir on the shared mount: the host's /mnt/checkpoints reaches the container
    assert "-v /mnt/checkpoints:/mnt/checkpoints" in cfg["docker"]["run_options"]


# The project's images (cluster/Dockerfile's build commands; the KubeRay manifests use them too).
CPU_IMAGE = "ghcr.io/your-org/grade-ray:0.1.0-cpu"
GPU_IMAGE = "ghcr.io/your-org/grade-ray:0.1.0-cu124"


def _node_images(cfg: dict[str, Any]) -> dict[str, str]:
    """The container image each node type runs in, as Ray's docker command runner picks it."""
    docker = cfg.get("docker") or {}
    out = {}
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            out[name] = docker.get("head_image", docker.get("image", ""))
        else:
            own = (nt.get("docker") or {}).get("worker_image")
            out[name] = own or docker.get("worker_image", docker.get("image", ""))
    return out


def test_launcher_runs_every_node_in_the_project_image(launcher_prepared):
    """Issue 15 item 4: Ray's default AWS AMI puts a Python older than 3.10 on PATH (Ray's
    own default setup_commands switch to a conda env first; this config replaces them), and
    Ray 2.60 needs >= 3.10. Every setup and start command therefore runs in the project's
    image (Python 3.11, Ray 2.60, torch, grade_ray), the GPU type in its CUDA build; the
    host AMI stays Ray's default (it brings docker and the NVIDIA container runtime)."""
    cfg = launcher_prepared
    assert cfg["docker"].get("container_name"), "docker mode needs a container name"
    gpu = set(_types_offering(cfg, "GPU"))
    images = _node_images(cfg)
    assert images == {n: GPU_IMAGE if n in gpu else CPU_IMAGE for n in images}, images
    # the images are the ones cluster/README.md and the Dockerfile build, from a py311 base
    for text in (DOCKERFILE.read_text(), (CLUSTER / "README.md").read_text()):
        assert CPU_IMAGE in text and GPU_IMAGE in text
    assert "rayproject/ray:2.60.0-py311-gpu" in DOCKERFILE.read_text()  # the CUDA build's base
    # nothing reinstalls what the image pins (Python, Ray, torch)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert not any(re.search(r"install\b.*\b(ray|torch)\b", c) for c in cfg[key]), key
    for nt in cfg["available_node_types"].values():
        cmds = nt.get("worker_setup_commands", [])
        assert not any(re.search(r"install\b.*\b(ray|torch)\b", c) for c in cmds)


def test_launcher_token_auth(launcher_prepared):
    cfg = launcher_prepared
    assert "~/.ray/auth_token" in cfg["file_mounts"], "ship the cluster token to every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda c: c["available_node_types"]["rollout"].pop("resources"),
            "'resources' is a required property",
        ),
        (
            lambda c: c["available_node_types"]["rollout"].__setitem__("min_worker", 1),
            "'min_worker' was unexpected",
        ),
        (
            lambda c: c["available_node_types"]["rollout"]["resources"].__setitem__("rollout", 0.5),
            "is not of type 'integer'",
        ),
        (lambda c: c.__setitem__("setup_command", []), "'setup_command' was unexpected"),
        (lambda c: c.__setitem__("head_node_type", "nope"), "must be one of"),
    ],
    ids=[
        "missing-resources",
        "misspelt-min_workers",
        "fractional-resource",
        "misspelt-setup_commands",
        "unknown-head-type",
    ],
)
def test_launcher_validation_catches_mistakes(launcher, mutate, expect):
    bad = copy.deepcopy(launcher)
    mutate(bad)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as err:
        _prepare_and_validate(bad)
    assert expect in str(err.value)


# --------------------------------------------------------------------------
# KubeRay manifests vs the real CRDs (vendored, unmodified, in crds/)
# --------------------------------------------------------------------------

# Oldest first. KUBERAY_VERSIONS[0] is the minimum the manifests support: the
# first release whose RayCluster spec has `authOptions`.
KUBERAY_VERSIONS = ["v1.5.1", "v1.7.0"]
MIN_KUBERAY = KUBERAY_VERSIONS[0]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

# The root `metadata` is `type: object` with no properties in every CRD: the
# API server validates it as ObjectMeta itself. These are the ObjectMeta fields
# a manifest author sets; anything else there is reported as unknown.
_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}

_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}
_INT_FORMATS = {"int32": 2**31, "int64": 2**63}


@functools.cache
def load_crd(kuberay: str, kind: str) -> dict[str, Any]:
    text = (CRDS / kuberay / CRD_FILES[kind]).read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    (crd,) = [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    return crd


class StructuralCheck:
    """Check a value against a CRD's structural schema the way the API server does.

    Kubernetes prunes every field a structural schema does not declare (in
    ``properties``, or by an ``additionalProperties`` schema) unless the object
    says ``x-kubernetes-preserve-unknown-fields: true``; kubectl's strict field
    validation turns that into an error. So here an undeclared field is an
    error. Also checked: ``type``, ``nullable``, ``required``, ``enum``,
    ``x-kubernetes-int-or-string``, ``pattern``, ``min/maxLength``,
    ``minimum``/``maximum``, ``min/maxItems``, the int32/int64 ``format`` ranges,
    ``anyOf``/``allOf``/``oneOf``/``not``, and unique keys of
    ``x-kubernetes-list-type: map``/``set`` lists. CEL rules
    (``x-kubernetes-validations``) are not evaluated; they are collected in
    ``cel`` so that a test can insist there are none.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.checked = 0  # manifest values compared with a schema node
        self.cel: list[str] = []

    def _passes(self, schema: dict[str, Any], value: Any) -> bool:
        sub = StructuralCheck()
        sub.check(schema, value, "")
        return not sub.errors

    def check(self, schema: dict[str, Any], value: Any, path: str) -> None:
        self.checked += 1
        where = path or "<root>"

        def err(msg: str) -> None:
            self.errors.append(f"{where}: {msg}")

        if value is None:
            if not schema.get("nullable"):
                err("null is not allowed")
            return
        self.cel += [f"{where}: {r['rule']}" for r in schema.get("x-kubernetes-validations", [])]

        if schema.get("x-kubernetes-int-or-string"):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                return err(f"must be an integer or a string, got {type(value).__name__} {value!r}")
        elif "type" in schema:
            want = schema["type"]
            is_num = isinstance(value, bool) and want in ("integer", "number")
            if is_num or not isinstance(value, _PY_TYPES[want]):
                return err(f"must be of type {want}, got {type(value).__name__} {value!r}")
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            return err("the schema declares no type here")

        if "anyOf" in schema and not any(self._passes(s, value) for s in schema["anyOf"]):
            err(f"{value!r} matches none of anyOf")
        for s in schema.get("allOf", []):
            if not self._passes(s, value):
                err(f"{value!r} fails an allOf branch")
        if "oneOf" in schema and sum(self._passes(s, value) for s in schema["oneOf"]) != 1:
            err(f"{value!r} must match exactly one of oneOf")
        if "not" in schema and self._passes(schema["not"], value):
            err(f"{value!r} must not match `not`")
        if "enum" in schema and value not in schema["enum"]:
            err(f"{value!r} is not one of {schema['enum']}")

        if isinstance(value, str):
            if "pattern" in schema and not re.search(schema["pattern"], value):
                err(f"{value!r} does not match {schema['pattern']!r}")
            if len(value) < schema.get("minLength", 0):
                err(f"shorter than minLength {schema['minLength']}")
            if len(value) > schema.get("maxLength", len(value)):
                err(f"longer than maxLength {schema['maxLength']}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bound = _INT_FORMATS.get(schema.get("format", ""))
            if bound and not -bound <= value < bound:
                err(f"{value} is out of {schema['format']} range")
            if "minimum" in schema and value < schema["minimum"]:
                err(f"{value} is less than the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                err(f"{value} is more than the maximum {schema['maximum']}")
        elif isinstance(value, list):
            self._check_list(schema, value, path, err)
        elif isinstance(value, dict):
            self._check_object(schema, value, path, err)

    def _check_list(self, schema: dict[str, Any], value: list, path: str, err) -> None:
        if len(value) < schema.get("minItems", 0):
            err(f"fewer than minItems {schema['minItems']}")
        if len(value) > schema.get("maxItems", len(value)):
            err(f"more than maxItems {schema['maxItems']}")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [
                tuple(v.get(k) for k in keys) if list_type == "map" and isinstance(v, dict) else v
                for v in value
            ]
            dups = {repr(s) for i, s in enumerate(seen) if s in seen[:i]}
            if dups:
                err(f"duplicate entries in a list-type {list_type} {keys or ''}: {sorted(dups)}")
        for i, item in enumerate(value):
            self.check(schema.get("items", {}), item, f"{path}[{i}]")

    def _check_object(self, schema: dict[str, Any], value: dict, path: str, err) -> None:
        for name in schema.get("required", []):
            if name not in value:
                err(f"missing required field {name!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        keep = extra is True or schema.get("x-kubernetes-preserve-unknown-fields")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in props:
                self.check(props[key], item, sub)
            elif isinstance(extra, dict):
                self.check(extra, item, sub)
            elif not keep:
                self.errors.append(f"{sub}: unknown field (the API server would prune it)")


def crd_schema(kuberay: str, api_version: str, kind: str) -> dict[str, Any] | None:
    """The openAPIV3Schema a server running `kuberay` applies to apiVersion/kind."""
    if kind not in CRD_FILES:
        return None
    crd = load_crd(kuberay, kind)
    group, _, version = api_version.partition("/")
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    if group != crd["spec"]["group"] or not served:
        return None
    return served[0]["schema"]["openAPIV3Schema"]


def check_manifest(doc: dict[str, Any], kuberay: str) -> StructuralCheck:
    result = StructuralCheck()
    schema = crd_schema(kuberay, doc.get("apiVersion", ""), doc.get("kind", ""))
    if schema is None:
        result.errors.append(
            f"<root>: KubeRay {kuberay} serves no {doc.get('kind')!r} in {doc.get('apiVersion')!r}"
        )
        return result
    schema = {**schema, "properties": {**schema["properties"], "metadata": _OBJECT_META}}
    result.check(schema, doc, "")
    return result


def _count_values(node: Any) -> int:
    if isinstance(node, dict):
        return 1 + sum(_count_values(v) for v in node.values())
    if isinstance(node, list):
        return 1 + sum(_count_values(v) for v in node)
    return 1


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _load(RAYCLUSTER_YAML)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB_YAML)


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.fixture(scope="module", params=["raycluster", "rayjob"])
def manifest(request) -> tuple[str, dict[str, Any]]:
    return request.param, request.getfixturevalue(request.param)


def test_vendored_crds_are_unmodified():
    sums = {}
    for line in (CRDS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    on_disk = {p.relative_to(CRDS).as_posix() for p in CRDS.glob("*/*.yaml")}
    assert on_disk == set(sums), "every vendored CRD file is listed in SHA256SUMS"
    for name, digest in sums.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in CRDS.iterdir() if p.is_dir()) == KUBERAY_VERSIONS
    assert (CRDS / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_manifest_matches_real_crd(manifest, kuberay):
    name, doc = manifest
    assert doc["apiVersion"] == "ray.io/v1"
    result = check_manifest(doc, kuberay)
    assert result.errors == [], f"{name} vs KubeRay {kuberay}"
    # Every value in the manifest met a schema node: nothing was skipped.
    assert result.checked == _count_values(doc), (result.checked, _count_values(doc))
    # No CEL rule applies to the fields used (this checker does not evaluate them).
    assert result.cel == []


def test_structural_check_pruning_semantics():
    schema = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "strmap": {"type": "object", "additionalProperties": {"type": "string"}},
            "closed": {"type": "object"},
            "port": {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
            },
        },
    }

    def errors(value):
        c = StructuralCheck()
        c.check(schema, value, "")
        return c.errors

    assert errors({"open": {"anything": [1, {"x": None}]}, "strmap": {"a": "b"}}) == []
    assert errors({"port": 8080}) == [] and errors({"port": "http"}) == []
    assert errors({"closed": {"a": 1}}) == [
        "closed.a: unknown field (the API server would prune it)"
    ]
    assert errors({"strmap": {"a": 1}}) == ["strmap.a: must be of type string, got int 1"]
    assert errors({"port": 1.5}) == ["port: must be an integer or a string, got float 1.5"]
    assert errors({"port": True}) == ["port: must be an integer or a string, got bool True"]
    assert errors({"other": 1}) == ["other: unknown field (the API server would prune it)"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _c0(spec: dict[str, Any], group: str | int) -> dict[str, Any]:
    g = spec["headGroupSpec"] if group == "head" else spec["workerGroupSpecs"][group]
    return g["template"]["spec"]["containers"][0]


# (mutation of a copy of the manifest's cluster spec or document, expected error text)
_CLUSTER_MISTAKES = {
    "misspelt-workerGroupSpecs": (
        lambda d, s: _rename(s, "workerGroupSpecs", "workerGroupSpec"),
        "workerGroupSpec: unknown field",
    ),
    "misspelt-container-resources": (
        lambda d, s: _rename(_c0(s, "head"), "resources", "resource"),
        "containers[0].resource: unknown field",
    ),
    "misspelt-maxReplicas": (
        lambda d, s: _rename(s["workerGroupSpecs"][0], "maxReplicas", "maxReplica"),
        "maxReplica: unknown field",
    ),
    "misspelt-metadata-labels": (
        lambda d, s: _rename(d["metadata"], "labels", "label"),
        "metadata.label: unknown field",
    ),
    "non-string-rayStartParam": (
        lambda d, s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        "rayStartParams.num-cpus: must be of type string",
    ),
    "bool-as-string": (
        lambda d, s: s.__setitem__("enableInTreeAutoscaling", "true"),
        "enableInTreeAutoscaling: must be of type boolean",
    ),
    "missing-template": (
        lambda d, s: s["workerGroupSpecs"][0].pop("template"),
        "missing required field 'template'",
    ),
    "bad-quantity": (
        lambda d, s: _c0(s, 1)["resources"]["limits"].__setitem__("nvidia.com/gpu", "one"),
        "'one' does not match",
    ),
    "float-int-or-string": (
        lambda d, s: _c0(s, 1)["resources"]["limits"].__setitem__("nvidia.com/gpu", 0.5),
        "must be an integer or a string, got float",
    ),
    "unknown-enum-upscalingMode": (
        lambda d, s: s["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
        "'Fast' is not one of",
    ),
    "int32-overflow": (
        lambda d, s: s["workerGroupSpecs"][0].__setitem__("maxReplicas", 2**31),
        "out of int32 range",
    ),
    "duplicate-container-name": (
        lambda d, s: s["headGroupSpec"]["template"]["spec"]["containers"].append(
            copy.deepcopy(_c0(s, "head"))
        ),
        "duplicate entries in a list-type map",
    ),
    "null-rayVersion": (
        lambda d, s: s.__setitem__("rayVersion", None),
        "rayVersion: null is not allowed",
    ),
    "unserved-apiVersion": (
        lambda d, s: d.__setitem__("apiVersion", "ray.io/v2"),
        "serves no",
    ),
}


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
@pytest.mark.parametrize("mistake", list(_CLUSTER_MISTAKES))
def test_real_crd_catches_mistakes(manifest, kuberay, mistake):
    _, doc = manifest
    mutate, expect = _CLUSTER_MISTAKES[mistake]
    bad = copy.deepcopy(doc)
    mutate(bad, _cluster_spec(bad))
    errors = check_manifest(bad, kuberay).errors
    assert errors, "the schema accepted a broken manifest"
    assert any(expect in e for e in errors), errors


_RAYJOB_MISTAKES = {
    "misspelt-runtimeEnvYAML": (
        lambda j: _rename(j["spec"], "runtimeEnvYAML", "runtimeEnvYaml"),
        "spec.runtimeEnvYaml: unknown field",
    ),
    "groupName-as-name": (
        lambda j: _rename(j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "groupName", "name"),
        "missing required field 'groupName'",
    ),
    "misspelt-authOptions": (
        lambda j: _rename(j["spec"]["rayClusterSpec"], "authOptions", "authOption"),
        "rayClusterSpec.authOption: unknown field",
    ),
    "unknown-enum-auth-mode": (
        lambda j: j["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "Token"),
        "'Token' is not one of ['disabled', 'token']",
    ),
    "string-backoffLimit": (
        lambda j: j["spec"].__setitem__("backoffLimit", "0"),
        "spec.backoffLimit: must be of type integer",
    ),
}


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
@pytest.mark.parametrize("mistake", list(_RAYJOB_MISTAKES))
def test_real_crd_catches_rayjob_mistakes(rayjob, kuberay, mistake):
    mutate, expect = _RAYJOB_MISTAKES[mistake]
    bad = copy.deepcopy(rayjob)
    mutate(bad)
    errors = check_manifest(bad, kuberay).errors
    assert any(expect in e for e in errors), errors


def test_real_crd_has_no_submissionMode_enum(rayjob):
    # The CRD does not restrict submissionMode (the reduced schema once invented
    # an enum); test_rayjob_entrypoint_and_runtime_env checks the value itself.
    for kuberay in KUBERAY_VERSIONS:
        bad = copy.deepcopy(rayjob)
        bad["spec"]["submissionMode"] = "K8sJob"
        assert check_manifest(bad, kuberay).errors == []


def _groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _cluster_spec(doc)["workerGroupSpecs"]}


def _containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _cluster_spec(doc)
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for name, g in _groups(doc).items():
        out += [(name, c) for c in g["template"]["spec"]["containers"]]
    return out


def _parse_custom_resources(value: str) -> dict[str, float]:
    # KubeRay passes the value to `ray start --resources=...` verbatim; the
    # documented form is a quoted JSON object: '"{\"rollout\": 8}"'.
    text = value.strip()
    if text.startswith('"') and text.endswith('"'):
        text = json.loads(text)
    return json.loads(text)


def test_rayStartParams_are_strings(manifest):
    _, doc = manifest
    spec = _cluster_spec(doc)
    params = [spec["headGroupSpec"]["rayStartParams"]]
    params += [g.get("rayStartParams", {}) for g in spec["workerGroupSpecs"]]
    for p in params:
        bad = {k: v for k, v in p.items() if not isinstance(v, str)}
        assert not bad, f"KubeRay needs string rayStartParams values: {bad}"


def test_kuberay_split_head_rollout_learner(manifest):
    name, doc = manifest
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    groups = _groups(doc)
    assert set(groups) >= {"rollout", "learner"}, name
    rollout, learner = groups["rollout"], groups["learner"]

    res = _parse_custom_resources(rollout["rayStartParams"]["resources"])
    assert res.get(ROLLOUT_RESOURCE, 0) > 0, res
    assert 1 <= rollout["minReplicas"] <= rollout["replicas"] <= rollout["maxReplicas"]
    assert rollout["maxReplicas"] > rollout["minReplicas"], "rollout group must be able to scale"
    for c in rollout["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert c["image"].endswith("-cpu")

    assert ROLLOUT_RESOURCE not in learner.get("rayStartParams", {}).get("resources", "")
    assert learner["minReplicas"] <= learner["replicas"] <= learner["maxReplicas"]
    assert learner["maxReplicas"] >= 1
    for c in learner["template"]["spec"]["containers"]:
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert "-cu" in c["image"], "the learner needs the CUDA image"


def ray_container_problems(doc: dict[str, Any]) -> list[str]:
    """KubeRay derives num-cpus / memory from container limits: require them."""
    problems = []
    for group, c in _containers(doc):
        limits = (c.get("resources") or {}).get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in limits:
                problems.append(f"{group}/{c['name']}: resources.limits.{key} missing")
    return problems


def test_ray_containers_set_cpu_and_memory(manifest):
    _, doc = manifest
    assert ray_container_problems(doc) == []
    bad = copy.deepcopy(doc)
    _groups(bad)["rollout"]["template"]["spec"]["containers"][0].pop("resources")
    assert ray_container_problems(bad), "a container without resources must be flagged"


def _env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


_TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def auth_guard_problems(doc: dict[str, Any]) -> list[str]:
    """Why the manifest could bring up a Ray without token auth, if it could.

    Every Ray container (head and each worker group) must say
    RAY_AUTH_MODE=token itself, not rely on `authOptions`: a KubeRay older
    than v1.5.1 drops `authOptions`, and with the mode set but no token Ray
    2.60's `ray start` refuses to start (test_ray_refuses_to_start_without_token).
    * RayCluster (no authOptions): the token comes from one Secret
      (secretKeyRef, not optional) in every Ray container and the autoscaler.
    * RayJob (authOptions.mode: token): the operator creates the token Secret
      and adds RAY_AUTH_TOKEN, and uses the same token for its own job
      submission and status calls. A token source in the manifest would
      replace the operator's in the Ray containers and lock the operator out,
      so none is allowed; under an older operator none is there, and Ray stops.
    """
    problems = []
    spec = _cluster_spec(doc)
    managed = "authOptions" in spec
    if managed and spec["authOptions"].get("mode") != "token":
        problems.append(f"authOptions.mode is {spec['authOptions'].get('mode')!r}, not 'token'")
    where_env = [(g, _env(c)) for g, c in _containers(doc)]
    if not managed:
        where_env.append(("autoscaler", _env(spec.get("autoscalerOptions", {}))))
    secrets = set()
    for where, env in where_env:
        mode = env.get("RAY_AUTH_MODE", {})
        if mode.get("value") != "token" or "valueFrom" in mode:
            problems.append(f"{where}: RAY_AUTH_MODE must be the literal 'token'")
        if managed:
            problems += [
                f"{where}: {k} overrides the operator's token" for k in _TOKEN_SOURCES if k in env
            ]
            continue
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") or {}
        if not (ref.get("name") and ref.get("key")) or ref.get("optional"):
            problems.append(f"{where}: RAY_AUTH_TOKEN must come from a (non-optional) Secret")
        else:
            secrets.add((ref["name"], ref["key"]))
    if len(secrets) > 1:
        problems.append(f"all containers must share one token Secret: {sorted(secrets)}")
    return problems


def test_manifests_guard_against_running_without_auth(manifest):
    _, doc = manifest
    assert auth_guard_problems(doc) == []


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda s: _c0(s, "head")["env"].clear(), "head: RAY_AUTH_MODE must be"),
        (
            lambda s: _c0(s, 1)["env"].__setitem__(
                0, {"name": "RAY_AUTH_MODE", "value": "disabled"}
            ),
            "learner: RAY_AUTH_MODE must be",
        ),
    ],
    ids=["head-without-mode", "learner-auth-disabled"],
)
def test_auth_guard_catches_missing_mode(manifest, mutate, expect):
    _, doc = manifest
    bad = copy.deepcopy(doc)
    mutate(_cluster_spec(bad))
    assert any(expect in p for p in auth_guard_problems(bad)), auth_guard_problems(bad)


def test_auth_guard_catches_token_mistakes(raycluster, rayjob):
    bad = copy.deepcopy(raycluster)
    _env(_c0(bad["spec"], 0))["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] = True
    assert any("non-optional" in p for p in auth_guard_problems(bad))
    bad = copy.deepcopy(raycluster)
    _env(_c0(bad["spec"], 1))["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] = "other"
    assert any("one token Secret" in p for p in auth_guard_problems(bad))
    bad = copy.deepcopy(rayjob)
    _c0(bad["spec"]["rayClusterSpec"], "head")["env"].append(
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": "t"}}}
    )
    assert any("overrides the operator's token" in p for p in auth_guard_problems(bad))
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "disabled"
    assert any("authOptions.mode" in p for p in auth_guard_problems(bad))


def test_authOptions_needs_the_minimum_kuberay(rayjob):
    # authOptions is in the oldest CRD the manifests are checked against ...
    for kuberay in KUBERAY_VERSIONS:
        cluster = crd_schema(kuberay, "ray.io/v1", "RayCluster")["properties"]["spec"]
        job = crd_schema(kuberay, "ray.io/v1", "RayJob")["properties"]["spec"]
        assert "authOptions" in cluster["properties"], kuberay
        assert "authOptions" in job["properties"]["rayClusterSpec"]["properties"], kuberay
    # ... and the manifests and the README name that minimum.
    needle = f"KubeRay {MIN_KUBERAY}"
    for path in (RAYCLUSTER_YAML, RAYJOB_YAML, CLUSTER / "README.md"):
        assert needle in path.read_text(), f"{path.name} must state the minimum {needle}"
    # An older API server prunes authOptions (as an undeclared field). What is
    # left must still demand a token: RAY_AUTH_MODE=token and no token source.
    pruned = copy.deepcopy(rayjob)
    del pruned["spec"]["rayClusterSpec"]["authOptions"]
    for where, c in _containers(pruned):
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert not set(_TOKEN_SOURCES) & set(env), where


# What `ray start` does about auth before it starts any Ray process.
_RAY_START_AUTH_CHECK = """
import json
from ray._private.authentication.authentication_token_setup import (
    ensure_token_if_auth_enabled, maybe_enable_token_auth_if_token_available)
try:
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    outcome = "started"
except Exception as exc:
    outcome = type(exc).__name__
print(json.dumps(outcome))
"""


def _ray_start_refusals() -> int:
    """Calls in `ray start` (scripts.start) that refuse rather than create a token."""
    origin = importlib.util.find_spec("ray.scripts.scripts").origin
    tree = ast.parse(Path(origin).read_text())
    (start,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "start"]
    return sum(
        isinstance(n, ast.Call)
        and getattr(n.func, "id", None) == "ensure_token_if_auth_enabled"
        and any(
            k.arg == "create_token_if_missing" and getattr(k.value, "value", None) is False
            for k in n.keywords
        )
        for n in ast.walk(start)
    )


def _ray_start_auth(tmp_path: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", **env)  # no ~/.ray/auth_token
    out = subprocess.run(
        [sys.executable, "-c", _RAY_START_AUTH_CHECK],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_refuses_to_start_without_token(tmp_path):
    """The guard's premise, in the installed Ray: `ray start` runs these checks."""
    assert _ray_start_refusals() == 2, "head and worker branch of `ray start`"
    assert _ray_start_auth(tmp_path, RAY_AUTH_MODE="token") == "AuthenticationError"
    assert _ray_start_auth(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t" * 32) == "started"
    # Without the mode and without a token Ray starts, with auth disabled:
    # what a pre-v1.5.1 operator would run if the manifest relied on authOptions.
    assert _ray_start_auth(tmp_path) == "started"


def _mounts(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    """group -> {mountPath: volume source kind} for shared volumes."""
    spec = _cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({n: g["template"] for n, g in _groups(doc).items()})
    out = {}
    for group, t in templates.items():
        vols = {v["name"]: v for v in t["spec"].get("volumes", [])}
        out[group] = {}
        for c in t["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                v = vols.get(m["name"])
                assert v is not None, f"{group}: volumeMount {m['name']} has no volume"
                kind = next(k for k in v if k != "name")
                out[group][m["mountPath"]] = kind
    return out


def test_rayjob_entrypoint_and_runtime_env(rayjob):
    from grade_ray.config import load_config

    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["grade-ray", "train"], argv
    assert argv[argv.index("--config") + 1] == "configs/base.yaml"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    run_dir = dict(o.split("=", 1) for o in overrides)["run_dir"]
    assert run_dir.startswith("/mnt/checkpoints/")

    # Every override names a real config key with a valid value.
    base = REPO / "configs" / "base.yaml"
    cfg = load_config([base] if base.exists() else [], overrides)
    assert cfg.run_dir == run_dir
    assert cfg.learner.use_gpu is True

    # run_dir lies on shared storage mounted on the head (driver) and every group.
    shared = {"persistentVolumeClaim", "nfs", "csi"}
    for group, mounts in _mounts(rayjob).items():
        hits = [p for p, kind in mounts.items() if run_dir.startswith(p.rstrip("/") + "/")]
        assert hits and mounts[hits[0]] in shared, f"{group}: {run_dir} is not on shared storage"

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and ("working_dir" in env or "pip" in env), env
    assert spec["shutdownAfterJobFinishes"] is True
    # The CRD does not restrict submissionMode (test_real_crd_has_no_submissionMode_enum).
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")


def test_raycluster_checkpoint_volume_shared(raycluster):
    for group, mounts in _mounts(raycluster).items():
        assert mounts.get("/mnt/checkpoints") == "persistentVolumeClaim", group


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def _dockerfile() -> tuple[dict[str, str], list[str], list[list[str]]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args, froms, copies = {}, [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG":
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip().strip('"'))
        elif instr == "FROM":
            froms.append(rest.split()[0])
        elif instr == "COPY":
            copies.append([t for t in shlex.split(rest) if not t.startswith("--")])
    return args, froms, copies


def test_dockerfile_defaults_and_inputs():
    args, froms, copies = _dockerfile()
    assert froms == ["${BASE_IMAGE}"]
    base = args["BASE_IMAGE"]
    assert base.startswith(("rayproject/ray:", "python:3.11"))
    if base.startswith("rayproject/ray:"):
        assert base.split(":")[1].startswith(RAY_VERSION) and "py311" in base
        assert "-gpu" not in base, "the default image is the CPU one"
    assert args["TORCH_VARIANT"] == "cpu"
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert copies, "the Dockerfile must copy the project in"
    for *sources, _dest in copies:
        for src in sources:
            if any(ch in src for ch in "*?["):
                continue  # optional glob (e.g. README*)
            assert (REPO / src).exists(), f"COPY source {src} is not in the repo"
