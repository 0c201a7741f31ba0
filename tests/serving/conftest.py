"""Shared fixtures of the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grade_ray.data.reading import read_meta
from grade_ray.learner.loop import new_policy, save_policy


@pytest.fixture(scope="session")
def personalised_run(smoke_cfg, smoke_data):
    """``personalised_run(run_dir, seed, info=None)`` saves into ``run_dir`` a Stage 2 policy
    whose weights are far from uniform (a fresh policy gives every request the same weights,
    which would hide ranking bugs) and returns ``run_dir``."""
    train_path, _ = smoke_data
    meta = read_meta(train_path)

    def make(run_dir: Path, seed: int, info: dict | None = None) -> Path:
        policy = new_policy(smoke_cfg, meta, train_path)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in policy.tower.parameters():
                p.normal_(0, 0.5)
        save_policy(run_dir / "policy.pt", policy, smoke_cfg, meta, {"stage": 2, **(info or {})})
        return run_dir

    return make
