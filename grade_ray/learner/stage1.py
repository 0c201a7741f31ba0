"""Stage 1's epochs over the data plan, shared by the single-process and the Ray Train paths.

An epoch visits every validated training row once, in file order, as tasks of
``pretrain.batch_size`` rows (:meth:`DataPlan.epoch_tasks`) read through a
:class:`TaskReader` (the plan's decoded cache when there is one). With ``world`` DDP
ranks each step gives every rank one task of its own contiguous shard of the tasks
(:func:`deal_steps`), so one step descends on up to ``world x pretrain.batch_size``
requests; with one rank the steps are exactly the single-process ones. Every epoch
ends with a checkpoint (``RUN_DIR/checkpoints/pretrain-epoch-NNNN.pt``: policy,
score scale, optimizer, every rank's torch RNG, the epochs' metrics), written by rank
0 and handed to ``report_fn`` (Ray Train's report), so a restarted worker group or a
``--resume`` continues after the last completed epoch and ends where an uninterrupted
run ends.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grade_ray import keys
from grade_ray.config import Config
from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, TaskReader, deal_steps
from grade_ray.learner.supervised import SupervisedLearner, SupervisedSettings
from grade_ray.runlog import (
    CHECKPOINT_DIR,
    CheckpointError,
    MetricsLogger,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from grade_ray.spec import RewardSpec

log = logging.getLogger(__name__)

EPOCH_CKPT = "pretrain-epoch"
STAGE1_REQUESTS = keys.PRETRAIN_REQUESTS
STAGE1_REQUESTS_PER_S = keys.PERF_STAGE1_REQUESTS_PER_S
STAGE1_PID = keys.PRETRAIN_WORKER_PID
"""Rank 0's process id (evidence of where Stage 1 ran)."""


def epoch_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's Stage 1 epoch checkpoints, oldest first."""
    d = Path(run_dir) / CHECKPOINT_DIR
    return sorted(d.glob(f"{EPOCH_CKPT}-*.pt")) if d.exists() else []


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Stage1Trainer:
    """Runs Stage 1 epochs on one rank: LambdaLoss steps over this rank's shard of a plan.

    ``model``: the policy, DDP-wrapped when ``world`` > 1. ``logger`` (rank 0) gets one
    metrics row per epoch; ``run_dir`` (rank 0) gets a checkpoint per epoch (None: no
    checkpoints); ``report_fn(metrics, checkpoint_path)`` is called by every rank at the
    end of every epoch.
    """

    STATE_KEYS = ("stage", "policy", "log_scale", "optimizer", "next_epoch", "history", "rng")

    def __init__(
        self,
        cfg: Config,
        plan: DataPlan,
        model: nn.Module,
        logger: MetricsLogger | None = None,
        run_dir: str | Path | None = None,
        *,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
        report_fn=None,
    ) -> None:
        if world != _dist_world() and world > 1:
            raise ValueError(f"world={world} but the process group has {_dist_world()} ranks")
        self.cfg, self.plan, self.logger = cfg, plan, logger
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.world, self.report_fn = rank, world, report_fn
        spec = RewardSpec.from_config(cfg.reward, plan.meta)
        self.learner = SupervisedLearner(
            model, SupervisedSettings.from_config(cfg), spec, device=device
        )
        tasks = plan.epoch_tasks(cfg.pretrain.batch_size)
        self.steps = deal_steps(tasks, world, world, rank, setting="pretrain.batch_size")
        self.reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
        self.next_epoch = 0
        self.history: list[dict[str, float]] = []
        self.fail_at_epoch: int | None = None  # fault injection for tests

    @property
    def module(self) -> nn.Module:
        return self.learner.module

    # -- state --------------------------------------------------------------
    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's torch RNG states (dropout: the CPU's, and the GPU's when the model
        is on one), rank order."""
        dev = self.learner.device
        state = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        }
        if self.world == 1:
            return [state]
        import torch.distributed as dist

        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def state_dict(self) -> dict[str, Any]:
        """What resumes Stage 1 after the epochs done (every rank must call it)."""
        opt = self.learner.optimizer.state_dict()
        return {
            "stage": 1,
            "policy": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "log_scale": self.learner.log_scale.detach().cpu(),
            "optimizer": opt,
            "next_epoch": self.next_epoch,
            "history": [dict(h) for h in self.history],
            "rng": self._rng_states(),
            "config": self.cfg.to_dict(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``state`` is a Stage 1 epoch checkpoint
        this run can continue from."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing or state.get("stage") != 1:
            raise CheckpointError(f"not a Stage 1 epoch checkpoint (lacks {missing or 'stage'})")
        n, epochs = int(state["next_epoch"]), self.cfg.pretrain.epochs
        if not 0 <= n <= epochs or len(state["history"]) != n:
            raise CheckpointError(
                f"checkpoint after epoch {n} with {len(state['history'])} epochs of history "
                f"does not fit pretrain.epochs={epochs}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["policy"])
        with torch.no_grad():
            self.learner.log_scale.copy_(state["log_scale"])
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.next_epoch = int(state["next_epoch"])
        self.history = [dict(h) for h in state["history"]]
        rng = state["rng"][self.rank % len(state["rng"])]
        torch.set_rng_state(rng["cpu"])
        dev = self.learner.device
        if dev.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], dev)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state; the metrics file is made to hold exactly its
        epochs (see :meth:`sync_metrics`)."""
        self.check_state(state)
        self.load_state_dict(state)
        self.sync_metrics()

    def resume_latest(self, run_dir: Path) -> Path | None:
        """Continue from the newest epoch checkpoint in ``run_dir`` that loads (older ones
        are tried when it does not, with a warning); returns its path, None if none."""
        for path in reversed(epoch_checkpoints(run_dir)):
            try:
                state = load_checkpoint(path)
                self.check_state(state)
            except CheckpointError as e:
                log.warning("%s: %s; falling back to the epoch before", path, e)
                continue
            self.restore(state)
            log.info("Stage 1 resumed from %s at epoch %d", path, self.next_epoch)
            return path
        return None

    def sync_metrics(self) -> None:
        """Make ``metrics.jsonl`` hold each epoch this trainer has done exactly once, before
        the rows of later stages: an epoch logged but not checkpointed is dropped (it runs
        again), one checkpointed but not logged is written from the history. Rank 0 only."""
        if self.logger is None or self.rank != 0:
            return
        rows = read_metrics(self.logger.run_dir)
        times = {r.get("epoch"): r.get("time") for r in rows if r.get("stage") == 1}
        stage1 = [
            {"step": int(h["epoch"]), "time": times.get(h["epoch"]) or time.time(), **h}
            for h in self.history
        ]
        kept = [r for r in rows if r.get("stage") != 1]
        if stage1 + kept != rows:
            log.info(
                "metrics.jsonl: %d Stage 1 row(s) -> the %d epoch(s) of the checkpoint",
                len(rows) - len(kept),
                len(stage1),
            )
            self.logger.rewrite(stage1 + kept)

    # -- the loop -----------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """The remaining epochs; returns the last epoch's metrics."""
        for e in range(self.next_epoch, self.cfg.pretrain.epochs):
            metrics = self.run_epoch(e)
            self.next_epoch = e + 1
            self.end_epoch(e, metrics)
            if e == self.fail_at_epoch:
                raise RuntimeError(f"injected failure after Stage 1 epoch {e} (fault test)")
        return self.history[-1] if self.history else {}

    def run_epoch(self, e: int) -> dict[str, float]:
        """One pass over this rank's shard; metrics are means over every rank's steps."""
        sums: dict[str, float] = collections.defaultdict(float)
        requests = 0
        t0 = time.perf_counter()
        for step in self.steps:
            batch = self.reader.load(step[0])  # one task per rank and step
            for k, v in self.learner.step(batch).items():
                sums[k] += v
            requests += len(batch)
        names = sorted(sums)
        totals = torch.tensor(
            [sums[k] for k in names] + [len(self.steps), requests], dtype=torch.float64
        )
        if self.world > 1:
            import torch.distributed as dist

            totals = totals.to(self.learner.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        elapsed = time.perf_counter() - t0
        n_steps, n_req = float(totals[-2]), float(totals[-1])
        out = {k: float(totals[i]) / max(n_steps, 1.0) for i, k in enumerate(names)}
        out[STAGE1_REQUESTS] = n_req
        out[STAGE1_REQUESTS_PER_S] = n_req / max(elapsed, 1e-9)
        return out

    def end_epoch(self, e: int, metrics: dict[str, float]) -> None:
        """Log the epoch, checkpoint it (rank 0) and report it (every rank)."""
        import os

        row = {"stage": 1, "epoch": e, **metrics, STAGE1_PID: os.getpid()}
        self.history.append(row)
        log.info(
            "pretrain epoch %d/%d: loss %.4f ndcg %.4f weight entropy %.3f (%.0f req/s)",
            e + 1,
            self.cfg.pretrain.epochs,
            metrics.get(keys.PRETRAIN_LOSS, float("nan")),
            metrics.get(keys.PRETRAIN_NDCG, float("nan")),
            metrics.get(keys.PRETRAIN_ENTROPY, float("nan")),
            metrics.get(STAGE1_REQUESTS_PER_S, 0.0),
        )
        state = self.state_dict() if self.run_dir is not None else None  # all ranks gather
        ckpt = None
        if self.rank == 0:
            if state is not None:
                # checkpoint first: a process killed before the metrics row is written
                # resumes after this epoch and writes the row from the checkpoint
                ckpt = save_checkpoint(self.run_dir, f"{EPOCH_CKPT}-{e:04d}", state)
            if self.logger is not None:
                self.logger.log(e, row)
        if self.report_fn is not None:  # every rank reports, the same number of times
            self.report_fn(row, ckpt)


def start_stage1(trainer: Stage1Trainer, run_dir: str | Path | None, resume: bool) -> None:
    """Where ``trainer`` starts when no restarted worker group hands it a checkpoint: after
    the newest epoch checkpoint in ``run_dir`` (``resume``), else at epoch 0, with the
    epoch checkpoints and Stage 1 metric rows of an earlier, interrupted attempt removed
    (rank 0, with a warning)."""
    if run_dir is None:
        return
    if resume and trainer.resume_latest(Path(run_dir)) is not None:
        return
    stale = epoch_checkpoints(run_dir)
    if stale and trainer.rank == 0:
        log.warning(
            "%s: %d Stage 1 epoch checkpoint(s) of an interrupted run; Stage 1 starts over "
            "(--resume continues it)",
            run_dir,
            len(stale),
        )
        for p in stale:
            p.unlink(missing_ok=True)
    trainer.sync_metrics()
