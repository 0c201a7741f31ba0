"""The marketplace simulator: determinism, schema round trip, response model, headroom, A/B."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from grade_ray.config import SimulatorConfig
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.data.simulator import (
    CHUNK,
    OUTCOME_KEYS,
    START_TS,
    MarketplaceSimulator,
    Truth,
    exam_prob,
    generation_benchmark,
    rank_positions,
)

SMALL = SimulatorConfig(
    num_users=500,
    num_items=3_000,
    num_candidates=30,
    min_candidates=10,
    context_dim=8,
    rows_per_shard=700,
    num_requests=2_000,
    num_eval_requests=600,
)


@pytest.fixture(scope="module")
def sim() -> MarketplaceSimulator:
    """The default configuration (100 candidates, 4 segments)."""
    return MarketplaceSimulator(SimulatorConfig())


@pytest.fixture(scope="module")
def fresh(sim):
    return sim.fresh_requests(3_000, seed=11)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """SMALL train split, 2000 requests over several shards."""
    out = tmp_path_factory.mktemp("train")
    paths = MarketplaceSimulator(SMALL).generate(out, SMALL.num_requests)
    return out, paths


def _fused(sim, batch, w) -> np.ndarray:
    import torch

    from grade_ray.algos.fusion import fuse

    weights = torch.from_numpy(np.tile(np.asarray(w, np.float32), (len(batch), 1)))
    return fuse("log_product", torch.from_numpy(batch.scores), weights).numpy()


# ---------------------------------------------------------------------------
# generation, determinism, schema


def test_generate_writes_valid_shards(logged):
    out, paths = logged
    assert len(paths) == 3  # 2000 rows, 700 per shard
    assert [p.name for p in paths] == [
        "train-00000.parquet",
        "train-00001.parquet",
        "train-00002.parquet",
    ]
    batch, meta, report = read_sessions(out)
    assert report.rows_read == report.rows_used == SMALL.num_requests
    assert report.rows_rejected == 0
    assert meta.task_names == ("ctr", "cvr", "gmv", "profit")
    assert meta.task_kinds == ("prob", "prob", "value", "value")
    assert meta.label_names == ("click", "order", "gmv", "profit")
    assert meta.context_dim == SMALL.context_dim and meta.source["split"] == "train"
    assert len(np.unique(batch.request_id)) == len(batch)
    assert np.all(np.diff(batch.ts) >= 0)
    assert batch.ts[0] == START_TS and batch.ts[-1] < START_TS + SMALL.num_days * 86_400
    assert batch.user_id.min() >= 0 and batch.user_id.max() < SMALL.num_users


def test_variable_length_candidate_lists(logged):
    batch, _, _ = read_sessions(logged[0])
    lengths = batch.mask.sum(1)
    assert lengths.min() == SMALL.min_candidates and lengths.max() == SMALL.num_candidates
    assert np.all(batch.item_ids[~batch.mask] == 0) and np.all(batch.item_ids[batch.mask] > 0)
    assert np.all(batch.scores[~batch.mask] == 0)
    for row in range(20):  # candidates of one request are distinct
        ids = batch.item_ids[row, batch.mask[row]]
        assert len(np.unique(ids)) == len(ids)


def test_same_seed_same_files_other_seed_differs(logged, tmp_path):
    _, paths = logged
    again = MarketplaceSimulator(SMALL).generate(tmp_path / "a", SMALL.num_requests)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    other = dataclasses.replace(SMALL, seed=1)
    b1, _, _ = read_sessions(MarketplaceSimulator(other).generate(tmp_path / "b", 500)[0])
    b0, _, _ = read_sessions(paths[0], max_rows=500)
    assert not np.array_equal(b0.scores, b1.scores)
    assert not np.array_equal(b0.context, b1.context)


def test_eval_split_is_later_and_disjoint(logged, tmp_path):
    train, _, _ = read_sessions(logged[0])
    sim = MarketplaceSimulator(SMALL)
    evb, _, _ = read_sessions(sim.generate(tmp_path, SMALL.num_eval_requests, split="eval")[0])
    assert read_meta(tmp_path).source["split"] == "eval"
    assert evb.ts.min() >= train.ts.max()
    assert not set(evb.request_id) & set(train.request_id)
    assert not np.array_equal(evb.context[:50], train.context[:50])
    assert set(evb.user_id) <= set(range(SMALL.num_users))
    with pytest.raises(ValueError, match="unknown split"):
        sim.generate(tmp_path, 10, split="test")


def test_progress_and_stale_shards(tmp_path):
    sim = MarketplaceSimulator(dataclasses.replace(SMALL, rows_per_shard=5_000))
    (tmp_path / "train-00009.parquet").write_bytes(b"stale")
    seen: list[int] = []
    n = CHUNK + 100
    paths = sim.generate(tmp_path, n, progress=seen.append)
    assert seen == [CHUNK, 100]
    assert sorted(tmp_path.glob("train-*.parquet")) == paths


def test_fresh_requests_deterministic(sim):
    b1, t1 = sim.fresh_requests(200, seed=3)
    b2, t2 = sim.fresh_requests(200, seed=3)
    b3, _ = sim.fresh_requests(200, seed=4)
    for f in dataclasses.fields(b1):
        np.testing.assert_array_equal(getattr(b1, f.name), getattr(b2, f.name))
    for f in dataclasses.fields(Truth):
        np.testing.assert_array_equal(getattr(t1, f.name), getattr(t2, f.name))
    assert not np.array_equal(b1.scores, b3.scores)
    assert np.all(b1.labels == 0)
    assert b1.context.shape == (200, sim.cfg.context_dim)
    assert t1.ctr.shape == b1.mask.shape and t1.intent.shape == (200, 4)


def test_bad_config_names(capsys):
    """Unknown segment or label names: a ConfigError, so the CLI prints one line."""
    from grade_ray.cli import main
    from grade_ray.config import ConfigError

    with pytest.raises(ConfigError, match="valid"):
        MarketplaceSimulator(
            dataclasses.replace(SMALL, segment_names=("whale",), segment_mix=(1.0,))
        )
    with pytest.raises(ConfigError, match="labels"):
        MarketplaceSimulator(dataclasses.replace(SMALL, north_star={"revenue": 1.0}))
    rc = main(
        ["simulate", "--config", "configs/smoke.yaml", "--set", "simulator.north_star={x: 1}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown label(s) ['x']" in err[0], err


@pytest.mark.parametrize("num_items", [30, 33])
def test_candidates_are_distinct_with_a_catalogue_barely_larger_than_a_list(num_items):
    """The config allows num_items == num_candidates: every list still shows distinct items
    (uniform redraws alone left duplicates in most lists)."""
    cfg = dataclasses.replace(SMALL, num_items=num_items, min_candidates=30)
    batch, _ = MarketplaceSimulator(cfg).fresh_requests(300, seed=1)
    assert all(len(set(row)) == 30 for row in batch.item_ids.tolist())


# ---------------------------------------------------------------------------
# response model


def test_click_rate_falls_with_position(sim, fresh, logged):
    batch, truth = fresh
    rng = np.random.default_rng(0)
    out = sim.sample_outcomes(batch, truth, rng.random(batch.mask.shape), seed=1)
    assert out["clicks"].sum() > 0
    # random ranking: the expected click rate by rank is exam(r) * mean ctr
    ranks = rank_positions(rng.random(batch.mask.shape), batch.mask)
    p_click = exam_prob(batch.mask.shape[1])[ranks] * truth.ctr
    by_rank = np.array([p_click[ranks == r].mean() for r in range(0, 100, 10)])
    assert np.all(np.diff(by_rank) < 0)
    # logged labels: top 10 ranks clicked far more than ranks 10-29 (both bias and policy)
    logb, _, _ = read_sessions(logged[0])
    clicks = logb.labels[..., 0]
    assert clicks[:, :10].mean() > 1.5 * clicks[:, 10:30][logb.mask[:, 10:30]].mean()


def test_rates_are_realistic(sim, fresh):
    batch, truth = fresh
    out = sim.expected_outcomes(batch, truth, _fused(sim, batch, sim.cfg.logging_weights))
    ctr = out["clicks"].sum() / out["impressions"].sum()
    cvr = out["orders"].sum() / out["clicks"].sum()
    assert 0.01 < ctr < 0.06 and 0.02 < cvr < 0.12


def test_segments_respond_differently(sim, fresh):
    batch, truth = fresh
    m = batch.mask
    cheap = truth.gmv < np.median(truth.gmv[m])
    seg = {name: truth.segment[:, None] == i for i, name in enumerate(sim.segment_names)}

    def cvr(s, items):
        sel = seg[s] & items & m
        return truth.cvr[sel].mean()

    assert cvr("bargain", cheap) > 2 * cvr("bargain", ~cheap)
    assert cvr("premium", ~cheap) > 1.5 * cvr("premium", cheap)
    assert cvr("browser", m) < 0.25 * cvr("buyer", m)  # browsers click but rarely buy
    assert truth.ctr[seg["browser"] & m].mean() > truth.ctr[seg["premium"] & m].mean()


def test_context_reveals_segment_only_partly(sim, fresh):
    batch, truth = fresh
    x, y = batch.context.astype(np.float64), truth.segment
    half = len(y) // 2
    mu = np.stack([x[:half][y[:half] == s].mean(0) for s in range(4)])
    prec = np.linalg.inv(np.cov((x[:half] - mu[y[:half]]).T))
    diff = x[half:, None, :] - mu
    pred = np.einsum("bsd,de,bse->bs", diff, prec, diff).argmin(1)
    acc = (pred == y[half:]).mean()
    assert 0.45 < acc < 0.92, acc


# ---------------------------------------------------------------------------
# outcomes, A/B, oracle


def test_expected_outcomes_match_reference_loop(sim):
    batch, truth = sim.fresh_requests(30, seed=5)
    batch.mask[:, 70:] = False  # pad
    fused = np.round(np.random.default_rng(1).random(batch.mask.shape), 1)  # many ties
    out = sim.expected_outcomes(batch, truth, fused)
    exam = exam_prob(batch.mask.shape[1])
    for b in range(len(batch)):
        idx = [i for i in range(batch.mask.shape[1]) if batch.mask[b, i]]
        idx.sort(key=lambda i: (-fused[b, i], i))
        clicks = sum(exam[r] * truth.ctr[b, i] for r, i in enumerate(idx))
        orders = sum(exam[r] * truth.ctr[b, i] * truth.cvr[b, i] for r, i in enumerate(idx))
        assert out["impressions"][b] == 70
        assert out["clicks"][b] == pytest.approx(clicks)
        assert out["north_star"][b] == pytest.approx(clicks + 10 * orders)
    assert set(out) == set(OUTCOME_KEYS)


def test_sampled_outcomes_track_expected(sim, fresh):
    batch, truth = fresh
    fused = _fused(sim, batch, (0.7, 0.3, 0.0, 0.0))
    exp = sim.expected_outcomes(batch, truth, fused)
    smp = sim.sample_outcomes(batch, truth, fused, seed=2)
    assert smp["clicks"].sum() == pytest.approx(exp["clicks"].sum(), rel=0.05)
    assert smp["orders"].sum() == pytest.approx(exp["orders"].sum(), rel=0.15)
    smp2 = sim.sample_outcomes(batch, truth, fused, seed=2)
    np.testing.assert_array_equal(smp["clicks"], smp2["clicks"])


def test_generation_benchmark(tmp_path):
    res = generation_benchmark(500, tmp_path, cfg=SMALL)
    assert res["requests"] == 500 and res["requests_per_s"] > 0 and res["peak_rss_mb"] > 0
    assert res["shards"] == 1
