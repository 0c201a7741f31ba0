"""The per-round held-out probe scores the policy it is given (its business metric is what
the failure warnings and the round logs show a user)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.algos.fusion import fuse
from grade_ray.algos.metrics import ndcg_at_k
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.jobs.train import simulator_for
from grade_ray.learner.loop import Probe, new_policy

N = 500


@pytest.fixture(scope="module")
def policies(smoke_cfg, smoke_data):
    meta = read_meta(smoke_data[0])
    uniform = new_policy(smoke_cfg, meta, smoke_data[0])
    skewed = new_policy(smoke_cfg, meta, smoke_data[0])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in skewed.tower[-1].parameters():
            p.normal_(0, 1.0)
    return meta, uniform, skewed


def _weights(policy, context: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return policy.pi(torch.from_numpy(context))


def test_simulator_probe_north_star_is_the_policys(smoke_cfg, smoke_data, policies):
    meta, uniform, skewed = policies
    sim = simulator_for(smoke_cfg)
    probe = Probe(smoke_cfg, meta, smoke_data[1], sim, n=N)
    assert probe.business_key == "eval/north_star"
    batch, truth = sim.fresh_requests(N, seed=smoke_cfg.eval.ab_seed + 1)
    got = {}
    for name, policy in (("uniform", uniform), ("skewed", skewed)):
        w = _weights(policy, batch.context)
        fused = fuse(
            smoke_cfg.policy.fusion,
            torch.from_numpy(batch.scores),
            w,
            smoke_cfg.policy.fusion_eps,
        ).numpy()
        want = float(sim.expected_outcomes(batch, truth, fused)["north_star"].mean())
        got[name] = probe(policy)["eval/north_star"]
        assert got[name] == pytest.approx(want, rel=1e-6), name
    assert abs(got["skewed"] - got["uniform"]) > 1e-3 * abs(got["uniform"])
    out = probe(skewed)
    mean_w = _weights(skewed, batch.context).mean(0)
    for j, task in enumerate(meta.task_names):  # diagnostics describe the same policy
        assert out[f"{keys.POLICY_MEAN_W}/{task}"] == pytest.approx(float(mean_w[j]), rel=1e-5)


def test_logs_probe_ndcg_uses_the_policy_and_logged_positions(smoke_cfg, smoke_data, policies):
    meta, uniform, skewed = policies
    probe = Probe(smoke_cfg, meta, smoke_data[1], None, n=N)
    assert probe.business_key == keys.EVAL_NDCG
    batch, _, _ = read_sessions(smoke_data[1], max_rows=N)
    r = smoke_cfg.reward
    coef = np.array([r.post_gains.get(n, 0.0) for n in meta.label_names])
    exam = np.maximum(
        (1.0 + batch.position / r.propensity_scale) ** -r.propensity_power, r.propensity_min
    )
    gains = torch.from_numpy((np.maximum(batch.labels @ coef, 0) / exam).astype(np.float32))
    got = {}
    for name, policy in (("uniform", uniform), ("skewed", skewed)):
        w = _weights(policy, batch.context)
        fused = fuse(
            smoke_cfg.policy.fusion, torch.from_numpy(batch.scores), w, smoke_cfg.policy.fusion_eps
        )
        want = float(ndcg_at_k(fused, gains, torch.from_numpy(batch.mask), r.k).mean())
        got[name] = probe(policy)[keys.EVAL_NDCG]
        assert got[name] == pytest.approx(want, rel=1e-5), name
    assert got["skewed"] != pytest.approx(got["uniform"], rel=1e-4)
