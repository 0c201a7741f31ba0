"""The Ray path: actor pool, Ray Train learner, resume, fault tolerance, DDP, resource guard.

Two Ray runs with the same config are deterministic (Ray Train workers and rollout actors run
torch on one thread; every rollout task has its own seed), so a restarted or resumed run
must reproduce the uninterrupted run's per-round metrics and final weights exactly. The
local path runs torch on this process's threads, so it matches the Ray path to ~1e-3.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from grade_ray import keys
from grade_ray.jobs.train_ray import run_train_ray
from grade_ray.raysession import ResourceError, check_resources
from grade_ray.runlog import load_checkpoint, read_metrics

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]

VOLATILE = (
    "time",
    "step",
    keys.PERF_ROUND_S,
    keys.PERF_REQUESTS_PER_S,
    keys.PERF_STAGE1_REQUESTS_PER_S,
    keys.PRETRAIN_WORKER_PID,
)


def stage2_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r.get("stage") == 2]


def stage2(run_dir) -> list[dict]:
    """Stage-2 metric rows without wall-clock values."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in stage2_rows(run_dir)]


def assert_same_policy(a_dir, b_dir) -> None:
    a = load_checkpoint(Path(a_dir) / "policy.pt")["state_dict"]
    b = load_checkpoint(Path(b_dir) / "policy.pt")["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def ray_cfg(smoke_cfg, smoke_data):
    return smoke_cfg.replace(**{"data.train_path": smoke_data[0], "data.eval_path": smoke_data[1]})


@pytest.fixture(scope="module")
def ray_run(ray_session, ray_cfg, tmp_path_factory):
    """An uninterrupted Ray run of the smoke config (2 rounds, 2 rollout actors)."""
    cfg = ray_cfg.replace(run_dir=str(tmp_path_factory.mktemp("ray") / "run"))
    run_train_ray(cfg)
    return cfg


def skewed_state(policy, seed: int) -> dict:
    """A non-uniform policy's weights (a fresh policy is uniform: stale weights look right)."""
    p = copy.deepcopy(policy)
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in p.tower[-1].parameters():
            t.normal_(0, 1.0)
    return p.state_dict()


def test_resource_guard_names_the_setting(smoke_cfg):
    with pytest.raises(ResourceError, match="rollout.num_workers"):
        check_resources(smoke_cfg.replace(**{"rollout.num_workers": 8}), {"CPU": 2.0})
    with pytest.raises(ResourceError, match="learner.use_gpu=false"):
        check_resources(smoke_cfg.replace(**{"learner.use_gpu": True}), {"CPU": 8.0})
    check_resources(smoke_cfg, {"CPU": 2.0})
    # Stage 1 alone starts no rollout actors
    check_resources(smoke_cfg.replace(**{"rollout.num_workers": 8}), {"CPU": 2.0}, rollouts=False)


def test_killed_actor_task_is_redone_exactly_once_with_the_current_weights(
    ray_session, smoke_cfg, smoke_data
):
    from grade_ray.data.plan import DataPlan, TaskReader
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.rollout.actor import RayRollout
    from grade_ray.rollout.worker import RolloutWorker

    cfg = smoke_cfg.replace(**{"rollout.batch_size": 100})
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=100)
    tasks = plan.rounds[0]
    spec = rollout_spec(cfg, plan.meta, smoke_data[0])
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    v0, v1 = skewed_state(policy, 0), skewed_state(policy, 1)
    local = RolloutWorker(copy.deepcopy(policy), spec)
    reader = TaskReader(plan.meta)

    def expected(state, version, task, seed):
        local.set_weights(state, version)
        local.reseed(seed)
        return local.rollout(reader.load(task), 5.0)

    pool = RayRollout(cfg, plan.meta, spec, num_workers=1)
    try:
        pool.set_weights(v0, 0)
        first = pool.collect(pool.submit(tasks[:1], 5.0, 0, [1]))[0]
        # a fresh actor samples with the weights it was sent, not its own initial ones
        np.testing.assert_array_equal(
            first[keys.WEIGHTS], expected(v0, 0, tasks[0], 1)[keys.WEIGHTS]
        )
        assert int(first[keys.POLICY_VERSION]) == 0
        pool.set_weights(v1, 1)  # the learner stepped
        pid = pool.infos()[0]["pid"]
        seeds = list(range(1, len(tasks) + 1))
        handle = pool.submit(tasks, 5.0, 1, seeds)
        os.kill(pid, signal.SIGKILL)
        out = pool.collect(handle)
        assert pool.infos()[0]["pid"] != pid  # a fresh process redid the work
        ids = np.concatenate([o[keys.REQUEST_ID] for o in out])
        want = np.concatenate(
            [
                np.asarray(pq.read_table(t.file, columns=["request_id"]).column(0).to_numpy())[
                    t.rows
                ]
                for t in tasks
            ]
        )
        np.testing.assert_array_equal(ids, want)  # every request once, in task order
        # the restarted actor sampled with the current weights (version 1), not stale ones
        for i in (0, len(tasks) - 1):
            ref = expected(v1, 1, tasks[i], seeds[i])
            assert int(out[i][keys.POLICY_VERSION]) == 1
            np.testing.assert_allclose(out[i][keys.WEIGHTS], ref[keys.WEIGHTS], rtol=1e-6)
            np.testing.assert_allclose(out[i][keys.REWARD], ref[keys.REWARD], rtol=1e-5)
    finally:
        pool.close()


def test_actors_run_ahead_within_max_staleness(ray_session, smoke_cfg, smoke_data):
    """rollout.max_staleness=1 with real actors: the next step is sampled while the learner
    updates, batches are at most one version old, each request is used once per pass, and
    batches come back in task order."""
    from grade_ray.data.plan import DataPlan
    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
    from grade_ray.learner.loop import GRPOTrainer, new_policy, rollout_spec
    from grade_ray.rollout.actor import RayRollout

    # 4 lanes per step on 2 actors: each actor runs two tasks per call
    cfg = smoke_cfg.replace(
        **{"rollout.max_staleness": 1, "rollout.batch_size": 125, "rollout.num_workers": 4}
    )
    plan = DataPlan.build(smoke_data[0], rounds=2, batch_size=125)
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    learner = GRPOLearner(policy, GRPOSettings.from_config(cfg), seed=cfg.seed)
    lags, ids = [], []
    update = learner.update

    def recording_update(batch):
        lags.append(learner.version - int(batch[keys.POLICY_VERSION]))
        ids.append(batch[keys.REQUEST_ID])
        return update(batch)

    learner.update = recording_update
    backend = RayRollout(
        cfg,
        plan.meta,
        rollout_spec(cfg, plan.meta, smoke_data[0]),
        num_workers=2,
        lanes_per_actor=2,
    )
    trainer = GRPOTrainer(cfg, plan, learner, backend, None, "unused")
    trainer.end_round = lambda r, m: trainer.history.append(m)  # no checkpoints
    try:
        trainer.fit()
    finally:
        backend.close()
    n_steps = sum(trainer._num_steps(r) for r in range(2))
    assert len(lags) == n_steps and set(lags) == {0, 1}
    assert lags.count(1) == n_steps - 2  # all but the first step of each round ran ahead
    reader_ids = []
    from grade_ray.data.plan import TaskReader

    reader = TaskReader(plan.meta)
    for r in range(2):
        for step in trainer._step_tasks(r):
            reader_ids.append(np.concatenate([reader.load(t).request_id for t in step]))
    for got, want in zip(ids, reader_ids):
        np.testing.assert_array_equal(got, want)
    for h, r in zip(trainer.history, plan.rounds):
        assert h[keys.ROLLOUT_REQUESTS] == h["rollout/unique_requests"] == sum(len(t) for t in r)


def test_two_actor_ray_run_matches_local(ray_run, ray_cfg, tmp_path):
    from grade_ray.jobs.train import run_train_local

    local = ray_cfg.replace(run_dir=str(tmp_path / "local"))
    run_train_local(local)
    a, b = stage2_rows(local.run_dir), stage2_rows(ray_run.run_dir)
    assert len(a) == len(b) == ray_cfg.grpo.rounds
    for ra, rb in zip(a, b):
        assert ra[keys.ROLLOUT_REQUESTS] == rb[keys.ROLLOUT_REQUESTS]
        assert rb["rollout/unique_requests"] == rb[keys.ROLLOUT_REQUESTS]
        for k in (keys.ROLLOUT_REWARD, keys.ROLLOUT_R_POST, keys.LEARNER_KL, keys.EVAL_NDCG):
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-5), k
    actors = json.loads((Path(ray_run.run_dir) / "rollout_actors.json").read_text())
    assert len({a["pid"] for a in actors}) == 2
    # Stage 1 ran in the Train worker (not this driver) and took the local run's steps
    from grade_ray.learner.stage1 import STAGE1_PID

    s1 = [r for r in read_metrics(ray_run.run_dir) if r.get("stage") == 1]
    assert [r["epoch"] for r in s1] == list(range(ray_cfg.pretrain.epochs)) and s1
    assert os.getpid() not in {r[STAGE1_PID] for r in s1}
    a1 = load_checkpoint(Path(local.run_dir) / "checkpoints" / "pretrain.pt")["state_dict"]
    b1 = load_checkpoint(Path(ray_run.run_dir) / "checkpoints" / "pretrain.pt")["state_dict"]
    for k in a1:
        torch.testing.assert_close(b1[k], a1[k], rtol=0, atol=1e-5, msg=k)


def test_learner_failure_restart_reproduces_the_uninterrupted_run(ray_run, ray_cfg, tmp_path):
    cfg = ray_cfg.replace(run_dir=str(tmp_path / "ft"), **{"learner.max_failures": 1})
    run_train_ray(cfg, fail_at_round=0)
    rows = stage2(cfg.run_dir)
    assert [r[keys.ROUND] for r in rows] == [0, 1]  # round 0 not redone, round 1 done once
    assert rows == stage2(ray_run.run_dir)
    assert_same_policy(cfg.run_dir, ray_run.run_dir)


def test_stopped_ray_run_resumes_to_the_uninterrupted_run(ray_run, ray_cfg, tmp_path):
    stopped = ray_cfg.replace(run_dir=str(tmp_path / "stop"), **{"learner.max_failures": 0})
    with pytest.raises(Exception, match="injected failure"):
        run_train_ray(stopped, fail_at_round=0)
    assert [r[keys.ROUND] for r in stage2_rows(stopped.run_dir)] == [0]
    run_train_ray(stopped, resume=True)
    rows = stage2(stopped.run_dir)
    assert [r[keys.ROUND] for r in rows] == [0, 1]
    assert rows == stage2(ray_run.run_dir)
    assert_same_policy(stopped.run_dir, ray_run.run_dir)


def test_two_learner_workers_share_each_round(ray_session, ray_cfg, tmp_path):
    """learner.num_workers=2 (DDP on CPU): each rank drives its own rollout actor over half
    of every step, both ranks report every round, and the run ends like a one-worker run in
    shape (the DDP update itself is compared with one worker in tests/learner/test_ddp.py)."""
    cfg = ray_cfg.replace(
        run_dir=str(tmp_path / "ddp"),
        **{
            "learner.num_workers": 2,
            "learner.num_cpus_per_worker": 0.25,
            "rollout.num_cpus_per_worker": 0.25,
        },
    )
    run_train_ray(cfg)
    rows = stage2_rows(cfg.run_dir)
    assert [r[keys.ROUND] for r in rows] == [0, 1]
    per_round = cfg.simulator.num_requests // cfg.grpo.rounds
    for r in rows:  # rank 0's share: half of every step, each request once
        assert r[keys.ROLLOUT_REQUESTS] == r["rollout/unique_requests"] == per_round // 2
        assert np.isfinite(r[keys.EVAL_NDCG])
    actors = json.loads((Path(cfg.run_dir) / "rollout_actors.json").read_text())
    assert len(actors) == 1  # rank 0's own actor (rollout.num_workers // world)
    start = load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "pretrain.pt")["state_dict"]
    end = load_checkpoint(Path(cfg.run_dir) / "policy.pt")["state_dict"]
    assert any(not torch.equal(start[k], end[k]) for k in end)


def _console(args: list[str], cwd: Path) -> list[str]:
    """The console lines (stdout + stderr) of ``python -m grade_ray ARGS`` in a fresh
    process: the embedded Ray, the Train worker's output relayed to the driver."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "GRADE_RAY_VERBOSE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "grade_ray", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout.splitlines()


def test_train_console_shows_round_lines_and_warnings_ray_info_only_with_v(smoke_data, tmp_path):
    """Issue 15 item 1: ``grade-ray train`` prints one line per round (its own), warnings
    and the summary; Ray Train's per-report ``Reporting training result ... metrics={...}``
    lines (~2,000 characters), checkpoint paths and worker-group banners only with -v.
    Stage 1 off and a negligible GRPO step keep the policy uniform, so every round warns
    "no personalization" from the Train worker: a worker's warning must still get through."""
    train = [
        "train",
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        "--set",
        f"data.train_path={smoke_data[0]}",
        "--set",
        f"data.eval_path={smoke_data[1]}",
        "--set",
        "pretrain.epochs=0",
        "--set",
        "grpo.lr=1e-12",
    ]
    quiet = _console([*train, "--run-dir", str(tmp_path / "quiet")], tmp_path)
    text = "\n".join(quiet)
    assert max(len(line) for line in quiet) <= 300, max(quiet, key=len)
    assert "Reporting training result" not in text
    assert "Checkpoint successfully created" not in text
    assert "Started training worker group" not in text
    rounds = [x for x in quiet if "round 1/2: reward" in x or "round 2/2: reward" in x]
    assert len(rounds) == 2, text  # one line per round, from the Train worker
    assert not any("(100%)" in x for x in quiet), text  # the round line is its summary
    assert any("no personalization" in x for x in quiet), text  # the worker's warning
    # the result line ends the job's own output (a raylet warning, e.g. disk nearly full,
    # may still arrive after it: warnings are shown, whenever they come)
    assert [x for x in quiet if "(raylet)" not in x][-1].startswith("policy: "), text

    loud = _console(["-v", *train, "--run-dir", str(tmp_path / "loud")], tmp_path)
    text = "\n".join(loud)
    assert sum("Reporting training result" in x for x in loud) == 2, text
    assert "Checkpoint successfully created" in text
    assert "Started training worker group" in text
    assert any("round 2/2: reward" in x for x in loud), text


def test_quiet_ray_info_keeps_the_jobs_lines_and_every_warning():
    """The worker-side filter drops Ray's INFO records by their source file, whatever the
    logger's name, and passes the job's INFO lines and Ray's warnings."""
    import ray

    from grade_ray.raysession import _RayInfoFilter

    f = _RayInfoFilter(logging.WARNING)
    ray_file = str(Path(ray.__file__).parent / "train" / "v2" / "x.py")

    def record(path: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(path, level, path, 1, "msg", None, None)

    assert not f.filter(record(ray_file, logging.INFO))
    assert f.filter(record(ray_file, logging.WARNING))
    assert f.filter(record(ray_file, logging.ERROR))
    assert f.filter(record(str(ROOT / "grade_ray" / "learner" / "loop.py"), logging.INFO))


def test_only_round_reports_reach_the_callers_callbacks():
    """Stage 1's epoch reports (a checkpoint for restarts, no held-out metric) must not reach
    Tune: it would refuse a result without its metric and ASHA would count epochs as rounds."""
    from ray.train import UserCallback

    from grade_ray.jobs.train_callbacks import Stage2Reports

    class Recorder(UserCallback):
        def __init__(self) -> None:
            self.reports, self.errors = [], []

        def after_report(self, run_context, metrics, checkpoint):
            self.reports.append((metrics[0]["stage"], checkpoint))

        def after_exception(self, run_context, worker_exceptions):
            self.errors.append(worker_exceptions)

    inner = Recorder()
    cb = Stage2Reports(inner)
    cb.after_report(None, [{"stage": 1, "epoch": 0}], "epoch-ckpt")
    cb.after_report(None, [{"stage": 2, keys.ROUND: 0}], "round-ckpt")
    cb.after_exception(None, {0: RuntimeError("x")})
    assert inner.reports == [(2, "round-ckpt")]
    assert len(inner.errors) == 1
