"""Per-round policy diagnostics and detectors for GRADE's known failure signatures.

- weight polarization: many weight vectors with one weight > 0.9;
- no personalization: weights near-identical across users;
- training instability: KL or loss spikes against the run's history;
- reward hacking: the training reward (R_post) rises while a business
  metric measured outside the reward (held-out north-star / NDCG) falls.
"""

from __future__ import annotations

import numpy as np

from grade_ray import keys

POLARIZED_MAX_W = 0.9
POLARIZED_WARN_FRAC = 0.5
SPREAD_WARN = 0.01
SPIKE_FACTOR = 5.0
STALLED_GRAD_NORM = 1e-7
"""A round whose mean GRPO gradient norm is below this did not move the policy."""
FULLY_POLARIZED_FRAC = 0.99
HACK_WINDOW = 3
"""Reward hacking is judged over this many latest rounds ..."""
HACK_MIN_REL = 0.005
"""... when R_post rose and the business metric fell, each by more than this fraction (moves
within noise, e.g. between rounds on different days, do not count)."""


def policy_diagnostics(
    pi: np.ndarray,
    task_names: tuple[str, ...],
    segments: np.ndarray | None = None,
    segment_names: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """pi: (B, K) policy weights on held-out requests -> flat metric dict.

    weight_entropy = mean_b -sum_k pi log pi; polarized_frac = share with
    max_k pi > 0.9; user_spread = mean_k std_b pi_k (0 = no personalization).
    With ground-truth ``segments`` (B,) also the mean weights per segment.
    """
    p = np.clip(pi, 1e-12, 1.0)
    out = {
        keys.POLICY_ENTROPY: float((-(p * np.log(p)).sum(axis=1)).mean()),
        keys.POLICY_POLARIZED: float((pi.max(axis=1) > POLARIZED_MAX_W).mean()),
        keys.POLICY_SPREAD: float(pi.std(axis=0).mean()),
    }
    for k, name in enumerate(task_names):
        out[f"{keys.POLICY_MEAN_W}/{name}"] = float(pi[:, k].mean())
    if segments is not None and segment_names is not None:
        for s, sname in enumerate(segment_names):
            sel = segments == s
            if sel.any():
                for k, name in enumerate(task_names):
                    out[f"{keys.SEGMENT_MEAN_W}/{sname}/w_{name}"] = float(pi[sel, k].mean())
    return out


def failure_warnings(history: list[dict[str, float]], business_key: str | None = None) -> list[str]:
    """Warnings for the latest round given all rounds' metrics so far (oldest first)."""
    if not history:
        return []
    cur = history[-1]
    warns = []
    grad = cur.get(keys.LEARNER_GRAD_NORM)
    if grad is not None and grad < STALLED_GRAD_NORM:
        warns.append(
            f"Stage 2 cannot move: the GRPO gradient norm is {grad:.2g} (weight entropy "
            f"{cur.get(keys.POLICY_ENTROPY, float('nan')):.3f}, "
            f"{cur.get(keys.POLICY_POLARIZED, float('nan')):.0%} of requests polarized): the "
            "policy's softmax is saturated, usually by Stage 1; retrain Stage 1 with "
            "pretrain.logit_bound > 0 (e.g. 8) or a lower pretrain.lr / fewer pretrain.epochs"
        )
    elif cur.get(keys.POLICY_POLARIZED, 0.0) >= FULLY_POLARIZED_FRAC:
        warns.append(
            f"the policy is fully polarized ({cur[keys.POLICY_POLARIZED]:.0%} of requests put > "
            f"{POLARIZED_MAX_W} on one task): exploration around it finds little; check "
            "pretrain.logit_bound, raise reward.l3 / the format rules or grpo.beta"
        )
    elif cur.get(keys.POLICY_POLARIZED, 0.0) > POLARIZED_WARN_FRAC:
        warns.append(
            f"weight polarization: {cur[keys.POLICY_POLARIZED]:.0%} of requests put > "
            f"{POLARIZED_MAX_W} on one task (raise reward.l3 / the format rules or grpo.beta)"
        )
    if keys.POLICY_SPREAD in cur and cur[keys.POLICY_SPREAD] < SPREAD_WARN:
        warns.append(
            f"no personalization: weights vary by only {cur[keys.POLICY_SPREAD]:.4f} across "
            "users (context may not reveal preferences, or beta pins the policy to the reference)"
        )
    for key in (keys.LEARNER_KL, keys.LEARNER_LOSS):
        past = [abs(h[key]) for h in history[:-1] if key in h]
        if len(past) >= 2 and key in cur:
            base = float(np.median(past))
            if abs(cur[key]) > SPIKE_FACTOR * max(base, 1e-6):
                warns.append(
                    f"training instability: {key}={cur[key]:.4g} is > "
                    f"{SPIKE_FACTOR:g}x its median {base:.4g} (lower grpo.lr)"
                )
    if business_key:
        win = [h for h in history[-HACK_WINDOW:] if business_key in h and keys.ROLLOUT_R_POST in h]
        if len(win) >= 2:
            first, last = win[0], win[-1]
            post, biz = keys.ROLLOUT_R_POST, business_key
            post_up = last[post] - first[post] > HACK_MIN_REL * abs(first[post])
            biz_down = first[biz] - last[biz] > HACK_MIN_REL * abs(first[biz])
            if post_up and biz_down:
                warns.append(
                    f"possible reward hacking: over the last {len(win)} rounds R_post rose "
                    f"({first[post]:.4f} -> {last[post]:.4f}) while {biz} fell "
                    f"({first[biz]:.4f} -> {last[biz]:.4f}); check the reward's gains and "
                    "propensities against the business metric"
                )
    return warns
