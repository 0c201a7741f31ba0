"""Measured training throughput: Stage 2 rounds on N rollout actors, on-policy and pipelined.

:func:`grade_ray.jobs.bench.throughput.scaling_projection` predicts training throughput
from per-part rates; this module measures it. For each number of rollout workers N it
builds one pool of N Ray actors and times, on the same tasks:

- ``rollout_only``: the pool alone (every task of a round submitted at once, no update);
- ``on_policy`` (``rollout.max_staleness=0``): real GRPO rounds, each step waiting for
  the update and the weight broadcast before the next rollouts start;
- ``pipelined`` (``rollout.max_staleness=1``): the next step's rollouts run while the
  learner updates on the current one.

The learner is the trainer's own :class:`GRPOLearner` in this process, at the torch
thread count the caller set (one thread, like one Ray Train worker with one CPU, unless
told otherwise). A warm-up round runs first so actor start-up, shard decoding and first
weight fetches are not timed; each timed figure is the median over ``repeats`` rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from grade_ray import keys
from grade_ray.config import Config
from grade_ray.data.plan import DataPlan
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import GRPOTrainer, new_policy, rollout_spec
from grade_ray.models.policy import build_policy
from grade_ray.rollout.actor import RayRollout

MODES = ("rollout_only", "on_policy", "pipelined")
STALENESS = {"on_policy": 0, "pipelined": 1}


def training_key(mode: str, n: int) -> str:
    """Result key of mode at N rollout workers, e.g. ``training.on_policy.2``."""
    return f"training.{mode}.{n}"


def bench_training(
    cfg: Config,
    train_path: str,
    workers: tuple[int, ...] = (1, 2),
    repeats: int = 3,
    modes: tuple[str, ...] = MODES,
) -> dict[str, float]:
    """Requests/s of a Stage 2 round at each N in ``workers``, per mode (see module doc).

    Every round of the plan holds the same requests (``rounds = repeats + 1`` over the
    training file at ``rollout.batch_size``); give the file at least ``max(workers) *
    rollout.batch_size`` requests per round so every actor gets work in each step. Needs
    a running Ray (the caller's ``init_ray``).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"training bench modes must be in {MODES}, got {sorted(unknown)}")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = DataPlan.build(
            train_path,
            rounds=repeats + 1,
            batch_size=cfg.rollout.batch_size,
            data_passes=repeats + 1,  # every round one full pass: the same work each round
            cache_dir=tmp,
        )
        meta = plan.meta
        spec = rollout_spec(cfg, meta, train_path)
        init_state = new_policy(cfg, meta, train_path).state_dict()
        for n in workers:
            pool = RayRollout(
                cfg.replace(**{"rollout.num_workers": n}), meta, spec, cache=plan.cache
            )
            try:
                for mode in modes:
                    run_cfg = cfg.replace(
                        **{
                            "rollout.num_workers": n,
                            "rollout.max_staleness": STALENESS.get(mode, 0),
                        }
                    )
                    out[training_key(mode, n)] = _rate(run_cfg, plan, pool, mode, init_state)
            finally:
                pool.close()
    return out


def _rate(cfg: Config, plan: DataPlan, pool: RayRollout, mode: str, init_state: dict) -> float:
    """Median requests/s of ``mode`` over the plan's rounds after the first (warm-up),
    every mode starting from the same initial policy."""
    policy = build_policy(cfg.policy, plan.meta.context_dim, plan.meta.num_tasks)
    policy.load_state_dict(init_state)
    learner = GRPOLearner(policy, GRPOSettings.from_config(cfg), seed=cfg.seed)
    trainer = GRPOTrainer(cfg, plan, learner, pool, None, cfg.run_dir)
    pool.set_weights(learner.policy_state(), learner.version)
    rates: list[float] = []
    for r in range(len(plan.rounds)):
        if mode == "rollout_only":
            tasks = plan.rounds[r]
            t0 = time.perf_counter()
            pool.collect(pool.submit(tasks, 10.0, learner.version, list(range(len(tasks)))))
            rate = sum(len(t) for t in tasks) / (time.perf_counter() - t0)
        else:
            rate = trainer.run_round(r)[keys.PERF_REQUESTS_PER_S]
        if r:  # round 0 warms actors, caches and weight fetches up
            rates.append(rate)
    return statistics.median(rates)


def training_markdown(results: dict[str, Any]) -> str:
    """Measured requests/s per N rollout workers (rows) and mode (columns)."""
    from grade_ray.jobs.bench.table import md_table
    from grade_ray.jobs.bench.throughput import PROJECTION_COLUMNS

    ns = sorted({int(k.rsplit(".", 1)[1]) for k in results if k.startswith("training.")})
    if not ns:
        return ""
    rows = [[str(n), *(_cell(results.get(training_key(m, n))) for m in MODES)] for n in ns]
    return md_table(PROJECTION_COLUMNS, "rrrr", rows)


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"
