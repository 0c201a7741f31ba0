"""The faster Stage 2 update computes the earlier one: GRPOLearner on the stacked-expert
FusionPolicy (reference policy run once per batch, fused Adam) against
ReferenceGRPOLearner on the per-expert policy (reference run on every minibatch, Adam
parameter by parameter), from the same weights and minibatch seed.

The batches are real rollouts of tests/learner/test_grpo_learner.py's one-task world; the
second update runs with a reference that differs from the policy, so the KL term and its
gradient are exercised.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_grpo_learner import SETTINGS, D, K, make_policy, one_task_batch, rollout

from grade_ray import keys
from grade_ray.learner.grpo import REF_PI, GRPOLearner
from grade_ray.learner.grpo_reference import ReferenceGRPOLearner
from grade_ray.models.policy import FusionPolicy
from grade_ray.models.policy_reference import PerExpertFusionPolicy, stacked_to_per_expert

TOL = 1e-6


def learners(settings):
    new = GRPOLearner(make_policy(seed=4), settings, seed=0)
    old_policy = PerExpertFusionPolicy(D, K, num_experts=2, expert_hidden=16)
    old_policy.load_state_dict(stacked_to_per_expert(new.module.state_dict()))
    return new, ReferenceGRPOLearner(old_policy, settings, seed=0)


def max_weight_diff(new: GRPOLearner, old: GRPOLearner) -> float:
    got = stacked_to_per_expert(new.module.state_dict())
    return max(float((got[k] - v).abs().max()) for k, v in old.module.state_dict().items())


@pytest.mark.parametrize("kl_estimator", ["exact", "k3"])
def test_updates_equal_the_reference_learner(kl_estimator):
    settings = dataclasses.replace(SETTINGS, kl_estimator=kl_estimator)
    new, old = learners(settings)
    batch = one_task_batch()
    moved = 0.0
    for s in range(2):  # update 2 runs against a reference the first one left behind
        train = rollout(new, batch, seed=s)
        start = {k: v.clone() for k, v in new.module.state_dict().items()}
        got, want = new.update(train), old.update(train)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-8), k
        now = new.module.state_dict()
        moved = max(moved, max(float((now[k] - v).abs().max()) for k, v in start.items()))
        assert max_weight_diff(new, old) <= TOL
    assert want[keys.LEARNER_KL] > 1e-5  # the reference term was not trivially zero
    assert moved > 1000 * TOL  # and the updates moved the weights


def test_loss_and_gradient_of_one_minibatch_equal_the_reference():
    """compute_loss with the precomputed pi_ref column equals compute_loss running the
    reference itself, and the per-expert policy's loss and gradients. The reference is far
    from the policy and beta = 1, so the KL term weighs as much as the surrogate."""
    new, old = learners(dataclasses.replace(SETTINGS, beta=1.0))
    batch = one_task_batch()
    new.update(rollout(new, batch, seed=0))
    far = make_policy(seed=9)
    torch.nn.init.normal_(far.tower[-1].weight)
    new.ref.load_state_dict(far.state_dict())
    old.load_state_dict(
        {
            "policy": stacked_to_per_expert(new.module.state_dict()),
            "ref": stacked_to_per_expert(far.state_dict()),
            "optimizer": old.optimizer.state_dict(),
            "version": new.version,
            "generator": new.generator.get_state(),
        }
    )
    train = rollout(new, batch, seed=3)
    mb = {
        c: torch.from_numpy(train[c])
        for c in (keys.CONTEXT, keys.WEIGHTS, keys.OLD_LOGP, keys.ADVANTAGES)
    }
    with torch.no_grad():
        pre = {**mb, REF_PI: torch.softmax(new.ref(mb[keys.CONTEXT]), dim=-1)}
    results = []
    for learner, minibatch in ((new, pre), (new, mb), (old, mb)):
        learner.optimizer.zero_grad(set_to_none=True)
        loss, stats = learner.compute_loss(minibatch, 5.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in learner.module.named_parameters()}
        if isinstance(learner.module, FusionPolicy):
            grads = stacked_to_per_expert(grads)
        results.append((float(loss.detach()), stats, grads))
    (loss0, stats0, g0), *rest = results
    assert stats0["kl"] > 0.1 and abs(stats0["pg_loss"]) < stats0["kl"]
    scale = max(float(g.abs().max()) for g in g0.values())
    for loss, stats, grads in rest:
        assert loss == pytest.approx(loss0, rel=1e-6)
        assert stats["kl"] == pytest.approx(stats0["kl"], rel=1e-6)
        for name, g in g0.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=TOL * scale, msg=name)


def test_a_learner_state_saved_with_the_per_expert_policy_resumes():
    """A checkpoint of the earlier learner (per-expert policy and reference, for-loop Adam
    with moments for 4 tensors per expert) loads into GRPOLearner, which then continues as
    the earlier learner does."""
    new, old = learners(SETTINGS)
    batch = one_task_batch()
    for s in range(2):
        old.update(rollout(new, batch, seed=s))
    saved = copy.deepcopy(old.state_dict())
    assert "experts.0.0.weight" in saved["policy"] and len(saved["optimizer"]["state"]) == 14
    resumed = GRPOLearner(make_policy(seed=8), SETTINGS, seed=5)
    resumed.load_state_dict(saved)
    assert resumed.version == old.version == 2
    assert resumed.optimizer.param_groups[0]["fused"]
    for s in (5, 6):
        train = rollout(resumed, batch, seed=s)
        got, want = resumed.update(train), old.update(train)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-8), k
        assert max_weight_diff(resumed, old) <= TOL


def test_a_one_expert_learner_state_of_either_layout_resumes():
    """With one expert both layouts have 10 tensors: the stacked state is left alone."""
    one = SETTINGS
    torch.manual_seed(0)
    a = GRPOLearner(FusionPolicy(D, K, num_experts=1, expert_hidden=8), one, seed=0)
    old = ReferenceGRPOLearner(PerExpertFusionPolicy(D, K, num_experts=1, expert_hidden=8), one)
    old.module.load_state_dict(stacked_to_per_expert(a.module.state_dict()))
    batch = one_task_batch()
    train = rollout(GRPOLearner(make_policy(), one), batch, seed=0)  # any policy's samples
    a.update(train)
    old.update(train)
    for saved in (a.state_dict(), old.state_dict()):
        b = GRPOLearner(FusionPolicy(D, K, num_experts=1, expert_hidden=8), one, seed=3)
        b.load_state_dict(copy.deepcopy(saved))
        got = b.optimizer.state_dict()["state"][0]["exp_avg"]
        assert got.shape == (1, 8, D)
