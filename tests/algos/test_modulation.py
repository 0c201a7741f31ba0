"""Item-aware fusion math: per-item weights, the fusion over them, the joint exploration.

References are torch.distributions and plain loops, not the module's own helpers."""

from __future__ import annotations

import pytest
import torch

from grade_ray.algos.exploration import EXPLORATIONS
from grade_ray.algos.fusion import fuse, fuse_items
from grade_ray.algos.modulation import (
    exploration_name,
    get_exploration,
    item_features,
    item_weights,
    modulated_fusion,
)
from grade_ray.algos.rewards import group_rewards

B, N, K, G = 6, 9, 4, 5
ALPHA, FLOOR = 5.0, 0.05


def rank(s: torch.Tensor) -> torch.Tensor:
    return torch.argsort(s, dim=-1, stable=True, descending=True)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, N, K, generator=g) * torch.tensor([1.0, 0.2, 80.0, 20.0])
    mask = torch.arange(N)[None, :] < torch.tensor([9, 7, 9, 5, 8, 9])[:, None]
    w = torch.softmax(torch.randn(B, K, generator=g), -1)
    return g, scores, mask, w


@pytest.mark.parametrize("fusion", ["log_product", "linear"])
def test_zero_modulation_ranks_like_the_item_agnostic_fusion(fusion):
    """c = 0: every candidate gets the request's weights, so the fused scores (and the
    ranking) equal the item-agnostic fusion's exactly, for one vector and for groups."""
    g, scores, mask, w = data()
    zero = torch.zeros(B, K)
    item = modulated_fusion(fusion, scores, mask, w, zero)
    ref = fuse(fusion, scores, w)
    assert torch.equal(rank(item), rank(ref))
    torch.testing.assert_close(item, ref, rtol=1e-6, atol=1e-6)
    wg = torch.softmax(torch.randn(B, G, K, generator=g), -1)
    item_g = modulated_fusion(fusion, scores, mask, wg, torch.zeros(B, G, K))
    assert torch.equal(rank(item_g), rank(fuse(fusion, scores, wg)))


def test_zero_modulation_rewards_equal_the_item_agnostic_rewards():
    g, scores, mask, _ = data(1)
    wg = torch.softmax(torch.randn(B, G, K, generator=g), -1)
    post = torch.rand(B, N, generator=g).round()
    prior = torch.rand(B, N, generator=g)
    kw = dict(fusion="log_product", k=5, rules=[(1, 0)], l1=1.0, l2=0.3, l3=0.05, tau=0.4)
    ref = group_rewards(scores, wg, post, prior, mask, **kw)
    per_item = item_weights(wg, torch.zeros(B, G, K), item_features(scores, mask))
    got = group_rewards(scores, wg, post, prior, mask, item_weights=per_item, **kw)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_item_weights_and_fusion_against_a_loop():
    """w_ik = w_k exp(c_k phi_ik) / sum_j w_j exp(c_j phi_ij); s_i = sum_k w_ik log(p_ik+eps);
    phi = per-request z-score of log(p + eps) over real candidates."""
    g, scores, mask, w = data(2)
    c = torch.randn(B, K, generator=g)
    phi = item_features(scores, mask)
    got = modulated_fusion("log_product", scores, mask, w, c)
    for b in range(B):
        n = int(mask[b].sum())
        lp = torch.log(scores[b, :n] + 1e-6).double()
        z = (lp - lp.mean(0)) / lp.std(0, unbiased=False)
        torch.testing.assert_close(phi[b, :n].double(), z.clamp(-3, 3), rtol=1e-4, atol=1e-4)
        assert torch.all(phi[b, n:] == 0)
        for i in range(n):
            u = w[b].double() * torch.exp(c[b].double() * z[i].clamp(-3, 3))
            wi = u / u.sum()
            assert float(got[b, i]) == pytest.approx(float((wi * lp[i]).sum()), rel=1e-4)


def test_item_features_ignore_a_per_task_rescale():
    _, scores, mask, _ = data(3)
    scaled = scores * torch.tensor([1.0, 1.0, 100.0, 0.01])
    torch.testing.assert_close(
        item_features(scores, mask, 1e-12), item_features(scaled, mask, 1e-12), atol=1e-4, rtol=0
    )


def test_fuse_items_with_constant_weights_is_fuse():
    _, scores, _, w = data(4)
    for fusion in ("linear", "log_product"):
        per_item = w[:, None, :].expand(B, N, K)
        torch.testing.assert_close(fuse_items(fusion, scores, per_item), fuse(fusion, scores, w))


def joint_params(seed: int = 5, sd: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(torch.randn(B, K, generator=g), -1)
    c = torch.randn(B, K, generator=g)
    return torch.cat([pi, c, torch.full((B, 1), sd)], -1)


@pytest.mark.parametrize("kind", ["dirichlet", "gaussian"])
def test_joint_log_prob_matches_torch_distributions(kind):
    """log p(w, c~) = log D(pi)(w) + sum_k log N(c~_k; c_k, sigma_c^2), w and c~ independent."""
    explore = get_exploration(exploration_name(kind, True))
    params = joint_params()
    a = explore.sample(params, G, ALPHA, floor=FLOOR, sigma=0.5, generator=torch.Generator())
    assert a.shape == (B, G, 2 * K)
    got = explore.log_prob(params, a, ALPHA, floor=FLOOR, sigma=0.5)
    pi, c, sd = params[:, :K], params[:, K : 2 * K], params[:, 2 * K :]
    w, cs = a[..., :K], a[..., K:]
    if kind == "dirichlet":
        conc = (ALPHA * pi).clamp_min(FLOOR)[:, None, :].expand(B, G, K)
        ref_w = torch.distributions.Dirichlet(conc.double()).log_prob(w.double())
    else:
        ref_w = EXPLORATIONS.get("gaussian").log_prob(pi, w, sigma=0.5).double()
    ref_c = torch.distributions.Normal(c[:, None, :].double(), sd[:, None, :].double())
    ref = ref_w + ref_c.log_prob(cs.double()).sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_joint_kl_matches_torch_distributions():
    explore = get_exploration(exploration_name("dirichlet", True))
    p, q = joint_params(6), joint_params(7)
    got = explore.kl(p, q, ALPHA, floor=FLOOR, sigma=0.5)
    a = (ALPHA * p[:, :K]).clamp_min(FLOOR).double()
    b = (ALPHA * q[:, :K]).clamp_min(FLOOR).double()
    kl_w = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(b)
    )
    n = torch.distributions.Normal
    kl_c = torch.distributions.kl_divergence(
        n(p[:, K : 2 * K].double(), 0.3), n(q[:, K : 2 * K].double(), 0.3)
    ).sum(-1)
    torch.testing.assert_close(got.double(), kl_w + kl_c, rtol=1e-4, atol=1e-4)
    assert torch.allclose(
        explore.kl(p, p, ALPHA, floor=FLOOR, sigma=0.5), torch.zeros(B), atol=1e-5
    )


def test_joint_samples_center_on_the_modulation():
    explore = get_exploration("item_aware+dirichlet")
    params = joint_params(8, sd=0.2)
    a = explore.sample(params, 4000, ALPHA, floor=FLOOR, sigma=0.5, generator=torch.Generator())
    cs = a[..., K:]
    torch.testing.assert_close(cs.mean(1), params[:, K : 2 * K], atol=0.02, rtol=0)
    torch.testing.assert_close(cs.std(1), torch.full((B, K), 0.2), atol=0.02, rtol=0)
    torch.testing.assert_close(a[..., :K].mean(1), params[:, :K], atol=0.02, rtol=0)
