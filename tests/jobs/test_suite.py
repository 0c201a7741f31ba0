"""``grade-ray suite`` on two tiny worlds and two arms: one table, shared Stage 1, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grade_ray.jobs.suite import SuiteError, load_suite, run_suite, select

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def suite_file(tmp_path):
    worlds = tmp_path / "worlds"
    worlds.mkdir()
    (worlds / "a.yaml").write_text("simulator: {seed: 1}\n")
    (worlds / "b.yaml").write_text("simulator: {seed: 2, context_signal: 0.5}\n")
    spec = {
        "worlds": "worlds",
        "set": {"grpo.rounds": 1, "eval.ab_requests": 800},
        "arms": {
            "GRADE": {},
            "no-format": {"set": {"reward.l3": 0.0}},
            "unbounded": {"set": {"pretrain.logit_bound": 0.0}},
            "paper": {"config": str(ROOT / "configs" / "paper.yaml")},
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_suite_trains_every_arm_on_every_world_and_resumes(suite_file, tmp_path):
    spec = load_suite(suite_file)
    assert list(spec.worlds) == ["a", "b"] and [a.name for a in spec.arms] == [
        "GRADE",
        "no-format",
        "paper",
        "unbounded",
    ]
    out = tmp_path / "run"
    smoke = [str(ROOT / "configs" / "smoke.yaml")]
    res = run_suite(spec, out, smoke)
    assert set(res) == {"a", "b"}
    for world in ("a", "b"):
        arms = res[world]["arms"]
        assert set(arms) == {"GRADE", "no-format", "unbounded", "paper"}
        for r in arms.values():
            assert r["ci_low"] <= r["lift"] <= r["ci_high"]
            total = r["captured"] + r["optimisation_gap"] + r["objective_gap"]
            assert total == pytest.approx(1.0)
        # one Stage 1 per distinct (pretrain, policy, R_post) setting: GRADE and no-format
        # share one, the two without a logit bound (unbounded, paper) another...
        assert len(list((out / world / "stage1").iterdir())) == 2
        # ...and one reward oracle per distinct reward (unbounded trains with GRADE's)
        oracles = [k for k in res[world]["oracles"] if k.startswith("reward_oracle[")]
        assert oracles == [
            "reward_oracle[GRADE]",
            "reward_oracle[no-format]",
            "reward_oracle[paper]",
        ]
    table = (out / "suite.md").read_text()
    assert table.count("\n| a | ") == 4 + 1 and table.count("\n| b | ") == 4 + 1  # + headroom
    assert json.loads((out / "suite.json").read_text())["b"]["arms"]["paper"]["north_star"] > 0
    # re-running trains nothing again and gives the same numbers
    again = run_suite(select(spec, ["a"], ["paper"]), out, smoke)
    assert again["a"]["train_s"]["paper"] is None
    assert again["a"]["arms"]["paper"]["north_star"] == res["a"]["arms"]["paper"]["north_star"]


def test_suite_errors_are_clear(suite_file, tmp_path):
    spec = load_suite(suite_file)
    with pytest.raises(SuiteError, match="unknown world"):
        select(spec, ["nope"], None)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"worlds": "worlds", "arms": {"x": {"sett": {}}}}))
    with pytest.raises(SuiteError, match="takes keys"):
        load_suite(bad)
    sim_arm = tmp_path / "sim.yaml"
    sim_arm.write_text(
        yaml.safe_dump(
            {
                "worlds": str(suite_file.parent / "worlds"),
                "arms": {"x": {"set": {"simulator.seed": 9}}},
            }
        )
    )
    from grade_ray.jobs.suite import arm_config

    s = load_suite(sim_arm)
    with pytest.raises(SuiteError, match="changes simulator"):
        arm_config(s, "a", s.arms[0], tmp_path / "r")
    eval_arm = tmp_path / "eval.yaml"
    eval_arm.write_text(
        yaml.safe_dump(
            {
                "worlds": str(suite_file.parent / "worlds"),
                "arms": {"x": {"set": {"eval.ab_requests": 99}}},
            }
        )
    )
    s = load_suite(eval_arm)
    with pytest.raises(SuiteError, match="changes eval"):
        arm_config(s, "a", s.arms[0], tmp_path / "r")


def test_data_scale_and_reports(suite_file, tmp_path):
    from grade_ray.jobs.report import run_report
    from grade_ray.jobs.suite import run_scale

    spec = select(load_suite(suite_file), ["a"], ["GRADE"])
    out = tmp_path / "scale"
    smoke = [str(ROOT / "configs" / "smoke.yaml")]
    scale = run_scale(spec, out, [1500, 800], smoke)
    assert sorted(scale) == [800, 1500]
    for n in (800, 1500):
        data = yaml.safe_load((out / f"n{n}" / "a" / "world.yaml").read_text())
        assert data["simulator"]["num_requests"] == n  # each size trains on its own logs
    md = (out / "scale.md").read_text()
    assert "| 800 requests | 1,500 requests |" in md and md.count("\n| a | GRADE |") == 1
    page = run_report(out).read_text()
    assert "scale.png" in page and (out / "report" / "scale.png").stat().st_size > 0
    page = run_report(out / "n800").read_text()
    assert "suite.png" in page and "| a | GRADE |" in page
