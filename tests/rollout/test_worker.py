"""RolloutWorker: what it hands the learner equals the reward and advantage math, recomputed.

The reference here is built from the pure functions in ``grade_ray.algos`` and a plain
numpy examination model, not from the worker's own calls, so a worker that scores the wrong
reward (R_post alone), drops the logged positions (no propensity weighting) or tags the wrong
policy version disagrees with it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.algos.advantages import group_advantages
from grade_ray.algos.calibration import apply_calibration
from grade_ray.algos.exploration import EXPLORATIONS
from grade_ray.algos.rewards import group_rewards
from grade_ray.data.plan import DataPlan, TaskReader
from grade_ray.learner.loop import new_policy, rollout_spec
from grade_ray.rollout.worker import RolloutWorker, rollout_summary

ALPHA = 5.0
SEED = 1234


def skew(policy, seed: int = 1):
    """Make a (uniform at init) policy personalise: random last layer."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.tower[-1].parameters():
            p.normal_(0, 0.7)
    return policy


@pytest.fixture(scope="module")
def setup(smoke_cfg, smoke_data):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=200)
    batch = TaskReader(plan.meta).load(plan.rounds[0][0])
    # logged ranks that are not the column order: IPS must follow the logged rank
    rng = np.random.default_rng(0)
    pos = np.stack([rng.permutation(batch.mask.shape[1]) for _ in range(len(batch))])
    batch.position = pos.astype(np.int32)
    policy = skew(new_policy(smoke_cfg, plan.meta, smoke_data[0]))
    spec = rollout_spec(smoke_cfg, plan.meta, smoke_data[0])
    worker = RolloutWorker(copy.deepcopy(policy), spec)
    worker.set_weights(policy.state_dict(), 7)
    worker.reseed(SEED)
    out = worker.rollout(batch, ALPHA)
    return smoke_cfg, plan.meta, policy, batch, out, spec.reward


def reference(cfg, meta, policy, batch, fitted):
    """Rewards and advantages recomputed from the config, the algos functions and numpy
    (what the reward fitted on the logs, R_prior's calibration and the dataset scales, is
    taken from ``fitted``; its fit is tested in tests/learner/test_reward_fit.py)."""
    r, e = cfg.reward, cfg.exploration
    with torch.no_grad():
        pi = policy.pi(torch.from_numpy(batch.context))
    w = EXPLORATIONS.get(e.kind).sample(
        pi,
        e.group_size,
        ALPHA,
        floor=e.alpha_floor,
        sigma=e.sigma,
        generator=torch.Generator().manual_seed(SEED),
    )
    lab = batch.labels.astype(np.float64)
    coef = np.array([r.post_gains.get(n, 0.0) for n in meta.label_names])
    gain = np.maximum(lab @ coef, 0.0)
    assert r.propensity == "inverse"
    exam = np.maximum((1.0 + batch.position / r.propensity_scale) ** -r.propensity_power, 0.05)
    post_gain = gain / exam
    sc = batch.scores.astype(np.float64)
    assert fitted.calibration is not None and fitted.post_scale and fitted.prior_scale
    sc = apply_calibration(
        torch.from_numpy(sc), torch.from_numpy(batch.context).double(), fitted.calibration
    ).numpy()
    ti = {n: i for i, n in enumerate(meta.task_names)}
    prior_gain = np.zeros(sc.shape[:2])
    for term, c in r.prior_gains.items():
        prod = np.ones(sc.shape[:2])
        for name in term.split("*"):
            prod = prod * sc[..., ti[name]]
        prior_gain += c * prod
    rules = [tuple(ti[x] for x in rule.split(">=")) for rule in r.format_rules]
    rew = group_rewards(
        torch.from_numpy(batch.scores),
        w,
        torch.from_numpy(post_gain.astype(np.float32)),
        torch.from_numpy(prior_gain.astype(np.float32)),
        torch.from_numpy(batch.mask),
        fusion=cfg.policy.fusion,
        k=r.k,
        rules=rules,
        l1=r.l1,
        l2=r.l2,
        l3=r.l3,
        tau=r.tau,
        fusion_eps=cfg.policy.fusion_eps,
        post_scale=fitted.post_scale,
        prior_scale=fitted.prior_scale,
    )
    adv, zero_var = group_advantages(rew["reward"], cfg.grpo.advantage)
    return w, rew, adv, zero_var


def test_samples_come_from_the_current_weights_and_seed(setup):
    cfg, meta, policy, batch, out, fitted = setup
    w, _, _, _ = reference(cfg, meta, policy, batch, fitted)
    np.testing.assert_array_equal(out[keys.WEIGHTS], w.numpy())
    assert int(out[keys.POLICY_VERSION]) == 7
    assert float(out[keys.ALPHA_HAT]) == ALPHA
    np.testing.assert_array_equal(out[keys.REQUEST_ID], batch.request_id)


def test_advantages_are_the_composite_rewards_group_advantages(setup):
    """R = l1 R_post + l2 R_prior + gated l3 R_format, R_post with IPS gains at the logged
    rank; A = group advantage of R. Checked against an independent computation."""
    cfg, meta, policy, batch, out, fitted = setup
    _, rew, adv, zero_var = reference(cfg, meta, policy, batch, fitted)
    np.testing.assert_allclose(out[keys.R_POST], rew["post"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[keys.R_PRIOR], rew["prior"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[keys.R_FORMAT], rew["format"].numpy())
    np.testing.assert_allclose(out[keys.REWARD], rew["reward"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[keys.ADVANTAGES], adv.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[keys.ZERO_VAR], zero_var.numpy())
    # the check has teeth: the composite differs from R_post, and IPS changes R_post
    assert not np.allclose(out[keys.REWARD], out[keys.R_POST])
    assert (~out[keys.ZERO_VAR]).mean() > 0.5


def test_old_logp_is_the_samples_log_density(setup):
    cfg, _, policy, batch, out, _ = setup
    e = cfg.exploration
    with torch.no_grad():
        pi = policy.pi(torch.from_numpy(batch.context))
    want = EXPLORATIONS.get(e.kind).log_prob(
        pi, torch.from_numpy(out[keys.WEIGHTS]), ALPHA, floor=e.alpha_floor, sigma=e.sigma
    )
    np.testing.assert_allclose(out[keys.OLD_LOGP], want.numpy(), rtol=1e-5, atol=1e-5)


def test_summary_reports_the_spread_within_groups_and_near_zero_advantages():
    """Hand values: one group with spread, two homogeneous groups (std 0, advantages 0)."""
    reward = np.array([[0.0, 4.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = np.array([[-1.0, 1.0, -1.0, 0.01], [0.0] * 4, [0.0] * 4])
    out = {
        keys.REQUEST_ID: np.array([1, 2, 3]),
        keys.REWARD: reward,
        keys.R_POST: reward,
        keys.R_PRIOR: reward,
        keys.R_FORMAT: np.ones_like(reward),
        keys.ZERO_VAR: np.array([False, True, True]),
        keys.ADVANTAGES: adv,
    }
    s = rollout_summary(out)
    assert s[keys.ROLLOUT_GROUP_REWARD_STD] == pytest.approx((2.0 + 0.0 + 0.0) / 3)
    assert s[keys.ROLLOUT_NEAR_ZERO_ADV_FRAC] == pytest.approx(9 / 12)
    assert s[keys.ROLLOUT_ZERO_VAR_FRAC] == pytest.approx(2 / 3)
    assert s[keys.ROLLOUT_REWARD] == pytest.approx(reward.mean())


def test_worker_batches_feed_the_group_spread(setup):
    """On a real rollout the spread is the mean per-request std of the G rewards."""
    out = setup[4]
    s = rollout_summary(out)
    want = float(np.mean([np.std(r) for r in out[keys.REWARD]]))
    assert want > 0 and s[keys.ROLLOUT_GROUP_REWARD_STD] == pytest.approx(want, rel=1e-6)
    near = float(np.mean(np.abs(out[keys.ADVANTAGES]) < 0.05))
    assert s[keys.ROLLOUT_NEAR_ZERO_ADV_FRAC] == pytest.approx(near)
