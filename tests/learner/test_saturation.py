"""Stage 1 saturation: a softmax pinned to one task leaves Stage 2 no gradient.

A learning rate far too high for Stage 1 on a click-only reward drives every request's
weights to (1, 0, 0, 0) in float32; the GRPO update then has gradient norm 0, and the
round's warnings must say so and name the setting. ``pretrain.logit_bound`` keeps Stage 1
out of that state, so Stage 2 can move.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.data.plan import DataPlan, TaskReader
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.learner.diagnostics import failure_warnings, policy_diagnostics
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import new_policy, pretrain, rollout_spec
from grade_ray.rollout.worker import RolloutWorker


def _stage1_then_one_update(smoke_cfg, smoke_data, bound: float):
    cfg = smoke_cfg.replace(
        **{
            "reward.post_gains": {"click": 1.0},
            "pretrain.lr": 0.05,
            "pretrain.epochs": 1,
            "pretrain.batch_size": 64,
            "pretrain.logit_bound": bound,
        }
    )
    train = smoke_data[0]
    meta = read_meta(train)
    policy = new_policy(cfg, meta, train)
    pretrain(cfg, policy, meta, train)
    batch, _, _ = read_sessions(train, max_rows=400)
    with torch.no_grad():
        pi = policy.pi(torch.from_numpy(batch.context)).numpy()
    plan = DataPlan.build(train, rounds=1, batch_size=400)
    worker = RolloutWorker(copy.deepcopy(policy), rollout_spec(cfg, plan.meta, train))
    worker.set_weights(policy.state_dict(), 0)
    rollout = worker.rollout(TaskReader(plan.meta).load(plan.rounds[0][0]), 5.0)
    stats = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(cfg)).update(rollout)
    row = {**stats, **policy_diagnostics(pi, meta.task_names)}
    return pi, row


def test_saturated_stage1_stalls_stage2_and_the_round_says_why(smoke_cfg, smoke_data):
    pi, row = _stage1_then_one_update(smoke_cfg, smoke_data, bound=0.0)
    assert (pi.max(1) == 1.0).all()  # saturated in float32
    assert row[keys.LEARNER_GRAD_NORM] < 1e-7
    warns = failure_warnings([row])
    assert any("Stage 2 cannot move" in w and "pretrain.logit_bound" in w for w in warns), warns


def test_logit_bound_keeps_stage2_able_to_move(smoke_cfg, smoke_data):
    pi, row = _stage1_then_one_update(smoke_cfg, smoke_data, bound=8.0)
    logit_spread = np.log(pi.max(1) / pi.min(1))
    assert logit_spread.max() < 8.0 * 1.25
    assert row[keys.LEARNER_GRAD_NORM] > 1e-4
    assert not any("cannot move" in w for w in failure_warnings([row]))


def test_fully_polarized_policy_is_flagged():
    row = {keys.POLICY_POLARIZED: 1.0, keys.LEARNER_GRAD_NORM: 0.3}
    assert any("fully polarized" in w for w in failure_warnings([row]))
    assert failure_warnings([{keys.POLICY_POLARIZED: 0.2, keys.LEARNER_GRAD_NORM: 0.3}]) == []


@pytest.mark.parametrize("bound", [0.0, 8.0])
def test_logit_bound_is_inert_within_the_bound(bound):
    from grade_ray.learner.supervised import logit_spread_hinge

    z = torch.tensor([[0.0, 3.0, -2.0, 1.0]], requires_grad=True)
    assert logit_spread_hinge(z, bound).item() == 0.0
    far = torch.tensor([[0.0, 12.0, -2.0, 1.0]], requires_grad=True)
    pen = logit_spread_hinge(far, bound)
    if bound:
        assert pen.item() == pytest.approx((14.0 - bound) ** 2)
        pen.backward()
        assert far.grad[0, 1] > 0 and far.grad[0, 2] < 0  # pulls max down, min up
    else:
        assert pen.item() == 0.0
