"""The GRADE training driver, shared by the single-process and the Ray paths.

A Stage 2 round reads like the paper::

    sync reference -> for each step: sample (rollout) -> score, advantage
    (in the rollout) -> update (learner) -> sync weights -> log round

Rollouts go through a backend (in-process or Ray actors); the learner is a
plain :class:`GRPOLearner` (DDP-wrapped under Ray Train when it has several
workers). Every round ends with diagnostics on held-out requests and a
checkpoint holding learner state, data position and RNG states.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade_ray import keys
from grade_ray.algos.exploration import alpha_schedule
from grade_ray.algos.fusion import fuse
from grade_ray.algos.metrics import ndcg_at_k
from grade_ray.algos.modulation import exploration_name
from grade_ray.config import Config
from grade_ray.data.plan import DataPlan, deal_steps
from grade_ray.data.reading import iter_batches, read_sessions
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.learner.diagnostics import failure_warnings, policy_diagnostics
from grade_ray.learner.grpo import GRPOLearner
from grade_ray.models.policy import FusionPolicy, build_policy
from grade_ray.rollout.backend import task_seed
from grade_ray.rollout.worker import RolloutSpec, rollout_summary
from grade_ray.runlog import (
    CheckpointError,
    MetricsLogger,
    Progress,
    load_checkpoint,
    read_metrics,
    save_atomic,
    save_checkpoint,
)
from grade_ray.spec import RewardSpec, as_tensor

log = logging.getLogger(__name__)

POLICY_FILE = "policy.pt"
PRETRAIN_CKPT = "pretrain"
INERT_STD = 1e6  # standardisation scale of context features that never vary in training


def rollout_spec(cfg: Config, meta: SessionMeta, train_path: str | Path) -> RolloutSpec:
    """Plain rollout settings from the config, names checked against the data, with what the
    reward fits on the training logs (``RUN_DIR/reward_fit.pt``: loaded, or fitted once)."""
    from grade_ray.learner.reward_fit import reward_spec

    e = cfg.exploration
    return RolloutSpec(
        reward=reward_spec(cfg, meta, train_path),
        exploration=exploration_name(e.kind, cfg.policy.kind == "item_aware"),
        group_size=e.group_size,
        alpha_floor=e.alpha_floor,
        sigma=e.sigma,
        advantage=cfg.grpo.advantage,
        fusion=cfg.policy.fusion,
        fusion_eps=cfg.policy.fusion_eps,
        item_aware=cfg.policy.kind == "item_aware",
    )


def fit_normalization(
    policy: FusionPolicy,
    contexts: Iterable[np.ndarray],
    min_std: float = 0.0,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Fit the policy's context standardisation on training contexts (streamed arrays (R, D)).

    A column constant in training (e.g. day-of-week when training covers one weekday) gets
    std :data:`INERT_STD`, so it cannot explode on later data; other stds are floored at
    ``min_std``. Stops after ``max_rows`` rows. Returns {'inert': [columns], 'floored': n}.
    """
    d = policy.context_dim
    n, s1, s2 = 0, np.zeros(d), np.zeros(d)
    for x in contexts:
        x = np.asarray(x, dtype=np.float64)
        n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0)
        if max_rows is not None and n >= max_rows:
            break
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
    inert = std < 1e-6 * (1.0 + np.abs(mean))
    floored = ~inert & (std < min_std)
    std = np.where(inert, INERT_STD, np.maximum(std, min_std))
    policy.set_normalization(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    return {"inert": np.flatnonzero(inert).tolist(), "floored": int(floored.sum())}


def new_policy(
    cfg: Config, meta: SessionMeta, train_path: str | Path, max_rows: int = 50_000
) -> FusionPolicy:
    """Policy with context standardisation fitted on (the start of) the training logs."""
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.policy, meta.context_dim, meta.num_tasks)
    batches = iter_batches(train_path, batch_size=8192, on_error=cfg.data.on_error)
    info = fit_normalization(policy, (b.context for b in batches), max_rows=max_rows)
    if info["inert"]:
        log.info(
            "context features constant in training (ignored by the policy): %s",
            [meta.context_names[i] for i in info["inert"]],
        )
    return policy


def save_policy(
    path: str | Path,
    policy: FusionPolicy,
    cfg: Config,
    meta: SessionMeta,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Policy weights + what is needed to rebuild and interpret it (safe to load)."""
    state = {
        "state_dict": getattr(policy, "module", policy).state_dict(),
        "context_dim": meta.context_dim,
        "num_tasks": meta.num_tasks,
        "meta": meta.to_json(),
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        **(extra or {}),
    }
    return save_atomic(path, state)


def load_policy(path: str | Path) -> tuple[FusionPolicy, SessionMeta, dict[str, Any]]:
    """(policy in eval mode, its data metadata, the whole saved dict); loads weights_only."""
    from grade_ray.config import PolicyConfig, from_dict

    p = Path(path)
    if p.is_dir():
        p = p / POLICY_FILE
    if not p.exists():
        raise FileNotFoundError(f"no policy at {p} (train one with `grade-ray train`)")
    state = load_checkpoint(p)
    missing = [
        k for k in ("state_dict", "context_dim", "num_tasks", "meta", "config") if k not in state
    ]
    if missing:
        raise CheckpointError(
            f"{p} is not a policy file (it lacks {missing}; a round or epoch checkpoint, or "
            f"the reward fit?): give the run directory or its {POLICY_FILE}"
        )
    pcfg = from_dict(PolicyConfig, state["config"]["policy"])
    policy = build_policy(pcfg, state["context_dim"], state["num_tasks"])
    policy.load_state_dict(state["state_dict"])
    return policy.eval(), SessionMeta.from_json(state["meta"]), state


# ---------------------------------------------------------------------------
# Stage 1


def pretrain(
    cfg: Config,
    policy: FusionPolicy,
    meta: SessionMeta,
    train_path: str | Path,
    logger: MetricsLogger | None = None,
    *,
    plan: DataPlan | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Stage 1 (SP) in this process: LambdaLoss epochs over the training logs; returns the
    last epoch's metrics.

    The epochs read the rows ``plan`` names (default: a plan built here, without a decoded
    cache), as :class:`~grade_ray.learner.stage1.Stage1Trainer` does in each Ray Train
    worker, so one worker there takes exactly these steps. ``run_dir``: checkpoint every
    epoch there, and with ``resume`` continue after its last checkpointed epoch.
    ``meta``: the data's (checked against the plan's).
    """
    from grade_ray.learner.stage1 import Stage1Trainer, start_stage1

    if plan is None:
        plan = DataPlan.build(
            train_path, rounds=1, batch_size=cfg.pretrain.batch_size, on_error=cfg.data.on_error
        )
    if plan.meta.task_names != meta.task_names:
        raise ValueError(f"plan tasks {plan.meta.task_names} differ from {meta.task_names}")
    trainer = Stage1Trainer(cfg, plan, policy, logger, run_dir)
    start_stage1(trainer, run_dir, resume)
    return trainer.fit()


# ---------------------------------------------------------------------------
# Held-out probe for per-round diagnostics


class Probe:
    """Held-out requests scored every round without exploration.

    Business metrics live outside the training reward: with the simulator, the
    expected north-star on fresh requests (ground truth known); otherwise the
    composite NDCG on held-out logs.
    """

    def __init__(
        self,
        cfg: Config,
        meta: SessionMeta,
        eval_path: str | Path | None,
        simulator=None,
        n: int = 2000,
    ) -> None:
        self.cfg, self.meta, self.simulator = cfg, meta, simulator
        self.spec = RewardSpec.from_config(cfg.reward, meta)
        self.truth = None
        if simulator is not None:
            self.batch, self.truth = simulator.fresh_requests(n, seed=cfg.eval.ab_seed + 1)
        elif eval_path:
            self.batch, _, _ = read_sessions(eval_path, on_error=cfg.data.on_error, max_rows=n)
        else:
            self.batch = None

    @torch.no_grad()
    def __call__(self, policy: FusionPolicy) -> dict[str, float]:
        if self.batch is None:
            return {}
        b: SessionBatch = self.batch
        device = next(policy.parameters()).device  # the learner's (a GPU under use_gpu)
        pi = policy.eval().pi(as_tensor(b.context).to(device)).cpu()
        scores = as_tensor(b.scores)
        if getattr(policy, "item_aware", False):  # per-item weights; pi: the request's
            x, m = as_tensor(b.context).to(device), as_tensor(b.mask).to(device)
            p = self.cfg.policy
            fused = policy.fused(x, scores.to(device), m, p.fusion, p.fusion_eps).cpu()
        else:
            fused = fuse(self.cfg.policy.fusion, scores, pi, self.cfg.policy.fusion_eps)
        out = policy_diagnostics(
            pi.numpy(),
            self.meta.task_names,
            None if self.truth is None else self.truth.segment,
            None if self.simulator is None else self.simulator.segment_names,
        )
        mask = as_tensor(b.mask)
        if self.truth is not None:
            exp = self.simulator.expected_outcomes(b, self.truth, fused.numpy())
            out["eval/north_star"] = float(np.mean(exp["north_star"]))
        else:
            post = ndcg_at_k(
                fused,
                self.spec.post_gain(as_tensor(b.labels), as_tensor(b.position)),
                mask,
                self.spec.k,
            )
            out[keys.EVAL_NDCG] = float(post.mean())
        return out

    @property
    def business_key(self) -> str:
        return "eval/north_star" if self.truth is not None else keys.EVAL_NDCG


# ---------------------------------------------------------------------------
# Stage 2


@dataclasses.dataclass
class Position:
    """Where training stands: the next round to run (rounds before it are done)."""

    next_round: int = 0


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in batches[0].items():
        out[k] = v if np.ndim(v) == 0 else np.concatenate([b[k] for b in batches])
    return out


class GRPOTrainer:
    """Runs Stage 2 rounds over a :class:`DataPlan` with a rollout backend."""

    def __init__(
        self,
        cfg: Config,
        plan: DataPlan,
        learner: GRPOLearner,
        backend,
        logger: MetricsLogger | None,
        run_dir: str | Path,
        probe: Probe | None = None,
        rank: int = 0,
        world: int = 1,
        report_fn=None,
    ) -> None:
        self.cfg, self.plan, self.learner, self.backend = cfg, plan, learner, backend
        self.logger, self.run_dir, self.probe = logger, Path(run_dir), probe
        self.rank, self.world, self.report_fn = rank, world, report_fn
        self.position = Position()
        self.fail_at_round: int | None = None  # fault injection for tests
        self.history: list[dict[str, float]] = []
        self.total_steps = sum(self._num_steps(r) for r in range(len(plan.rounds)))
        self.steps_done = 0

    # -- plan helpers -------------------------------------------------------
    def _step_tasks(self, r: int) -> list[list]:
        """Round r's tasks grouped into steps: each step = rollout.num_workers tasks per rank.

        The round is dealt into one lane per rollout worker (contiguous runs of tasks, see
        :func:`lanes`); step s takes the s-th task of every lane, in lane order, so a
        worker keeps reading the same files from step to step.
        """
        per_step = self.cfg.rollout.num_workers * self.world
        return deal_steps(self.plan.rounds[r], per_step, self.world, self.rank)

    def _num_steps(self, r: int) -> int:
        return len(self._step_tasks(r))

    def alpha_hat(self) -> float:
        e = self.cfg.exploration
        progress = self.steps_done / max(self.total_steps - 1, 1)
        return alpha_schedule(progress, e.alpha_start, e.alpha_end, e.schedule)

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": self.learner.state_dict(),
            "next_round": self.position.next_round,
            "steps_done": self.steps_done,
            "history": [dict(h) for h in self.history],
            "config": self.cfg.to_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    STATE_KEYS = ("learner", "next_round", "steps_done", "history", "torch_rng")

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``state`` is a Stage 2 checkpoint this plan
        can continue from."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"not a Stage 2 round checkpoint (lacks {missing})")
        if not 0 <= int(state["next_round"]) <= len(self.plan.rounds) or len(
            state["history"]
        ) != int(state["next_round"]):
            raise CheckpointError(
                f"checkpoint at round {state['next_round']} with {len(state['history'])} "
                f"rounds of history does not fit this plan's {len(self.plan.rounds)} rounds"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.position.next_round = int(state["next_round"])
        self.steps_done = int(state["steps_done"])
        self.history = [dict(h) for h in state["history"]]
        torch.set_rng_state(state["torch_rng"])

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state; the metrics file is made to hold exactly its
        rounds (see :meth:`sync_metrics`)."""
        self.check_state(state)
        self.load_state_dict(state)
        self.sync_metrics()

    def resume_from(self, path: str | Path) -> None:
        try:
            self.restore(load_checkpoint(path))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        log.info(
            "resumed from %s at round %d/%d", path, self.position.next_round, len(self.plan.rounds)
        )

    def sync_metrics(self) -> None:
        """Make ``metrics.jsonl`` hold each round this trainer has done exactly once, after
        the rows of other stages: a round logged but not checkpointed before a kill is
        dropped (it runs again), a round checkpointed but not yet logged is written from
        the checkpoint's history. Rank 0 only (it owns the logger)."""
        if self.logger is None or self.rank != 0:
            return
        rows = read_metrics(self.logger.run_dir)
        times = {r.get(keys.ROUND): r.get("time") for r in rows if r.get("stage") == 2}
        stage2 = [
            {"step": int(h[keys.ROUND]), "time": times.get(h[keys.ROUND]) or time.time(), **h}
            for h in self.history
        ]
        kept = [r for r in rows if r.get("stage") != 2]
        if kept + stage2 != rows:
            log.info(
                "metrics.jsonl: %d Stage 2 row(s) -> the %d round(s) of the checkpoint",
                len(rows) - len(kept),
                len(stage2),
            )
            self.logger.rewrite(kept + stage2)

    # -- the loop -------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        self.backend.set_weights(self.learner.policy_state(), self.learner.version)
        for r in range(self.position.next_round, len(self.plan.rounds)):
            metrics = self.run_round(r)
            self.position.next_round = r + 1
            self.end_round(r, metrics)
            if r == self.fail_at_round:
                raise RuntimeError(f"injected failure after round {r} (fault-tolerance test)")
        return self.history

    def run_round(self, r: int) -> dict[str, float]:
        """One training round: reference sync, then rollout/update steps over its data."""
        self.learner.sync_reference()
        steps = self._step_tasks(r)
        sums: dict[str, float] = collections.defaultdict(float)
        seen: list[np.ndarray] = []
        # every few seconds within a long round; its end is the summary line of end_round
        progress = Progress(
            f"round {r + 1}/{len(self.plan.rounds)}",
            sum(len(t) for s in steps for t in s),
            at_end=False,
        )
        t0 = time.perf_counter()
        pending: collections.deque = collections.deque()
        next_step = 0

        def submit() -> None:
            nonlocal next_step
            tasks = steps[next_step]
            seeds = [task_seed(self.cfg.seed, t) for t in tasks]
            alpha = self.alpha_hat()
            handle = self.backend.submit(tasks, alpha, self.learner.version, seeds)
            pending.append((alpha, handle))
            next_step += 1

        while next_step < len(steps) and len(pending) <= self.cfg.rollout.max_staleness:
            submit()
        while pending:
            alpha, handle = pending.popleft()
            batch = _concat(self.backend.collect(handle))  # sample + score + advantage
            lag = self.learner.version - int(batch[keys.POLICY_VERSION])
            if lag > self.cfg.rollout.max_staleness:
                raise RuntimeError(
                    f"rollout is {lag} versions stale; bound is {self.cfg.rollout.max_staleness}"
                )
            stats = self.learner.update(batch)  # GRPO update
            self.backend.set_weights(self.learner.policy_state(), self.learner.version)  # sync
            self.steps_done += 1
            if next_step < len(steps):
                submit()
            roll = rollout_summary(batch)
            for k, v in {**roll, **stats}.items():
                sums[k] += v
            sums[keys.ROLLOUT_ALPHA_HAT] += alpha
            sums["_n"] += 1
            seen.append(batch[keys.REQUEST_ID])
            progress.update(
                len(batch[keys.REQUEST_ID]),
                f"reward {roll[keys.ROLLOUT_REWARD]:.4f} kl {stats[keys.LEARNER_KL]:.4f}",
            )
        n = max(sums.pop("_n"), 1)
        metrics = {k: v / n for k, v in sums.items()}
        ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        metrics[keys.ROLLOUT_REQUESTS] = float(len(ids))
        metrics["rollout/unique_requests"] = float(len(np.unique(ids)))
        elapsed = time.perf_counter() - t0
        metrics[keys.PERF_ROUND_S] = elapsed
        metrics[keys.PERF_REQUESTS_PER_S] = len(ids) / max(elapsed, 1e-9)
        return metrics

    def end_round(self, r: int, metrics: dict[str, float]) -> None:
        """Diagnostics, failure warnings, metrics and a checkpoint for round r."""
        metrics = {keys.ROUND: r, "stage": 2, **metrics}
        if self.probe is not None and self.rank == 0:
            metrics.update(self.probe(self.learner.module))
        self.history.append(metrics)
        for w in failure_warnings(self.history, self.probe.business_key if self.probe else None):
            log.warning("round %d: %s", r, w)
        log.info(
            "round %d/%d: reward %.4f (post %.4f prior %.4f format %.4f) kl %.4f clip %.3f "
            "zero-var %.3f alpha %.1f %.0f req/s",
            r + 1,
            len(self.plan.rounds),
            metrics.get(keys.ROLLOUT_REWARD, 0),
            metrics.get(keys.ROLLOUT_R_POST, 0),
            metrics.get(keys.ROLLOUT_R_PRIOR, 0),
            metrics.get(keys.ROLLOUT_R_FORMAT, 0),
            metrics.get(keys.LEARNER_KL, 0),
            metrics.get(keys.LEARNER_CLIP_FRAC, 0),
            metrics.get(keys.ROLLOUT_ZERO_VAR_FRAC, 0),
            metrics.get(keys.ROLLOUT_ALPHA_HAT, 0),
            metrics.get(keys.PERF_REQUESTS_PER_S, 0),
        )
        ckpt = None
        if self.rank == 0:
            # checkpoint first: a process killed before the metrics row is written resumes
            # from this round and writes the row from the checkpoint's history
            ckpt = save_checkpoint(self.run_dir, f"round-{r:04d}", self.state_dict())
            if self.logger:
                self.logger.log(r, metrics)
        if self.report_fn is not None:  # every rank reports, the same number of times
            self.report_fn(metrics, ckpt)
