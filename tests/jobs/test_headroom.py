"""Headroom decomposition: the reward oracle, captured headroom, the gaps and the diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.config import load_config
from grade_ray.data.oracles import truth_table
from grade_ray.data.simulator import MarketplaceSimulator
from grade_ray.jobs.headroom import (
    CONTEXT_ORACLE,
    REWARD_ORACLE,
    SEGMENT_ORACLE,
    STATIC,
    diagnose,
    headroom,
    reward_table,
)


def _north_star(sim, batch, truth, weights) -> float:
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    fused = fuse("log_product", torch.from_numpy(batch.scores), w).numpy()
    return float(sim.expected_outcomes(batch, truth, fused)["north_star"].mean())


def test_reward_oracle_matches_the_true_oracle_when_the_reward_is_the_north_star(tmp_path):
    """A calibrated, noise-free upstream model and R = NDCG over the whole list with the
    north-star's own gains on predictions: the reward's optimum is the truth's."""
    cfg = load_config(
        [],
        [
            f"run_dir={tmp_path}",
            "simulator.num_users=3000",
            "simulator.num_items=6000",
            "simulator.num_candidates=30",
            "simulator.min_candidates=30",
            "simulator.miscalibration=0.0",
            "simulator.prediction_noise=0.0",
            "reward.k=30",
            "reward.l1=0.0",
            "reward.l2=1.0",
            "reward.l3=0.0",
            "reward.prior_gains={ctr: 1.0, 'ctr*cvr': 10.0}",
            "eval.oracle_requests=3000",
        ],
    )
    sim = MarketplaceSimulator(cfg.simulator)
    sim.generate(tmp_path / "train", 3000)
    rew = reward_table(cfg, sim, str(tmp_path / "train")).segment_best()
    true = truth_table(sim, "log_product", 0.1, n_requests=3000, seed=1).segment_best()
    batch, truth = sim.fresh_requests(3000, seed=2)
    ns_rew = _north_star(sim, batch, truth, rew[truth.segment])
    ns_true = _north_star(sim, batch, truth, true[truth.segment])
    assert ns_rew == pytest.approx(ns_true, rel=0.005)
    # and a reward that ignores the north-star's orders does not match it
    cfg2 = cfg.replace(**{"reward.prior_gains": {"ctr": 1.0}})
    clicks_only = reward_table(cfg2, sim, str(tmp_path / "train")).segment_best()
    assert _north_star(sim, batch, truth, clicks_only[truth.segment]) < ns_true * 0.99


def test_headroom_shares_by_hand():
    seg = np.array([0, 0, 1, 1])
    ns = {
        STATIC: np.array([1.0, 1.0, 1.0, 1.0]),
        CONTEXT_ORACLE: np.array([1.2, 1.2, 1.0, 1.0]),  # +0.1 on average
        SEGMENT_ORACLE: np.array([1.2, 1.2, 1.2, 1.2]),  # +0.2
        REWARD_ORACLE: np.array([1.1, 1.1, 1.0, 1.0]),  # +0.05: objective gap 0.5
        "GRADE": np.array([1.06, 1.06, 1.0, 1.0]),  # +0.03
    }
    h = headroom(ns, seg, ("a", "b"))
    assert h.captured["GRADE"] == pytest.approx(0.3)
    assert h.captured_segment["GRADE"] == pytest.approx(0.15)
    assert h.optimisation_gap["GRADE"] == pytest.approx(0.2)
    assert h.objective_gap == pytest.approx(0.5)
    assert h.captured["GRADE"] + h.optimisation_gap["GRADE"] + h.objective_gap == pytest.approx(1)
    assert h.captured[CONTEXT_ORACLE] == pytest.approx(1.0) and h.captured[STATIC] == 0.0
    assert h.per_segment["GRADE"] == pytest.approx({"a": 1.06, "b": 1.0})
    assert h.relative_headroom == pytest.approx(0.1)


def test_diagnosis_names_the_limit():
    seg = np.zeros(2, dtype=int)
    base = {STATIC: 1.0, CONTEXT_ORACLE: 1.1, SEGMENT_ORACLE: 1.2}

    def h(reward_oracle: float, grade: float):
        vals = {**base, REWARD_ORACLE: reward_oracle, "GRADE": grade}
        return headroom({k: np.full(2, v) for k, v in vals.items()}, seg, ("a",))

    reward_limited = diagnose(h(1.02, 1.02), {})
    assert len(reward_limited) == 1 and "the reward, not training" in reward_limited[0]
    training_limited = diagnose(h(1.09, 1.01), {})
    assert len(training_limited) == 1 and "training, not the reward" in training_limited[0]
    assert diagnose(h(1.09, 1.08), {}) == []
    flat = headroom({k: np.full(2, 1.0) for k in (*base, REWARD_ORACLE, "GRADE")}, seg, ("a",))
    assert np.isnan(flat.captured["GRADE"])
    assert "no attainable headroom" in diagnose(flat, {})[0]


def test_diagnosis_flags_a_policy_equal_to_sp():
    w = np.tile([0.25, 0.25, 0.25, 0.25], (5, 1))
    assert "GRADE equals SP" in diagnose(None, {"GRADE": w, "SP": w.copy()})[0]
    moved = w.copy()
    moved[0] = [0.4, 0.2, 0.2, 0.2]
    assert diagnose(None, {"GRADE": moved, "SP": w}) == []


def test_context_clusters_find_separated_groups():
    from grade_ray.jobs.headroom import assign_clusters, context_clusters

    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = np.concatenate([c + rng.normal(0, 0.3, (100, 2)) for c in centres])
    found = context_clusters(x, 3, seed=1)
    lab = assign_clusters(x, found)
    # every true group lands in one cluster, different groups in different clusters
    groups = [set(lab[i * 100 : (i + 1) * 100]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_logs_diagnosis_names_the_limit():
    from grade_ray.jobs.headroom import CLUSTER_ORACLE, REWARD_STATIC, LogsHeadroom, diagnose_logs

    def h(static, oracle, grade, gain=0.0, ci=0.01):
        reward = {REWARD_STATIC: static, CLUSTER_ORACLE: oracle, "GRADE": grade}
        gap = oracle - static
        cap = {a: (r - static) / gap if gap > 0 else float("nan") for a, r in reward.items()}
        return LogsHeadroom(reward, cap, gain, ci, 8)

    assert diagnose_logs(h(1.0, 1.1, 1.09), "GRADE") == []
    assert "more training" in diagnose_logs(h(1.0, 1.1, 1.02), "GRADE")[0]
    assert "no personalization" in diagnose_logs(h(1.0, 0.99, 1.0), "GRADE")[0]
    more = diagnose_logs(h(1.0, 1.1, 1.09, gain=0.05, ci=0.01), "GRADE")
    assert len(more) == 1 and "more logs should help" in more[0]


def test_logs_table_shows_no_share_when_the_cluster_oracle_gains_nothing():
    """Per-cluster weights no better than one static vector: the share column says '—', not nan."""
    from grade_ray.jobs.headroom import LogsHeadroom, logs_markdown

    h = LogsHeadroom(
        reward={"GRADE": 1.3291, "reward_static": 1.3304, "cluster_oracle": 1.3298},
        captured={
            "GRADE": float("nan"),
            "reward_static": float("nan"),
            "cluster_oracle": float("nan"),
        },
        data_gain=0.0,
        data_gain_ci=0.001,
        clusters=8,
    )
    text = "\n".join(logs_markdown(h))
    assert "nan" not in text
    assert "| GRADE | 1.3291 | — |" in text
    h.captured["GRADE"] = 0.5
    assert "| GRADE | 1.3291 | 0.50 |" in "\n".join(logs_markdown(h))
