"""What the reward fits on the logs: R_prior's recalibration and the dataset normalization."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from grade_ray.algos.calibration import PriorCalibration, apply_calibration
from grade_ray.config import ConfigError, SimulatorConfig, load_config
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.data.simulator import MarketplaceSimulator
from grade_ray.learner.reward_fit import (
    REWARD_FIT_FILE,
    fit_prior_calibration,
    fit_reward,
    load_reward_fit,
    save_reward_fit,
)
from grade_ray.spec import RewardFit, RewardSpec

CAL = {"ctr": "click", "cvr": "order|click"}


def _identity(d: int) -> PriorCalibration:
    row0, row1 = (0.0,) * (d + 1), (1.0,) + (0.0,) * d
    coef = (row0, row1, row0, row0)
    return PriorCalibration((0, 1), (2, 3), (coef, coef), (0.0,) * d, (1.0,) * d, (0.0, 0.0))


def test_identity_calibration_changes_nothing():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    context = torch.randn(3, 6, generator=g, dtype=torch.float64)
    out = apply_calibration(scores, context, _identity(6))
    torch.testing.assert_close(out, scores)


def test_calibration_touches_only_its_tasks():
    cal = _identity(2)
    shifted = ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0,) * 3, (0.0,) * 3)  # logit + 1
    cal = dataclasses.replace(cal, tasks=(1,), coef=(shifted,))
    scores = torch.full((1, 2, 4), 0.5, dtype=torch.float64)
    out = apply_calibration(scores, torch.zeros(1, 2, dtype=torch.float64), cal)
    assert out[0, 0, 1].item() == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert torch.equal(out[..., [0, 2, 3]], scores[..., [0, 2, 3]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Default segments (miscalibrated pCVR per segment), small catalogue, 20k logged requests."""
    sim_cfg = SimulatorConfig(
        num_users=4_000, num_items=8_000, num_candidates=50, min_candidates=50
    )
    sim = MarketplaceSimulator(sim_cfg)
    out = tmp_path_factory.mktemp("calib")
    sim.generate(out / "train", 20_000)
    return sim, out


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def test_fitted_calibration_tracks_true_rates_better_than_the_raw_model(world):
    sim, out = world
    cfg = load_config([], [f"run_dir={out}", f"reward.prior_calibration={CAL}"])
    batch, meta, _ = read_sessions(out / "train")
    cal = fit_prior_calibration(cfg, batch, meta)
    assert cal.tasks == (0, 1) and cal.value_tasks == (2, 3)
    batch, truth = sim.fresh_requests(3_000, seed=9)
    scores = torch.from_numpy(batch.scores).double()
    fixed = apply_calibration(scores, torch.from_numpy(batch.context).double(), cal).numpy()
    m = batch.mask
    for k, true in ((0, truth.ctr), (1, truth.cvr)):
        raw_err = np.abs(_logit(batch.scores[..., k]) - _logit(true))[m].mean()
        cal_err = np.abs(_logit(fixed[..., k]) - _logit(true))[m].mean()
        assert cal_err < raw_err, (k, raw_err, cal_err)
    # pCVR's segment-specific error is what the calibration is for: it must shrink a lot
    bias = lambda p: np.abs(  # noqa: E731  per-segment mean logit error
        [
            (_logit(p) - _logit(truth.cvr))[m & (truth.segment[:, None] == s)].mean()
            for s in range(4)
        ]
    ).mean()
    assert bias(fixed[..., 1]) < 0.8 * bias(batch.scores[..., 1])


def test_reward_fit_round_trip_and_stale_file(world, tmp_path):
    _, out = world
    over = [f"reward.prior_calibration={CAL}", "reward.normalization=dataset"]
    cfg = load_config([], [f"run_dir={tmp_path}", *over])
    fit = fit_reward(cfg, out / "train", read_meta(out / "train"))
    assert fit.calibration.tasks == (0, 1) and fit.post_scale > 0 and fit.prior_scale > 0
    save_reward_fit(tmp_path / REWARD_FIT_FILE, fit, cfg)
    assert load_reward_fit(tmp_path / REWARD_FIT_FILE, cfg) == fit
    with pytest.raises(ConfigError, match="another reward config"):
        load_reward_fit(tmp_path / REWARD_FIT_FILE, cfg.replace(**{"reward.l2": 0.5}))
    paper = load_config([], ["reward.prior_calibration={}", "reward.normalization=request"])
    assert fit_reward(paper, out / "train", read_meta(out / "train")) == RewardFit()


def test_spec_names_and_missing_fit_are_clear(world):
    _, out = world
    meta = read_meta(out / "train")
    bad_task = load_config([], ["reward.prior_calibration={gmv: click}"]).reward
    with pytest.raises(ConfigError, match="probability tasks in this data"):
        RewardSpec.from_config(bad_task, meta)
    bad_label = load_config([], ["reward.prior_calibration={ctr: clicks}"]).reward
    with pytest.raises(ConfigError, match="labels in this data"):
        RewardSpec.from_config(bad_label, meta)
    with pytest.raises(ConfigError, match="label name, or 'label|given'"):
        load_config([], ["reward.prior_calibration={ctr: 'a|b|c'}"])
    unfitted = RewardSpec.from_config(
        load_config([], [f"reward.prior_calibration={CAL}"]).reward, meta
    )
    with pytest.raises(ConfigError, match="no calibration was fitted"):
        unfitted.prior_gain(torch.rand(1, 3, 4), torch.rand(1, meta.context_dim))


def test_local_run_with_calibration_fits_once_and_evaluates(smoke_cfg, smoke_data, tmp_path):
    from pathlib import Path

    from grade_ray.jobs.evaluate import run_evaluate
    from grade_ray.jobs.train import run_train_local

    cfg = smoke_cfg.replace(
        run_dir=str(tmp_path),
        **{"reward.prior_calibration": CAL, "grpo.rounds": 1, "data.train_path": smoke_data[0]},
        **{"data.eval_path": smoke_data[1], "reward.normalization": "dataset"},
    )
    run_train_local(cfg)
    path = Path(tmp_path) / REWARD_FIT_FILE
    assert load_reward_fit(path, cfg).calibration.tasks == (0, 1)
    stamp = path.stat().st_mtime_ns
    res = run_evaluate(cfg, tmp_path)
    assert path.stat().st_mtime_ns == stamp  # evaluation reuses the run's fit
    assert np.isfinite(res.offline["GRADE"]["r_prior"])


def test_nll_with_examination_by_hand():
    from grade_ray.learner.reward_fit import _nll

    eta = torch.tensor([-3.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    exam = torch.tensor([0.25, 0.5, 1.0, 1.0], dtype=torch.float64)
    p = exam * torch.sigmoid(eta)
    want = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert _nll(eta, y, exam.log()).item() == pytest.approx(want.item(), rel=1e-12)


def test_dataset_normalization_divides_dcg_by_one_constant():
    from grade_ray.algos.rewards import group_rewards

    scores = torch.tensor([[[0.9, 0.1], [0.1, 0.9]], [[0.9, 0.1], [0.1, 0.9]]])
    weights = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # rank by task 0: item 0 first
    post = torch.tensor([[1.0, 0.0], [10.0, 0.0]])  # request 2's feedback is worth 10x
    mask = torch.ones(2, 2, dtype=torch.bool)
    kw = dict(fusion="linear", k=2, rules=[], l1=1.0, l2=0.0, l3=0.0, tau=0.0)
    ndcg = group_rewards(scores, weights, post, post, mask, **kw)["post"]
    assert ndcg[:, 0].tolist() == [1.0, 1.0]  # NDCG: both requests weigh the same
    dcg = group_rewards(scores, weights, post, post, mask, post_scale=5.0, prior_scale=5.0, **kw)
    assert dcg["post"][:, 0].tolist() == pytest.approx([0.2, 2.0])  # DCG / 5


def test_dataset_normalization_needs_the_fit(world):
    _, out = world
    meta = read_meta(out / "train")
    rc = load_config([], ["reward.normalization=dataset"]).reward
    spec = RewardSpec.from_config(rc, meta)
    assert spec.needs_fit
    with pytest.raises(ConfigError, match="needs the scales"):
        spec.group_rewards(
            torch.rand(1, 3, 4),
            torch.full((1, 2, 4), 0.25),
            torch.rand(1, 3),
            torch.rand(1, 3),
            torch.ones(1, 3, dtype=torch.bool),
            fusion="linear",
            fusion_eps=1e-6,
        )
