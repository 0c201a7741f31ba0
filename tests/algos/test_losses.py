"""GRPO loss, k3 KL estimator and LambdaLoss: hand values, invariances, reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from grade_ray.algos import losses
from grade_ray.algos.exploration import EXPLORATIONS, safe_log
from grade_ray.algos.losses import (
    K3_BOUND,
    POLICY_LOSSES,
    dirichlet_grpo_loss,
    grpo_loss,
    kl_k3,
    lambda_loss,
    lambda_loss_dense_reference,
)
from grade_ray.algos.metrics import ndcg_at_k

# ---------------------------------------------------------------- k3 and GRPO


def test_kl_k3_by_hand_and_unbiased():
    logp = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[math.log(0.5), -1.0]])
    got = kl_k3(logp, ref)
    assert got[0].tolist() == pytest.approx([0.5 - 1 + math.log(2), 0.0])
    # samples from N(0, 1), ref N(1, 1): KL = 0.5
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(1.0, 1.0)
    est = kl_k3(p.log_prob(x), q.log_prob(x))
    assert bool((est >= 0).all()) and est.mean().item() == pytest.approx(0.5, abs=0.02)


def test_kl_k3_is_bounded_in_the_reference_tail():
    # ref - logp = 20: the raw k3 is exp(20) - 21 ~ 4.9e8; one such sample must not swamp the loss
    logp = torch.tensor([[-25.0, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-5.0, 0.0, 5.0]])
    got = kl_k3(logp, ref)
    assert got[0, 0].item() == K3_BOUND == 10.0
    assert got[0, 1].item() == 0.0
    assert got[0, 2].item() == pytest.approx(min(math.exp(5.0) - 6.0, 10.0))
    got.sum().backward()
    assert logp.grad[0, 0].item() == 0.0  # clamped: no gradient from the tail sample
    assert kl_k3(torch.tensor([0.0]), torch.tensor([2.0]), bound=100.0).item() == pytest.approx(
        math.exp(2.0) - 3.0
    )


def test_grpo_loss_by_hand():
    rho = torch.tensor([[1.5, 0.5], [1.0, 1.1]])
    adv = torch.tensor([[1.0, -1.0], [2.0, -1.0]])
    old = torch.full((2, 2), -2.0)
    logp = (old + rho.log()).requires_grad_(True)
    kl = torch.tensor([0.1, 0.3])
    loss, stats = grpo_loss(logp, old, adv, kl, clip_eps=0.2, beta=0.5)
    # min terms: 1.2 (clipped), -0.8 (clipped), 2.0, -1.1 -> mean 0.325
    assert stats["pg_loss"] == pytest.approx(-0.325, abs=1e-6)
    assert loss.item() == pytest.approx(-0.325 + 0.5 * 0.2, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.2)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.025, abs=1e-6)
    loss.backward()
    # clipped samples carry no gradient; the others d/dlogp = -rho * A / n
    expected = torch.tensor([[0.0, 0.0], [-1.0 * 2.0 / 4, 1.1 * 1.0 / 4]])
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_clip_frac_ignores_inactive_clip():
    # rho outside the range but the unclipped term is the smaller one: not counted
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    _, stats = grpo_loss(
        logp, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.zeros(1), clip_eps=0.2, beta=0
    )
    assert stats["clip_frac"] == 0.0
    assert stats["pg_loss"] == pytest.approx(-(-1.5 + 0.5) / 2)


def test_policy_loss_registry():
    assert POLICY_LOSSES.get("grpo") is grpo_loss
    with pytest.raises(ValueError, match=r"\['grpo'\]"):
        POLICY_LOSSES.get("ppo_kl")


# ---------------------------------------------------------------- LambdaLoss


def ref_lambda_loss(fused, gains, mask, k=None, temperature=1.0) -> float:
    """Per-pair Python loop of the documented LambdaRank-weighted loss."""
    total, count = 0.0, 0
    for b in range(fused.shape[0]):
        real = [i for i in range(fused.shape[1]) if mask[b, i]]
        s = {i: fused[b, i].item() for i in real}
        g = {i: gains[b, i].item() for i in real}
        kk = len(fused[b]) if k is None else k
        order = sorted(real, key=lambda i: (-s[i], i))
        disc = {i: (1 / math.log2(r + 2) if r < kk else 0.0) for r, i in enumerate(order)}
        ideal = sorted(g.values(), reverse=True)[:kk]
        idcg = sum(x / math.log2(r + 2) for r, x in enumerate(ideal))
        if idcg <= 0:
            continue
        count += 1
        for i in real:
            for j in real:
                if g[i] > g[j]:
                    w = (g[i] - g[j]) / idcg * abs(disc[i] - disc[j])
                    total += w * math.log2(1 + math.exp(-(s[i] - s[j]) / temperature))
    return total / count if count else 0.0


def test_lambda_loss_two_items_by_hand():
    fused = torch.tensor([[0.5, 1.0]], requires_grad=True)
    gains = torch.tensor([[1.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # item 1 ranks first; swapping changes NDCG by |1/log2(3) - 1|, IDCG = 1
    w = 1 - 1 / math.log2(3)
    loss = lambda_loss(fused, gains, mask)
    assert loss.item() == pytest.approx(w * math.log2(1 + math.exp(0.5)), rel=1e-6)
    loss.backward()
    sig = 1 / (1 + math.exp(-0.5))  # d/ds_0 of log2(1 + exp(-(s0 - s1))) = -sigmoid(s1 - s0)/ln2
    assert fused.grad[0].tolist() == pytest.approx([-w * sig / math.log(2), w * sig / math.log(2)])
    # temperature and cutoff k = 1 (only rank 0 counts: weight 1)
    t2 = lambda_loss(fused, gains, mask, temperature=2.0)
    assert t2.item() == pytest.approx(w * math.log2(1 + math.exp(0.25)), rel=1e-6)
    k1 = lambda_loss(fused, gains, mask, k=1)
    assert k1.item() == pytest.approx(math.log2(1 + math.exp(0.5)), rel=1e-6)


def test_lambda_loss_mean_over_requests_with_positive_gain():
    fused = torch.tensor([[0.5, 1.0], [0.3, 0.1]])
    gains = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    both = lambda_loss(fused, gains, mask)
    assert both.item() == pytest.approx(lambda_loss(fused[:1], gains[:1], mask[:1]).item())
    none = lambda_loss(fused[1:].clone().requires_grad_(True), gains[1:], mask[1:])
    assert none.item() == 0.0
    none.backward()  # still a graph


def test_lambda_loss_padding_and_ties_produce_no_nan():
    fused = torch.tensor([[2.0, 2.0, 2.0, math.inf, math.nan]], requires_grad=True)
    gains = torch.tensor([[1.0, 0.0, 2.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True, False, False]])
    loss = lambda_loss(fused, gains, mask)
    loss.backward()
    assert math.isfinite(loss.item())
    assert bool(torch.isfinite(fused.grad).all()) and fused.grad[0, 3:].tolist() == [0.0, 0.0]
    plain = torch.tensor([[2.0, 2.0, 2.0]], requires_grad=True)
    ref = lambda_loss(plain, gains[:, :3], mask[:, :3])
    ref.backward()
    assert loss.item() == pytest.approx(ref.item())
    torch.testing.assert_close(fused.grad[:, :3], plain.grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambda_loss_matches_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(5, 6, generator=g)
    gains = torch.randint(0, 3, (5, 6), generator=g).float()
    mask = torch.rand(5, 6, generator=g) < 0.8
    for k, temp in ((None, 1.0), (3, 0.5)):
        want = ref_lambda_loss(fused, gains, mask, k, temp)
        got = lambda_loss(fused, gains, mask, k=k, temperature=temp).item()
        assert got == pytest.approx(want, rel=1e-5)
        dense = lambda_loss_dense_reference(fused, gains, mask, k=k, temperature=temp).item()
        assert dense == pytest.approx(want, rel=1e-5)


def test_lambda_loss_descent_raises_ndcg():
    g = torch.Generator().manual_seed(3)
    gains = torch.randint(0, 3, (16, 10), generator=g).float()
    mask = torch.ones(16, 10, dtype=torch.bool)
    fused = torch.randn(16, 10, generator=g, requires_grad=True)
    before = ndcg_at_k(fused.detach(), gains, mask, 5).mean()
    opt = torch.optim.SGD([fused], lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        lambda_loss(fused, gains, mask, k=5).backward()
        opt.step()
    assert ndcg_at_k(fused.detach(), gains, mask, 5).mean() > before + 0.05


def assert_equals_dense_reference(fused, gains, mask, k) -> None:
    """lambda_loss equals the all-pairs reference in value (1e-9) and gradient (1e-6)."""
    a = fused.clone().requires_grad_(True)
    d = fused.clone().requires_grad_(True)
    got = lambda_loss(a, gains, mask, k=k, temperature=0.7)
    want = lambda_loss_dense_reference(d, gains, mask, k=k, temperature=0.7)
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(a.grad, d.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("positives", [0.03, 0.3, 1.0])
@pytest.mark.parametrize("k", [3, 10, None])
def test_lambda_loss_pairs_from_positive_or_top_rows_equal_all_pairs(positives, k, monkeypatch):
    """Sparse feedback forms the pairs from the positive items' rows, dense feedback from
    the top-k rows: each way, every weighted pair once (loss and gradient equal the dense
    reference's), padded candidates, ties in score and in gain included."""
    used = []
    for name in ("positive_rows", "top_rows"):
        fn = getattr(losses, name)
        monkeypatch.setattr(
            losses, name, lambda *a, _fn=fn, _name=name: used.append(_name) or _fn(*a)
        )
    gen = torch.Generator().manual_seed(int(positives * 100) + (k or 0))
    b, n = 48, 60
    fused = torch.randn(b, n, generator=gen, dtype=torch.float64)
    fused[::3, 5:9] = 0.5
    gains = (torch.rand(b, n, generator=gen) < positives).double() * torch.randint(
        1, 4, (b, n), generator=gen
    )
    gains[::7] = 0.0  # requests without feedback
    mask = torch.rand(b, n, generator=gen) < 0.85
    mask[1::4, 20:] = False  # short lists: fewer real items than k
    assert_equals_dense_reference(fused, gains, mask, k)
    dense = positives == 1.0 and k is not None  # every item positive: the top rows are fewer
    assert used == (["top_rows"] if dense else ["positive_rows"])  # one row set built


@pytest.mark.parametrize("positives", [0.05, 1.0])
def test_lambda_loss_gradient_is_bitwise_repeatable_on_two_threads(positives):
    """A resumed Stage 1 must equal the uninterrupted one. Advanced indexing's backward
    (index_put_ with accumulate) adds repeated indices in a thread-dependent order on CPU,
    rarely enough to slip past a repeat check (1 resumed run in 8 here), so the loss's
    graph must not hold one; and the gradient repeats bit for bit on two threads."""
    gen = torch.Generator().manual_seed(5)
    b, n = 2048, 100
    fused = torch.randn(b, n, generator=gen)
    gains = (torch.rand(b, n, generator=gen) < positives).float()
    mask = torch.rand(b, n, generator=gen) < 0.9
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads, seen = [], {}
        for _ in range(4):
            x = fused.clone().requires_grad_(True)
            loss = lambda_loss(x, gains, mask, k=10)
            stack = [loss.grad_fn]
            while stack:
                node = stack.pop()
                if node is not None and id(node) not in seen:
                    seen[id(node)] = node.name()
                    stack.extend(f for f, _ in node.next_functions)
            loss.backward()
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    nodes = set(seen.values())
    assert "SubBackward0" in nodes and not any(n.startswith("IndexBackward") for n in nodes), nodes
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("k", [1, 5, 10, None])
def test_topk_pair_lambda_loss_equals_all_pairs_in_value_and_gradient(k):
    """The (B, k, N) top-k pairs against the (B, N, N) reference at N = 100: a pair dropped
    or counted twice moves the loss and the gradient far beyond 1e-6."""
    gen = torch.Generator().manual_seed(k or 0)
    b, n = 64, 100
    fused = torch.randn(b, n, generator=gen, dtype=torch.float64)
    fused[::4, 10:14] = 0.25  # ties in score (ranked by index)
    gains = (torch.rand(b, n, generator=gen) < 0.08).double() * torch.randint(
        1, 12, (b, n), generator=gen
    )
    gains[:, :3] = torch.tensor([10.0, 1.0, 1.0])  # ties in gain
    mask = torch.rand(b, n, generator=gen) < 0.9
    mask[:, 0] = True
    assert_equals_dense_reference(fused, gains, mask, k)


# ---------------------------------------------------------------- fused Dirichlet GRPO


def _fused_case(seed: int, b: int = 64, g: int = 8, k: int = 4):
    """pi with some components under the floor, samples of a nearby policy, old log-probs
    spread so that ratios fall inside the clip range, outside it on both sides and beyond
    the +-20 log-ratio clamp, advantages of both signs and some exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, k, generator=gen)
    logits[: b // 4, 0] = -12.0  # alpha_hat * pi_0 < floor for a quarter of the rows
    pi = torch.softmax(logits, -1)
    pi_ref = torch.softmax(logits + 0.5 * torch.randn(b, k, generator=gen), -1)
    explore = EXPLORATIONS.get("dirichlet")
    w = explore.sample(pi_ref, g, 10.0, floor=0.05, generator=gen)
    with torch.no_grad():
        logp = explore.log_prob(pi, w, 10.0, floor=0.05)
    shift = 0.3 * torch.randn(b, g, generator=gen)
    shift[0, :4] = torch.tensor([25.0, -25.0, 20.0, -20.0])  # at and beyond the clamp
    adv = torch.randn(b, g, generator=gen)
    adv[0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # ratio e^20 with A < 0: unclipped side
    adv[1] = 0.0
    return pi, pi_ref, w, logp + shift, adv


@pytest.mark.parametrize("beta", [0.0, 0.01, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_dirichlet_grpo_equals_the_composed_loss_in_value_stats_and_gradient(seed, beta):
    pi, pi_ref, w, old, adv = _fused_case(seed)
    explore = EXPLORATIONS.get("dirichlet")
    kw = {"clip_eps": 0.2, "beta": beta}
    p1 = pi.clone().requires_grad_(True)
    want, want_stats = grpo_loss(
        explore.log_prob(p1, w, 10.0, floor=0.05),
        old,
        adv,
        explore.kl(p1, pi_ref, 10.0, floor=0.05),
        **kw,
    )
    want.backward()
    p2 = pi.clone().requires_grad_(True)
    got, got_stats = dirichlet_grpo_loss(p2, pi_ref, safe_log(w), old, adv, 10.0, floor=0.05, **kw)
    (3.0 * got).backward()  # the upstream gradient scales it
    assert float(got.detach()) == float(want.detach())  # the same ops in the same order
    assert got_stats == want_stats
    assert 0 < got_stats["clip_frac"] < 1
    # element by element: the sample at the +20 log-ratio bound has a gradient ~1e6 (its
    # ratio is e^20), the others ~1e-3, so the tolerance is relative to a typical entry
    typical = float(p1.grad.abs().median())
    assert typical > 0
    torch.testing.assert_close(p2.grad, 3.0 * p1.grad, rtol=1e-4, atol=1e-3 * typical)


def test_fused_dirichlet_grpo_checks_its_concentrations():
    pi, pi_ref, w, old, adv = _fused_case(0)
    with pytest.raises(ValueError, match="must be > 0"):
        dirichlet_grpo_loss(
            pi, pi_ref, safe_log(w), old, adv, 10.0, floor=0.0, clip_eps=0.2, beta=0
        )
