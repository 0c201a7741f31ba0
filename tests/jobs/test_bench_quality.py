"""Quality benchmark: time-to-95% on hand values, the Markdown table, and a smoke end-to-end run."""

from __future__ import annotations

import math

import pytest

from grade_ray.jobs.bench.quality import (
    AB_KEYS,
    BASELINES,
    PPO,
    PPO_SAMPLES,
    PPO_TIME,
    bench_quality,
    quality_config,
    quality_markdown,
    time_to_fraction,
)
from grade_ray.jobs.compare import VARIANTS


def test_time_to_fraction_hand_values():
    # uniform 4.0, GRADE final 5.0 -> target = 4.0 + 0.95 * 1.0 = 4.95
    grade = [(0.0, 4.5), (10.0, 4.9), (20.0, 4.96), (30.0, 5.0)]
    assert time_to_fraction(grade, 4.0, 5.0) == 20.0
    assert time_to_fraction([(0.0, 4.5), (10.0, 4.95)], 4.0, 5.0) == 10.0  # exactly at target
    assert time_to_fraction([(5.0, 4.2), (15.0, 4.94)], 4.0, 5.0) is None  # never reached
    assert time_to_fraction([(0.0, 5.1), (10.0, 4.0)], 4.0, 5.0) == 0.0  # start already there
    assert time_to_fraction([(20.0, 5.0), (10.0, 4.99)], 4.0, 5.0) == 10.0  # sorted by time
    assert time_to_fraction([(0.0, float("nan")), (3.0, 5.0)], 4.0, 5.0) == 3.0
    assert time_to_fraction(grade, 4.0, 5.0, fraction=0.5) == 0.0
    # GRADE no better than uniform: the target is undefined, not trivially reached
    assert time_to_fraction([(0.0, 4.5)], 4.0, 3.9) is None
    assert time_to_fraction([(0.0, 4.5)], 4.0, 4.0) is None


def _synthetic_results() -> dict:
    res = {
        "quality.setup.ab_requests": 5000,
        "quality.setup.bootstrap": 100,
        "quality.probe.north_star_uniform": 4.0,
        "quality.probe.north_star_sp": 4.5,
        "quality.probe.north_star_grade_final": 5.0,
        "quality.probe.target_north_star": 4.95,
    }
    groups = [("baseline", a) for a in BASELINES] + [("equal_budget", n) for n in VARIANTS]
    groups += [("equal_budget", PPO), ("equal_time", PPO), ("equal_time", "GRADE")]
    for i, (g, arm) in enumerate(groups):
        p = f"quality.{g}.{arm}"
        for m in AB_KEYS:
            lift = 0.0 if arm == "best_static" else 1.0 + i
            res[f"{p}.{m}"] = 5.0 + i / 100
            res[f"{p}.{m}_lift_pct"] = lift
            res[f"{p}.{m}_lift_pct_ci_low"] = lift - 0.5
            res[f"{p}.{m}_lift_pct_ci_high"] = lift + 0.5
        res[f"{p}.attainable_headroom_captured"] = 0.1 * i
        if g != "baseline":
            res[f"{p}.requests"] = 10_000
            res[f"{p}.reward_evals"] = 200_000 if arm.startswith("GRADE") else 10_000
            res[f"{p}.train_s"] = 1234.56
            res[f"{p}.time_to_95pct_s"] = None if (g, arm) == ("equal_time", PPO) else 8.5
            res[f"{p}.time_to_95pct_over_sp_s"] = None if arm == PPO else 30.0
    return res


def test_quality_markdown_synthetic():
    md = quality_markdown(_synthetic_results())
    lines = md.splitlines()
    assert lines[0].startswith("| arm | budget |") and "time to 95%" in lines[0]
    table = [ln for ln in lines[2:] if ln.startswith("|")]
    labels = [ln.split("|")[1].strip() for ln in table]
    assert labels == [
        "uniform", "best_static", "SP", "GRADE", "GRADE-gaussian", "GRADE-no-prior",
        "GRADE-no-format", f"{PPO} (equal samples)", f"{PPO} (equal time)",
    ]  # fmt: skip
    ncols = len(lines[0].split("|"))
    assert all(len(ln.split("|")) == ncols for ln in table)
    by = dict(zip(labels, table))
    assert "control" in by["best_static"]
    assert "| never / never |" in by[f"{PPO} (equal time)"]  # never reached -> "never"
    assert "| 8.5 / never |" in by[f"{PPO} (equal samples)"]
    assert "| 8.5 / 30.0 |" in by["GRADE"] and "| 1,234.6 |" in by["GRADE"]
    assert "10,000 (200,000)" in by["GRADE"] and "10,000 (10,000)" in by[f"{PPO} (equal samples)"]
    assert "equal time" in by[f"{PPO} (equal time)"].split("|")[2]
    assert "+1.00%* [+0.50%, +1.50%] | 0.00 |" in by["uniform"]  # lift with CI, then captured
    assert "attainable headroom captured" in lines[0]
    assert "targets 4.9500" in md
    # missing arms are skipped, not an error
    partial = {k: v for k, v in _synthetic_results().items() if ".equal_time." not in k}
    assert f"{PPO} (equal time)" not in quality_markdown(partial)


def test_quality_config_modes(tmp_path):
    quick, full = quality_config(True, tmp_path / "q"), quality_config(False, tmp_path / "f")
    assert quick.run_dir == str(tmp_path / "q")
    assert quick.simulator.num_requests < full.simulator.num_requests
    # full = the README's compare setting: default simulator, 8 rounds x 2 passes
    assert full.simulator.num_requests == 100_000
    assert (full.grpo.rounds, full.grpo.data_passes) == (8, 2)


@pytest.mark.ray
def test_bench_quality_smoke_end_to_end(ray_session, smoke_cfg, tmp_path):
    from grade_ray.baselines.rllib_ppo.training import PPOSettings
    from grade_ray.jobs.bench.quality import _probe
    from grade_ray.learner.loop import load_policy

    settings = PPOSettings(train_batch=500, minibatch=250, num_epochs=1)
    res = bench_quality(smoke_cfg, tmp_path / "q", quick=True, ppo_settings=settings)
    arms = [("baseline", a) for a in BASELINES] + [("equal_budget", n) for n in VARIANTS]
    arms += [("equal_budget", PPO), ("equal_time", PPO), ("equal_time", "GRADE")]
    for g, arm in arms:
        p = f"quality.{g}.{arm}"
        for m in AB_KEYS:
            lift, lo, hi = (res[f"{p}.{m}_lift_pct{s}"] for s in ("", "_ci_low", "_ci_high"))
            assert all(math.isfinite(x) for x in (lift, lo, hi)), (p, m)
            assert lo - 1e-9 <= lift <= hi + 1e-9, (p, m, lo, lift, hi)
        assert res[f"{p}.north_star"] > 0
        assert math.isfinite(res[f"{p}.attainable_headroom_captured"])
    grade_req = res["quality.equal_budget.GRADE.requests"]
    assert grade_req == smoke_cfg.simulator.num_requests  # 1 pass over the smoke logs
    assert res["quality.equal_budget.GRADE.reward_evals"] == grade_req * 8  # smoke G = 8
    assert res["quality.equal_budget.RLlib-PPO.requests"] >= grade_req  # equal samples
    assert (
        res["quality.equal_budget.RLlib-PPO.reward_evals"]
        == res["quality.equal_budget.RLlib-PPO.requests"]
    )
    assert res["quality.equal_time.RLlib-PPO.train_s"] >= res["quality.equal_budget.GRADE.train_s"]
    for arm in [*VARIANTS, PPO_SAMPLES, PPO_TIME]:
        for key in ("time_to_95pct_s", "time_to_95pct_over_sp_s"):
            t = res[f"quality.{key}.{arm}"]
            assert t is None or 0 <= t <= res["quality.total_s"]
        curve = res[f"quality.curves.{arm}"]
        assert curve[0][0] == 0.0 and len(curve) >= 2
    # GRADE's final probe north-star is its own curve's end point, and the probe that scores
    # PPO's snapshots sees the same held-out requests as GRADE's per-round probe
    ns_final = res["quality.probe.north_star_grade_final"]
    assert ns_final == res["quality.curves.GRADE"][-1][1]
    run = tmp_path / "q"
    cfg = smoke_cfg.replace(run_dir=str(run))
    probe = _probe(cfg, str(run / "data" / "train"), str(run / "data" / "eval"))
    grade, _, _ = load_policy(run / "variants" / "GRADE" / "policy.pt")
    assert probe(grade)["eval/north_star"] == pytest.approx(ns_final, rel=1e-6)
    if ns_final > res["quality.probe.north_star_sp"]:  # from the Stage-1 start: not at t = 0
        assert res["quality.time_to_95pct_over_sp_s.GRADE"] > 0
        assert res["quality.time_to_95pct_s.GRADE"] is not None
    md = (tmp_path / "q" / "quality.md").read_text()
    for label in (
        "uniform",
        "best_static",
        "SP",
        "GRADE-no-format",
        "(equal samples)",
        "(equal time)",
    ):
        assert f"| {label}" in md or label in md
    assert (tmp_path / "q" / "eval" / "eval.json").exists()
    # the variants read the training logs through one decoded cache in the run directory
    assert list((run / "decoded").glob("*.arrow"))
    assert not any((run / "variants" / v / "decoded").exists() for v in VARIANTS)
