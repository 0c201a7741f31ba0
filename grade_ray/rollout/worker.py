"""Rollout: logged requests -> candidate weight groups with rewards and advantages.

:class:`RolloutWorker` is a plain class (tested without Ray); the Ray actor in
``grade_ray.rollout.actor`` only delegates to it. One call does, for B requests:

1. pi_old = policy(x)                                  (B, K)
2. w_g ~ explore(pi_old, alpha_hat), g = 1..G          (B, G, K)
3. re-rank each request with each w_g, reward R        (B, G)
4. A = group-relative advantage of R                   (B, G)
5. old_logp = log p(w_g | pi_old, alpha_hat)           (B, G)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from grade_ray import keys
from grade_ray.algos.advantages import group_advantages
from grade_ray.algos.modulation import fusion_inputs, get_exploration
from grade_ray.data.sessions import SessionBatch
from grade_ray.models.policy import FusionPolicy
from grade_ray.spec import RewardSpec, as_tensor


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout needs besides weights and data (plain values)."""

    reward: RewardSpec
    exploration: str
    group_size: int
    alpha_floor: float
    sigma: float
    advantage: str
    fusion: str
    fusion_eps: float
    item_aware: bool = False
    """The policy is item-aware: actions are (w, c) and rank with per-item weights."""


class RolloutWorker:
    """Holds a policy copy; turns request batches into GRPO training batches."""

    def __init__(self, policy: FusionPolicy, spec: RolloutSpec, seed: int = 0) -> None:
        self.policy = policy.eval()
        self.spec = spec
        self.version = -1
        self.explore = get_exploration(spec.exploration)
        self.generator = torch.Generator().manual_seed(seed)

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load policy weights tagged with their version."""
        self.policy.load_state_dict(state_dict)
        self.version = int(version)

    def reseed(self, seed: int) -> None:
        """Make the next rollout's samples a function of ``seed`` only."""
        self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def rollout(self, batch: SessionBatch, alpha_hat: float) -> dict[str, np.ndarray]:
        """One batch of requests -> columnar GRPO batch (see ``grade_ray.keys``)."""
        s = self.spec
        context = as_tensor(batch.context)
        scores = as_tensor(batch.scores)
        mask = as_tensor(batch.mask)
        if s.item_aware:  # the joint exploration's parameters [pi, c, sigma_c]
            pi = self.policy.exploration_params(self.policy(context))
        else:
            pi = self.policy.pi(context)
        w = self.explore.sample(
            pi,
            s.group_size,
            alpha_hat,
            floor=s.alpha_floor,
            sigma=s.sigma,
            generator=self.generator,
        )
        old_logp = self.explore.log_prob(pi, w, alpha_hat, floor=s.alpha_floor, sigma=s.sigma)
        w_req, w_items = fusion_inputs(w, scores, mask, s.fusion_eps) if s.item_aware else (w, None)
        r = s.reward.group_rewards(
            scores,
            w_req,
            s.reward.post_gain(as_tensor(batch.labels), as_tensor(batch.position)),
            s.reward.prior_gain(scores, context),
            mask,
            fusion=s.fusion,
            fusion_eps=s.fusion_eps,
            item_weights=w_items,
        )
        adv, zero_var = group_advantages(r["reward"], s.advantage)
        return {
            keys.REQUEST_ID: batch.request_id,
            keys.CONTEXT: batch.context,
            keys.WEIGHTS: w.numpy(),
            keys.OLD_LOGP: old_logp.numpy(),
            keys.ADVANTAGES: adv.numpy(),
            keys.REWARD: r["reward"].numpy(),
            keys.R_POST: r["post"].numpy(),
            keys.R_PRIOR: r["prior"].numpy(),
            keys.R_FORMAT: r["format"].numpy(),
            keys.ZERO_VAR: zero_var.numpy(),
            keys.POLICY_VERSION: np.int64(self.version),
            keys.ALPHA_HAT: np.float64(alpha_hat),
        }


NEAR_ZERO_ADV = 0.05
"""|advantage| below this (advantages have unit scale in every mode) counts as near zero."""


def rollout_summary(out: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean reward components, zero-variance share, the spread of rewards within a group
    (how much a group can tell its samples apart: it shrinks as groups homogenize) and the
    share of near-zero advantages of one rollout batch."""
    return {
        keys.ROLLOUT_REWARD: float(out[keys.REWARD].mean()),
        keys.ROLLOUT_R_POST: float(out[keys.R_POST].mean()),
        keys.ROLLOUT_R_PRIOR: float(out[keys.R_PRIOR].mean()),
        keys.ROLLOUT_R_FORMAT: float(out[keys.R_FORMAT].mean()),
        keys.ROLLOUT_ZERO_VAR_FRAC: float(out[keys.ZERO_VAR].mean()),
        keys.ROLLOUT_GROUP_REWARD_STD: float(out[keys.REWARD].std(axis=1).mean()),
        keys.ROLLOUT_NEAR_ZERO_ADV_FRAC: float(
            (np.abs(out[keys.ADVANTAGES]) < NEAR_ZERO_ADV).mean()
        ),
        keys.ROLLOUT_REQUESTS: float(len(out[keys.REQUEST_ID])),
    }
