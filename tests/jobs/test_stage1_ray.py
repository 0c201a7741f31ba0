"""Stage 1 on Ray Train (issue 17, item 1): it runs in the Train workers, not the driver; one
worker takes exactly the single-process steps; a failure after an epoch resumes after it.

One Ray Train worker runs torch on one thread over the same tasks in the same order as
``grade-ray pretrain`` (the steps are the plan's file-order tasks, whoever reads them), so
with this process on one thread too the two Stage 1 policies are equal; the tests allow
``TOL = 1e-5`` on every parameter (float summation order is the only thing that could
differ) and check that Stage 1 moved the weights far more than that.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from grade_ray.jobs.train import run_pretrain
from grade_ray.jobs.train_ray import run_pretrain_ray
from grade_ray.learner.stage1 import STAGE1_PID, STAGE1_REQUESTS_PER_S, epoch_checkpoints
from grade_ray.runlog import load_checkpoint, read_metrics

pytestmark = pytest.mark.ray

TOL = 1e-5
VOLATILE = ("time", STAGE1_REQUESTS_PER_S, STAGE1_PID)


def stage1_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("stage") == 1]


def stage1(run_dir) -> list[dict]:
    """Stage 1 metric rows without wall-clock values and process ids."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in stage1_rows(run_dir)]


def assert_same_rows(a_dir, b_dir) -> None:
    a, b = stage1(a_dir), stage1(b_dir)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-6, abs=TOL)


def pretrained(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run_dir) / "checkpoints" / "pretrain.pt")["state_dict"]


def assert_same_stage1(a_dir, b_dir, tol: float = TOL) -> None:
    a, b = pretrained(a_dir), pretrained(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


@pytest.fixture(scope="module")
def s1_cfg(smoke_cfg, smoke_data):
    """The smoke config with two Stage 1 epochs (a failure after the first leaves one)."""
    return smoke_cfg.replace(
        **{
            "data.train_path": smoke_data[0],
            "data.eval_path": smoke_data[1],
            "pretrain.epochs": 2,
        }
    )


@pytest.fixture(scope="module")
def local_stage1(s1_cfg, tmp_path_factory):
    """``grade-ray pretrain`` (this process, one thread) on the same data and seed."""
    cfg = s1_cfg.replace(run_dir=str(tmp_path_factory.mktemp("s1") / "local"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Train worker runs
    try:
        run_pretrain(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg


def test_stage1_runs_in_a_train_worker_and_matches_the_local_run(
    ray_session, s1_cfg, local_stage1, tmp_path
):
    cfg = s1_cfg.replace(run_dir=str(tmp_path / "ray"))
    path = run_pretrain_ray(cfg)
    assert path == Path(cfg.run_dir).resolve() / "checkpoints" / "pretrain.pt" and path.exists()
    rows = stage1_rows(cfg.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    pids = {r[STAGE1_PID] for r in rows}
    assert len(pids) == 1 and os.getpid() not in pids  # one Train worker, not this driver
    assert_same_rows(cfg.run_dir, local_stage1.run_dir)
    assert_same_stage1(cfg.run_dir, local_stage1.run_dir)
    start = load_checkpoint(epoch_checkpoints(cfg.run_dir)[0])["policy"]
    moved = max(float((v - start[k]).abs().max()) for k, v in pretrained(cfg.run_dir).items())
    assert moved > 100 * TOL  # the second epoch alone moved it far past the tolerance
    assert load_checkpoint(Path(cfg.run_dir) / "policy.pt")["stage"] == 1


def test_stage1_failure_restarts_after_the_last_epoch(ray_session, s1_cfg, local_stage1, tmp_path):
    """A worker failure after epoch 0 (FailureConfig, max_failures=1): the restarted worker
    group continues from epoch 0's checkpoint and ends equal to the uninterrupted run."""
    cfg = s1_cfg.replace(run_dir=str(tmp_path / "ft"), **{"learner.max_failures": 1})
    run_pretrain_ray(cfg, fail_at_epoch=0)
    rows = stage1_rows(cfg.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]  # epoch 0 not redone, epoch 1 done once
    assert rows[0][STAGE1_PID] != rows[1][STAGE1_PID]  # epoch 1 by the restarted worker
    assert_same_rows(cfg.run_dir, local_stage1.run_dir)
    assert_same_stage1(cfg.run_dir, local_stage1.run_dir)


@pytest.mark.slow
def test_stopped_stage1_resumes_with_resume(ray_session, s1_cfg, local_stage1, tmp_path):
    """No restarts left (max_failures=0): the job stops after epoch 0; ``--resume`` continues
    from RUN_DIR's epoch checkpoint in a new Train run and ends as the uninterrupted run."""
    cfg = s1_cfg.replace(run_dir=str(tmp_path / "stop"), **{"learner.max_failures": 0})
    with pytest.raises(Exception, match="injected failure after Stage 1 epoch 0"):
        run_pretrain_ray(cfg, fail_at_epoch=0)
    assert [r["epoch"] for r in stage1_rows(cfg.run_dir)] == [0]
    assert not (Path(cfg.run_dir) / "checkpoints" / "pretrain.pt").exists()
    run_pretrain_ray(cfg, resume=True)
    rows = stage1_rows(cfg.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0][STAGE1_PID] != rows[1][STAGE1_PID]
    assert_same_rows(cfg.run_dir, local_stage1.run_dir)
    assert_same_stage1(cfg.run_dir, local_stage1.run_dir)


@pytest.mark.slow  # two Ray Train jobs with two workers each: ~3 min here
def test_two_worker_stage1_restart_equals_the_uninterrupted_two_worker_run(
    ray_session, s1_cfg, tmp_path
):
    """DDP over two Train workers: each rank's shard, optimizer, score scale and RNG state
    come back after a restart, so the run ends as the uninterrupted two-worker run; both
    ranks report every epoch (Train would hang otherwise)."""
    two = s1_cfg.replace(
        **{
            "learner.num_workers": 2,
            "learner.num_cpus_per_worker": 0.25,
            "learner.max_failures": 1,
            "policy.dropout": 0.1,  # the ranks' RNG states matter
        }
    )
    whole = two.replace(run_dir=str(tmp_path / "whole"))
    run_pretrain_ray(whole)
    ft = two.replace(run_dir=str(tmp_path / "ft"))
    run_pretrain_ray(ft, fail_at_epoch=0)
    rows = stage1_rows(ft.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0][STAGE1_PID] != rows[1][STAGE1_PID]
    assert all(r["pretrain/requests"] == s1_cfg.simulator.num_requests for r in rows)
    assert_same_rows(ft.run_dir, whole.run_dir)
    assert_same_stage1(ft.run_dir, whole.run_dir, tol=0.0)
    state = load_checkpoint(epoch_checkpoints(ft.run_dir)[-1])
    assert len(state["rng"]) == 2 and not torch.equal(
        state["rng"][0]["cpu"], state["rng"][1]["cpu"]
    )
