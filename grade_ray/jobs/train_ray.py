"""GRADE on Ray: a Ray Train learner driving a pool of rollout actors.

The controller loop lives in each Ray Train worker (rank r drives its own
rollout actors over its share of every step's tasks); with several learner
workers the model is DDP-wrapped and every rank runs the same number of steps
and minibatches. Stage 1 runs in the driver before Train starts. Each round
rank 0 writes a checkpoint to ``RUN_DIR/checkpoints`` and reports it to Ray
Train, so ``FailureConfig(max_failures)`` restarts resume from it and
``--resume`` continues a stopped run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grade_ray.config import Config, from_dict
from grade_ray.data.reading import read_meta
from grade_ray.learner.reward_fit import run_reward_fit
from grade_ray.raysession import (
    check_resources,
    init_ray,
    local_only_session,
    loopback_torch_config,
    quiet_ray_info,
    ray_log_level,
    train_logging_config,
)

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from grade_ray.data.plan import DataPlan
    from grade_ray.learner.grpo import GRPOLearner
    from grade_ray.learner.loop import GRPOTrainer
    from grade_ray.rollout.actor import RayRollout
    from grade_ray.runlog import MetricsLogger

log = logging.getLogger(__name__)


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: build learner + rollout actors, run the remaining rounds."""
    from grade_ray.jobs.train import data_scope

    quiet_ray_info(config["ray_log_level"])  # the driver's -v, wherever this worker runs
    cfg = from_dict(Config, config["cfg"])
    with data_scope(cfg):
        _train_rounds(cfg, config)


def _train_rounds(cfg: Config, config: dict[str, Any]) -> None:
    """One Train worker's Stage 2: build the learner and its rollout actors, continue from
    where the run stopped, run the remaining rounds; rank 0 saves the final policy."""
    import ray.train
    import torch

    from grade_ray.jobs.train import build_plan, simulator_for
    from grade_ray.learner.loop import GRPOTrainer, Probe
    from grade_ray.runlog import MetricsLogger

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = build_plan(cfg, config["train_path"])
    learner = _build_learner(cfg, config["init_policy"], rank)
    backend = _build_rollout(cfg, plan, config["train_path"], world)
    logger = MetricsLogger(cfg.run_dir) if rank == 0 else None
    probe = Probe(cfg, plan.meta, config["eval_path"], simulator_for(cfg)) if rank == 0 else None
    trainer = GRPOTrainer(
        cfg,
        plan,
        learner,
        backend,
        logger,
        cfg.run_dir,
        probe,
        rank=rank,
        world=world,
        report_fn=_report,
    )
    restarted = _restore(trainer, Path(cfg.run_dir), config["resume"], rank)
    fail_at = config.get("fail_at_round")
    if fail_at is not None and not restarted:
        trainer.fail_at_round = int(fail_at)
    trainer.fit()
    if rank == 0:
        _save_final(cfg, plan, learner, trainer, backend)
        logger.close()
    backend.close()


def _build_learner(cfg: Config, init_policy: str, rank: int) -> GRPOLearner:
    """The GRPO learner around the Stage 1 policy, prepared for Train (DDP when world > 1)."""
    import ray.train.torch

    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
    from grade_ray.learner.loop import load_policy

    policy, _, _ = load_policy(init_policy)
    model = ray.train.torch.prepare_model(policy.train())
    return GRPOLearner(
        model, GRPOSettings.from_config(cfg), ray.train.torch.get_device(), seed=cfg.seed + rank
    )


def _build_rollout(cfg: Config, plan: DataPlan, train_path: str, world: int) -> RayRollout:
    """This rank's rollout actors: its share of ``rollout.num_workers``."""
    from grade_ray.learner.loop import rollout_spec
    from grade_ray.rollout.actor import RayRollout

    per_rank = max(1, cfg.rollout.num_workers // world)
    # a step deals num_workers * world lanes over world * per_rank actors
    lanes_per_actor = -(-cfg.rollout.num_workers // per_rank)
    return RayRollout(
        cfg,
        plan.meta,
        rollout_spec(cfg, plan.meta, train_path),
        num_workers=per_rank,
        cache=plan.cache,
        lanes_per_actor=lanes_per_actor,
    )


def _report(metrics: dict[str, float], ckpt_path: Path | None) -> None:
    """A round's numeric metrics to Ray Train, with its checkpoint when one was written."""
    import ray.train

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if ckpt_path is None:
        ray.train.report(clean)
        return
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(ckpt_path, Path(d) / "state.pt")  # a checkpoint is a few KB
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(trainer: GRPOTrainer, run_dir: Path, resume: bool, rank: int) -> bool:
    """Continue from Train's last reported checkpoint when FailureConfig restarted this run
    (returns True), else from ``run_dir``'s checkpoints when ``resume`` (``--resume``)."""
    import ray.train

    from grade_ray.jobs.train import resume_trainer
    from grade_ray.runlog import load_checkpoint

    train_ckpt = ray.train.get_checkpoint()
    if train_ckpt is None:
        resume_trainer(trainer, run_dir, resume)
        return False
    with train_ckpt.as_directory() as d:
        trainer.restore(load_checkpoint(Path(d) / "state.pt"))
    log.info(
        "rank %d restarted from the last reported checkpoint (round %d)",
        rank,
        trainer.position.next_round,
    )
    return True


def _save_final(
    cfg: Config,
    plan: DataPlan,
    learner: GRPOLearner,
    trainer: GRPOTrainer,
    backend: RayRollout,
) -> None:
    """Rank 0, after the last round: policy.pt, the run summary and the actors' infos."""
    from grade_ray.jobs.train import write_summary
    from grade_ray.learner.loop import POLICY_FILE, save_policy

    save_policy(
        Path(cfg.run_dir) / POLICY_FILE,
        learner.module.cpu(),
        cfg,
        plan.meta,
        {"stage": 2, "ts_range": list(plan.ts_range)},
    )
    write_summary(Path(cfg.run_dir), plan, trainer.history)
    (Path(cfg.run_dir) / "rollout_actors.json").write_text(json.dumps(backend.infos()))


def run_train_ray(
    cfg: Config,
    resume: bool = False,
    address: str | None = None,
    fail_at_round: int | None = None,
    callbacks: list | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Stage 1 in the driver, then Stage 2 on Ray Train + rollout actors. Returns policy.pt.

    ``callbacks`` go to Ray Train's RunConfig (Tune passes its report callback here, so
    every round's metrics reach the Tuner); ``fail_at_round`` injects a learner failure
    after that round (fault-tolerance tests). ``resume`` / ``overwrite``: as
    :func:`grade_ray.jobs.train.run_train_local`.
    """
    from grade_ray.jobs.train import claim_stage2, data_scope

    claim_stage2(Path(cfg.run_dir), resume, overwrite)
    with data_scope(cfg):
        return _run(cfg, resume, address, fail_at_round, callbacks)


def _run(
    cfg: Config,
    resume: bool,
    address: str | None,
    fail_at_round: int | None,
    callbacks: list | None,
) -> Path:
    """The driver: claim the run, Stage 1 here, Stage 2 on Ray Train; returns policy.pt."""
    from grade_ray.learner.loop import POLICY_FILE

    cfg, run_dir, logger = _start_driver(cfg, address)
    train_path, eval_path, init = _stage1(cfg, run_dir, logger)
    loop_config = {
        "cfg": cfg.to_dict(),
        "train_path": str(Path(train_path).resolve()),
        "eval_path": str(Path(eval_path).resolve()) if eval_path else "",
        "init_policy": str(init),
        "resume": resume,
        "fail_at_round": fail_at_round,
        "ray_log_level": ray_log_level(),
    }
    _torch_trainer(cfg, run_dir, loop_config, callbacks).fit()
    return run_dir / POLICY_FILE


def _start_driver(cfg: Config, address: str | None) -> tuple[Config, Path, MetricsLogger]:
    """Connect to Ray, check the cluster can hold the run, claim the run directory.
    Returns (cfg with absolute paths, run_dir, the driver's logger)."""
    from grade_ray.jobs.train import _start

    init_ray(address)
    check_resources(cfg)
    run_dir, logger = _start(cfg)
    run_dir = run_dir.resolve()
    cfg = cfg.replace(run_dir=str(run_dir))
    if cfg.data.cache_dir:  # Train workers run elsewhere: give them an absolute path
        cfg = cfg.replace(**{"data.cache_dir": str(Path(cfg.data.cache_dir).resolve())})
    return cfg, run_dir, logger


def _stage1(cfg: Config, run_dir: Path, logger: MetricsLogger) -> tuple[str, str, Path]:
    """Stage 1 in the driver: the data, the initial policy, the reward's fit to the logs.
    Returns (train_path, eval_path, the checkpoint Stage 2 starts from)."""
    from grade_ray.jobs.train import initial_policy, prepare_data
    from grade_ray.learner.loop import PRETRAIN_CKPT, save_policy
    from grade_ray.runlog import CHECKPOINT_DIR

    train_path, eval_path = prepare_data(cfg)
    meta = read_meta(train_path)
    policy = initial_policy(cfg, meta, train_path, logger)
    logger.close()
    run_reward_fit(cfg, train_path, meta)  # what the reward learns from the logs, once, here
    init = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if not init.exists():  # pretrain.epochs == 0: start Stage 2 from the initial policy
        save_policy(init, policy, cfg, meta)
    return train_path, eval_path, init


def _torch_trainer(
    cfg: Config, run_dir: Path, loop_config: dict[str, Any], callbacks: list | None
) -> TorchTrainer:
    """Ray Train's TorchTrainer running :func:`_train_loop` on ``learner.num_workers``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    lr = cfg.learner
    return TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=lr.num_workers,
            use_gpu=lr.use_gpu,
            resources_per_worker={"CPU": lr.num_cpus_per_worker},
        ),
        # A fresh Train run name per invocation: resuming is explicit (--resume reads
        # RUN_DIR/checkpoints); FailureConfig restarts within this run use Train's checkpoint.
        run_config=RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(run_dir / "ray_train"),
            failure_config=FailureConfig(max_failures=lr.max_failures),
            callbacks=callbacks or [],
            # Train's INFO lines (each report's metrics, checkpoint paths, worker-group
            # banners) only with -v; grade_ray's own round line and all warnings always
            logging_config=train_logging_config(),
        ),
        # on this machine only: no rendezvous port beyond loopback (torch's TCPStore binds *)
        **({"torch_config": loopback_torch_config()} if local_only_session() else {}),
    )
