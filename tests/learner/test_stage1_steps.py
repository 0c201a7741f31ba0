"""Stage 1's epochs over the data plan: what each rank reads, and resuming after an epoch.

Without Ray: the same :class:`Stage1Trainer` runs in each Ray Train worker
(tests/jobs/test_stage1_ray.py runs it there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade_ray.data.plan import DataPlan, TaskReader, deal_steps
from grade_ray.data.reading import iter_batches, read_meta
from grade_ray.learner.loop import new_policy
from grade_ray.learner.stage1 import Stage1Trainer, epoch_checkpoints, start_stage1
from grade_ray.runlog import MetricsLogger, read_metrics


@pytest.fixture(scope="module")
def plan(smoke_data):
    return DataPlan.build(smoke_data[0], rounds=2, batch_size=100)


def test_epoch_tasks_read_what_streaming_the_files_reads(plan, smoke_data):
    """One epoch = every validated row once, in file order, cut as ``iter_batches`` cuts it:
    so the plan-driven Stage 1 takes the steps the streamed one took."""
    tasks = plan.epoch_tasks(256)
    reader = TaskReader(plan.meta)
    streamed = list(iter_batches(smoke_data[0], batch_size=256))
    assert [len(t) for t in tasks] == [len(b) for b in streamed]
    for t, b in zip(tasks, streamed):
        got = reader.load(t)
        np.testing.assert_array_equal(got.request_id, b.request_id)
        np.testing.assert_array_equal(got.scores, b.scores)
        np.testing.assert_array_equal(got.mask, b.mask)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        plan.epoch_tasks(0)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_each_epoch_step_and_read_every_row_once(plan, world):
    tasks = plan.epoch_tasks(256)
    per_rank = [deal_steps(tasks, world, world, r, "pretrain.batch_size") for r in range(world)]
    assert len({len(s) for s in per_rank}) == 1  # DDP: every rank steps equally often
    assert all(len(step) == 1 for steps in per_rank for step in steps)
    rows = [(t.file, int(i)) for steps in per_rank for step in steps for t in step for i in t.rows]
    want = [(t.file, int(i)) for t in tasks for i in t.rows]
    assert sorted(rows) == sorted(want) and len(rows) == len(want)
    # rank 0 reads the first contiguous shard: its files come first
    assert per_rank[0][0][0].file == tasks[0].file


def test_a_too_small_step_names_the_setting(plan):
    tiny = plan.epoch_tasks(1)[:1]
    with pytest.raises(ValueError, match="raise pretrain.batch_size"):
        deal_steps(tiny, 2, 2, 0, "pretrain.batch_size")


def _trainer(cfg, plan, train_path, run_dir):
    torch.manual_seed(0)
    policy = new_policy(cfg, read_meta(train_path), train_path)
    return Stage1Trainer(cfg, plan, policy, MetricsLogger(run_dir, tensorboard=False), run_dir)


def test_stopped_local_stage1_resumes_after_its_last_epoch(smoke_cfg, smoke_data, plan, tmp_path):
    cfg = smoke_cfg.replace(**{"pretrain.epochs": 2})
    whole = _trainer(cfg, plan, smoke_data[0], tmp_path / "whole")
    start_stage1(whole, tmp_path / "whole", resume=False)
    whole.fit()

    stopped = _trainer(cfg, plan, smoke_data[0], tmp_path / "stop")
    start_stage1(stopped, tmp_path / "stop", resume=False)
    stopped.fail_at_epoch = 0
    with pytest.raises(RuntimeError, match="injected failure after Stage 1 epoch 0"):
        stopped.fit()
    assert [p.name for p in epoch_checkpoints(tmp_path / "stop")] == ["pretrain-epoch-0000.pt"]
    again = _trainer(cfg, plan, smoke_data[0], tmp_path / "stop")
    start_stage1(again, tmp_path / "stop", resume=True)
    assert again.next_epoch == 1
    again.fit()
    for k, v in whole.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[k], v), k
    assert torch.equal(again.learner.log_scale, whole.learner.log_scale)
    rows = [r for r in read_metrics(tmp_path / "stop") if r.get("stage") == 1]
    assert [r["epoch"] for r in rows] == [0, 1]

    # without --resume an interrupted attempt's epochs are dropped and Stage 1 starts over
    fresh = _trainer(cfg, plan, smoke_data[0], tmp_path / "stop")
    start_stage1(fresh, tmp_path / "stop", resume=False)
    assert fresh.next_epoch == 0 and not epoch_checkpoints(tmp_path / "stop")
    assert not [r for r in read_metrics(tmp_path / "stop") if r.get("stage") == 1]
