"""GRPOLearner does what a user relies on: an update raises the reward, the reference
policy follows ``sync_reference``, and a loaded state continues exactly where it was saved.

The task here is synthetic and one-sided on purpose: only task 0's score predicts the clicks,
so the right direction of an update is known (more weight on task 0, a higher NDCG of fresh
samples). A learner that climbs its loss moves the other way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.data.sessions import SessionBatch
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.models.policy import FusionPolicy
from grade_ray.rollout.worker import RolloutSpec, RolloutWorker
from grade_ray.spec import RewardSpec

B, N, K, D = 256, 10, 4, 4
ALPHA = 5.0


def one_task_batch(seed: int = 0) -> SessionBatch:
    """Clicks on the two candidates with the highest task-0 score; tasks 1-3 are noise."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.05, 0.95, (B, N, K)).astype(np.float32)
    top = np.argsort(-scores[..., 0], axis=1)[:, :2]
    labels = np.zeros((B, N, 1), np.float32)
    np.put_along_axis(labels[..., 0], top, 1.0, axis=1)
    return SessionBatch(
        request_id=np.arange(B, dtype=np.int64),
        user_id=np.zeros(B, np.int64),
        ts=np.zeros(B, np.int64),
        context=rng.standard_normal((B, D)).astype(np.float32),
        item_ids=np.zeros((B, N), np.int64),
        scores=scores,
        labels=labels,
        mask=np.ones((B, N), bool),
    )


RSPEC = RolloutSpec(
    reward=RewardSpec(
        k=3, post_coef=(1.0,), prior_terms=(), rules=(), l1=1.0, l2=0.0, l3=0.0, tau=0.0
    ),
    exploration="dirichlet",
    group_size=8,
    alpha_floor=0.05,
    sigma=0.5,
    advantage="std",
    fusion="log_product",
    fusion_eps=1e-6,
)

SETTINGS = GRPOSettings(
    lr=0.01,
    clip_eps=0.2,
    beta=0.01,
    kl_estimator="exact",
    epochs_per_batch=2,
    minibatch_size=128,
    grad_clip=1.0,
    exploration="dirichlet",
    alpha_floor=0.05,
    sigma=0.5,
)


def make_policy(seed: int = 0) -> FusionPolicy:
    torch.manual_seed(seed)
    return FusionPolicy(D, K, num_experts=2, expert_hidden=16)


def fresh(learner: GRPOLearner, batch: SessionBatch, seed: int = 99) -> tuple[float, float]:
    """(mean composite reward of fresh samples, mean pi_0) under the learner's weights;
    the same sampling seed every time (common random numbers)."""
    worker = RolloutWorker(make_policy(), RSPEC)
    worker.set_weights(learner.policy_state(), learner.version)
    worker.reseed(seed)
    out = worker.rollout(batch, ALPHA)
    with torch.no_grad():
        pi = learner.module.pi(torch.from_numpy(batch.context))
    return float(out[keys.REWARD].mean()), float(pi[:, 0].mean())


def rollout(learner: GRPOLearner, batch: SessionBatch, seed: int) -> dict[str, np.ndarray]:
    worker = RolloutWorker(make_policy(), RSPEC)
    worker.set_weights(learner.policy_state(), learner.version)
    worker.reseed(seed)
    return worker.rollout(batch, ALPHA)


def test_update_on_a_fixed_batch_raises_the_reward_of_fresh_samples():
    batch = one_task_batch()
    learner = GRPOLearner(make_policy(), SETTINGS, seed=0)
    r0, p0 = fresh(learner, batch)
    assert p0 == pytest.approx(1 / K, abs=1e-6)  # starts uniform
    train = rollout(learner, batch, seed=1)
    learner.update(train)
    r1, p1 = fresh(learner, batch)
    assert p1 > p0 + 0.01, (p0, p1)  # pi moved toward the rewarded task
    assert r1 > r0 + 0.005, (r0, r1)  # and fresh samples score higher
    # a few more on-policy updates keep climbing
    for s in range(2, 6):
        learner.update(rollout(learner, batch, seed=s))
    r2, p2 = fresh(learner, batch)
    assert p2 > p1 + 0.02 and r2 > r1 + 0.005, (r1, r2, p1, p2)


def test_sync_reference_makes_the_reference_the_current_policy():
    batch = one_task_batch()
    learner = GRPOLearner(make_policy(), SETTINGS, seed=0)
    start = copy.deepcopy(learner.module.state_dict())
    for s in range(3):
        learner.update(rollout(learner, batch, seed=s))
    ctx = torch.from_numpy(batch.context)
    # before a sync the reference is still the starting policy: KL(pi || ref) > 0
    for k, v in learner.ref.state_dict().items():
        assert torch.equal(v, start[k]), k
    mb = {
        c: torch.from_numpy(np.asarray(train_col))
        for c, train_col in rollout(learner, batch, seed=9).items()
        if c in (keys.CONTEXT, keys.WEIGHTS, keys.OLD_LOGP, keys.ADVANTAGES)
    }
    _, before = learner.compute_loss(mb, ALPHA)
    assert before["kl"] > 1e-4
    learner.sync_reference()
    for k, v in learner.ref.state_dict().items():
        assert torch.equal(v, learner.module.state_dict()[k]), k
    _, after = learner.compute_loss(mb, ALPHA)
    assert after["kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(learner.ref.pi(ctx), learner.module.pi(ctx), rtol=0, atol=0)
    # the reference is a copy, not the policy itself: the next update leaves it behind
    learner.update(rollout(learner, batch, seed=10))
    _, later = learner.compute_loss(mb, ALPHA)
    assert later["kl"] > 1e-6


def test_loaded_state_continues_exactly_like_the_saved_learner():
    """Policy, reference, Adam moments, version and minibatch order all come back:
    after loading, the next updates give bit-identical weights."""
    batch = one_task_batch()
    a = GRPOLearner(make_policy(), SETTINGS, seed=0)
    for s in range(2):
        a.update(rollout(a, batch, seed=s))
    # a reference that differs from the policy, so restoring it matters
    saved = copy.deepcopy(a.state_dict())
    nxt = [rollout(a, batch, seed=s) for s in (5, 6)]
    b = GRPOLearner(make_policy(seed=3), SETTINGS, seed=42)  # other init, other order seed
    b.load_state_dict(copy.deepcopy(saved))
    assert b.version == a.version == 2
    for train in nxt:
        sa, sb = a.update(train), b.update(train)
        assert sa == sb
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    for k, v in a.ref.state_dict().items():
        assert torch.equal(v, b.ref.state_dict()[k]), k
    assert b.version == 4
