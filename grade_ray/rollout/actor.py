"""Rollout on Ray: a pool of thin actors around :class:`RolloutWorker`.

Weights travel once per update: the driver ``ray.put`` s the state dict (as numpy
arrays) and passes the reference (wrapped in a list, so Ray does not resolve it) with
its version; an actor fetches it only when its own version differs — so a
restarted actor reloads the current weights before redoing a task. Actors are
restartable (``max_restarts``) and their calls retried (``max_task_retries``);
a task's samples depend only on its seed, so a redone task gives the same batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import ray
import torch

from grade_ray.config import PolicyConfig
from grade_ray.data.plan import ROLLOUT_COLUMNS, Task, TaskReader
from grade_ray.data.sessions import SessionMeta
from grade_ray.models.policy import build_policy
from grade_ray.rollout.worker import RolloutSpec, RolloutWorker

log = logging.getLogger(__name__)


def _to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays: Ray reads them back as zero-copy views of its
    object store, where torch tensors go through pickle on both sides (put, fetch and
    load of the policy took 5.8 ms with tensors, 3.3 ms with arrays, one actor)."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _from_numpy(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors over copies of the fetched arrays (Ray's are read-only views of the object
    store; ``load_state_dict`` copies them into the policy's parameters anyway)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


class RolloutActor:
    """Ray actor body: owns a policy copy and a task reader."""

    def __init__(
        self,
        policy_cfg: PolicyConfig,
        meta_json: str,
        spec: RolloutSpec,
        cache: dict[str, str] | None = None,
        lanes: int = 1,
    ) -> None:
        torch.set_num_threads(1)
        meta = SessionMeta.from_json(meta_json)
        policy = build_policy(policy_cfg, meta.context_dim, meta.num_tasks)
        self.worker = RolloutWorker(policy, spec)
        self.reader = TaskReader(
            meta, max_files=lanes, columns=ROLLOUT_COLUMNS, use_threads=False, cache=cache
        )

    def run(
        self,
        tasks: list[Task],
        weights: list[ray.ObjectRef],
        version: int,
        alpha_hat: float,
        seeds: list[int],
    ) -> list[dict[str, np.ndarray]]:
        if version != self.worker.version:
            self.worker.set_weights(_from_numpy(ray.get(weights[0])), version)
        out = []
        for task, seed in zip(tasks, seeds):
            self.worker.reseed(seed)
            out.append(self.worker.rollout(self.reader.load(task), alpha_hat))
        return out

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "file_reads": dict(self.reader.reads),
        }


class RayRollout:
    """Backend with ``num_workers`` rollout actors; task i of a step goes to actor
    i mod num_workers (the trainer deals each actor its own lane of the round, see
    :func:`grade_ray.data.plan.lanes`)."""

    def __init__(
        self,
        cfg,
        meta: SessionMeta,
        spec: RolloutSpec,
        num_workers: int | None = None,
        cache: dict[str, str] | None = None,
        lanes_per_actor: int = 1,
    ) -> None:
        n = num_workers or cfg.rollout.num_workers
        options: dict[str, Any] = {
            "num_cpus": cfg.rollout.num_cpus_per_worker,
            "max_restarts": 2,
            "max_task_retries": 2,
        }
        if cfg.rollout.resource and ray.cluster_resources().get(cfg.rollout.resource, 0) > 0:
            options["resources"] = {cfg.rollout.resource: 1}
        remote = ray.remote(RolloutActor).options(**options)
        # the cache map (file -> decoded cache path) is a few strings: constructor-sized
        self.actors = [
            remote.remote(cfg.policy, meta.to_json(), spec, cache or {}, lanes_per_actor)
            for _ in range(n)
        ]
        self._weights: list[ray.ObjectRef] = []
        self._version = -1

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self._weights = [ray.put(_to_numpy(state))]
        self._version = int(version)

    def submit(
        self, tasks: list[Task], alpha_hat: float, version: int, seeds: list[int]
    ) -> list[ray.ObjectRef]:
        if version != self._version:
            raise RuntimeError(f"weights version {self._version} was put, asked {version}")
        refs = []
        for i, actor in enumerate(self.actors):
            mine = tasks[i :: len(self.actors)]
            if mine:
                refs.append(
                    actor.run.remote(
                        mine, self._weights, version, alpha_hat, seeds[i :: len(self.actors)]
                    )
                )
        # remember how to restore task order from the round-robin split
        return [refs, len(tasks)]

    def collect(self, handle: list) -> list[dict[str, np.ndarray]]:
        refs, n = handle
        parts = ray.get(refs)
        out: list[Any] = [None] * n
        for i, part in enumerate(parts):
            out[i :: len(self.actors)] = part
        return out

    def infos(self) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
