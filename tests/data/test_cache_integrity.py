"""The decoded cache is checked by content before a plan reuses it (issue 14, finding 5), and
a task reader does not pad a whole file to one long list (finding 3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, TaskReader
from grade_ray.data.sessions import SessionBatch, SessionMeta, to_table

META = SessionMeta(("ctr", "cvr"), ("prob", "prob"), ("click",), ("a",))


def _batch(b: int, n: int, first_id: int = 0, seed: int = 0) -> SessionBatch:
    rng = np.random.default_rng(seed)
    return SessionBatch(
        request_id=first_id + np.arange(b, dtype=np.int64),
        user_id=np.zeros(b, np.int64),
        ts=first_id + np.arange(b, dtype=np.int64),
        context=rng.random((b, 1), dtype=np.float32),
        item_ids=np.ones((b, n), np.int64),
        scores=rng.random((b, n, 2), dtype=np.float32),
        labels=rng.integers(0, 2, (b, n, 1)).astype(np.float32),
        mask=np.ones((b, n), bool),
    )


def _poison(path: str) -> None:
    """Write NaN into one score of a cache file, keeping its rows and row numbers."""
    table = pa.ipc.open_file(path).read_all()
    scores = table.column("scores").to_pylist()
    scores[3][0][0] = float("nan")
    i = table.schema.get_field_index("scores")
    table = table.set_column(i, table.schema.field(i), pa.array(scores, table.schema.field(i).type))
    with pa.ipc.new_file(path, table.schema) as w:
        w.write_table(table)


def test_nan_written_into_the_cache_is_caught_before_use(tmp_path, caplog):
    src = tmp_path / "s.parquet"
    pq.write_table(to_table(_batch(200, 5), META), src)
    a = DataPlan.build(src, rounds=1, batch_size=50, cache_dir=tmp_path / "c")
    (victim,) = a.cache.values()
    _poison(victim)
    b = DataPlan.build(src, rounds=1, batch_size=50, cache_dir=tmp_path / "c")
    assert "does not match its checksum" in caplog.text
    assert b.cache == {}  # not reused; removed and rewritten by the next plan
    c = DataPlan.build(src, rounds=1, batch_size=50, cache_dir=tmp_path / "c")
    reader = TaskReader(c.meta, columns=ROLLOUT_COLUMNS, cache=c.cache)
    for t in c.rounds[0]:
        assert np.isfinite(reader.load(t).scores).all()
    assert reader.reads == {"cache": 1, "parquet": 0}
    table = pa.ipc.open_file(c.cache[str(src)]).read_all()
    assert not pc.any(pc.is_nan(pc.list_flatten(pc.list_flatten(table["scores"])))).as_py()


def test_a_long_list_is_decoded_with_its_task_only(tmp_path):
    parts = [_batch(600, 5), _batch(1, 3000, first_id=600, seed=1), _batch(600, 5, 601, 2)]
    src = tmp_path / "s.parquet"
    pq.write_table(pa.concat_tables([to_table(p, META) for p in parts]), src)
    plan = DataPlan.build(
        src, rounds=1, batch_size=100, cache_dir=tmp_path / "c", max_candidates=3000
    )
    for cache in ({}, plan.cache):
        reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=cache)
        widths = {}
        for t in plan.rounds[0]:
            b = reader.load(t)
            np.testing.assert_array_equal(b.request_id, t.rows)
            widths[int(t.rows[0])] = b.mask.shape[1]
        assert isinstance(reader._files[str(src)][0], pa.Table)  # not padded to 1201 x 3000
        assert max(widths.values()) == 3000
        assert sorted(w for w in widths.values() if w != 3000) == [5] * (len(widths) - 1)


def test_parquet_reader_skips_rows_the_plan_rejected_as_malformed(tmp_path):
    """Without the cache, workers decode Parquet: a rejected row with a short score list or
    a null list must not break the decoding of the rows around it."""
    t = to_table(_batch(20, 4), META)
    scores = t.column("scores").to_pylist()
    scores[3] = [scores[3][0][:1], *scores[3][1:]]  # one value for two tasks
    scores[9] = None
    i = t.schema.get_field_index("scores")
    t = t.set_column(
        i, pa.field("scores", t.schema.field(i).type), pa.array(scores, t.schema.field(i).type)
    )
    src = tmp_path / "s.parquet"
    pq.write_table(t, src)
    plan = DataPlan.build(
        src, rounds=1, batch_size=6, on_error="reject", rejects_path=tmp_path / "r.parquet"
    )
    reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS)
    ids = np.concatenate([reader.load(task).request_id for task in plan.rounds[0]])
    assert sorted(ids.tolist()) == [r for r in range(20) if r not in (3, 9)]
