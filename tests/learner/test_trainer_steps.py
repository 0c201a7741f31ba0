"""GRPOTrainer's step logic without Ray: how a round's tasks are shared among learner ranks,
and the staleness bound when rollouts run ahead of the learner.

``EagerRollout`` samples when a step is submitted (as a Ray actor does), so with
``rollout.max_staleness=1`` the next step's batch is drawn before the current update lands.
"""

from __future__ import annotations

import numpy as np
import pytest

from grade_ray import keys
from grade_ray.data.plan import DataPlan
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import GRPOTrainer, new_policy, rollout_spec
from grade_ray.rollout.backend import LocalRollout


def _rows(task) -> set[tuple[str, int]]:
    return {(task.file, int(r)) for r in task.rows}


@pytest.mark.parametrize(
    "workers, world, per_round",
    [(2, 2, 0), (1, 2, 750), (3, 2, 0), (2, 3, 1000), (1, 4, 500)],
)
def test_ranks_share_each_step_and_use_every_request_once(
    smoke_cfg, smoke_data, workers, world, per_round
):
    """Every rank runs the same number of steps with at least one task in each (DDP needs
    all ranks in every step), and the ranks' tasks of a step cover the step's requests once."""
    cfg = smoke_cfg.replace(**{"rollout.num_workers": workers})
    plan = DataPlan.build(smoke_data[0], rounds=2, batch_size=250, requests_per_round=per_round)
    for r, round_tasks in enumerate(plan.rounds):
        want = set().union(*(_rows(t) for t in round_tasks))
        by_rank = [
            GRPOTrainer(cfg, plan, None, None, None, "unused", rank=k, world=world)._step_tasks(r)
            for k in range(world)
        ]
        n_steps = {len(s) for s in by_rank}
        assert len(n_steps) == 1, n_steps  # symmetric
        seen: list[tuple[str, int]] = []
        for steps in by_rank:
            for step in steps:
                assert len(step) >= 1
                for t in step:
                    seen += sorted(_rows(t))
        assert len(seen) == len(set(seen)) == len(want)
        assert set(seen) == want


class EagerRollout(LocalRollout):
    """Samples at submit time with the weights it holds then (like a Ray actor)."""

    def submit(self, tasks, alpha_hat, version, seeds):
        return super().collect(super().submit(tasks, alpha_hat, version, seeds))

    def collect(self, handle):
        return handle


class StaleRollout(EagerRollout):
    """Tags every batch ``lag`` versions older than the weights it was given."""

    def __init__(self, *args, lag: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.lag = lag

    def submit(self, tasks, alpha_hat, version, seeds):
        out = super().submit(tasks, alpha_hat, version, seeds)
        for b in out:
            b[keys.POLICY_VERSION] = np.int64(version - self.lag)
        return out


def _trainer(cfg, plan, smoke_data, backend_cls=EagerRollout, **kw):
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    learner = GRPOLearner(policy, GRPOSettings.from_config(cfg), seed=cfg.seed)
    backend = backend_cls(
        new_policy(cfg, plan.meta, smoke_data[0]),
        rollout_spec(cfg, plan.meta, smoke_data[0]),
        plan.meta,
        **kw,
    )
    lags: list[int] = []
    update = learner.update

    def recording_update(batch):
        lags.append(learner.version - int(batch[keys.POLICY_VERSION]))
        return update(batch)

    learner.update = recording_update
    backend.set_weights(learner.policy_state(), learner.version)  # as fit() does first
    return GRPOTrainer(cfg, plan, learner, backend, None, "unused"), lags


@pytest.mark.parametrize("staleness", [0, 1])
def test_max_staleness_bounds_the_lag_and_uses_every_request_once(
    smoke_cfg, smoke_data, tmp_path, staleness, monkeypatch
):
    monkeypatch.setattr("grade_ray.learner.loop.save_checkpoint", lambda *a, **k: None)
    cfg = smoke_cfg.replace(
        **{"rollout.max_staleness": staleness, "rollout.batch_size": 125, "run_dir": str(tmp_path)}
    )
    plan = DataPlan.build(smoke_data[0], rounds=2, batch_size=125)
    trainer, lags = _trainer(cfg, plan, smoke_data)
    history = trainer.fit()
    n_steps = sum(trainer._num_steps(r) for r in range(2))
    assert len(lags) == n_steps == trainer.steps_done == trainer.learner.version
    assert max(lags) == staleness  # one version old at most, and the pipeline is used
    if staleness:
        assert lags[0] == 0 and lags.count(1) == n_steps - 2  # first step of each round fresh
    for r, h in zip(plan.rounds, history):
        assert h[keys.ROLLOUT_REQUESTS] == h["rollout/unique_requests"] == sum(len(t) for t in r)


@pytest.mark.parametrize("staleness, lag", [(0, 1), (1, 2)])
def test_a_batch_older_than_the_bound_is_refused(smoke_cfg, smoke_data, staleness, lag):
    cfg = smoke_cfg.replace(**{"rollout.max_staleness": staleness})
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=250)
    trainer, _ = _trainer(cfg, plan, smoke_data, StaleRollout, lag=lag)
    with pytest.raises(RuntimeError, match=f"{lag} versions stale; bound is {staleness}"):
        trainer.run_round(0)
    assert trainer.learner.version == 0  # nothing was applied
