"""The learned format constraint (reward.format_kind='learned'): the Dirichlet fit, the grid
optima it is fitted to, its round trip through RUN/reward_fit.pt, a training run with it on,
and that with it off (the default) training is what it was."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.algos import rewards
from grade_ray.algos.rewards import learned_format_reward
from grade_ray.config import ConfigError, load_config
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.learner import format_fit
from grade_ray.learner.format_fit import (
    MAX_GRID,
    best_grid_mass,
    constraint,
    fit_dirichlet,
    fit_format,
    format_grid_step,
)
from grade_ray.learner.reward_fit import (
    REWARD_FIT_FILE,
    fit_reward,
    load_reward_fit,
    save_reward_fit,
)
from grade_ray.runlog import read_metrics
from grade_ray.spec import RewardFit, RewardSpec

VOLATILE = ("time", "step", keys.PERF_ROUND_S, keys.PERF_REQUESTS_PER_S)


def stage2(run_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_metrics(run_dir)
        if r.get("stage") == 2
    ]


# ---------------------------------------------------------------- the fit


@pytest.mark.parametrize("alpha", [(2.0, 5.0, 3.0, 8.0), (0.5, 1.5, 0.8), (12.0, 4.0)])
def test_fit_dirichlet_recovers_a_known_dirichlet(alpha):
    a = torch.tensor(alpha, dtype=torch.float64)
    torch.manual_seed(0)
    x = torch.distributions.Dirichlet(a).sample((40_000,))
    got = fit_dirichlet(x)
    torch.testing.assert_close(got, a, rtol=0.05, atol=0.0)
    # mass is a weight per point: doubling half the points = giving them mass 2
    mass = torch.ones(len(x), dtype=torch.float64)
    mass[::2] = 2.0
    dup = torch.cat([x, x[::2]])
    torch.testing.assert_close(fit_dirichlet(x, mass), fit_dirichlet(dup))


def test_fit_dirichlet_degenerate_points_stay_finite():
    one = torch.tensor([[0.7, 0.3, 0.0]] * 5, dtype=torch.float64)
    got = fit_dirichlet(one)  # no spread: the concentration is capped, zeros floored
    assert torch.isfinite(got).all() and (got >= format_fit.MIN_ALPHA).all()
    assert got.sum() == pytest.approx(format_fit.MAX_CONCENTRATION, rel=1e-3)
    assert (got / got.sum())[0].item() == pytest.approx(0.7, abs=1e-3)


def test_constraint_mode_is_the_fitted_mean():
    alpha_fit = torch.tensor([2.0, 0.6, 0.2, 0.2], dtype=torch.float64)  # raw mode on a face
    c = constraint(alpha_fit)
    assert c.alpha == pytest.approx([3.0, 1.6, 1.2, 1.2])
    assert list(c.ref_logpdf) == sorted(c.ref_logpdf)
    mean = (alpha_fit / alpha_fit.sum()).float()
    far = torch.tensor([0.05, 0.05, 0.45, 0.45])
    s = learned_format_reward(torch.stack([mean, far, torch.eye(4)[1]]), c)
    assert s[0] == 1.0 and s[1] < 0.1 and s[2] == 0.0
    assert constraint(alpha_fit) == c  # deterministic reference draws


def test_best_grid_mass_by_hand():
    values = torch.tensor(
        [
            [0.1, 0.5, 0.5, 0.2],  # two best points: half each
            [0.3, 0.3, 0.3, 0.3],  # the grid cannot tell them apart: skipped
            [0.9, 0.1, 0.2, 0.3],  # one best point
        ],
        dtype=torch.float64,
    )
    mass, informative = best_grid_mass(values)
    assert informative == 2
    assert mass.tolist() == [1.0, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 12])
def test_format_grid_stays_small_for_any_k(k):
    step = format_grid_step(k)
    m = round(1 / step)
    assert math.comb(m + k - 1, k - 1) <= MAX_GRID or step == 1.0
    assert format_grid_step(4) == 0.1  # 286 points, the eval grid's step


# ---------------------------------------------------------------- on logged requests


@pytest.fixture(scope="module")
def learned_cfg(smoke_cfg, smoke_data):
    return smoke_cfg.replace(
        **{"reward.format_kind": "learned", "data.train_path": smoke_data[0]},
        **{"data.eval_path": smoke_data[1]},
    )


def test_fit_on_logs_round_trips_and_is_stale_for_another_fusion(learned_cfg, tmp_path):
    train = learned_cfg.data.train_path
    cfg = learned_cfg.replace(run_dir=str(tmp_path))
    fit = fit_reward(cfg, train, read_meta(train))
    assert fit.format is not None and len(fit.format.alpha) == 4
    assert min(fit.format.alpha) > 1.0  # one interior mode
    assert fit.post_scale > 0 and fit.calibration is not None  # the rest is still fitted
    path = tmp_path / REWARD_FIT_FILE
    save_reward_fit(path, fit, cfg)
    assert load_reward_fit(path, cfg) == fit  # weights_only load (runlog.load_checkpoint)
    with pytest.raises(ConfigError, match="another reward config"):
        load_reward_fit(path, cfg.replace(**{"policy.fusion": "linear"}))
    rules = cfg.replace(**{"reward.format_kind": "rules"})
    assert fit_reward(rules, train, read_meta(train)).format is None


def test_spec_needs_the_fit_and_ignores_rules_unless_asked(learned_cfg):
    meta = read_meta(learned_cfg.data.train_path)
    spec = RewardSpec.from_config(learned_cfg.reward, meta)
    assert spec.needs_fit and spec.rules == () and spec.format_kind == "learned"
    spec = dataclasses.replace(spec, post_scale=1.0, prior_scale=1.0)  # all but the format
    with pytest.raises(ConfigError, match="format_kind='learned' needs the Dirichlet"):
        spec.group_rewards(
            torch.rand(1, 3, 4),
            torch.full((1, 2, 4), 0.25),
            torch.rand(1, 3),
            torch.rand(1, 3),
            torch.ones(1, 3, dtype=torch.bool),
            fusion="linear",
            fusion_eps=1e-6,
        )
    # the ranking alone (l3 = 0: a replay's yardstick, the static search) needs no fit
    ranking = spec.group_rewards(
        torch.rand(1, 3, 4),
        torch.full((1, 2, 4), 0.25),
        torch.rand(1, 3),
        torch.rand(1, 3),
        torch.ones(1, 3, dtype=torch.bool),
        fusion="linear",
        fusion_eps=1e-6,
        l3=0.0,
    )
    assert torch.equal(ranking["reward"], ranking["post"] + 0.3 * ranking["prior"])
    rules = RewardSpec.from_config(learned_cfg.reward.__class__(), meta)
    assert rules.format_kind == "rules" and rules.rules == ((0, 2), (0, 3))


def test_nothing_to_learn_is_a_clear_error(learned_cfg):
    batch, meta, _ = read_sessions(learned_cfg.data.train_path, max_rows=50)
    flat = dataclasses.replace(batch, scores=np.full_like(batch.scores, 0.5))
    spec = RewardSpec.from_config(
        learned_cfg.reward, meta, RewardFit(post_scale=1.0, prior_scale=1.0)
    )
    spec = dataclasses.replace(spec, calibrate=(), calibration=None)
    with pytest.raises(ConfigError, match="nothing to learn the format from"):
        fit_format(spec, flat, "log_product", 1e-6)


@pytest.mark.parametrize("value", ["rule", "learn", ""])
def test_unknown_format_kind_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"reward.format_kind=.*use one of \['rules', 'learned'"):
        load_config([], [f"reward.format_kind={value!r}"])


# ---------------------------------------------------------------- training


def test_local_run_with_the_learned_format(learned_cfg, tmp_path):
    """End to end: the fit is made once and saved, every rollout scores R_format against it
    (in [0, 1], not constant), and evaluation reuses the run's fit."""
    from grade_ray.jobs.evaluate import run_evaluate
    from grade_ray.jobs.train import run_train_local

    cfg = learned_cfg.replace(run_dir=str(tmp_path))
    run_train_local(cfg)
    fit = load_reward_fit(tmp_path / REWARD_FIT_FILE, cfg)
    assert fit.format is not None
    rows = stage2(tmp_path)
    assert len(rows) == cfg.grpo.rounds
    fmt = [r[keys.ROLLOUT_R_FORMAT] for r in rows]
    assert all(0.0 < f < 1.0 for f in fmt), fmt  # a typicality share, not the rules' 0/1 steps
    stamp = (tmp_path / REWARD_FIT_FILE).stat().st_mtime_ns
    res = run_evaluate(cfg, tmp_path)
    assert (tmp_path / REWARD_FIT_FILE).stat().st_mtime_ns == stamp
    assert np.isfinite(res.offline["GRADE"]["r_prior"])


def test_format_off_leaves_the_default_run_unchanged(smoke_cfg, smoke_data, tmp_path, monkeypatch):
    """With reward.format_kind at its default ('rules') a run never touches the learned path:
    the same run with that path made to fail gives identical per-round metrics, and so does
    the explicit setting. (Against the code before the option existed, the default smoke
    run's metrics were compared once by hand: identical.)"""
    from grade_ray.jobs.train import run_train_local

    base = smoke_cfg.replace(
        **{"data.train_path": smoke_data[0], "data.eval_path": smoke_data[1]},
    )
    assert base.reward.format_kind == "rules"
    run_train_local(base.replace(run_dir=str(tmp_path / "plain")))

    def boom(*a, **k):
        raise AssertionError("the learned format path ran with format_kind='rules'")

    monkeypatch.setattr(format_fit, "fit_format", boom)
    monkeypatch.setattr(rewards, "learned_format_reward", boom)
    monkeypatch.setitem(rewards.FORMATS._items, "learned", boom)
    monkeypatch.setitem(rewards.FORMATS._items, "none", boom)
    guarded = base.replace(run_dir=str(tmp_path / "guarded"), **{"reward.format_kind": "rules"})
    run_train_local(guarded)
    a, b = stage2(tmp_path / "plain"), stage2(tmp_path / "guarded")
    assert len(a) == base.grpo.rounds and a == b
    fit = load_reward_fit(Path(tmp_path / "plain" / REWARD_FIT_FILE), base)
    assert fit.format is None
