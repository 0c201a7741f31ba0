"""Rollout backends: where rollout tasks run.

Both backends take the same calls so one training loop drives either:

- :class:`LocalRollout`: one in-process :class:`RolloutWorker` (tests, ``--local``).
- ``grade_ray.rollout.actor.RayRollout``: a pool of Ray actors.

``submit(tasks, alpha_hat, version, seeds)`` starts work and returns a handle;
``collect(handle)`` returns one columnar batch per task, in task order. Each
task's samples depend only on its seed, so results do not depend on which
worker ran it.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from grade_ray.data.plan import ROLLOUT_COLUMNS, Task, TaskReader
from grade_ray.data.sessions import SessionMeta
from grade_ray.models.policy import FusionPolicy
from grade_ray.rollout.worker import RolloutSpec, RolloutWorker


def task_seed(seed: int, task: Task) -> int:
    """Deterministic per-task sampling seed (independent of worker count and order)."""
    return zlib.crc32(f"{seed}/{task.round}/{task.index}".encode())


class LocalRollout:
    """Runs tasks in this process, one after another."""

    def __init__(
        self,
        policy: FusionPolicy,
        spec: RolloutSpec,
        meta: SessionMeta,
        cache: dict[str, str] | None = None,
        lanes: int = 1,
    ) -> None:
        self.worker = RolloutWorker(policy, spec)
        # one reader serves every lane of a step: keep each lane's current file
        self.reader = TaskReader(meta, max_files=lanes, columns=ROLLOUT_COLUMNS, cache=cache)

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.worker.set_weights(state, version)

    def submit(self, tasks: list[Task], alpha_hat: float, version: int, seeds: list[int]) -> Any:
        if version != self.worker.version:
            raise RuntimeError(f"local worker holds version {self.worker.version}, asked {version}")
        return (tasks, alpha_hat, seeds)

    def collect(self, handle: Any) -> list[dict[str, np.ndarray]]:
        tasks, alpha_hat, seeds = handle
        out = []
        for task, seed in zip(tasks, seeds):
            self.worker.reseed(seed)
            out.append(self.worker.rollout(self.reader.load(task), alpha_hat))
        return out

    def close(self) -> None:
        pass
