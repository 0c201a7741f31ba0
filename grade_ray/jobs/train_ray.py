"""GRADE on Ray: Stage 1 and Stage 2 in Ray Train workers, Stage 2 driving rollout actors.

The driver only orchestrates: it connects to Ray, checks the cluster can hold the run,
simulates the data when the run's data is simulated, fits the reward to the logs
(``reward_fit``) and starts one ``TorchTrainer`` on ``learner.num_workers`` workers
(``learner.use_gpu`` honoured). Each worker builds the data plan (one validating pass,
the decoded cache) and then:

* Stage 1 (:class:`~grade_ray.learner.stage1.Stage1Trainer`): LambdaLoss epochs, each
  rank reading its own contiguous shard of the plan's tasks, DDP-wrapped when there are
  several ranks (the score scale is all-reduced by the learner). Rank 0 checkpoints every
  epoch and every rank reports it to Ray Train; rank 0 saves ``pretrain.pt``. A run
  directory that already holds ``pretrain.pt`` skips Stage 1. With one worker the steps
  are exactly ``--local``'s (:func:`grade_ray.learner.loop.pretrain`).
* Stage 2: the controller loop lives in each worker (rank r drives its own rollout actors
  over its share of every step's tasks); with several workers the model is DDP-wrapped
  and every rank runs the same number of steps and minibatches. Each round rank 0 writes
  a checkpoint to ``RUN_DIR/checkpoints`` and reports it to Ray Train.

So ``FailureConfig(max_failures)`` restarts resume after the last reported epoch or round
and ``--resume`` continues a stopped run from the run directory's checkpoints. Only Stage
2's reports reach callers' callbacks (Tune ranks and schedules trials by round).
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
    from grade_ray.models.policy import FusionPolicy
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
    """One Train worker: Stage 1 over this rank's shard (or its saved result), then Stage 2:
    build the learner and its rollout actors, continue from where the run stopped, run the
    remaining rounds; rank 0 saves the final policy."""
    import ray.train
    import torch

    from grade_ray.jobs.train import build_plan, simulator_for
    from grade_ray.learner.loop import GRPOTrainer, Probe
    from grade_ray.runlog import MetricsLogger

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = build_plan(cfg, config["train_path"])
    logger = MetricsLogger(cfg.run_dir) if rank == 0 else None
    restart = _train_checkpoint()
    stage1 = _stage1_worker(cfg, plan, config, logger, rank, world, restart)
    if config.get("stage1_only"):  # run_pretrain_ray: policy.pt is the SP baseline
        if rank == 0:
            from grade_ray.learner.loop import POLICY_FILE, save_policy

            save_policy(Path(cfg.run_dir) / POLICY_FILE, stage1, cfg, plan.meta, {"stage": 1})
            logger.close()
        return
    learner = _build_learner(cfg, stage1, rank)
    backend = _build_rollout(cfg, plan, config["train_path"], world)
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
    restarted = _restore(trainer, Path(cfg.run_dir), config["resume"], rank, restart)
    fail_at = config.get("fail_at_round")
    if fail_at is not None and not restarted:
        trainer.fail_at_round = int(fail_at)
    trainer.fit()
    if rank == 0:
        _save_final(cfg, plan, learner, trainer, backend)
        logger.close()
    backend.close()


def _train_checkpoint() -> dict[str, Any] | None:
    """The state of the last checkpoint this Train run reported (a restarted worker group
    continues from it): a Stage 1 epoch or a Stage 2 round; None on a first start."""
    import ray.train

    from grade_ray.runlog import load_checkpoint

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint(Path(d) / "state.pt")


def _stage1_worker(
    cfg: Config,
    plan: DataPlan,
    config: dict[str, Any],
    logger: MetricsLogger | None,
    rank: int,
    world: int,
    restart: dict[str, Any] | None,
) -> FusionPolicy:
    """Stage 1 in this Train worker: the saved result (RUN_DIR/checkpoints/pretrain.pt) if
    there is one, else LambdaLoss epochs over this rank's shard of the plan (DDP over the
    ranks), continued from the restarted run's epoch checkpoint or, with ``--resume``, from
    the run directory's; rank 0 saves pretrain.pt. Returns the policy: on the CPU, not
    wrapped (Stage 2 prepares its own copy)."""
    import ray.train.torch
    import torch

    from grade_ray.jobs.train import load_stage1
    from grade_ray.learner.loop import PRETRAIN_CKPT, new_policy, save_policy
    from grade_ray.learner.stage1 import Stage1Trainer, start_stage1
    from grade_ray.models.policy import build_policy
    from grade_ray.runlog import CHECKPOINT_DIR

    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if ckpt.exists():  # done earlier: by this run before a restart, or by an earlier run
        return load_stage1(ckpt, plan.meta)
    policy = new_policy(cfg, plan.meta, config["train_path"])  # the same on every rank
    if cfg.pretrain.epochs:
        if rank > 0:  # its own dropout masks (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.seed + rank)
        model = ray.train.torch.prepare_model(policy.train())  # DDP when world > 1
        trainer = Stage1Trainer(
            cfg,
            plan,
            model,
            logger,
            run_dir,
            rank=rank,
            world=world,
            device=ray.train.torch.get_device(),
            report_fn=_report,
        )
        if restart is not None and restart.get("stage") == 1:
            trainer.restore(restart)
            log.info(
                "rank %d restarted Stage 1 from the last reported checkpoint (%d epoch(s) done)",
                rank,
                trainer.next_epoch,
            )
        else:
            start_stage1(trainer, run_dir, config["resume"])
            fail_at = config.get("fail_at_epoch")
            if fail_at is not None and restart is None:
                trainer.fail_at_epoch = int(fail_at)
        trainer.fit()
        trained = {k: v.detach().cpu() for k, v in trainer.module.state_dict().items()}
        policy = build_policy(cfg.policy, plan.meta.context_dim, plan.meta.num_tasks)
        policy.load_state_dict(trained)
    if rank == 0:
        save_policy(ckpt, policy, cfg, plan.meta)
    return policy


def _build_learner(cfg: Config, policy: FusionPolicy, rank: int) -> GRPOLearner:
    """The GRPO learner around the Stage 1 policy, prepared for Train (DDP when world > 1)."""
    import ray.train.torch

    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings

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


def _restore(
    trainer: GRPOTrainer,
    run_dir: Path,
    resume: bool,
    rank: int,
    restart: dict[str, Any] | None,
) -> bool:
    """Continue from Train's last reported round checkpoint ``restart`` when FailureConfig
    restarted this run during Stage 2 (returns True), else from ``run_dir``'s checkpoints
    when ``resume`` (``--resume``); a Stage 1 epoch checkpoint means no round was done."""
    from grade_ray.jobs.train import resume_trainer

    if restart is None or restart.get("stage") == 1:
        resume_trainer(trainer, run_dir, resume)
        return False
    trainer.restore(restart)
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
    fail_at_epoch: int | None = None,
) -> Path:
    """Stage 1 then Stage 2 in Ray Train workers (+ rollout actors). Returns policy.pt.

    ``callbacks`` go to Ray Train's RunConfig (Tune passes its report callback here, so
    every round's metrics reach the Tuner; Stage 1's epoch reports are not passed on);
    ``fail_at_round`` / ``fail_at_epoch`` inject a learner failure after that Stage 2
    round / Stage 1 epoch (fault-tolerance tests). ``resume`` / ``overwrite``: as
    :func:`grade_ray.jobs.train.run_train_local`.
    """
    from grade_ray.jobs.train import check_run_config, claim_stage2, data_scope

    claim_stage2(Path(cfg.run_dir), resume, overwrite)
    check_run_config(cfg, resume)
    with data_scope(cfg):
        faults = {"fail_at_round": fail_at_round, "fail_at_epoch": fail_at_epoch}
        return _run(cfg, resume, address, faults, callbacks)


def run_pretrain_ray(
    cfg: Config,
    resume: bool = False,
    address: str | None = None,
    *,
    overwrite: bool = True,
    fail_at_epoch: int | None = None,
) -> Path:
    """Stage 1 alone in Ray Train workers (``learner.num_workers``, DDP when > 1), as
    :func:`run_train_ray` runs it; returns RUN_DIR/checkpoints/pretrain.pt. ``overwrite``:
    replace an earlier Stage 1 result (else refuse); ``resume``: continue after the newest
    epoch checkpoint; ``fail_at_epoch``: as :func:`run_train_ray`."""
    from grade_ray.jobs.train import _claim_stage1, check_run_config, data_scope
    from grade_ray.learner.loop import PRETRAIN_CKPT
    from grade_ray.runlog import CHECKPOINT_DIR

    if not resume:
        _claim_stage1(Path(cfg.run_dir), overwrite)
    else:
        check_run_config(cfg, resume)
    with data_scope(cfg):
        faults = {"fail_at_epoch": fail_at_epoch, "stage1_only": True}
        _run(cfg, resume, address, faults, None)
    return Path(cfg.run_dir).resolve() / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"


def _run(
    cfg: Config,
    resume: bool,
    address: str | None,
    options: dict[str, Any],
    callbacks: list | None,
) -> Path:
    """The driver: claim the run, prepare the data and the reward's fit, then both stages
    on Ray Train; returns policy.pt. ``options``: fault injection, ``stage1_only``."""
    from grade_ray.learner.loop import POLICY_FILE

    cfg, run_dir, logger = _start_driver(cfg, address, rollouts=not options.get("stage1_only"))
    logger.close()  # rank 0 of the Train run logs every epoch and round
    train_path, eval_path = _prepare(cfg, fit_reward=not options.get("stage1_only"))
    loop_config = {
        "cfg": cfg.to_dict(),
        "train_path": str(Path(train_path).resolve()),
        "eval_path": str(Path(eval_path).resolve()) if eval_path else "",
        "resume": resume,
        "ray_log_level": ray_log_level(),
        **options,
    }
    if callbacks:
        from grade_ray.jobs.train_callbacks import Stage2Reports

        callbacks = [Stage2Reports(c) for c in callbacks]
    _torch_trainer(cfg, run_dir, loop_config, callbacks).fit()
    return run_dir / POLICY_FILE


def _start_driver(
    cfg: Config, address: str | None, rollouts: bool = True
) -> tuple[Config, Path, MetricsLogger]:
    """Connect to Ray, check the cluster can hold the run (``rollouts``: with its rollout
    actors), claim the run directory. Returns (cfg with absolute paths, run_dir, the
    driver's logger)."""
    from grade_ray.jobs.train import _start

    init_ray(address)
    check_resources(cfg, rollouts=rollouts)
    run_dir, logger = _start(cfg)
    run_dir = run_dir.resolve()
    cfg = cfg.replace(run_dir=str(run_dir))
    if cfg.data.cache_dir:  # Train workers run elsewhere: give them an absolute path
        cfg = cfg.replace(**{"data.cache_dir": str(Path(cfg.data.cache_dir).resolve())})
    return cfg, run_dir, logger


def _prepare(cfg: Config, fit_reward: bool = True) -> tuple[str, str]:
    """What the Train workers start from: the data (simulated here when the run's data is
    simulated) and, for Stage 2, the reward's fit to the logs (once, here). Stage 1 itself
    runs in the workers. Returns (train_path, eval_path)."""
    from grade_ray.jobs.train import prepare_data

    train_path, eval_path = prepare_data(cfg)
    if fit_reward:
        run_reward_fit(cfg, train_path, read_meta(train_path))
    return train_path, eval_path


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
