"""Exploration distributions over fusion weights on the simplex, and the concentration schedule.

Stage 2 draws G weight vectors per request around the rollout policy's output pi (B, K):
``w ~ D(pi)``. Each registered variant (``EXPLORATIONS.get(name)``) has one interface:

- ``sample(pi, group_size, alpha_hat, *, floor, sigma, generator) -> w (B, G, K)``, strictly
  positive, rows summing to 1; no gradient.
- ``log_prob(pi, w, alpha_hat, *, floor, sigma) -> (B, G)``: log-density of w under D(pi),
  w.r.t. Lebesgue measure on the first K-1 coordinates; differentiable w.r.t. pi.
- ``kl(pi_p, pi_q, alpha_hat, *, floor, sigma) -> (B,)``: exact KL(D(pi_p) || D(pi_q)),
  differentiable w.r.t. both.

Variants: ``dirichlet`` (alpha = max(alpha_hat * pi, floor); uses alpha_hat and floor) and
``gaussian`` (logistic-normal, w = softmax(log pi + sigma * eps); uses sigma only). Every
variant accepts all keyword arguments so callers can switch by name.
"""

from __future__ import annotations

import math

import torch

from grade_ray.algos.registry import Registry

W_MIN = 1e-8
"""Smallest weight a sample may hold (samples are clamped to it and renormalised)."""

_MAX_GAMMA_ROUNDS = 64


class Exploration:
    """Interface of an exploration distribution D(pi) on the simplex (see module docstring)."""

    def sample(
        self,
        pi: torch.Tensor,
        group_size: int,
        alpha_hat: float,
        *,
        floor: float,
        sigma: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw w (B, G, K) ~ D(pi); pi (B, K) on the simplex."""
        raise NotImplementedError

    def log_prob(
        self, pi: torch.Tensor, w: torch.Tensor, alpha_hat: float, *, floor: float, sigma: float
    ) -> torch.Tensor:
        """log D(pi)(w): pi (B, K), w (B, G, K) -> (B, G)."""
        raise NotImplementedError

    def kl(
        self,
        pi_p: torch.Tensor,
        pi_q: torch.Tensor,
        alpha_hat: float,
        *,
        floor: float,
        sigma: float,
    ) -> torch.Tensor:
        """KL(D(pi_p) || D(pi_q)): pi_p, pi_q (B, K) -> (B,)."""
        raise NotImplementedError


EXPLORATIONS: Registry[Exploration] = Registry("exploration")


def _finalize_sample(w: torch.Tensor) -> torch.Tensor:
    """Clamp to >= W_MIN and renormalise so that every log-density stays finite."""
    w = w.clamp_min(W_MIN)
    return w / w.sum(-1, keepdim=True)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (short, K-long) axis; several times faster on CPU than
    ``torch.softmax`` for (B, G, K) samples, whose per-row dispatch dominates at small K."""
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def safe_log(w: torch.Tensor) -> torch.Tensor:
    """log(max(w, tiny)): what :meth:`DirichletExploration.log_prob` takes of its samples."""
    return torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))


_safe_log = safe_log


def _check_group(pi: torch.Tensor, group_size: int) -> None:
    if pi.dim() != 2:
        raise ValueError(f"pi must be (B, K), got shape {tuple(pi.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def log_standard_gamma(alpha: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """log X, X ~ Gamma(alpha, 1) elementwise (Marsaglia-Tsang with the alpha < 1 boost).

    alpha: any shape, > 0, finite. Returns alpha's shape and dtype, computed in that dtype.
    For alpha < 1 draws X = Y * U^(1/alpha), Y ~ Gamma(alpha + 1), in log space so tiny
    alpha does not underflow. Takes a generator (torch's own gamma sampler does not), so
    rollouts are reproducible. The first proposal covers every element at once; only the
    rejected few (< 5%) are proposed again, so the cost is a dozen elementwise passes.
    """
    a = alpha.detach().reshape(-1)
    if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    if a.numel() == 0:
        return torch.empty(alpha.shape, dtype=alpha.dtype, device=alpha.device)
    lo, hi = torch.aminmax(a)  # NaN propagates, so one reduction checks all three cases
    if not (bool(lo > 0) and bool(hi < math.inf)):
        raise ValueError("gamma concentrations must be finite and > 0")
    boost = a < 1
    d = torch.where(boost, a + 1.0, a) - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)

    def propose(dt: torch.Tensor, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(dt.shape, generator=generator, dtype=dt.dtype, device=dt.device)
        u = torch.rand(dt.shape, generator=generator, dtype=dt.dtype, device=dt.device)
        v = (1.0 + ct * x).pow_(3)
        log_v = torch.log(v.clamp_min(torch.finfo(dt.dtype).tiny))
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dt - dt * v + dt * log_v)
        return torch.log(dt) + log_v, ok

    out, ok = propose(d, c)
    todo = torch.nonzero(~ok).reshape(-1)
    for _ in range(_MAX_GAMMA_ROUNDS):  # acceptance >= 95% per round; rounds, not elements
        if todo.numel() == 0:
            break
        val, ok = propose(d[todo], c[todo])
        out[todo[ok]] = val[ok]
        todo = todo[~ok]
    if todo.numel():
        raise RuntimeError("gamma sampler did not converge; concentrations out of range?")
    u = torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
    out = torch.where(boost, out + torch.log(u.clamp_min(torch.finfo(a.dtype).tiny)) / a, out)
    return out.reshape(alpha.shape).to(alpha.dtype)


def dirichlet_concentration(pi: torch.Tensor, alpha_hat: float, floor: float) -> torch.Tensor:
    """alpha = max(alpha_hat * pi, floor). pi (B, K) -> (B, K); E[w] = pi when no floor binds."""
    if alpha_hat <= 0 or floor <= 0:
        raise ValueError(f"alpha_hat and floor must be > 0, got {alpha_hat}, {floor}")
    return (alpha_hat * pi).clamp_min(floor)


class DirichletExploration(Exploration):
    """w ~ Dirichlet(alpha), alpha = max(alpha_hat * pi, floor): mean pi, total concentration
    alpha_hat (larger = tighter around pi). ``sigma`` is ignored."""

    def sample(
        self,
        pi: torch.Tensor,
        group_size: int,
        alpha_hat: float,
        *,
        floor: float,
        sigma: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """pi (B, K) -> w (B, G, K): w = gamma / sum(gamma), gamma_k ~ Gamma(alpha_k)."""
        _check_group(pi, group_size)
        with torch.no_grad():
            alpha = dirichlet_concentration(pi.detach(), alpha_hat, floor)
            alpha = alpha.unsqueeze(1).expand(-1, group_size, -1)
            w = _softmax(log_standard_gamma(alpha, generator))
            return _finalize_sample(w).to(pi.dtype)

    def log_prob(
        self,
        pi: torch.Tensor,
        w: torch.Tensor,
        alpha_hat: float,
        *,
        floor: float,
        sigma: float = 0.0,
    ) -> torch.Tensor:
        """log Dir(w; alpha) = lgamma(sum alpha) - sum lgamma(alpha) + sum (alpha - 1) log w.

        pi (B, K), w (B, G, K) -> (B, G); zero gradient through components where the floor binds.
        """
        alpha = dirichlet_concentration(pi, alpha_hat, floor).unsqueeze(1)  # (B, 1, K)
        norm = torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)
        return norm + ((alpha - 1.0) * _safe_log(w.to(alpha.dtype))).sum(-1)

    def kl(
        self,
        pi_p: torch.Tensor,
        pi_q: torch.Tensor,
        alpha_hat: float,
        *,
        floor: float,
        sigma: float = 0.0,
    ) -> torch.Tensor:
        """KL(Dir(a) || Dir(b)) = lgamma(a0) - sum lgamma(a) - lgamma(b0) + sum lgamma(b)
        + sum (a - b)(digamma(a) - digamma(a0)); a, b the floored concentrations. (B, K) -> (B,)."""
        a = dirichlet_concentration(pi_p, alpha_hat, floor)
        b = dirichlet_concentration(pi_q, alpha_hat, floor)
        a0, b0 = a.sum(-1), b.sum(-1)
        return (
            torch.lgamma(a0)
            - torch.lgamma(a).sum(-1)
            - torch.lgamma(b0)
            + torch.lgamma(b).sum(-1)
            + ((a - b) * (torch.digamma(a) - torch.digamma(a0).unsqueeze(-1))).sum(-1)
        )


def _alr_mean(pi: torch.Tensor) -> torch.Tensor:
    """Additive log-ratio mean mu_k = log pi_k - log pi_K, k < K. (B, K) -> (B, K-1)."""
    log_pi = _safe_log(pi)
    return log_pi[..., :-1] - log_pi[..., -1:]


def _check_sigma(sigma: float) -> None:
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 for gaussian exploration, got {sigma}")


class GaussianExploration(Exploration):
    """Logistic-normal: w = softmax(log pi + sigma * eps), eps ~ N(0, I_K).

    In additive log-ratio coordinates y_k = log(w_k / w_K), k < K:
    y ~ N(mu, sigma^2 (I + 1 1^T)), mu_k = log pi_k - log pi_K. The median of w is pi (not its
    mean). ``alpha_hat`` and ``floor`` are ignored.
    """

    def sample(
        self,
        pi: torch.Tensor,
        group_size: int,
        alpha_hat: float = 0.0,
        *,
        floor: float = 0.0,
        sigma: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """pi (B, K) -> w (B, G, K) = softmax(log pi + sigma * eps), clamped to >= W_MIN."""
        _check_group(pi, group_size)
        _check_sigma(sigma)
        with torch.no_grad():
            b, k = pi.shape
            eps = torch.randn(
                (b, group_size, k), generator=generator, dtype=pi.dtype, device=pi.device
            )
            logits = _safe_log(pi.detach()).unsqueeze(1) + sigma * eps
            return _finalize_sample(_softmax(logits))

    def log_prob(
        self,
        pi: torch.Tensor,
        w: torch.Tensor,
        alpha_hat: float = 0.0,
        *,
        floor: float = 0.0,
        sigma: float,
    ) -> torch.Tensor:
        """log p(w) = log N(y; mu, Sigma) - sum_{k=1..K} log w_k, with Sigma = sigma^2 (I + 11^T),
        Sigma^{-1} = (I - 11^T / K) / sigma^2, log det Sigma = (K-1) log sigma^2 + log K.
        pi (B, K), w (B, G, K) -> (B, G)."""
        _check_sigma(sigma)
        k = pi.shape[-1]
        log_w = _safe_log(w.to(pi.dtype))
        y = log_w[..., :-1] - log_w[..., -1:]  # (B, G, K-1)
        diff = y - _alr_mean(pi).unsqueeze(1)
        quad = (diff.pow(2).sum(-1) - diff.sum(-1).pow(2) / k) / sigma**2
        log_norm = 0.5 * ((k - 1) * math.log(2 * math.pi * sigma**2) + math.log(k))
        return -0.5 * quad - log_norm - log_w.sum(-1)

    def kl(
        self,
        pi_p: torch.Tensor,
        pi_q: torch.Tensor,
        alpha_hat: float = 0.0,
        *,
        floor: float = 0.0,
        sigma: float,
    ) -> torch.Tensor:
        """KL = 0.5 d^T Sigma^{-1} d = 0.5 (|d|^2 - (sum d)^2 / K) / sigma^2, d = mu_p - mu_q
        (same covariance, so no trace/log-det terms). (B, K) -> (B,)."""
        _check_sigma(sigma)
        k = pi_p.shape[-1]
        d = _alr_mean(pi_p) - _alr_mean(pi_q)
        return 0.5 * (d.pow(2).sum(-1) - d.sum(-1).pow(2) / k) / sigma**2


EXPLORATIONS.register("dirichlet")(DirichletExploration())
EXPLORATIONS.register("gaussian")(GaussianExploration())


# --- concentration schedule -------------------------------------------------------------------

SCHEDULES: Registry = Registry("alpha schedule")


@SCHEDULES.register("cosine")
def _cosine(p: float, start: float, end: float) -> float:
    return start + (end - start) * (1.0 - math.cos(math.pi * p)) / 2.0


@SCHEDULES.register("linear")
def _linear(p: float, start: float, end: float) -> float:
    return start + (end - start) * p


@SCHEDULES.register("constant")
def _constant(p: float, start: float, end: float) -> float:
    return start


def alpha_schedule(progress: float, start: float, end: float, shape: str) -> float:
    """Total Dirichlet concentration alpha_hat_t at training progress t.

    progress: fraction of training done, clamped to [0, 1]; start, end: alpha_hat at 0 and 1
    (paper: 5 -> 15, explore then exploit); shape in SCHEDULES:
    cosine: start + (end - start) (1 - cos(pi t)) / 2; linear: start + (end - start) t;
    constant: start.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(SCHEDULES.get(shape)(p, start, end))
