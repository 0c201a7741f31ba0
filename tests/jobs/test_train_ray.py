"""The Ray path: actor pool, Ray Train learner, resume, fault tolerance, resource guard."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from grade_ray import keys
from grade_ray.jobs.train_ray import run_train_ray
from grade_ray.raysession import ResourceError, check_resources
from grade_ray.runlog import read_metrics

pytestmark = pytest.mark.ray


def stage2_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r.get("stage") == 2]


def test_resource_guard_names_the_setting(smoke_cfg):
    with pytest.raises(ResourceError, match="rollout.num_workers"):
        check_resources(smoke_cfg.replace(**{"rollout.num_workers": 8}), {"CPU": 2.0})
    with pytest.raises(ResourceError, match="learner.use_gpu=false"):
        check_resources(smoke_cfg.replace(**{"learner.use_gpu": True}), {"CPU": 8.0})
    check_resources(smoke_cfg, {"CPU": 2.0})


def test_killed_actor_task_is_redone_exactly_once(ray_session, smoke_cfg, smoke_data):
    from grade_ray.data.plan import DataPlan
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.rollout.actor import RayRollout

    cfg = smoke_cfg.replace(**{"rollout.batch_size": 100})
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=100)
    tasks = plan.rounds[0]
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    pool = RayRollout(cfg, plan.meta, rollout_spec(cfg, plan.meta), num_workers=1)
    try:
        pool.set_weights(policy.state_dict(), 0)
        ref = pool.collect(pool.submit(tasks[:1], 5.0, 0, [1]))[0]
        pid = pool.infos()[0]["pid"]
        handle = pool.submit(tasks, 5.0, 0, list(range(1, len(tasks) + 1)))
        os.kill(pid, signal.SIGKILL)
        out = pool.collect(handle)
        assert pool.infos()[0]["pid"] != pid  # a fresh process redid the work
        ids = np.concatenate([o[keys.REQUEST_ID] for o in out])
        want = np.concatenate(
            [
                np.asarray(
                    __import__("pyarrow.parquet")
                    .parquet.read_table(t.file, columns=["request_id"])
                    .column(0)
                    .to_numpy()
                )[t.rows]
                for t in tasks
            ]
        )
        assert len(ids) == len(np.unique(ids)) == len(want)
        np.testing.assert_array_equal(np.sort(ids), np.sort(want))
        # the restarted actor reloaded the weights: same seed, same samples
        np.testing.assert_allclose(out[0][keys.WEIGHTS], ref[keys.WEIGHTS], rtol=1e-6)
    finally:
        pool.close()


def test_two_actor_ray_run_matches_local(ray_session, smoke_cfg, smoke_data, tmp_path):
    from grade_ray.jobs.train import run_train_local

    base = smoke_cfg.replace(**{"data.train_path": smoke_data[0], "data.eval_path": smoke_data[1]})
    local = base.replace(run_dir=str(tmp_path / "local"))
    remote = base.replace(run_dir=str(tmp_path / "ray"))
    run_train_local(local)
    run_train_ray(remote)
    a, b = stage2_rows(local.run_dir), stage2_rows(remote.run_dir)
    assert len(a) == len(b) == base.grpo.rounds
    for ra, rb in zip(a, b):
        assert ra[keys.ROLLOUT_REQUESTS] == rb[keys.ROLLOUT_REQUESTS]
        assert rb["rollout/unique_requests"] == rb[keys.ROLLOUT_REQUESTS]
        for k in (keys.ROLLOUT_REWARD, keys.ROLLOUT_R_POST, keys.LEARNER_KL):
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-5), k
    actors = json.loads((tmp_path / "ray" / "rollout_actors.json").read_text())
    assert len({a["pid"] for a in actors}) == 2


def test_learner_failure_restarts_from_checkpoint_and_resume(
    ray_session, smoke_cfg, smoke_data, tmp_path
):
    cfg = smoke_cfg.replace(
        **{
            "data.train_path": smoke_data[0],
            "data.eval_path": smoke_data[1],
            "run_dir": str(tmp_path / "ft"),
            "grpo.rounds": 2,
            "learner.max_failures": 1,
        }
    )
    run_train_ray(cfg, fail_at_round=0)
    rounds = [r[keys.ROUND] for r in stage2_rows(cfg.run_dir)]
    assert rounds == [0, 1]  # round 0 not redone after the restart, round 1 done once

    # A stopped run (no failures allowed) resumes at the round boundary with the rest.
    stopped = cfg.replace(run_dir=str(tmp_path / "stop"), **{"learner.max_failures": 0})
    with pytest.raises(Exception, match="injected failure"):
        run_train_ray(stopped, fail_at_round=0)
    assert [r[keys.ROUND] for r in stage2_rows(stopped.run_dir)] == [0]
    run_train_ray(stopped, resume=True)
    assert [r[keys.ROUND] for r in stage2_rows(stopped.run_dir)] == [0, 1]
