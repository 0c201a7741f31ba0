"""``grade-ray tune``: tune YAML validation (no Ray) and a small sweep on local Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from grade_ray.config import load_config
from grade_ray.jobs.tune.spec import (
    TuneError,
    check_sweep_resources,
    load_tune_spec,
    parse_tune_spec,
)
from grade_ray.jobs.tune.sweep import run_tune

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def spec_of(tmp_path, tune: dict, **overlay):
    data = {
        "experiment": ["smoke.yaml"],
        "run_dir": str(tmp_path / "run"),
        "rollout": {"num_cpus_per_worker": 0.4},
        **overlay,
        "tune": tune,
    }
    return parse_tune_spec(data, CONFIGS)


GRID = {"space": {"exploration.group_size": {"grid": [4, 8]}}}


@pytest.mark.parametrize("path", sorted((CONFIGS / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_tune_configs_parse(path):
    spec = load_tune_spec(path)
    assert spec.space and spec.metric == "eval/north_star"
    assert spec.shares_data() and spec.shares_stage1()
    check_sweep_resources(spec, {"CPU": 2.0})


def test_spec_defaults_and_layout(tmp_path):
    spec = spec_of(tmp_path, GRID)
    assert spec.search == "grid" and spec.num_samples == 1 and spec.mode == "max"
    assert spec.metric == "eval/north_star"  # simulator data
    assert spec.max_concurrent_trials == 1 and spec.scheduler == "none"
    assert spec.sweep_dir == (tmp_path / "run" / "tune" / "sweep").resolve()
    assert spec.cfg.grpo.rounds == 2  # from smoke.yaml, via experiment:
    logs = spec_of(tmp_path, GRID, data={"train_path": "x", "eval_path": "y"})
    assert logs.metric == "eval/ndcg" and not logs.shares_data()


@pytest.mark.parametrize(
    ("tune", "match"),
    [
        ({"space": {}}, "tune.space is empty"),
        ({"space": {"exploration.group_sizes": {"grid": [4]}}}, "unknown config key"),
        ({"space": {"explore.group_size": {"grid": [4]}}}, "unknown config section"),
        ({"space": {"exploration.group_size": {"grid": [1, 4]}}}, "group_size must be >= 2"),
        ({"space": {"exploration.group_size": {"gridd": [4]}}}, "unknown distribution"),
        ({"space": {"exploration.group_size": [4, 8]}}, "one-key mapping"),
        ({"space": {"grpo.lr": {"loguniform": [0, 1e-3]}}, "search": "random"}, "low > 0"),
        ({"space": {"grpo.lr": {"uniform": [1e-3, 1e-4]}}, "search": "random"}, "low < high"),
        ({"space": {"run_dir": {"grid": ["a"]}}}, "run_dir cannot be swept"),
        ({**GRID, "search": "bayes"}, "unknown search"),
        ({"space": {"grpo.lr": {"uniform": [1e-4, 1e-3]}}}, "search=grid needs"),
        ({**GRID, "search": "optuna"}, "cannot take grid entries"),
        ({**GRID, "metric": "rollout/reward"}, "training signal"),
        ({**GRID, "metric": "eval/ndcg"}, "only for logged data"),
        ({**GRID, "metric": "lift/ctr"}, "per-round held-out metric"),
        ({**GRID, "mode": "best"}, "tune.mode"),
        ({**GRID, "scheduler": "pbt"}, "tune.scheduler"),
        ({**GRID, "scheduler": "asha", "grace_period": 2}, "grace_period=2 must be < grpo"),
        ({**GRID, "cpus_per_trial": 0}, "must be > 0"),
        ({**GRID, "num_samples": 0}, "num_samples=0 must be >= 1"),
        ({**GRID, "samples": 2}, "unknown tune key"),
        ({**GRID, "num_samples": float("inf")}, "num_samples must be a int"),
        ({**GRID, "cpus_per_trial": float("nan")}, "cpus_per_trial must be a finite number"),
        ({"space": {1: {"grid": [4]}}}, "a dotted config name"),
        # every value a trial may get is checked, not only the range ends
        (
            {"space": {"exploration.group_size": {"uniform": [4, 8]}}, "search": "random"},
            "group_size must be an integer",
        ),
        (
            {
                "space": {"grpo.rounds": {"randint": [2, 4]}, "grpo.data_passes": {"choice": [2]}},
                "search": "random",
            },
            "rounds=3 must be a multiple of grpo.data_passes=2",
        ),
        (
            {
                "space": {
                    "simulator.num_candidates": {"choice": [20, 30]},
                    "simulator.min_candidates": {"randint": [10, 30]},
                },
                "search": "random",
            },
            "combination",
        ),
        # a whole section would slip past the shared-data and shared-Stage-1 rules
        ({"space": {"simulator": {"grid": [{"seed": 0}, {"seed": 1}]}}}, "is a config section"),
        ({"space": {"reward": {"grid": [{"k": 5}]}}}, "is a config section"),
    ],
)
def test_tune_spec_errors_are_clear(tmp_path, tune, match):
    with pytest.raises(TuneError, match=match):
        spec_of(tmp_path, tune)


def test_missing_tune_section(tmp_path):
    with pytest.raises(TuneError, match="'tune:' section"):
        parse_tune_spec({"experiment": ["smoke.yaml"]}, CONFIGS)


def test_space_supports_the_documented_keys(tmp_path):
    space = {
        "exploration.group_size": {"choice": [5, 10]},
        "exploration.alpha_start": {"uniform": [2.0, 5.0]},
        "exploration.alpha_end": {"loguniform": [10.0, 30.0]},
        "exploration.schedule": {"choice": ["cosine", "linear", "constant"]},
        "exploration.kind": {"choice": ["dirichlet", "gaussian"]},
        "reward.l1": {"choice": [0.5, 1.0]},
        "reward.l2": {"choice": [0.0, 0.3]},
        "reward.l3": {"choice": [0.0, 0.05]},
        "reward.tau": {"uniform": [0.2, 0.6]},
        "grpo.lr": {"loguniform": [1e-4, 3e-3]},
        "grpo.clip_eps": {"choice": [0.1, 0.2]},
        "grpo.beta": {"uniform": [0.0, 0.05]},
        "grpo.epochs_per_batch": {"randint": [1, 3]},
    }
    spec = spec_of(tmp_path, {"space": space, "search": "random", "num_samples": 4})
    assert spec.shares_data() and spec.shares_stage1()  # none of them changes Stage 1
    assert not spec_of(tmp_path, {"space": {"pretrain.lr": {"grid": [1e-3]}}}).shares_stage1()
    sim = spec_of(tmp_path, {"space": {"simulator.seed": {"grid": [0, 1]}}})
    assert not sim.shares_data() and not sim.shares_stage1()


def test_overrides_reach_config_and_tune_section(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        f"experiment: [{CONFIGS / 'smoke.yaml'}]\nrun_dir: {tmp_path / 'r'}\n"
        "rollout: {num_cpus_per_worker: 0.4}\n"
        "tune:\n  space:\n    exploration.group_size: {grid: [4, 8]}\n"
    )
    spec = load_tune_spec(path, ["grpo.rounds=3", "tune.num_samples=2", "tune.name=x"])
    assert spec.cfg.grpo.rounds == 3 and spec.num_samples == 2 and spec.name == "x"
    assert spec.cfg.rollout.num_cpus_per_worker == 0.4


def test_resources_checked_per_trial_naming_the_setting(tmp_path):
    from grade_ray.raysession import ResourceError

    spec = spec_of(tmp_path, {**GRID, "max_concurrent_trials": 2})
    with pytest.raises(ResourceError, match="tune.max_concurrent_trials=2.*rollout.num_workers"):
        check_sweep_resources(spec, {"CPU": 2.0})
    greedy = spec_of(tmp_path, {"space": {"rollout.num_workers": {"grid": [1, 4]}}})
    with pytest.raises(ResourceError, match="'rollout.num_workers': 4"):
        check_sweep_resources(greedy, {"CPU": 2.0})
    check_sweep_resources(spec_of(tmp_path, GRID), {"CPU": 2.0})


def test_model_searcher_without_its_package_is_refused(tmp_path):
    pytest.importorskip("ray.tune")
    from grade_ray.jobs.tune.sweep import _search_alg

    spec = spec_of(tmp_path, {"space": {"grpo.lr": {"uniform": [1e-4, 1e-3]}}, "search": "optuna"})
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(TuneError, match="needs the 'optuna' package"):
            _search_alg(spec)


def test_resume_without_a_sweep_is_a_clear_error(tmp_path):
    spec = spec_of(tmp_path, GRID)
    with pytest.raises(FileNotFoundError, match="no Tune experiment to resume"):
        run_tune(spec, resume=True)


@pytest.mark.ray
def test_sweep_runs_writes_results_and_resumes(ray_session, tmp_path):
    """Two trials; the second fails after its first round. The sweep still writes its
    results, and a resume reruns only the failed trial, from its round checkpoint."""
    spec = spec_of(tmp_path, {**GRID, "name": "t"}, learner={"max_failures": 0})
    res = run_tune(spec, inject_failure=(1, 0))
    d = spec.sweep_dir
    by_id = {t["trial_id"]: t for t in res.trials}
    assert len(by_id) == 2
    status = sorted(t["status"] for t in res.trials)
    assert status == ["completed", "error"], res.trials
    ok = next(t for t in res.trials if t["status"] == "completed")
    failed = next(t for t in res.trials if t["status"] == "error")
    assert failed["trial_id"].endswith("_00001")
    assert Path(ok["checkpoint"]).name == "policy.pt"
    for k in ("eval/north_star", "lift/ctr", "lift/cvr", "lift/opm", "lift/north_star"):
        assert k in ok["metrics"], k
    ok_mtime = Path(ok["checkpoint"]).stat().st_mtime
    # the failed trial got as far as one round and its checkpoint
    assert Path(failed["checkpoint"]).name == "round-0000.pt"
    # trials share one decoded cache (the same logs through each trial's data link)
    shards = sorted((d / "data" / "train").glob("*.parquet"))
    assert shards and len(list((d / "decoded").glob("*.arrow"))) == len(shards)
    assert not any((Path(t["run_dir"]) / "decoded").exists() for t in res.trials)

    with pytest.raises(TuneError, match="pass --resume"):
        run_tune(spec)
    for changed in ({"mode": "min"}, {"num_samples": 3}, {"max_concurrent_trials": 2}):
        # Tune restores its own copy of these: a changed one is refused, naming it
        (key,) = changed
        with pytest.raises(TuneError, match=f"{key}: .* -> "):
            run_tune(dataclasses.replace(spec, **changed), resume=True)
    res2 = run_tune(spec, resume=True)
    assert sorted(t["trial_id"] for t in res2.trials) == sorted(by_id)  # no new trials
    assert all(t["status"] == "completed" for t in res2.trials), res2.trials
    assert Path(ok["checkpoint"]).stat().st_mtime == ok_mtime  # the finished one not rerun
    redone = next(t for t in res2.trials if t["trial_id"] == failed["trial_id"])
    assert redone["metrics"]["rounds_done"] == spec.cfg.grpo.rounds
    rows = [
        json.loads(line)
        for line in (Path(redone["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    rounds = [r["round"] for r in rows if r.get("stage") == 2]
    assert rounds == [0, 1]  # continued from its round checkpoint, round 0 not redone

    data = json.loads((d / "sweep_results.json").read_text())
    assert data["metric"] == "eval/north_star" and data["mode"] == "max"
    assert len(data["trials"]) == 2 and data["table_md"].startswith("| trial_id")
    values = [t["metrics"]["eval/north_star"] for t in data["trials"]]
    assert values == sorted(values, reverse=True)
    for t in data["trials"]:
        assert set(t["config"]) == {"exploration.group_size"}
        assert {"lift/ctr", "lift/cvr", "lift/opm"} <= set(t["metrics"])
    assert (d / "results.md").read_text().count("| ") > 0
    assert (d / "results.csv").read_text().splitlines()[0].startswith("trial_id,status,")
    best = load_config([d / "best_config.yaml"])
    assert best.exploration.group_size == data["trials"][0]["config"]["exploration.group_size"]
    assert best.grpo.rounds == spec.cfg.grpo.rounds
    assert data["best"]["checkpoint"].endswith("policy.pt")

    from grade_ray.jobs.report import run_report

    md = run_report(d)
    assert (md.parent / "tradeoff.png").exists() and (md.parent / "sensitivity.png").exists()


@pytest.mark.ray
@pytest.mark.slow  # one trial's Stage 1 + Stage 2 Train job and its evaluation: ~2 min here
def test_a_trial_runs_its_own_stage1_in_its_train_workers(ray_session, tmp_path):
    """A swept Stage 1 key: each trial's Stage 1 runs in its Train run (before its rounds);
    the epoch reports do not reach Tune, which would refuse a result without its metric."""
    import os

    from grade_ray import keys

    tune = {"space": {"pretrain.lr": {"grid": [0.003]}}, "name": "s1"}
    spec = spec_of(tmp_path, tune, learner={"max_failures": 0})
    assert not spec.shares_stage1()
    res = run_tune(spec)
    (trial,) = res.trials
    assert trial["status"] == "completed", trial
    assert trial["metrics"]["rounds_done"] == spec.cfg.grpo.rounds
    rows = [
        json.loads(line)
        for line in (Path(trial["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    s1 = [r for r in rows if r.get("stage") == 1]
    assert [r["epoch"] for r in s1] == list(range(spec.cfg.pretrain.epochs))
    assert os.getpid() not in {r[keys.PRETRAIN_WORKER_PID] for r in s1}
    assert (Path(trial["run_dir"]) / "checkpoints" / "pretrain.pt").exists()
