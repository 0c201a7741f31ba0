"""Offline checks of the deployment files under cluster/.

* cluster/ray-cluster.yaml goes through Ray's own ``prepare_config`` (fills the
  AWS defaults; needs no cloud credentials or boto3) and ``validate_config``
  (Ray's JSON schema, ray/autoscaler/ray-schema.json, plus its cross checks).
* cluster/kuberay/*.yaml are validated against the openAPIV3Schema of the
  KubeRay CRDs vendored (reduced) under tests/cluster/schemas/, with unknown
  fields rejected the way kubectl's strict field validation does.
* On top of the schemas: the layout grade_ray relies on (a head that runs no
  work, a CPU node type/group offering the custom resource ``rollout``, a GPU
  one for the learner), token auth, shared checkpoint storage, the job
  entrypoint's config overrides, and the Dockerfile's inputs.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
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
# KubeRay manifests vs the (vendored) CRD schemas
# --------------------------------------------------------------------------


def _resolve_refs(node: Any) -> Any:
    """Inline ``$ref: "<file>#/json/pointer"`` into sibling schema files."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            fname, _, pointer = ref.partition("#")
            target: Any = yaml.safe_load((SCHEMAS / fname).read_text())
            for part in filter(None, pointer.split("/")):
                target = target[int(part)] if isinstance(target, list) else target[part]
            return _resolve_refs(copy.deepcopy(target))
        return {k: _resolve_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v) for v in node]
    return node


def _strict(node: Any) -> None:
    """Reject unknown fields like kubectl's strict field validation.

    The vendored reduced schemas already say ``additionalProperties: false``;
    this makes a drop-in copy of the real KubeRay CRD behave the same.
    """
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)


def crd_validator(crd_file: str, version: str = "v1") -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / crd_file).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _resolve_refs(ver["schema"]["openAPIV3Schema"])
    _strict(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return sorted(
        "/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(doc)
    )


@pytest.fixture(scope="module")
def raycluster_validator():
    return crd_validator("ray.io_rayclusters.yaml")


@pytest.fixture(scope="module")
def rayjob_validator():
    return crd_validator("ray.io_rayjobs.yaml")


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


def test_raycluster_matches_crd(raycluster, raycluster_validator):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert schema_errors(raycluster_validator, raycluster) == []


def test_rayjob_matches_crd(rayjob, rayjob_validator):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert schema_errors(rayjob_validator, rayjob) == []


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda m: _rename(m["spec"], "workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec"),
        (
            lambda m: _rename(
                m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                "resources",
                "resource",
            ),
            "resource",
        ),
        (
            lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
            "num-cpus",
        ),
        (lambda m: m["spec"]["workerGroupSpecs"][0].pop("template"), "template"),
        (
            lambda m: m["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0][
                "resources"
            ]["limits"].__setitem__("nvidia.com/gpu", "one"),
            "does not match",
        ),
        (
            lambda m: m["spec"].__setitem__("enableInTreeAutoscaling", "true"),
            "enableInTreeAutoscaling",
        ),
        (lambda m: m["spec"]["workerGroupSpecs"][0].__setitem__("maxReplica", 4), "maxReplica"),
    ],
    ids=[
        "misspelt-workerGroupSpec",
        "misspelt-resources",
        "non-string-rayStartParam",
        "missing-template",
        "bad-quantity",
        "bool-as-string",
        "misspelt-maxReplicas",
    ],
)
def test_raycluster_schema_catches_mistakes(raycluster, raycluster_validator, mutate, expect):
    bad = copy.deepcopy(raycluster)
    mutate(bad)
    errors = schema_errors(raycluster_validator, bad)
    assert errors, "the schema accepted a broken manifest"
    assert any(expect in e for e in errors), errors


def test_rayjob_schema_catches_mistakes(rayjob, rayjob_validator):
    bad = copy.deepcopy(rayjob)
    _rename(bad["spec"], "runtimeEnvYAML", "runtimeEnvYaml")
    assert any("runtimeEnvYaml" in e for e in schema_errors(rayjob_validator, bad))
    bad = copy.deepcopy(rayjob)
    _rename(bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "groupName", "name")
    assert schema_errors(rayjob_validator, bad)
    bad = copy.deepcopy(rayjob)
    bad["spec"]["submissionMode"] = "K8sJob"
    assert schema_errors(rayjob_validator, bad)


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


def test_raycluster_token_auth_from_secret(raycluster):
    envs = [(g, _env(c)) for g, c in _containers(raycluster)]
    envs.append(
        ("autoscaler", {e["name"]: e for e in raycluster["spec"]["autoscalerOptions"]["env"]})
    )
    secrets = set()
    for where, env in envs:
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref.get("name") and ref.get("key"), f"{where}: token must come from a Secret"
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"all containers must share one token: {secrets}"


def test_rayjob_token_auth(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    # Operator-managed token (KubeRay v1.5+): it creates the Secret, injects
    # RAY_AUTH_MODE/RAY_AUTH_TOKEN, and authenticates its own job calls.
    assert spec.get("authOptions", {}).get("mode") == "token"
    for where, c in _containers(rayjob):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") in (None, "token"), where


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
