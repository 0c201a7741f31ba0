"""Stage-2 rewards: re-rank a request's candidates with each sampled weight vector and score it.

R = l1 * R_post + l2 * R_prior + l3 * R_format * 1[l1 * R_post + l2 * R_prior >= tau]

- R_post:   NDCG@k with gains from observed feedback (sparse, real).
- R_prior:  NDCG@k with gains from the upstream model's predicted value (dense).
- R_format: share of configured weight-hierarchy rules (a, b), meaning w_a >= w_b, that hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grade_ray.algos.fusion import fuse, fuse_items
from grade_ray.algos.metrics import (
    gather_gains,
    ideal_dcg_at_k,
    ndcg_from_dcg,
    rank_discounts,
    topk_indices,
)

# Keys of the dict returned by group_rewards.
REWARD = "reward"
POST = "post"
PRIOR = "prior"
FORMAT = "format"


def format_reward(weights: torch.Tensor, rules: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Share of hierarchy rules satisfied by each weight vector.

    weights: (B, G, K) (or (B, K)) on the simplex; rules: pairs (a, b) meaning w_a >= w_b, with
    0 <= a, b < K. Returns weights.shape[:-1] in [0, 1]:
    R_format = (1 / |rules|) sum_{(a, b)} 1[w_a >= w_b]; 1.0 everywhere if there are no rules.
    """
    shape = weights.shape[:-1]
    if not rules:
        return torch.ones(shape, dtype=weights.dtype, device=weights.device)
    k = weights.shape[-1]
    for a, b in rules:
        if not (0 <= a < k and 0 <= b < k):
            raise ValueError(f"format rule ({a}, {b}) has a task index outside [0, {k})")
    a_idx = torch.tensor([a for a, _ in rules], device=weights.device)
    b_idx = torch.tensor([b for _, b in rules], device=weights.device)
    ok = weights.index_select(-1, a_idx) >= weights.index_select(-1, b_idx)
    return ok.to(weights.dtype).mean(-1)


def composite_reward(
    r_post: torch.Tensor,
    r_prior: torch.Tensor,
    r_format: torch.Tensor,
    *,
    l1: float,
    l2: float,
    l3: float,
    tau: float,
) -> torch.Tensor:
    """Gated composite reward. All inputs (B, G); returns (B, G).

    R = l1 * R_post + l2 * R_prior + l3 * R_format * 1[l1 * R_post + l2 * R_prior >= tau].
    The format term counts only once the ranking itself is good enough (the gate), so a policy
    cannot earn reward from the weight hierarchy alone.
    """
    base = l1 * r_post + l2 * r_prior
    return base + l3 * r_format * (base >= tau).to(base.dtype)


def group_rewards(
    scores: torch.Tensor,
    weights: torch.Tensor,
    post_gain: torch.Tensor,
    prior_gain: torch.Tensor,
    mask: torch.Tensor,
    *,
    fusion: str,
    k: int,
    rules: Sequence[tuple[int, int]],
    l1: float,
    l2: float,
    l3: float,
    tau: float,
    fusion_eps: float = 1e-6,
    post_scale: float | None = None,
    prior_scale: float | None = None,
    item_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rewards of G sampled weight vectors per request (the rollout hot path).

    scores: (B, N, K) upstream predictions; weights: (B, G, K) sampled fusion weights;
    post_gain, prior_gain: (B, N) >= 0; mask: (B, N) bool (True = real); fusion: a name in
    ``FUSIONS``; k >= 1 the NDCG cutoff. For every (b, g): s = fuse(scores_b, w_bg) (N,),
    re-rank the real candidates by s (ties to the lower index), then
    post = NDCG@k(s; post_gain), prior = NDCG@k(s; prior_gain), format = format_reward(w),
    reward = composite_reward(post, prior, format; l1, l2, l3, tau).
    With ``post_scale`` (``prior_scale``) > 0, post (prior) = DCG@k / scale instead of NDCG:
    one constant for every request (e.g. the mean IDCG@k over the training logs), so requests
    weigh by their feedback's value as in a summed business metric, not equally.
    ``item_weights`` (B, G, N, K) (item-aware policies): rank by these per-candidate weights
    instead; ``weights`` (B, G, K) then only feed the format rules.
    Returns {"reward", "post", "prior", "format"}: each (B, G) float. No gradient.
    Vectorized over B and G; the ideal DCGs depend only on the gains, so they are computed once
    per request.
    """
    with torch.no_grad():
        if item_weights is None:
            fused = fuse(fusion, scores, weights, fusion_eps)  # (B, G, N)
        else:
            fused = fuse_items(fusion, scores, item_weights, fusion_eps)
        idx = topk_indices(fused, mask, k)  # (B, G, kk)
        disc = rank_discounts(idx.shape[-1], post_gain.dtype, post_gain.device)
        m = mask.bool()
        zero = torch.zeros((), dtype=post_gain.dtype, device=post_gain.device)
        out: dict[str, torch.Tensor] = {}
        for name, gains, scale in ((POST, post_gain, post_scale), (PRIOR, prior_gain, prior_scale)):
            g = torch.where(m, gains, zero)
            dcg = (gather_gains(g, idx) * disc).sum(-1)
            out[name] = dcg / scale if scale else ndcg_from_dcg(dcg, ideal_dcg_at_k(g, m, k))
        out[FORMAT] = format_reward(weights, rules).to(out[POST].dtype)
        out[REWARD] = composite_reward(
            out[POST], out[PRIOR], out[FORMAT], l1=l1, l2=l2, l3=l3, tau=tau
        )
    return out
