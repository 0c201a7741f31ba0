"""Exploration distributions: densities and KL vs torch.distributions, sample moments,
schedules, and a short GRPO training smoke test for every registered variant."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Dirichlet, MultivariateNormal, kl_divergence

from grade_ray.algos.advantages import group_advantages
from grade_ray.algos.exploration import EXPLORATIONS, SCHEDULES, W_MIN, alpha_schedule
from grade_ray.algos.losses import grpo_loss

KW = {"floor": 0.05, "sigma": 0.5}
DIR = EXPLORATIONS.get("dirichlet")
GAUSS = EXPLORATIONS.get("gaussian")


def policy(seed: int, b: int = 6, k: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, k, generator=g), dim=-1)


def alr_cov(k: int, sigma: float) -> torch.Tensor:
    return sigma**2 * (torch.eye(k - 1) + torch.ones(k - 1, k - 1))


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_log_prob_and_kl_match_torch():
    pi, pq = policy(0), policy(1)
    pi[0] = torch.tensor([0.001, 0.5, 0.3, 0.199])  # floor binds on component 0
    w = DIR.sample(pi, 7, 10.0, generator=torch.Generator().manual_seed(0), **KW)
    alpha = (10.0 * pi).clamp_min(KW["floor"])
    assert alpha[0, 0] == KW["floor"]
    expected = Dirichlet(alpha.unsqueeze(1)).log_prob(w)
    torch.testing.assert_close(DIR.log_prob(pi, w, 10.0, **KW), expected)
    beta = (10.0 * pq).clamp_min(KW["floor"])
    torch.testing.assert_close(
        DIR.kl(pi, pq, 10.0, **KW), kl_divergence(Dirichlet(alpha), Dirichlet(beta))
    )
    assert torch.allclose(DIR.kl(pi, pi, 10.0, **KW), torch.zeros(6), atol=1e-5)


def test_dirichlet_sample_mean_matches_pi():
    pi = policy(2, b=3)
    w = DIR.sample(pi, 20000, 8.0, generator=torch.Generator().manual_seed(1), **KW)
    assert w.shape == (3, 20000, 4)
    assert bool((w >= W_MIN * 0.99).all()) and torch.allclose(w.sum(-1), torch.ones(3, 20000))
    torch.testing.assert_close(w.mean(1), pi, atol=0.01, rtol=0)
    var = Dirichlet(8.0 * pi).variance
    torch.testing.assert_close(w.var(1), var, atol=0.003, rtol=0.1)


def test_dirichlet_small_concentration_stays_finite():
    pi = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    w = DIR.sample(pi, 500, 1.0, floor=1e-3, sigma=0.0, generator=torch.Generator().manual_seed(0))
    assert bool((w > 0).all())
    logp = DIR.log_prob(pi, w, 1.0, floor=1e-3, sigma=0.0)
    assert bool(torch.isfinite(logp).all())
    edge = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    assert bool(torch.isfinite(DIR.log_prob(pi, edge, 1.0, floor=1e-3, sigma=0.0)).all())


def test_sampling_is_reproducible_with_a_generator():
    pi = policy(3)
    for expl in (DIR, GAUSS):
        a = expl.sample(pi, 5, 6.0, generator=torch.Generator().manual_seed(7), **KW)
        b = expl.sample(pi, 5, 6.0, generator=torch.Generator().manual_seed(7), **KW)
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gaussian (logistic-normal)


def test_gaussian_log_prob_and_kl_match_torch():
    pi, pq = policy(4), policy(5)
    w = GAUSS.sample(pi, 7, 6.0, generator=torch.Generator().manual_seed(0), **KW)
    y = torch.log(w[..., :-1] / w[..., -1:])
    mu = torch.log(pi[:, :-1] / pi[:, -1:])
    mvn = MultivariateNormal(mu.unsqueeze(1), alr_cov(4, 0.5))
    expected = mvn.log_prob(y) - torch.log(w).sum(-1)
    torch.testing.assert_close(GAUSS.log_prob(pi, w, 6.0, **KW), expected, atol=1e-4, rtol=1e-5)
    mq = torch.log(pq[:, :-1] / pq[:, -1:])
    exp_kl = kl_divergence(
        MultivariateNormal(mu, alr_cov(4, 0.5)), MultivariateNormal(mq, alr_cov(4, 0.5))
    )
    torch.testing.assert_close(GAUSS.kl(pi, pq, 6.0, **KW), exp_kl, atol=1e-5, rtol=1e-5)
    # KL is a property of the distributions, not of the reference coordinate
    perm = torch.tensor([3, 0, 2, 1])
    torch.testing.assert_close(GAUSS.kl(pi[:, perm], pq[:, perm], 6.0, **KW), exp_kl)


def test_gaussian_sample_log_ratio_mean_matches():
    pi = policy(6, b=3)
    w = GAUSS.sample(pi, 20000, 6.0, generator=torch.Generator().manual_seed(2), **KW)
    y = torch.log(w[..., :-1] / w[..., -1:])
    mu = torch.log(pi[:, :-1] / pi[:, -1:])
    torch.testing.assert_close(y.mean(1), mu, atol=0.03, rtol=0)
    cov = torch.cov(y[0].T)
    torch.testing.assert_close(cov, alr_cov(4, 0.5), atol=0.02, rtol=0)


# ---------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", EXPLORATIONS.names())
def test_log_prob_and_kl_are_differentiable_wrt_pi(name):
    expl = EXPLORATIONS.get(name)
    logits = torch.randn(4, 3, requires_grad=True)
    pi = torch.softmax(logits, -1)
    w = expl.sample(pi, 6, 5.0, generator=torch.Generator().manual_seed(0), **KW)
    assert not w.requires_grad and w.shape == (4, 6, 3)
    kl = expl.kl(pi, policy(9, b=4, k=3), 5.0, **KW)
    (expl.log_prob(pi, w, 5.0, **KW).sum() + kl.sum()).backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad.abs().sum()) > 0
    assert bool((kl >= -1e-6).all())


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="dirichlet.*gaussian"):
        EXPLORATIONS.get("beta")
    with pytest.raises(ValueError, match="constant.*cosine.*linear"):
        alpha_schedule(0.5, 5.0, 15.0, "step")


def test_alpha_schedule():
    assert alpha_schedule(0.0, 5.0, 15.0, "cosine") == pytest.approx(5.0)
    assert alpha_schedule(0.5, 5.0, 15.0, "cosine") == pytest.approx(10.0)
    assert alpha_schedule(0.25, 5.0, 15.0, "cosine") == pytest.approx(
        5.0 + 10.0 * (1 - math.cos(math.pi / 4)) / 2
    )
    assert alpha_schedule(1.0, 5.0, 15.0, "cosine") == pytest.approx(15.0)
    assert alpha_schedule(1.7, 5.0, 15.0, "cosine") == pytest.approx(15.0)  # clamped
    assert alpha_schedule(-1.0, 5.0, 15.0, "linear") == pytest.approx(5.0)
    assert alpha_schedule(0.3, 5.0, 15.0, "linear") == pytest.approx(8.0)
    assert alpha_schedule(0.9, 5.0, 15.0, "constant") == 5.0
    assert SCHEDULES.names() == ["constant", "cosine", "linear"]


# ---------------------------------------------------------------- training smoke test


@pytest.mark.parametrize("name", EXPLORATIONS.names())
def test_grpo_smoke_moves_policy_toward_the_rewarded_task(name):
    """Rewards favour task 0; a few GRPO rounds with Adam must raise pi_0."""
    torch.manual_seed(0)
    expl = EXPLORATIONS.get(name)
    b, g, k, alpha = 8, 16, 4, 5.0
    logits = torch.zeros(1, k, requires_grad=True)
    start = logits.detach().clone()
    ref_pi = torch.softmax(start, -1).expand(b, k)
    opt = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        old_pi = torch.softmax(logits.detach(), -1).expand(b, k)
        w = expl.sample(old_pi, g, alpha, generator=gen, **KW)
        adv, _ = group_advantages(w[..., 0], "std")
        old_logp = expl.log_prob(old_pi, w, alpha, **KW)
        for _ in range(3):
            pi = torch.softmax(logits, -1).expand(b, k)
            logp = expl.log_prob(pi, w, alpha, **KW)
            kl = expl.kl(pi, ref_pi, alpha, **KW)
            loss, stats = grpo_loss(logp, old_logp, adv, kl, clip_eps=0.2, beta=0.01)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            assert set(stats) == {"pg_loss", "kl", "clip_frac", "ratio_mean"}
    pi_end = torch.softmax(logits.detach(), -1)[0]
    assert not torch.equal(logits.detach(), start)
    assert max(losses) - min(losses) > 1e-3
    assert pi_end[0] > 0.35 and int(pi_end.argmax()) == 0


def test_gamma_of_an_empty_tensor_is_empty():
    from grade_ray.algos.exploration import log_standard_gamma

    assert log_standard_gamma(torch.ones(0, 3), None).shape == (0, 3)
    w = EXPLORATIONS.get("dirichlet").sample(torch.ones(0, 3) / 3, 4, 10.0, floor=0.05)
    assert w.shape == (0, 4, 3)
