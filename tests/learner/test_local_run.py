"""End to end without Ray: train --local, resume, evaluate, compare, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grade_ray import keys
from grade_ray.cli import main
from grade_ray.jobs.train import run_train_local
from grade_ray.runlog import read_metrics


@pytest.fixture(scope="module")
def local_run(smoke_cfg, smoke_data, tmp_path_factory):
    cfg = smoke_cfg.replace(run_dir=str(tmp_path_factory.mktemp("local")))
    # reuse the session's simulated data
    Path(cfg.run_dir, "data").symlink_to(Path(smoke_data[0]).parent)
    run_train_local(cfg)
    return cfg


def test_run_dir_contents_and_diagnostics(local_run):
    run = Path(local_run.run_dir)
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "policy.pt", "summary.json"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").glob("round-*.pt")) == [
        "round-0000.pt",
        "round-0001.pt",
    ]
    rows = [r for r in read_metrics(run) if r.get("stage") == 2]
    assert len(rows) == 2
    for key in (
        keys.ROLLOUT_R_POST,
        keys.ROLLOUT_R_PRIOR,
        keys.ROLLOUT_R_FORMAT,
        keys.LEARNER_KL,
        keys.LEARNER_CLIP_FRAC,
        keys.ROLLOUT_ZERO_VAR_FRAC,
        keys.POLICY_ENTROPY,
        keys.POLICY_POLARIZED,
        keys.POLICY_SPREAD,
        "eval/north_star",
        "segment/bargain/w_cvr",
    ):
        assert key in rows[-1], key
    assert rows[0][keys.ROLLOUT_ALPHA_HAT] < rows[1][keys.ROLLOUT_ALPHA_HAT]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["rows_used"] == local_run.simulator.num_requests


def test_resume_at_round_boundary_runs_the_rest(local_run, tmp_path):
    import shutil

    run = tmp_path / "resume"
    shutil.copytree(local_run.run_dir, run, symlinks=True)
    (run / "checkpoints" / "round-0001.pt").unlink()
    (run / "metrics.jsonl").write_text("")
    cfg = local_run.replace(run_dir=str(run))
    run_train_local(cfg, resume=True)
    rounds = [r[keys.ROUND] for r in read_metrics(run) if r.get("stage") == 2]
    assert rounds == [1]


def test_evaluate_all_arms(local_run):
    from grade_ray.jobs.evaluate import run_evaluate

    res = run_evaluate(local_run, local_run.run_dir)
    assert set(res.offline) == {"uniform", "best_static", "SP", "GRADE"}
    arms = {r["arm"] for r in res.online}
    assert {"GRADE", "SP", "best_static", "static_truth", "oracle"} <= arms
    assert res.headroom["oracle"] == pytest.approx(1.0)
    assert res.headroom["static_truth"] == pytest.approx(0.0)
    assert "north_star" in res.markdown
    assert (Path(local_run.run_dir) / "eval" / "eval.json").exists()


def test_cli_errors_are_clear(capsys):
    assert main(["train", "--local", "--set", "grpo.nope=1"]) == 2
    assert "valid keys here" in capsys.readouterr().err
