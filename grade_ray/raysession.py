"""The Ray session a job runs in: connect or start one, and check the job fits it.

``init_ray`` connects to ``--address`` / ``RAY_ADDRESS`` or starts an embedded
local Ray (dashboard on 127.0.0.1, which Ray Train needs to clean up placement
groups); ``check_resources`` fails fast, naming the setting to change, when the
requested rollout actors and learner workers cannot fit the cluster.
"""

from __future__ import annotations

import os

import ray

from grade_ray.config import Config

DATA_CPU_RESERVE = 0.5  # CPUs left free for the driver and Ray Data read tasks


class ResourceError(RuntimeError):
    """Requested resources do not fit the cluster; the message says what to change."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, else start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the State API that Ray Train's PlacementGroupCleaner needs:
        # without it every finished Train run leaks its placement group, and a Tune sweep
        # (many Train runs in one Ray session) deadlocks once the leaks fill the CPUs.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )


def check_resources(cfg: Config, resources: dict[str, float] | None = None) -> None:
    """Fail fast, naming the setting to change, if the job cannot fit the cluster."""
    res = resources if resources is not None else ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    r, lr = cfg.rollout, cfg.learner
    rollout_cpu = r.num_workers * r.num_cpus_per_worker
    learner_cpu = lr.num_workers * lr.num_cpus_per_worker
    need = rollout_cpu + learner_cpu + DATA_CPU_RESERVE
    if need > cpus + 1e-9:
        raise ResourceError(
            f"the job needs {need:g} CPUs (rollout {r.num_workers} x {r.num_cpus_per_worker:g} "
            f"+ learner {lr.num_workers} x {lr.num_cpus_per_worker:g} + {DATA_CPU_RESERVE:g} "
            f"kept free for data tasks) but the cluster has {cpus:g}; lower rollout.num_workers "
            "or rollout.num_cpus_per_worker (fractions are fine), lower learner.num_workers / "
            "learner.num_cpus_per_worker, or add nodes"
        )
    if lr.use_gpu and gpus < lr.num_workers:
        raise ResourceError(
            f"learner.use_gpu=true with learner.num_workers={lr.num_workers} needs "
            f"{lr.num_workers} GPU(s) but the cluster has {gpus:g}; set learner.use_gpu=false "
            "or add GPU nodes"
        )
