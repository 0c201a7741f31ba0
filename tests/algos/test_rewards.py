"""Stage-2 rewards: hand values, fusion/padding invariances, vectorized vs reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from grade_ray.algos.fusion import FUSIONS, fuse
from grade_ray.algos.metrics import product_gains, rank_positions
from grade_ray.algos.rewards import (
    FORMATS,
    FittedDirichlet,
    composite_reward,
    dirichlet_log_density,
    format_reward,
    group_rewards,
    learned_format_reward,
)

KW = {"k": 3, "rules": [(1, 0), (2, 3)], "l1": 1.0, "l2": 0.3, "l3": 0.05, "tau": 0.4}


def ref_ndcg(scores: list[float], gains: list[float], mask: list[bool], k: int) -> float:
    real = [i for i in range(len(scores)) if mask[i]]
    order = sorted(real, key=lambda i: (-scores[i], i))
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order[:k]))
    ideal = sorted((gains[i] for i in real), reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def make_batch(seed: int, b: int = 6, g: int = 5, n: int = 7, k_tasks: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, n, k_tasks, generator=gen) * 0.98 + 0.01
    scores[:, 1] = scores[:, 0]  # duplicate items: tied under every w, different post gains
    weights = torch.distributions.Dirichlet(torch.ones(k_tasks)).sample((b, g))
    n_real = torch.randint(1, n + 1, (b,), generator=gen)
    mask = torch.argsort(torch.rand(b, n, generator=gen), dim=-1) < n_real.unsqueeze(-1)
    post = (torch.rand(b, n, generator=gen) < 0.4).float()
    post[:, 1] = 1.0 - post[:, 0]
    prior = product_gains(scores, [((0,), 1.0), ((0, 1), 10.0)])
    return {"scores": scores, "weights": weights, "post": post, "prior": prior, "mask": mask}


def call(d: dict, fusion: str, **kw) -> dict[str, torch.Tensor]:
    args = {**KW, **kw}
    return group_rewards(
        d["scores"], d["weights"], d["post"], d["prior"], d["mask"], fusion=fusion, **args
    )


# ---------------------------------------------------------------- hand-computed values


def test_format_reward_by_hand():
    w = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    got = format_reward(w, [(1, 0), (2, 3)])  # w1 >= w0, w2 >= w3
    assert got.tolist() == [[0.5, 0.5, 1.0]]
    assert format_reward(w, []).tolist() == [[1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="outside"):
        format_reward(w, [(0, 4)])


def test_composite_reward_gate_by_hand():
    post = torch.tensor([[0.5, 0.2]])
    prior = torch.tensor([[0.0, 0.5]])
    fmt = torch.tensor([[1.0, 1.0]])
    got = composite_reward(post, prior, fmt, l1=1.0, l2=0.3, l3=0.05, tau=0.4)
    # sample 0: base 0.5 >= 0.4 -> 0.55; sample 1: base 0.35 < 0.4 -> no format term
    assert got[0].tolist() == pytest.approx([0.55, 0.35])


def test_composite_reward_gate_is_inclusive_at_tau():
    """The gate is base >= tau: a ranking exactly at the threshold earns the format term."""
    post = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    prior = torch.tensor([[0.5, 0.25, 0.5]], dtype=torch.float64)
    fmt = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64)
    # base = 0.25 + 0.5 * prior = 0.5 (at tau), 0.375 (below), 0.75 (above); exact in binary
    got = composite_reward(post, prior, fmt, l1=1.0, l2=0.5, l3=0.25, tau=0.5)
    assert got[0].tolist() == [0.75, 0.375, 0.875]


def test_group_rewards_by_hand():
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])  # (1, 3, 2)
    weights = torch.tensor([[[0.9, 0.1], [0.1, 0.9]]])  # (1, 2, 2)
    post = torch.tensor([[0.0, 1.0, 0.0]])
    prior = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = group_rewards(
        scores, weights, post, prior, mask,
        fusion="linear", k=2, rules=[(1, 0)], l1=1.0, l2=0.3, l3=0.05, tau=0.4,
    )  # fmt: skip
    # w0 ranks 0, 2, 1: post NDCG@2 = 0, prior = 1; w1 ranks 1, 2, 0: post = 1, prior = 0
    assert out["post"][0].tolist() == [0.0, 1.0]
    assert out["prior"][0].tolist() == [1.0, 0.0]
    assert out["format"][0].tolist() == [0.0, 1.0]
    assert out["reward"][0].tolist() == pytest.approx([0.3, 1.05])


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_padding_changes_nothing(fusion):
    d = make_batch(0)
    n = d["mask"].shape[1]
    big = n + 4
    pos = torch.tensor([0, 2, 3, 5, 6, 8, 10])  # real slots, in order; padding in between
    padded = {
        "scores": torch.full((6, big, 4), 0.99),
        "post": torch.full((6, big), 5.0),
        "prior": torch.full((6, big), 5.0),
        "mask": torch.zeros(6, big, dtype=torch.bool),
        "weights": d["weights"],
    }
    for key in ("scores", "post", "prior", "mask"):
        padded[key][:, pos] = d[key]
    a, b = call(d, fusion), call(padded, fusion)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_ranking_unchanged_by_positive_rescale_of_weights(fusion, scale):
    d = make_batch(1)
    ranks = rank_positions(fuse(fusion, d["scores"], d["weights"]), d["mask"])
    scaled = rank_positions(fuse(fusion, d["scores"], scale * d["weights"]), d["mask"])
    assert torch.equal(ranks, scaled)


def test_log_product_ranking_invariant_to_per_task_rescale_of_scores():
    d = make_batch(2)
    task_scale = torch.tensor([3.0, 0.5, 7.0, 0.01])
    fused = fuse("log_product", d["scores"], d["weights"], eps=0.0)
    fused_scaled = fuse("log_product", d["scores"] * task_scale, d["weights"], eps=0.0)
    # the scale only adds sum_k w_k log c_k, the same for every candidate of a row
    shift = (fused_scaled - fused).amax(-1) - (fused_scaled - fused).amin(-1)
    assert shift.max() < 1e-5
    d["scores"][:, 1] += 1e-3  # break the deliberate duplicate tie
    fused = fuse("log_product", d["scores"], d["weights"], eps=0.0)
    fused_scaled = fuse("log_product", d["scores"] * task_scale, d["weights"], eps=0.0)
    assert torch.equal(rank_positions(fused, d["mask"]), rank_positions(fused_scaled, d["mask"]))


# ---------------------------------------------------------------- vectorized vs reference loop


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_rewards_match_reference_loop(fusion, seed):
    d = make_batch(seed)
    out = call(d, fusion)
    rules, k = KW["rules"], KW["k"]
    for b in range(6):
        m = d["mask"][b].tolist()
        for g in range(5):
            w = d["weights"][b, g].tolist()
            s = [
                sum(
                    w[t] * (p if fusion == "linear" else math.log(p + 1e-6))
                    for t, p in enumerate(row)
                )
                for row in d["scores"][b].tolist()
            ]
            post = ref_ndcg(s, d["post"][b].tolist(), m, k)
            prior = ref_ndcg(s, d["prior"][b].tolist(), m, k)
            fmt = sum(w[i] >= w[j] for i, j in rules) / len(rules)
            base = post + 0.3 * prior
            reward = base + 0.05 * fmt * (base >= 0.4)
            assert out["post"][b, g].item() == pytest.approx(post, abs=1e-6)
            assert out["prior"][b, g].item() == pytest.approx(prior, abs=1e-6)
            assert out["format"][b, g].item() == pytest.approx(float(fmt))
            assert out["reward"][b, g].item() == pytest.approx(reward, abs=1e-6)


def test_unknown_fusion_lists_valid_names():
    with pytest.raises(ValueError, match="linear"):
        call(make_batch(0), "bogus")


# ---------------------------------------------------------------- learned format constraint


def _fitted(alpha: list[float], m: int = 4096, seed: int = 0) -> FittedDirichlet:
    """Dir(alpha) with the sorted log-densities of m reference draws (as format_fit builds)."""
    a = torch.tensor(alpha, dtype=torch.float64)
    torch.manual_seed(seed)
    draws = torch.distributions.Dirichlet(a).sample((m,))
    ref = dirichlet_log_density(draws, a).sort().values
    return FittedDirichlet(tuple(alpha), tuple(ref.tolist()))


def test_dirichlet_log_density_matches_torch():
    a = torch.tensor([2.0, 0.7, 3.5, 1.0], dtype=torch.float64)
    w = torch.distributions.Dirichlet(a).sample((3, 5))
    want = torch.distributions.Dirichlet(a).log_prob(w)
    torch.testing.assert_close(dirichlet_log_density(w, a), want)


def test_learned_format_is_bounded_and_highest_at_the_mode():
    alpha = [6.0, 3.0, 2.0, 1.5]
    fitted = _fitted(alpha)
    mode = torch.tensor([(a - 1) / (sum(alpha) - 4) for a in alpha])
    corners = torch.eye(4)
    near = 0.9 * mode + 0.1 * torch.full((4,), 0.25)
    w = torch.stack([mode, near, *corners])[None].float()  # (1, 6, 4)
    got = learned_format_reward(w, fitted)
    assert got.shape == (1, 6) and got.dtype == torch.float32
    assert got[0, 0] == 1.0  # nothing in the fit is more typical than its mode
    assert 0.5 < got[0, 1] <= got[0, 0]
    assert got[0, 2:].tolist() == [0.0] * 4  # the corners are the least typical points
    # w drawn from the fit itself: the score is uniform on [0, 1] (the rules' scale)
    torch.manual_seed(1)
    draws = torch.distributions.Dirichlet(torch.tensor(alpha)).sample((8, 500))
    s = learned_format_reward(draws, fitted)
    assert ((s >= 0) & (s <= 1)).all()
    assert s.mean().item() == pytest.approx(0.5, abs=0.02)
    assert (s < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="3 tasks"):
        learned_format_reward(draws, _fitted([2.0, 2.0, 2.0]))


def test_group_rewards_format_kinds():
    d = make_batch(0)
    rules = call(d, "linear")
    assert torch.equal(rules["format"], format_reward(d["weights"], KW["rules"]))
    assert torch.equal(call(d, "linear", format_kind="rules")["reward"], rules["reward"])
    none = call(d, "linear", format_kind="none")
    assert torch.equal(none["format"], torch.zeros_like(none["format"]))
    base = none["post"] + 0.3 * none["prior"]
    torch.testing.assert_close(none["reward"], base)  # no format term at all
    fitted = _fitted([4.0, 2.0, 2.0, 1.5])
    learned = call(d, "linear", format_kind="learned", fitted=fitted)
    assert torch.equal(learned["format"], learned_format_reward(d["weights"], fitted))
    gate = (base >= KW["tau"]).float()
    torch.testing.assert_close(learned["reward"], base + 0.05 * learned["format"] * gate)
    for k in ("post", "prior"):  # the ranking part does not depend on the format
        assert torch.equal(learned[k], rules[k])
    with pytest.raises(ValueError, match="needs the Dirichlet"):
        call(d, "linear", format_kind="learned")
    with pytest.raises(ValueError, match=r"valid: \['learned', 'none', 'rules'\]"):
        call(d, "linear", format_kind="typo")
    assert FORMATS.names() == ["learned", "none", "rules"]
