"""Oracles (static, attainable, segment, reward), the segment posterior, and the A/B test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.config import SimulatorConfig
from grade_ray.data.abtest import AB_METRICS, ab_test
from grade_ray.data.oracles import (
    ValueTable,
    grid_north_star,
    headroom,
    simplex_grid,
    truth_table,
)
from grade_ray.data.simulator import MarketplaceSimulator

SMALL = SimulatorConfig(num_users=2_000, num_items=5_000, num_candidates=40, min_candidates=40)


@pytest.fixture(scope="module")
def sim() -> MarketplaceSimulator:
    """The default configuration (100 candidates, 4 segments)."""
    return MarketplaceSimulator(SimulatorConfig())


@pytest.fixture(scope="module")
def fresh(sim):
    return sim.fresh_requests(3_000, seed=11)


def _fused(batch, w, eps: float = 1e-6) -> np.ndarray:
    weights = torch.from_numpy(np.tile(np.asarray(w, np.float32), (len(batch), 1)))
    return fuse("log_product", torch.from_numpy(batch.scores), weights, eps).numpy()


# ---------------------------------------------------------------------------
# A/B test


def test_ab_self_is_zero_and_random_is_worse(sim, fresh):
    batch, truth = fresh
    base = _fused(batch, (0.8, 0.2, 0.0, 0.0))
    arms = {
        "control": base,
        "same": base.copy(),
        "random": np.random.default_rng(3).random(base.shape),
    }
    rep = ab_test(sim, batch, truth, arms, control="control", seed=7, bootstrap=100)
    same = rep.row("same", "north_star")
    assert same["lift"] == 0 and same["ci_low"] <= 0 <= same["ci_high"]
    assert not same["significant"] and rep.row("same", "ctr")["sampled_lift"] == 0
    rnd = rep.row("random", "north_star")
    assert rnd["lift"] < 0 and rnd["ci_high"] < 0 and rnd["significant"]
    assert rnd["ci_low"] <= rnd["lift"] <= rnd["ci_high"]
    rows = rep.to_rows()
    assert len(rows) == 3 * len(AB_METRICS) and {r["metric"] for r in rows} == set(AB_METRICS)
    md = rep.to_markdown()
    assert "| random | north_star |" in md and "control" in md
    # per-request north-star: its mean is the reported value
    assert rep.north_star.shape == (3, len(batch))
    assert rep.north_star[2].mean() == pytest.approx(rnd["value"])


# ---------------------------------------------------------------------------
# grid search


def test_simplex_grid():
    g = simplex_grid(4, 0.1)
    assert g.shape == (286, 4)
    np.testing.assert_allclose(g.sum(1), 1.0)
    assert len(np.unique(np.round(g, 6), axis=0)) == 286 and g.min() >= 0
    assert simplex_grid(3, 0.5).shape == (6, 3)
    with pytest.raises(ValueError, match="divide"):
        simplex_grid(4, 0.3)


@pytest.mark.parametrize("eps", [1e-6, 0.05])
def test_grid_north_star_matches_expected_outcomes(sim, eps):
    """The oracle search ranks under the same fusion (eps included) as the arms it bounds."""
    batch, truth = sim.fresh_requests(40, seed=8)
    grid = simplex_grid(4, 0.5)
    ns = grid_north_star(sim, batch, truth, "log_product", grid, chunk=16, eps=eps)
    for p in (0, 3, 7, len(grid) - 1):
        ref = sim.expected_outcomes(batch, truth, _fused(batch, grid[p], eps))["north_star"]
        np.testing.assert_allclose(ns[:, p], ref, rtol=1e-4)


def test_value_table_picks_by_hand():
    grid = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    values = np.array([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0], [4.0, 2.0, 1.0]])  # (B=3, P=3)
    table = ValueTable.from_requests(grid, values, np.array([0, 1, 0]), num_segments=3)
    np.testing.assert_allclose(table.per_segment[0], [3.5, 2.0, 0.5])
    np.testing.assert_allclose(table.per_segment[2], table.overall)  # no requests: overall
    assert table.static_best().tolist() == [1.0, 0.0]  # overall [7/3, 5/3, 1]
    np.testing.assert_array_equal(table.segment_best()[:2], [[1.0, 0.0], [0.0, 1.0]])
    post = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.4, 0.6, 0.0]])
    # 0.4 * [3.5, 2, .5] + 0.6 * [0, 1, 2] = [1.4, 1.4, 1.4] -> first (ties to the lower index)
    np.testing.assert_array_equal(table.posterior_best(post), [[1, 0], [0, 1], [1, 0]])


def test_truth_table_shapes(sim):
    table = truth_table(sim, "log_product", 0.25, n_requests=400, seed=1)
    per_seg, static = table.segment_best(), table.static_best()
    assert per_seg.shape == (4, 4) and static.shape == (4,)
    np.testing.assert_allclose(per_seg.sum(1), 1.0)
    np.testing.assert_allclose(static.sum(), 1.0)


# ---------------------------------------------------------------------------
# segment posterior and the attainable oracle


def test_segment_posterior_is_calibrated(sim, fresh):
    batch, truth = fresh
    post = sim.segment_posterior(batch.context)
    assert post.shape == (len(batch), 4)
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-9)
    # calibrated: the top segment is right as often as its probability says, and the
    # probability given to the true segment averages E[sum_s p_s^2]
    hit = (post.argmax(1) == truth.segment).mean()
    assert hit == pytest.approx(post.max(1).mean(), abs=0.03)
    p_true = post[np.arange(len(batch)), truth.segment].mean()
    assert p_true == pytest.approx((post**2).sum(1).mean(), abs=0.03)
    assert 0.5 < hit < 0.95  # the default context reveals the segment only partly


def test_segment_posterior_extremes():
    blind = MarketplaceSimulator(dataclasses.replace(SMALL, context_signal=0.0))
    batch, _ = blind.fresh_requests(200, seed=2)
    np.testing.assert_allclose(
        blind.segment_posterior(batch.context), np.tile(SMALL.segment_mix, (200, 1)), atol=1e-9
    )
    sharp = MarketplaceSimulator(dataclasses.replace(SMALL, context_signal=40.0))
    batch, truth = sharp.fresh_requests(400, seed=2)
    post = sharp.segment_posterior(batch.context)
    assert (post.argmax(1) == truth.segment).mean() > 0.99 and post.max(1).min() > 0.9


def test_attainable_oracle_never_exceeds_the_segment_oracle(sim, fresh):
    batch, truth = fresh
    table = truth_table(sim, "log_product", 0.1, n_requests=1_000, seed=3)
    post = sim.segment_posterior(batch.context)
    chosen = table.posterior_best(post)  # (B, K)
    # under the table's own values: E_x[sum_s p(s|x) V_s(w(x))] <= sum_s mix_s max_w V_s(w)
    idx = np.array([np.flatnonzero((table.grid == w).all(1))[0] for w in chosen])
    ctx_value = (post * table.per_segment[:, idx].T).sum(1).mean()
    seg_value = (post * table.per_segment.max(1)[None, :]).sum(1).mean()
    assert ctx_value <= seg_value + 1e-12
    static_value = (post * table.per_segment[:, table.overall.argmax()][None, :]).sum(1).mean()
    assert static_value <= ctx_value + 1e-12


def test_attainable_oracle_equals_segment_oracle_when_context_reveals_segment():
    sharp = MarketplaceSimulator(dataclasses.replace(SMALL, context_signal=40.0))
    table = truth_table(sharp, "log_product", 0.25, n_requests=800, seed=4)
    batch, truth = sharp.fresh_requests(500, seed=5)
    ctx = table.posterior_best(sharp.segment_posterior(batch.context))
    seg = table.segment_best()[truth.segment]
    assert (ctx == seg).all(1).mean() > 0.99


def test_personalization_headroom(sim):
    h = headroom(sim, "log_product", grid_step=0.1, n_requests=1_500, seed=21)
    assert h["oracle_north_star"] > h["static_north_star"] > h["logging_north_star"]
    assert h["relative_gain"] > 0.03, h
    assert h["static_north_star"] < h["attainable_north_star"] < h["oracle_north_star"]
    assert h["true_value_north_star"] > h["oracle_north_star"]
    oracle = np.array(list(h["oracle_weights"].values()))
    assert len(np.unique(oracle, axis=0)) >= 3  # segments want different weights
