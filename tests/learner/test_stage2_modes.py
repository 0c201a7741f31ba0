"""Stage 2 with dropout: the learner's on-policy quantities use the rollout's (eval) mode.

A policy with dropout samples its rollout in eval mode; if the learner then computed
log-probs and the KL in train mode, the first update of a round would not be at ratio 1
and the KL right after a reference sync would not be 0.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grade_ray import keys
from grade_ray.data.plan import DataPlan, TaskReader
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import new_policy, rollout_spec
from grade_ray.rollout.worker import RolloutWorker


@pytest.mark.parametrize("kl", ["exact", "k3"])
def test_first_update_after_sync_is_on_policy_with_dropout(smoke_cfg, smoke_data, kl):
    cfg = smoke_cfg.replace(
        **{
            "policy.dropout": 0.5,
            "grpo.kl_estimator": kl,
            "grpo.epochs_per_batch": 1,
            "grpo.minibatch_size": 100_000,  # one minibatch: its stats are pre-step values
        }
    )
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=200)
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    with torch.no_grad():  # a non-uniform policy, so dropout changes pi in train mode
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    worker = RolloutWorker(copy.deepcopy(policy), rollout_spec(cfg, plan.meta, smoke_data[0]))
    worker.set_weights(policy.state_dict(), 0)
    batch = worker.rollout(TaskReader(plan.meta).load(plan.rounds[0][0]), 5.0)
    learner = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(cfg))
    learner.sync_reference()
    stats = learner.update(batch)
    assert stats[keys.LEARNER_RATIO_MEAN] == pytest.approx(1.0, abs=1e-6)
    assert stats[keys.LEARNER_CLIP_FRAC] == 0.0
    assert stats[keys.LEARNER_KL] == pytest.approx(0.0, abs=1e-6)
