"""``grade-ray bench``'s measured training throughput at N rollout workers."""

from __future__ import annotations

import pytest

from grade_ray.jobs.bench.throughput import bench_config, markdown_table
from grade_ray.jobs.bench.training import MODES, bench_training, training_key, training_markdown
from grade_ray.learner.grpo import GRPOLearner


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="modes"):
        bench_training(None, "", modes=("offline",))


def test_the_measured_table_has_a_row_per_worker_count():
    res = {training_key(m, n): 1000.0 * n for m in MODES for n in (1, 2)}
    md = training_markdown(res)
    assert "| 1 | 1,000 | 1,000 | 1,000 |" in md and "| 2 | 2,000 | 2,000 | 2,000 |" in md
    assert "Measured training requests/s" in markdown_table(res)


@pytest.mark.ray
def test_training_rounds_are_timed_with_real_updates(ray_session, tmp_path, monkeypatch):
    cfg = bench_config(str(tmp_path / "run"), 2048).replace(
        **{"rollout.batch_size": 256, "rollout.num_cpus_per_worker": 0.5}
    )
    from grade_ray.jobs.train import prepare_data

    train_path, _ = prepare_data(cfg)
    updates = []
    real_update = GRPOLearner.update

    def counting_update(self, batch):
        updates.append(len(batch["request_id"]))
        return real_update(self, batch)

    monkeypatch.setattr(GRPOLearner, "update", counting_update)
    out = bench_training(cfg, train_path, workers=(1, 2), repeats=1)
    assert set(out) == {training_key(m, n) for m in MODES for n in (1, 2)}
    assert all(v > 0 for v in out.values())
    # on-policy and pipelined each run 2 rounds (warm-up + 1 timed) of 2048 requests at
    # N = 1 and at N = 2: every request of every round goes through a GRPO update
    assert sum(updates) == 2 * 2 * 2 * 2048
    # one step = one task per worker: 8 steps per round at N = 1, 4 at N = 2
    assert len(updates) == 2 * 2 * (8 + 4)
