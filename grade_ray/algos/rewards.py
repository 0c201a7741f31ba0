"""Stage-2 rewards: re-rank a request's candidates with each sampled weight vector and score it.

R = l1 * R_post + l2 * R_prior + l3 * R_format * 1[l1 * R_post + l2 * R_prior >= tau]

- R_post:   NDCG@k with gains from observed feedback (sparse, real).
- R_prior:  NDCG@k with gains from the upstream model's predicted value (dense).
- R_format: by ``format_kind`` (``FORMATS``): 'rules', the share of configured
  weight-hierarchy rules (a, b), meaning w_a >= w_b, that hold; 'learned', how typical w is of
  a Dirichlet fitted to the weights that rank the training logs best (``learned_format_reward``);
  'none', 0 (no format term).
"""

from __future__ import annotations

import dataclasses
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
from grade_ray.algos.registry import Registry

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


W_EPS = 1e-6
"""Weights are clamped here before log w_k (Dirichlet samples can be exactly 0 in float32)."""


@dataclasses.dataclass(frozen=True)
class FittedDirichlet:
    """The learned format constraint: Dir(alpha) fitted to the weights that rank well.

    alpha: (K,) concentrations (each >= 1: one mode, no density spike at w_k = 0);
    ref_logpdf: (M,) ascending log-densities of M reference draws from Dir(alpha), the table
    that turns a log-density into the share of the fitted mass less typical than it.
    """

    alpha: tuple[float, ...]
    ref_logpdf: tuple[float, ...]


def dirichlet_log_density(weights: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log Dir(w; alpha) for weights (..., K) (clamped at ``W_EPS``), alpha (K,) > 0.

    = sum_k (alpha_k - 1) log w_k + lgamma(sum_k alpha_k) - sum_k lgamma(alpha_k).
    Returns weights.shape[:-1] in alpha's dtype."""
    a = alpha.to(weights.device)
    logw = weights.to(a.dtype).clamp_min(W_EPS).log()
    return ((a - 1) * logw).sum(-1) + torch.lgamma(a.sum()) - torch.lgamma(a).sum()


def learned_format_reward(weights: torch.Tensor, fitted: FittedDirichlet) -> torch.Tensor:
    """How typical each weight vector is of the fitted Dirichlet, in [0, 1].

    weights: (..., K) on the simplex with K = len(fitted.alpha). Returns weights.shape[:-1]:
    R_format = P_{w' ~ Dir(alpha)}[log p(w') <= log p(w)], estimated on the M reference draws
    (the share of the fitted mass w is at least as typical as): 1 at the mode, near 0 far in
    the tails, and uniform on [0, 1] when w itself is drawn from the fit, whatever alpha's
    concentration (so l3 and tau mean what they mean with rules).
    """
    k = weights.shape[-1]
    if len(fitted.alpha) != k:
        raise ValueError(
            f"the learned format constraint has {len(fitted.alpha)} tasks, weights {k}"
        )
    ref = torch.tensor(fitted.ref_logpdf, dtype=torch.float64, device=weights.device)
    lp = dirichlet_log_density(weights, torch.tensor(fitted.alpha, dtype=torch.float64))
    share = torch.searchsorted(ref, lp.contiguous(), right=True).to(torch.float64) / len(ref)
    return share.to(weights.dtype)


FORMATS: Registry = Registry("reward format")
"""R_format variants; each ``fn(weights (..., K), *, rules, fitted) -> (...) in [0, 1]``."""


@FORMATS.register("rules")
def _rules_format(weights, *, rules, fitted):
    return format_reward(weights, rules)


@FORMATS.register("learned")
def _learned_format(weights, *, rules, fitted):
    if fitted is None:
        raise ValueError("format 'learned' needs the Dirichlet fitted on the training logs")
    return learned_format_reward(weights, fitted)


@FORMATS.register("none")
def _no_format(weights, *, rules, fitted):
    return torch.zeros(weights.shape[:-1], dtype=weights.dtype, device=weights.device)


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
    format_kind: str = "rules",
    fitted: FittedDirichlet | None = None,
    item_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rewards of G sampled weight vectors per request (the rollout hot path).

    scores: (B, N, K) upstream predictions; weights: (B, G, K) sampled fusion weights;
    post_gain, prior_gain: (B, N) >= 0; mask: (B, N) bool (True = real); fusion: a name in
    ``FUSIONS``; k >= 1 the NDCG cutoff. For every (b, g): s = fuse(scores_b, w_bg) (N,),
    re-rank the real candidates by s (ties to the lower index), then
    post = NDCG@k(s; post_gain), prior = NDCG@k(s; prior_gain),
    format = FORMATS[format_kind](w; rules, fitted) (default: the share of ``rules`` that hold),
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
        fmt = FORMATS.get(format_kind)(weights, rules=rules, fitted=fitted)
        out[FORMAT] = fmt.to(out[POST].dtype)
        out[REWARD] = composite_reward(
            out[POST], out[PRIOR], out[FORMAT], l1=l1, l2=l2, l3=l3, tau=tau
        )
    return out
