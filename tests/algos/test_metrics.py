"""Ranking metrics: hand-computed values, padding invariance, vectorized vs reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grade_ray.algos import metrics
from grade_ray.algos.metrics import (
    dcg_at_k,
    gauc,
    label_gains,
    ndcg_at_k,
    product_gains,
    rank_positions,
    request_auc,
    topk_indices,
)

# ---------------------------------------------------------------- slow references (Python loops)


def ref_order(scores: list[float], mask: list[bool]) -> list[int]:
    """Candidates by score descending, ties to the lower index, NaN as -inf, padding last."""
    real = [i for i in range(len(scores)) if mask[i]]
    pad = [i for i in range(len(scores)) if not mask[i]]
    return sorted(real, key=lambda i: (math.inf if math.isnan(scores[i]) else -scores[i], i)) + pad


def ref_ndcg(scores: list[float], gains: list[float], mask: list[bool], k: int) -> float:
    order = ref_order(scores, mask)
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order[:k]) if mask[i])
    ideal = sorted((g for g, m in zip(gains, mask) if m), reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def ref_gauc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    num = den = 0.0
    for b in range(scores.shape[0]):
        rows = [(s, y) for s, y, m in zip(scores[b].tolist(), labels[b].tolist(), mask[b]) if m]
        pos = [s for s, y in rows if y > 0]
        neg = [s for s, y in rows if y <= 0]
        if pos and neg:
            hits = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
            num += len(rows) * hits / (len(pos) * len(neg))
            den += len(rows)
    return num / den if den else math.nan


def random_batch(seed: int, b: int, n: int, *, ties: bool) -> tuple[torch.Tensor, ...]:
    """scores (B, N) (quantised when ties), gains (B, N) >= 0, mask (B, N) with >= 1 real."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, n, generator=g)
    if ties:
        scores = (scores * 4).floor() / 4
    gains = torch.randint(0, 3, (b, n), generator=g).float()
    n_real = torch.randint(1, n + 1, (b,), generator=g)
    mask = torch.argsort(torch.rand(b, n, generator=g), dim=-1) < n_real.unsqueeze(-1)
    return scores, gains, mask


# ---------------------------------------------------------------- hand-computed values


def test_rank_positions_ties_and_padding_by_hand():
    scores = torch.tensor([[1.0, 3.0, 3.0, 5.0, 2.0]])
    mask = torch.tensor([[True, True, True, False, True]])
    # 3.0 (idx 1) before 3.0 (idx 2) by index; padded 5.0 last despite the top score
    assert rank_positions(scores, mask).tolist() == [[3, 0, 1, 4, 2]]
    assert topk_indices(scores, mask, 3).tolist() == [[1, 2, 4]]
    assert topk_indices(scores, mask, 10).tolist() == [[1, 2, 4, 0, 3]]


def test_rank_positions_broadcasts_mask_over_groups():
    scores = torch.tensor([[[0.1, 0.9, 0.5], [0.9, 0.1, 0.5]]])  # (1, 2, 3)
    mask = torch.tensor([[True, True, False]])
    assert rank_positions(scores, mask).tolist() == [[[1, 0, 2], [0, 1, 2]]]


def test_ndcg_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    gains = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # ranking: 0, 2, 1, 3 -> DCG@3 = 0/1 + 2/log2(3) + 1/log2(4)
    dcg = 2 / math.log2(3) + 1 / 2
    idcg = 2 / 1 + 1 / math.log2(3)
    assert dcg_at_k(scores, gains, mask, 3).item() == pytest.approx(dcg, rel=1e-6)
    assert ndcg_at_k(scores, gains, mask, 3).item() == pytest.approx(dcg / idcg, rel=1e-6)
    assert ndcg_at_k(scores, gains, mask, 1).item() == 0.0
    # the ideal ranking scores 1
    assert ndcg_at_k(gains, gains, mask, 3).item() == pytest.approx(1.0)


def test_ndcg_zero_when_no_positive_gain():
    scores = torch.rand(2, 5)
    gains = torch.zeros(2, 5)
    gains[1, 4] = 1.0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False  # the only positive is padding
    assert ndcg_at_k(scores, gains, mask, 3).tolist() == [0.0, 0.0]


def test_label_and_product_gains_by_hand():
    labels = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 20.0]]])  # click, order, gmv
    assert label_gains(labels, [1.0, 5.0, 0.1])[0].tolist() == pytest.approx([1.0, 8.0])
    scores = torch.tensor([[[0.2, 0.5], [0.1, 0.1]]])  # ctr, cvr
    got = product_gains(scores, [((0,), 1.0), ((0, 1), 10.0)])
    assert got[0].tolist() == pytest.approx([0.2 + 10 * 0.1, 0.1 + 10 * 0.01])


def test_gauc_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.3], [0.5, 0.4, 0.1, 0.0], [0.1, 0.9, 0.5, 0.7]])
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    # request 0: pos {0.9, 0.3} vs neg {0.8, 0.3}: 1 + 1 + 0 + 0.5 -> 2.5 / 4
    # request 1: no positive -> skipped; request 2: pos {0.1} vs neg {0.9} -> 0, weight 2
    assert gauc(scores, labels, mask) == pytest.approx((4 * 0.625 + 2 * 0.0) / 6)
    auc, weight = request_auc(scores.numpy(), labels.numpy(), mask.numpy())
    assert np.isnan(auc[1]) and weight.tolist() == [4.0, 0.0, 2.0]
    assert math.isnan(gauc(scores[1:2], labels[1:2], mask[1:2]))


# ---------------------------------------------------------------- invariances


def test_padding_changes_nothing():
    scores, gains, mask = random_batch(0, 16, 8, ties=True)
    g = torch.Generator().manual_seed(1)
    n_pad = 5
    pos = torch.sort(torch.randperm(8 + n_pad, generator=g)[:8]).values  # real slots, in order
    big = 8 + n_pad
    s2 = torch.full((16, big), 1e6)  # padding gets the best scores and gains
    g2 = torch.full((16, big), 7.0)
    m2 = torch.zeros(16, big, dtype=torch.bool)
    s2[:, pos], g2[:, pos], m2[:, pos] = scores, gains, mask
    for k in (1, 3, 8, 20):
        torch.testing.assert_close(ndcg_at_k(s2, g2, m2, k), ndcg_at_k(scores, gains, mask, k))
    labels = (gains > 0).float()
    l2 = torch.ones(16, big)
    l2[:, pos] = labels
    assert gauc(s2, l2, m2) == pytest.approx(gauc(scores, labels, mask))


# ---------------------------------------------------------------- vectorized vs reference loop


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_matches_reference_loop(seed):
    scores, gains, mask = random_batch(seed, 24, 9, ties=seed > 0)
    group = torch.stack([scores, scores.flip(-1), torch.rand(24, 9)], dim=1)  # (B, 3, N)
    for k in (1, 4, 12):
        got2 = ndcg_at_k(scores, gains, mask, k)
        got3 = ndcg_at_k(group, gains, mask, k)
        for b in range(24):
            m = mask[b].tolist()
            exp = ref_ndcg(scores[b].tolist(), gains[b].tolist(), m, k)
            assert got2[b].item() == pytest.approx(exp, abs=1e-6)
            for j in range(3):
                exp = ref_ndcg(group[b, j].tolist(), gains[b].tolist(), m, k)
                assert got3[b, j].item() == pytest.approx(exp, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_paths_agree_with_reference_on_special_values(seed):
    scores, _, mask = random_batch(seed, 32, 7, ties=True)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0])
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(32, 7, generator=g) < 0.3
    scores = torch.where(hit, special[torch.randint(0, 5, (32, 7), generator=g)], scores)
    ranks = rank_positions(scores, mask)
    assert torch.equal(ranks, rank_positions(scores.double(), mask))  # key vs two stable sorts
    top = topk_indices(scores, mask, 4)
    assert torch.equal(top, topk_indices(scores.double(), mask, 4))
    key = metrics._descending_key(scores, mask)  # the non-CPU (torch.topk) path
    assert torch.equal(torch.topk(key, 4, largest=False).values & 0xFFFFFFFF, top)
    for b in range(32):
        s = [0.0 if x == 0 else x for x in scores[b].tolist()]  # -0.0 ties +0.0
        order = ref_order(s, mask[b].tolist())
        assert top[b].tolist() == order[:4]
        assert [order.index(i) for i in range(7)] == ranks[b].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_reference_loop(seed):
    scores, gains, mask = random_batch(seed, 40, 8, ties=True)
    labels = (gains > 1).float()
    assert gauc(scores, labels, mask) == pytest.approx(ref_gauc(scores, labels, mask))
    assert gauc(scores.numpy(), labels.numpy(), mask.numpy()) == pytest.approx(
        ref_gauc(scores, labels, mask)
    )


def test_large_batch_uses_several_cache_blocks():
    scores, gains, mask = random_batch(3, 300, 9, ties=True)
    group = scores.unsqueeze(1).expand(-1, 60, -1)  # 300 * 60 * 9 > one block
    got = topk_indices(group, mask, 5)
    assert torch.equal(got, topk_indices(scores, mask, 5).unsqueeze(1).expand(-1, 60, -1))


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(torch.rand(1, 3), torch.rand(1, 3), torch.ones(1, 3, dtype=torch.bool), 0)
