"""The plan's decoded cache: workers read the same rows as from Parquet, faster."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, TaskReader
from grade_ray.data.sessions import SessionBatch, SessionMeta, to_table

FIELDS = ("request_id", "user_id", "ts", "context", "scores", "labels", "mask", "position")


def _same(a, b) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_cached_tasks_equal_parquet_tasks(smoke_data, tmp_path):
    plan = DataPlan.build(smoke_data[0], rounds=2, batch_size=128, cache_dir=tmp_path / "c")
    assert sorted(plan.cache) == sorted(plan.files)
    assert all(os.path.exists(p) for p in plan.cache.values())
    parquet = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS)
    cached = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
    for r in plan.rounds:
        for t in r:
            _same(cached.load(t), parquet.load(t))
    assert cached.reads["parquet"] == 0 and cached.reads["cache"] > 0


def test_cache_is_reused_and_keyed_by_the_file(smoke_data, tmp_path):
    src = tmp_path / "logs"
    src.mkdir()
    for f in sorted(os.listdir(smoke_data[0])):
        if f.endswith(".parquet"):
            pq.write_table(pq.read_table(os.path.join(smoke_data[0], f)), src / f)
    a = DataPlan.build(src, rounds=1, batch_size=100, cache_dir=tmp_path / "c")
    stamps = {p: os.stat(p).st_mtime_ns for p in a.cache.values()}
    b = DataPlan.build(src, rounds=1, batch_size=100, cache_dir=tmp_path / "c")
    assert b.cache == a.cache  # same files: nothing rewritten
    assert {p: os.stat(p).st_mtime_ns for p in b.cache.values()} == stamps
    first = sorted(a.files)[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(0, table.num_rows - 5), first)  # the file changes
    c = DataPlan.build(src, rounds=1, batch_size=100, cache_dir=tmp_path / "c")
    assert c.cache[first] != a.cache[first]
    reader = TaskReader(c.meta, columns=ROLLOUT_COLUMNS, cache=c.cache)
    assert sum(len(reader.load(t)) for t in c.rounds[0]) == c.report.rows_used


def test_cache_maps_file_rows_around_rejected_ones(tmp_path):
    meta = SessionMeta(("ctr", "cvr"), ("prob", "prob"), ("click",), ("a",))
    rng = np.random.default_rng(0)
    b, n = 6, 4
    batch = SessionBatch(
        request_id=np.arange(b, dtype=np.int64),
        user_id=np.zeros(b, np.int64),
        ts=np.arange(b, dtype=np.int64),
        context=rng.random((b, 1), dtype=np.float32),
        item_ids=np.ones((b, n), np.int64),
        scores=rng.random((b, n, 2), dtype=np.float32),
        labels=np.zeros((b, n, 1), np.float32),
        mask=np.ones((b, n), bool),
    )
    batch.scores[1, 2, 0] = np.nan  # row 1 is rejected
    path = tmp_path / "s.parquet"
    pq.write_table(to_table(batch, meta), path)
    plan = DataPlan.build(
        path, rounds=1, batch_size=2, on_error="reject", cache_dir=tmp_path / "c",
        rejects_path=tmp_path / "rej.parquet",
    )  # fmt: skip
    assert list(plan.cache) == [str(path)]
    cached = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
    parquet = TaskReader(plan.meta)
    ids = []
    for t in plan.rounds[0]:
        _same(cached.load(t), parquet.load(t))
        ids += cached.load(t).request_id.tolist()
    assert sorted(ids) == [0, 2, 3, 4, 5]  # row 1 was rejected
    assert cached.reads == {"cache": 1, "parquet": 0}


def test_missing_or_stale_cache(smoke_data, tmp_path, caplog):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    task = plan.rounds[0][0]
    gone = dict(plan.cache)
    os.remove(gone[task.file])  # e.g. a worker on a node without the shared folder
    reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=gone)
    _same(reader.load(task), TaskReader(plan.meta).load(task))
    assert "unreadable here" in caplog.text
    # a cache file that lacks rows the plan names is refused, not silently misread
    other = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "d")
    table = pa.ipc.open_file(other.cache[task.file]).read_all()
    with pa.ipc.new_file(other.cache[task.file], table.schema) as w:
        w.write_table(table.slice(5))
    with pytest.raises(RuntimeError, match="lacks rows"):
        TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=other.cache).load(task)


def test_cache_skipped_when_the_disk_is_short(smoke_data, tmp_path, monkeypatch, caplog):
    import shutil

    import grade_ray.data.plan as plan_mod

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(plan_mod.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    assert plan.cache == {} and "decoded cache skipped" in caplog.text
    reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
    assert sum(len(reader.load(t)) for t in plan.rounds[0]) == plan.report.rows_used


def test_damaged_cache_file_is_not_reused(smoke_data, tmp_path, caplog):
    a = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    victim = sorted(a.cache.values())[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    b = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    assert victim not in b.cache.values() and "does not match" in caplog.text
    assert len(b.cache) == len(a.cache) - 1
    c = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    assert c.cache == a.cache  # rewritten by the next plan
    # a reader handed an unreadable cache file reads Parquet instead
    with open(victim, "r+b") as f:
        f.truncate(10)
    task = next(t for t in c.rounds[0] if c.cache[t.file] == victim)
    reader = TaskReader(c.meta, columns=ROLLOUT_COLUMNS, cache=c.cache)
    _same(reader.load(task), TaskReader(c.meta).load(task))
    assert reader.reads == {"cache": 0, "parquet": 1} and "unreadable" in caplog.text


def test_cache_only_serves_rollout_columns(smoke_data, tmp_path):
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    task = plan.rounds[0][0]
    full = TaskReader(plan.meta, cache=plan.cache)  # all columns: item ids are not cached
    assert full.load(task).item_ids.any() and full.reads == {"cache": 0, "parquet": 1}
    lean = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
    lean.load(task)
    assert lean.reads == {"cache": 1, "parquet": 0}


def test_concurrent_writers_publish_one_whole_file(smoke_data, tmp_path):
    """Two plans (e.g. two learner ranks) writing the same shard's cache at once."""
    from grade_ray.data.plan import DecodedCache
    from grade_ray.data.reading import iter_validated

    chunks = list(iter_validated(smoke_data[0]))
    a, b = DecodedCache(tmp_path / "c"), DecodedCache(tmp_path / "c")
    for ch in chunks:  # interleaved: both start before either finishes
        rows = np.flatnonzero(ch.kept) + ch.offset
        a.add(ch.file, ch.good, rows)
        b.add(ch.file, ch.good, rows)
    pa_, pb = a.close(), b.close()
    assert pa_ == pb and len(pa_) == len({ch.file for ch in chunks})
    assert not list((tmp_path / "c").glob("*.tmp"))
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=128, cache_dir=tmp_path / "c")
    assert plan.cache == pa_  # the published files pass the reuse check
