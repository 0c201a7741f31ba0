"""Shared fixtures: one local Ray per test session, small simulated logs, scripts/ runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) shared by every test marked ``ray``."""
    import ray

    from grade_ray.raysession import loopback_only

    if not ray.is_initialized():
        with loopback_only():  # like the jobs' embedded Ray: nothing beyond 127.0.0.1
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_cfg(tmp_path_factory):
    """The smoke config with its run_dir in a temp dir."""
    from pathlib import Path

    from grade_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("smoke")
    return load_config([root / "configs" / "smoke.yaml"], [f"run_dir={run}"])


@pytest.fixture(scope="session")
def smoke_data(smoke_cfg):
    """(train_path, eval_path) simulated once per session for the smoke config."""
    from grade_ray.jobs.train import prepare_data

    return prepare_data(smoke_cfg)


@pytest.fixture
def run_script():
    """``run_script(name, args, env=None, timeout=900)``: ``python scripts/NAME ARGS`` in a
    subprocess from the repository root, with ``env`` over this process's environment;
    returns the CompletedProcess (output captured as text, the exit status not checked)."""
    root = Path(__file__).resolve().parents[1]

    def run(name: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 900):
        return subprocess.run(
            [sys.executable, str(root / "scripts" / name), *args],
            cwd=root,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
