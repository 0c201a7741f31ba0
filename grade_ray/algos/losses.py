"""Policy and ranking losses: GRPO clipped surrogate with a KL penalty (Stage 2) and
LambdaLoss (Stage 1).

``POLICY_LOSSES.get(name)`` returns ``fn(logp, old_logp, adv, kl, *, clip_eps, beta) ->
(loss, stats)``; ``grpo`` is registered here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grade_ray.algos.metrics import ideal_dcg_at_k, rank_discounts, rank_positions, ranking
from grade_ray.algos.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")

# Keys of the stats dict returned by policy losses.
PG_LOSS = "pg_loss"
KL = "kl"
CLIP_FRAC = "clip_frac"
RATIO_MEAN = "ratio_mean"

_LOG_RATIO_CLAMP = 20.0
K3_BOUND = 10.0
"""Largest value of one k3 KL sample (see :func:`kl_k3`)."""


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, bound: float = K3_BOUND) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) at samples drawn from (approximately) pi.

    logp, ref_logp: (B, G) log-densities of the same samples. Returns (B, G) in [0, bound]:
    k3 = exp(ref - logp) - 1 - (ref - logp), unbiased for KL(pi || ref) when samples ~ pi.
    One sample far in the reference's tail (ref - logp = 20 gives k3 ~ 5e8) would swamp the
    loss, so each value is clamped to ``bound`` (10, as verl does; the clamped samples carry
    no KL gradient).
    """
    delta = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(delta) - 1.0 - delta).clamp(0.0, bound)


@POLICY_LOSSES.register("grpo")
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    kl: torch.Tensor,
    *,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO clipped surrogate plus KL penalty.

    logp: (B, G) log-density of each sampled w under the current policy (with grad);
    old_logp: (B, G) under the rollout policy; adv: (B, G) advantages; kl: (B,) or (B, G)
    KL(pi_theta || pi_ref) per request or per sample; clip_eps > 0; beta >= 0.
    rho = exp(logp - old_logp) (log-ratio clamped to [-20, 20]);
    loss = -mean_{b,g} min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * mean(kl).
    Returns (scalar loss, stats) with stats "pg_loss", "kl" (mean kl), "clip_frac" (share of
    samples whose clipped term is the smaller one, i.e. rho outside [1 - eps, 1 + eps] on the
    side that would increase the objective) and "ratio_mean".
    """
    log_ratio = (logp - old_logp.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = adv.detach()
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    pg_loss = -torch.minimum(surr, surr_clipped).mean()
    kl_mean = kl.mean()
    loss = pg_loss + beta * kl_mean
    with torch.no_grad():
        outside = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)
        clipped = (surr_clipped < surr) & outside
        stats = {
            PG_LOSS: float(pg_loss.detach()),
            KL: float(kl_mean.detach()),
            CLIP_FRAC: float(clipped.float().mean()),
            RATIO_MEAN: float(ratio.mean()),
        }
    return loss, stats


class _WeightedSoftplusSum(torch.autograd.Function):
    """sum(w * softplus(x)) over a pair tensor, its gradient w * sigmoid(x) written by hand:
    a softplus, a product and a sum forward, a sigmoid and a product backward, where
    autograd's graph of the same expression makes about ten passes over the pairs. (Not
    ``torch.dot``: BLAS's result depends on the buffers' alignment, so a resumed run would
    log a loss that differs from the uninterrupted run's in the last digits.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.softplus(x).mul_(w).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, w = ctx.saved_tensors
        return torch.sigmoid(x).mul_(w).mul_(grad), None


class PairRows(NamedTuple):
    """LambdaLoss pairs as rows of one anchor item against C items of its request.

    request: (R,) each row's request; anchor: (R,) its flat (request * N + item) index;
    cols: (B, C) the column items of each request's rows, or None for all N items (C = N);
    weight: (R, C) the pairs' |delta NDCG| weights (0 for what is not a pair); flip: (R, C)
    the sign of g_anchor - g_column, or None where the anchor always has the higher gain.
    Every weighted pair of the batch is exactly one entry of one :class:`PairRows`.
    """

    request: torch.Tensor
    anchor: torch.Tensor
    cols: torch.Tensor | None
    weight: torch.Tensor
    flip: torch.Tensor | None


def top_rows(g_norm, disc, top, m) -> list[PairRows]:
    """Rows of each request's top kk items (|D_i - D_j| = 0 when both rank beyond kk) against
    the real items ranked below them (padded items rank last: their D is set above every
    D_row): B x kk x N pairs for top (B, kk), the items at ranks 0..kk-1. Only requests
    with a positive gain get rows."""
    n = g_norm.shape[-1]
    has_pos = (g_norm > 0).any(-1)
    top = top[has_pos]
    request = has_pos.nonzero().squeeze(-1).repeat_interleave(top.shape[-1])
    anchor = request * n + top.reshape(-1)
    gap = g_norm.index_select(0, request).neg_().add_(g_norm.view(-1)[anchor].unsqueeze(-1))
    below = disc.masked_fill(~m, 2.0).index_select(0, request)
    weight = below.neg_().add_(disc.view(-1)[anchor].unsqueeze(-1)).clamp_min_(0.0)
    return [PairRows(request, anchor, None, weight.mul_(gap.abs()), gap.sign_())]


def positive_rows(g_norm, disc, rank, top, m) -> list[PairRows]:
    """Rows of each positive-gain item (the higher-gain item of every weighted pair has a
    positive gain) against the real items of lower gain (a padded item's gain is taken as
    +inf, so it is never lower): a positive item in the top kk against all N items, one
    ranked below them against the top kk only (|D_i - D_j| = 0 when both rank beyond kk).
    With sparse feedback, far fewer pairs than :func:`top_rows`. rank (B, N) the items'
    ranks, top (B, kk) the items at ranks 0..kk-1."""
    n = g_norm.shape[-1]
    kk = top.shape[-1]
    g_real = g_norm.masked_fill(~m, math.inf)
    positive = g_norm > 0
    in_top = rank < kk
    out = []
    for anchor in (positive & in_top, positive & ~in_top):
        anchor = anchor.view(-1).nonzero().squeeze(-1)
        request = anchor.div(n, rounding_mode="floor")
        if not out:  # in the top kk: against all N items
            cols, g_cols = None, g_real.index_select(0, request)
            d_cols = disc.index_select(0, request)
        else:  # below the top kk: against the top kk items
            cols = top
            g_cols = g_real.gather(-1, top).index_select(0, request)
            d_cols = disc.gather(-1, top).index_select(0, request)
        weight = g_cols.neg_().add_(g_norm.view(-1)[anchor].unsqueeze(-1)).clamp_min_(0.0)
        weight.mul_(d_cols.sub_(disc.view(-1)[anchor].unsqueeze(-1)).abs_())
        out.append(PairRows(request, anchor, cols, weight, None))
    return out


def lambda_loss(
    fused: torch.Tensor,
    gains: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int | None = None,
    temperature: float = 1.0,
    eps: float = 1e-10,
) -> torch.Tensor:
    """LambdaLoss with LambdaRank |delta NDCG@k| pair weights (Wang et al. 2018, "lambdaRank"
    scheme in allRank), linear gains.

    fused: (B, N) fused scores (with grad); gains: (B, N) >= 0; mask: (B, N) bool (True = real);
    k: NDCG cutoff (None = N); temperature > 0.
    With r_i the current 0-based rank of i (by fused, detached; ties to the lower index),
    D_i = 1 / log2(r_i + 2) if r_i < k else 0, and IDCG the ideal DCG@k of the request:
      w_ij = (g_i - g_j) / IDCG * |D_i - D_j|   (the NDCG@k change from swapping i and j)
      L_b  = sum_{i, j real, g_i > g_j} w_ij * log2(1 + exp(-(s_i - s_j) / temperature))
    Returns the scalar mean of L_b over requests with a positive gain (0, still differentiable,
    if there are none). Padded candidates and ties contribute no NaN.

    Only rows of pairs that can carry weight are formed (:class:`PairRows`), by whichever
    set is smaller for the batch: each request's top k items (:func:`top_rows`, B x k x N
    pairs) or its positive-gain items (:func:`positive_rows`, R x N for R of them; implicit
    feedback is sparse). Both give the same loss and gradient up to float summation order.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = fused.shape[-1]
    kk = n if k is None else min(k, n)
    m = mask.bool()
    zero = torch.zeros((), dtype=fused.dtype, device=fused.device)
    with torch.no_grad():
        g = torch.where(m, gains.to(fused.dtype), zero)
        ideal = ideal_dcg_at_k(g, m, kk)  # (B,)
        has_pos = ideal > 0
        table = rank_discounts(n, fused.dtype, fused.device)
        table[kk:] = 0.0
        order, rank = ranking(fused.detach(), m)  # (B, N) each
        top = order[..., :kk]  # the items at ranks 0..kk-1
        disc = table[rank]
        g_norm = g / ideal.clamp_min(eps).unsqueeze(-1)
        # positive_rows' pair count, counted before building any: (in top kk) x N + (below) x kk
        positive = g > 0
        n_top = int((positive & (rank < kk)).sum())
        positive_pairs = n_top * n + (int(positive.sum()) - n_top) * kk
        if positive_pairs <= int(has_pos.sum()) * kk * n:
            rows = positive_rows(g_norm, disc, rank, top, m)
        else:  # dense feedback: the top-k rows are fewer
            rows = top_rows(g_norm, disc, top, m)
    s = fused.masked_fill(~m, 0.0) / temperature
    total = fused.new_zeros(())
    for r in rows:
        # s_col - s_anchor: the margin by which the anchor (the higher gain) should win,
        # negated (flip turns it where the column item has the higher gain). Gathers whose
        # gradient is index_add_ / scatter_add_, not advanced indexing: its backward
        # (index_put_ with accumulate) adds repeated indices in a thread-dependent order.
        s_cols = (s if r.cols is None else s.gather(-1, r.cols)).index_select(0, r.request)
        x = s_cols - s.view(-1).index_select(0, r.anchor).unsqueeze(-1)
        total = total + _WeightedSoftplusSum.apply(x if r.flip is None else x * r.flip, r.weight)
    return total / math.log(2.0) / has_pos.sum().clamp_min(1)


def lambda_loss_dense_reference(
    fused: torch.Tensor,
    gains: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int | None = None,
    temperature: float = 1.0,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Reference only (tests and ``grade-ray bench``; training uses :func:`lambda_loss`):
    the same loss over all (B, N, N) pairs, as the kernel computed it before top-k pairs.

    Arguments and value as :func:`lambda_loss`; pairs with both items beyond k are formed
    and weigh 0, so the two agree up to floating-point summation order.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = fused.shape[-1]
    kk = n if k is None else min(k, n)
    m = mask.bool()
    zero = torch.zeros((), dtype=fused.dtype, device=fused.device)
    with torch.no_grad():
        g = torch.where(m, gains.to(fused.dtype), zero)
        ideal = ideal_dcg_at_k(g, m, kk)
        has_pos = ideal > 0
        table = rank_discounts(n, fused.dtype, fused.device)
        table[kk:] = 0.0
        disc = table[rank_positions(fused.detach(), m)]
        g_norm = g / ideal.clamp_min(eps).unsqueeze(-1)
        pair = (g.unsqueeze(-1) > g.unsqueeze(-2)) & m.unsqueeze(-1) & m.unsqueeze(-2)
        weight = (g_norm.unsqueeze(-1) - g_norm.unsqueeze(-2)) * (
            disc.unsqueeze(-1) - disc.unsqueeze(-2)
        ).abs()
        weight = torch.where(pair, weight, zero)
    s = fused.masked_fill(~m, 0.0)
    diff = (s.unsqueeze(-1) - s.unsqueeze(-2)) / temperature
    per_request = (weight * F.softplus(-diff)).sum((-1, -2)) / math.log(2.0)
    return (per_request * has_pos).sum() / has_pos.sum().clamp_min(1)


class _DirichletGRPO(torch.autograd.Function):
    """Forward: the GRPO loss of Dirichlet samples with the exact KL penalty, and its gradient
    w.r.t. pi, both in one pass; backward scales that gradient (see
    :func:`dirichlet_grpo_loss`)."""

    @staticmethod
    def forward(ctx, pi, pi_ref, log_w, old_logp, adv, alpha_hat, floor, clip_eps, beta):
        # The forward values repeat DirichletExploration.log_prob / .kl and grpo_loss op by
        # op (same expressions, same order), so they are bitwise the composed ones.
        scaled = alpha_hat * pi
        a = scaled.clamp_min(floor)  # (B, K)
        a0 = a.sum(-1)
        lg_a = torch.lgamma(a).sum(-1)
        norm = torch.lgamma(a0).unsqueeze(-1) - lg_a.unsqueeze(-1)  # (B, 1)
        logp = norm + ((a.unsqueeze(1) - 1.0) * log_w).sum(-1)  # (B, G)
        b = (alpha_hat * pi_ref).clamp_min(floor)
        b0 = b.sum(-1)
        psi_a, psi_a0 = torch.digamma(a), torch.digamma(a0)
        kl = (
            torch.lgamma(a0)
            - lg_a
            - torch.lgamma(b0)
            + torch.lgamma(b).sum(-1)
            + ((a - b) * (psi_a - psi_a0.unsqueeze(-1))).sum(-1)
        )
        diff = logp - old_logp
        log_ratio = diff.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        surr = ratio * adv
        surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
        pg_loss = -torch.minimum(surr, surr_clipped).mean()
        kl_mean = kl.mean()
        loss = pg_loss + beta * kl_mean
        # the clipped term is the smaller one only outside [1 - eps, 1 + eps] (inside, clamp
        # returns ratio itself and the two terms are equal): grpo_loss's clip_frac
        clipped = surr_clipped < surr
        stats = torch.stack([pg_loss, kl_mean, clipped.float().mean(), ratio.mean()])

        # d loss / d ratio, as autograd takes it through grpo_loss: -adv / n where the
        # unclipped term is the minimum, 0 where the clipped one is smaller (ratio beyond
        # a bound). On ties minimum() gives each side half and clamp() passes its half
        # inside [1 - eps, 1 + eps], bounds included, where the ties with adv != 0 lie:
        # the halves add up to -adv / n, bitwise (halving and doubling are exact)
        d_ratio = torch.full_like(surr, -1.0 / logp.numel()).masked_fill_(clipped, 0.0) * adv
        c = d_ratio * ratio * ((diff >= -_LOG_RATIO_CLAMP) & (diff <= _LOG_RATIO_CLAMP))
        # logp = lgamma(a0) - sum lgamma(a) + sum_k (a_k - 1) log w_k:
        #   d/da_k = sum_g c_g (digamma(a0) - digamma(a_k) + log w_gk)
        d_a = c.sum(1, keepdim=True) * (psi_a0.unsqueeze(-1) - psi_a) + (
            c.unsqueeze(-1) * log_w
        ).sum(1)
        # KL(Dir(a) || Dir(b)): d/da_k = (a_k - b_k) trigamma(a_k) - (a0 - b0) trigamma(a0)
        d_kl = (a - b) * torch.polygamma(1, a) - ((a0 - b0) * torch.polygamma(1, a0)).unsqueeze(-1)
        d_a = d_a + (beta / kl.numel()) * d_kl
        # clamp_min passes the gradient where alpha_hat * pi >= floor
        ctx.save_for_backward(d_a * alpha_hat * (scaled >= floor))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (d_pi,) = ctx.saved_tensors
        return grad_loss * d_pi, None, None, None, None, None, None, None, None


def dirichlet_grpo_loss(
    pi: torch.Tensor,
    pi_ref: torch.Tensor,
    log_w: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    alpha_hat: float,
    *,
    floor: float,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`grpo_loss` of Dirichlet exploration samples with the exact KL penalty, fused:
    the value of ``grpo_loss(log_prob(pi, w), old_logp, adv, kl(pi, pi_ref), ...)`` with
    :class:`~grade_ray.algos.exploration.DirichletExploration`, and the same gradient
    w.r.t. pi, computed by hand in the forward pass instead of by autograd through ~70
    small ops (the per-op overhead of the composed version was most of the loss's time at
    the learner's 512-request minibatches).

    pi: (B, K) with grad; pi_ref: (B, K) no grad; log_w: (B, G, K) = log(max(w, tiny)) of
    the samples; old_logp, adv: (B, G); alpha_hat, floor > 0 as in
    :func:`~grade_ray.algos.exploration.dirichlet_concentration`. Returns (scalar loss,
    stats) like :func:`grpo_loss`. The loss and stats are bitwise the composed ones; the
    gradient agrees up to floating-point rounding (the KL's terms are simplified).
    """
    if alpha_hat <= 0 or floor <= 0:
        raise ValueError(f"alpha_hat and floor must be > 0, got {alpha_hat}, {floor}")
    loss, stats = _DirichletGRPO.apply(
        pi,
        pi_ref.detach(),
        log_w,
        old_logp.detach(),
        adv.detach(),
        alpha_hat,
        floor,
        clip_eps,
        beta,
    )
    pg, kl, clip_frac, ratio_mean = stats.tolist()
    return loss, {PG_LOSS: pg, KL: kl, CLIP_FRAC: clip_frac, RATIO_MEAN: ratio_mean}
