"""Learners and the single-process training path (no Ray)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.algos.exploration import EXPLORATIONS
from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, Task, TaskReader, lanes
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import new_policy, rollout_spec
from grade_ray.rollout.worker import RolloutWorker


@pytest.fixture(scope="module")
def rollout_batch(smoke_cfg, smoke_data):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=200)
    policy = new_policy(smoke_cfg, plan.meta, smoke_data[0])
    worker = RolloutWorker(copy.deepcopy(policy), rollout_spec(smoke_cfg, plan.meta, smoke_data[0]))
    worker.set_weights(policy.state_dict(), 0)
    batch = worker.rollout(TaskReader(plan.meta).load(plan.rounds[0][0]), 5.0)
    return policy, batch


def test_rollout_batch_columns(rollout_batch, smoke_cfg):
    _, b = rollout_batch
    g = smoke_cfg.exploration.group_size
    assert b[keys.WEIGHTS].shape[1:] == (g, 4)
    np.testing.assert_allclose(b[keys.WEIGHTS].sum(-1), 1.0, atol=1e-5)
    assert b[keys.ADVANTAGES].shape == b[keys.REWARD].shape == (len(b[keys.REQUEST_ID]), g)
    assert np.isfinite(b[keys.OLD_LOGP]).all()
    assert int(b[keys.POLICY_VERSION]) == 0


@pytest.mark.parametrize("kind", ["dirichlet", "gaussian"])
@pytest.mark.parametrize("kl", ["exact", "k3"])
def test_grpo_update_moves_parameters(rollout_batch, smoke_cfg, kind, kl):
    policy, batch = rollout_batch
    cfg = smoke_cfg.replace(**{"exploration.kind": kind, "grpo.kl_estimator": kl})
    if kind == "gaussian":  # resample so log-probs come from the same exploration family
        batch = dict(batch)
        explore = EXPLORATIONS.get("gaussian")
        with torch.no_grad():
            pi = policy.pi(torch.from_numpy(batch[keys.CONTEXT]))
            w = explore.sample(
                pi, 8, 5.0, floor=0.05, sigma=0.5, generator=torch.Generator().manual_seed(0)
            )
            batch[keys.WEIGHTS] = w.numpy()
            batch[keys.OLD_LOGP] = explore.log_prob(pi, w, 5.0, floor=0.05, sigma=0.5).numpy()
    learner = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(cfg))
    before = [p.detach().clone() for p in learner.module.parameters()]
    stats = learner.update(batch)
    assert learner.version == 1
    assert np.isfinite(stats[keys.LEARNER_LOSS])
    moved = [not torch.equal(a, b) for a, b in zip(before, learner.module.parameters())]
    assert any(moved)
    # a second update on the same batch sees ratios away from 1 -> loss changes
    stats2 = learner.update(batch)
    assert stats2[keys.LEARNER_LOSS] != stats[keys.LEARNER_LOSS]


def test_non_finite_inputs_raise_and_leave_weights(rollout_batch, smoke_cfg):
    policy, batch = rollout_batch
    learner = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(smoke_cfg))
    bad = dict(batch)
    bad[keys.ADVANTAGES] = batch[keys.ADVANTAGES].copy()
    bad[keys.ADVANTAGES][0, 0] = np.nan
    before = copy.deepcopy(learner.module.state_dict())
    with pytest.raises(FloatingPointError, match="advantages"):
        learner.update(bad)
    for k, v in learner.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip(rollout_batch, smoke_cfg):
    policy, batch = rollout_batch
    a = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(smoke_cfg))
    a.update(batch)
    b = GRPOLearner(copy.deepcopy(policy), GRPOSettings.from_config(smoke_cfg))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    sa, sb = a.update(batch), b.update(batch)
    assert sa[keys.LEARNER_LOSS] == pytest.approx(sb[keys.LEARNER_LOSS], rel=1e-6)


def test_plan_covers_every_row_once_in_time_order(smoke_data):
    plan = DataPlan.build(smoke_data[0], rounds=4, batch_size=128)
    reader = TaskReader(plan.meta)
    ids, last_ts = [], -1
    for r in plan.rounds:
        ts = np.concatenate([reader.load(t).ts for t in r])
        assert ts.min() >= last_ts  # rounds follow time
        last_ts = ts.max()
        ids += [reader.load(t).request_id for t in r]
        assert all(len(t) <= 128 for t in r)
    ids = np.concatenate(ids)
    assert len(ids) == len(np.unique(ids)) == plan.report.rows_used
    capped = DataPlan.build(smoke_data[0], rounds=2, batch_size=128, requests_per_round=300)
    assert [sum(len(t) for t in r) for r in capped.rounds] == [300, 300]
    passes = DataPlan.build(smoke_data[0], rounds=4, batch_size=128, data_passes=2)
    assert passes.num_requests == 2 * plan.report.rows_used


def test_round_tasks_go_file_by_file(smoke_data):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128)
    assert len(plan.files) > 1
    files = [t.file for t in plan.rounds[0]]
    # each file's tasks are one contiguous run, rows ascending within and across its tasks
    assert files == sorted(files, key=plan.files.index)
    for f in plan.files:
        rows = np.concatenate([t.rows for t in plan.rounds[0] if t.file == f])
        assert (np.diff(rows) > 0).all()


def _task(i: int, n: int, file: str = "f") -> Task:
    return Task(0, i, file, np.arange(n))


def test_lanes_are_contiguous_balanced_and_cover_every_task():
    tasks = [_task(i, n) for i, n in enumerate([100, 100, 100, 100, 50, 50, 100, 100])]
    dealt = lanes(tasks, 2)
    assert [t.index for lane in dealt for t in lane] == list(range(8))  # contiguous, in order
    assert [len(lane) for lane in dealt] == [4, 4]
    assert [len(lane) for lane in lanes(tasks, 3)] == [3, 3, 2]  # longer lanes first
    assert [len(lane) for lane in lanes(tasks, 8)] == [1] * 8
    assert [len(lane) for lane in lanes(tasks[:3], 5)] == [1, 1, 1, 0, 0]  # more lanes
    assert lanes([], 3) == [[], [], []]
    with pytest.raises(ValueError, match="lane"):
        lanes(tasks, 0)


def test_rollout_reader_skips_item_ids(smoke_data):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128)
    task = plan.rounds[0][1]
    full = TaskReader(plan.meta).load(task)
    lean = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, use_threads=False).load(task)
    assert full.item_ids.any() and not lean.item_ids.any()
    for name in ("request_id", "context", "scores", "labels", "mask", "position"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_lane_reads_its_files_once_per_round(smoke_cfg, smoke_data, workers):
    """A single local reader serving every lane of the steps decodes each file once."""
    from grade_ray.learner.loop import GRPOTrainer
    from grade_ray.rollout.backend import LocalRollout

    cfg = smoke_cfg.replace(**{"rollout.num_workers": workers, "rollout.batch_size": 128})
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128)
    assert len(plan.files) > 1 and len(plan.rounds[0]) > 2 * workers
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    backend = LocalRollout(
        policy, rollout_spec(cfg, plan.meta, smoke_data[0]), plan.meta, lanes=workers
    )
    trainer = GRPOTrainer(cfg, plan, None, backend, None, "unused")
    for step in trainer._step_tasks(0):
        for task in step:
            backend.reader.load(task)
    assert backend.reader.reads["parquet"] == len(plan.files)
