"""The tree shows the architecture: dependencies point one way, core <- jobs/integrations <- CLI.

Layers, bottom up (a module may import its own layer and the ones below):

0. plumbing: config, keys, options, runlog, raysession, algos
1. core: models, data, spec (reward names resolved against the data), rollout, learner
2. jobs and integrations: jobs, baselines, datasets, serving, cluster
3. the CLI: cli, __main__ (nothing imports it)
"""

from __future__ import annotations

import ast
from pathlib import Path

import grade_ray

PACKAGE = Path(grade_ray.__file__).resolve().parent
LAYER = {
    "config": 0,
    "keys": 0,
    "options": 0,
    "runlog": 0,
    "raysession": 0,
    "spec": 1,
    "algos": 0,
    "models": 1,
    "data": 1,
    "rollout": 1,
    "learner": 1,
    "jobs": 2,
    "baselines": 2,
    "datasets": 2,
    "serving": 2,
    "cluster": 2,
    "cli": 3,
    "__main__": 3,
    "__init__": 0,
}
# options.py lists the command modules and imports them lazily to name the subcommands
# (`grade-ray submit` checks a command exists); that is the one upward reference.
LAZY_UPWARD = {("options", "cluster"), ("options", "jobs"), ("options", "serving")}
LAZY_UPWARD |= {("options", "datasets"), ("options", "baselines")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "grade_ray":
                out |= {f"grade_ray.{a.name}" for a in node.names}
            elif node.module.startswith("grade_ray."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("grade_ray.")}
    return out


def _modules() -> dict[str, set[str]]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        mods[".".join(rel.parts)] = _imports(path)
    return mods


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(LAYER), f"new top-level module(s) without a layer: {rooms - set(LAYER)}"


def test_nothing_imports_the_cli():
    bad = [
        m for m, deps in _modules().items() if "grade_ray.cli" in deps and m != "grade_ray.__main__"
    ]
    assert not bad, f"modules importing the CLI: {bad}"


def test_dependencies_point_down():
    bad = []
    for module, deps in _modules().items():
        src = _room(module)
        for dep in deps:
            dst = _room(dep)
            if LAYER[dst] > LAYER[src] and (src, dst) not in LAZY_UPWARD:
                bad.append(f"{module} -> {dep}")
    assert not bad, f"imports that point up the layers: {bad}"


# The logged-session modules: the format, then row checks on it, then reading files.
SESSION_LAYERS = ("grade_ray.data.sessions", "grade_ray.data.validation", "grade_ray.data.reading")


def test_session_modules_point_one_way():
    mods = _modules()
    bad = [
        f"{low} -> {high}"
        for i, low in enumerate(SESSION_LAYERS)
        for high in SESSION_LAYERS[i + 1 :]
        if high in mods[low]
    ]
    assert not bad, f"sessions <- validation <- reading; imports the other way: {bad}"


def test_string_references_to_modules_resolve():
    import importlib

    from grade_ray.options import COMMAND_MODULES

    for name in COMMAND_MODULES:
        assert hasattr(importlib.import_module(name), "add_parser"), name
