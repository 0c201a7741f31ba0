"""grade_ray/algos stays pure math: only torch, numpy, a few stdlib modules and itself."""

from __future__ import annotations

import ast
from pathlib import Path

import grade_ray.algos

ALLOWED_ROOTS = {
    "torch",
    "numpy",
    "__future__",
    "math",
    "dataclasses",
    "typing",
    "collections",
    "functools",
    "itertools",
}
ALGOS_DIR = Path(grade_ray.algos.__file__).resolve().parent


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside grade_ray.algos only at level 1
                names.append("grade_ray.algos" if node.level == 1 else "." * node.level)
            else:
                names.append(node.module or "")
    return names


def test_algos_import_only_torch_numpy_stdlib_and_itself():
    files = sorted(ALGOS_DIR.glob("*.py"))
    assert len(files) >= 7
    bad = []
    for path in files:
        for name in imported_modules(path):
            root = name.split(".")[0]
            if root in ALLOWED_ROOTS or name == "grade_ray.algos":
                continue
            if name.startswith("grade_ray.algos."):
                continue
            bad.append(f"{path.name}: {name}")
    assert not bad, f"impure imports in grade_ray/algos: {bad}"
