"""The Ray session a job runs in: connect or start one, and check the job fits it.

``init_ray`` connects to ``--address`` / ``RAY_ADDRESS`` or starts an embedded
local Ray (dashboard on 127.0.0.1, which Ray Train needs to clean up placement
groups). The embedded Ray listens on the loopback interface only
(:func:`loopback_only`): gcs_server, raylet, workers, the dashboard and its agent,
and the Prometheus metrics exporters of the monitor, dashboard and agent, which have
no authentication. ``check_resources`` fails fast, naming the setting to change,
when the requested rollout actors and learner workers cannot fit the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import ray

from grade_ray.config import Config, UserError
from grade_ray.options import verbose

log = logging.getLogger(__name__)

DATA_CPU_RESERVE = 0.5  # CPUs left free for the driver and Ray Data read tasks
LOOPBACK = "127.0.0.1"
# Ray binds its node IP; it uses the loopback address as node IP only when "Ray clusters"
# are off (ray._private.ray_constants.ENABLE_RAY_CLUSTER, read from this variable).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray Train's preemption watcher polls for node drains (spot / autoscaler); a one-machine Ray
# has none, and in 2.60 its start prints a false-alarm core_worker error line (416 chars:
# constructor arguments in the object store with max_restarts > 0, ray issue 53727).
_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class ResourceError(UserError, RuntimeError):
    """Requested resources do not fit the cluster; the message says what to change."""


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local Ray node starts inside this block, it binds 127.0.0.1 only.

    Ray 2.60 starts every server on its node IP (gcs_server and raylet on all interfaces
    otherwise; the metrics exporters of the monitor, dashboard and dashboard agent on
    0.0.0.0 unless the node IP is loopback), and it chooses the loopback address as node
    IP only when Ray clusters are disabled (``ENABLE_RAY_CLUSTER``; ``_node_ip_address=
    "127.0.0.1"`` is turned back into the machine's address). This disables them for the
    start: in this process and, through the environment, in the processes the node starts
    (they keep it). Both are restored afterwards, so a later connection to a real cluster
    is unaffected. ``tests/test_raysession.py`` lists the listening sockets to check it.
    """
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = old_env


def ray_log_level() -> int:
    """The level of Ray's own log lines on the console: INFO with ``-v``, else WARNING.

    Without ``-v`` a job's console holds grade_ray's own lines (one per round, from the Train
    worker) plus every warning and error, Ray's included; Ray's INFO lines (a ``Reporting
    training result ... metrics={...}`` line and a checkpoint path per report, the Train
    controller's worker-group banners, "Started a local Ray instance") are left out. Ray
    Train's system log files under the session directory (``logs/train/``) keep its
    ``ray.train`` records at every level; each round's metrics are in RUN_DIR/metrics.csv."""
    return logging.INFO if verbose() else logging.WARNING


def train_logging_config():
    """Ray Train's ``LoggingConfig`` at :func:`ray_log_level`. Train applies it to the
    ``ray.train`` loggers of its controller and of every worker (wherever they run), and
    leaves the workers' root logger, which carries grade_ray's lines, at INFO."""
    import ray.train

    return ray.train.LoggingConfig(log_level=logging.getLevelName(ray_log_level()))


class _RayInfoFilter(logging.Filter):
    """Drops records below ``level`` that Ray's own code emitted (its source file lies in
    the ray package), whatever their logger's name; passes everything else."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.ray_dir = os.path.dirname(ray.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(self.ray_dir)


def quiet_ray_info(level: int) -> None:
    """In a Ray Train worker: Ray's records below ``level`` leave its root handlers.

    :func:`train_logging_config` covers the ``ray.train.*`` loggers only, but Ray 2.60's
    ``Reporting training result ... metrics={...}`` line (one per report, every metric as a
    dict) comes from a logger named after its file
    (``ray/train/v2/_internal/execution/context.py``) and propagates to the worker's root
    logger, which Train sets to INFO with a console handler for the job's own lines. This
    filters those handlers by the record's source file instead, so grade_ray's INFO lines
    and every warning still pass. Train configures a worker's logging before it runs the
    train function, so calling this from the train function is not undone."""
    if level <= logging.INFO:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RayInfoFilter) for f in handler.filters):
            handler.addFilter(_RayInfoFilter(level))


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment while a local Ray node starts inside this block
    (the processes it starts keep it), unless the user set ``name``; restored afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, else start an embedded local Ray (without Ray
    Train's preemption watcher: one machine has no node drains to watch). Workers' output
    reaches this console (grade_ray's round lines come from the Train worker); the
    driver's ``ray`` logger is at :func:`ray_log_level`."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=ray_log_level())
    else:
        # The dashboard serves the State API that Ray Train's PlacementGroupCleaner needs:
        # without it every finished Train run leaks its placement group, and a Tune sweep
        # (many Train runs in one Ray session) deadlocks once the leaks fill the CPUs.
        with loopback_only(), _env_default(_PREEMPTION_WATCHER_ENV, "0"):
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host=LOOPBACK,
                log_to_driver=True,
                logging_level=ray_log_level(),
            )
        ip = ray.util.get_node_ip_address()
        if ip != LOOPBACK:
            log.warning(
                "embedded Ray node IP is %s, not %s: it may listen beyond loopback", ip, LOOPBACK
            )


def check_resources(
    cfg: Config, resources: dict[str, float] | None = None, rollouts: bool = True
) -> None:
    """Fail fast, naming the setting to change, if the job cannot fit the cluster.
    ``rollouts=False``: a job without rollout actors (Stage 1 alone)."""
    res = resources if resources is not None else ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    r, lr = cfg.rollout, cfg.learner
    rollout_cpu = r.num_workers * r.num_cpus_per_worker if rollouts else 0.0
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


def local_only_session() -> bool:
    """Whether the connected Ray session runs on this machine's loopback address only (the
    embedded one, or a test cluster started on 127.0.0.1)."""
    return ray.is_initialized() and ray.util.get_node_ip_address() == LOOPBACK


def _loopback_sockets() -> None:
    """In a learner worker: gloo and NCCL open their sockets on the loopback interface."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def loopback_torch_config():
    """Ray Train's torch setup for a :func:`local_only_session`: the learner workers meet
    through a file store instead of torch's TCPStore (which listens on every interface,
    whatever its address), and gloo / NCCL use the loopback interface.

    Ray Train offers only ``env://`` and ``tcp://`` rendezvous, both through a TCPStore, so
    this overrides its backend's ``on_start`` (Ray 2.60's ``_TorchBackend``; the Ray tests in
    tests/jobs/test_train_ray.py run it, with one and two learner workers).
    """
    import dataclasses
    import tempfile
    import uuid

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import (
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    class FileRendezvous(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
            store = os.path.join(tempfile.gettempdir(), f"grade_ray-pg-{uuid.uuid4().hex}")
            worker_group.execute(_loopback_sockets)
            worker_group.execute(_set_torch_distributed_env_vars)
            n = len(worker_group)
            ray.get(
                [
                    worker_group.execute_single_async(
                        i,
                        _setup_torch_process_group,
                        backend=backend,
                        world_rank=i,
                        world_size=n,
                        init_method=f"file://{store}",
                        timeout_s=backend_config.timeout_s,
                    )
                    for i in range(n)
                ]
            )

    @dataclasses.dataclass
    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return FileRendezvous

    return LoopbackTorchConfig()
