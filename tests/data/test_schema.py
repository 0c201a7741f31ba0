"""Logged-session schema: round trip, every bad-input kind, reject accounting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grade_ray.data.plan import DataPlan
from grade_ray.data.reading import iter_batches, read_meta, read_sessions
from grade_ray.data.sessions import SchemaError, SessionBatch, SessionMeta, ShardWriter, to_table
from grade_ray.data.validation import ReadReport

META = SessionMeta(("ctr", "cvr", "gmv"), ("prob", "prob", "value"), ("click", "order"), ("a", "b"))


def make_batch(b: int = 6, n: int = 5, seed: int = 0) -> SessionBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, b)
    lengths[0] = n
    mask = np.arange(n)[None] < lengths[:, None]
    return SessionBatch(
        request_id=np.arange(b, dtype=np.int64),
        user_id=rng.integers(0, 3, b),
        ts=np.arange(b, dtype=np.int64) * 10,
        context=rng.random((b, 2), dtype=np.float32),
        item_ids=(rng.integers(1, 100, (b, n)) * mask).astype(np.int64),
        scores=(rng.random((b, n, 3), dtype=np.float32) * mask[..., None]),
        labels=(rng.integers(0, 2, (b, n, 2)).astype(np.float32) * mask[..., None]),
        mask=mask,
    )


def write(tmp_path, table: pa.Table, name: str = "s.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def test_round_trip_through_shards(tmp_path):
    batch = make_batch(7)
    with ShardWriter(tmp_path, META, rows_per_shard=3) as w:
        w.write(batch)
    assert len(w.paths) == 3 and w.rows_written == 7
    back, meta, report = read_sessions(tmp_path)
    assert meta == META
    assert (report.rows_read, report.rows_used, report.rows_rejected) == (7, 7, 0)
    for f in ("request_id", "context", "scores", "labels", "mask", "item_ids"):
        np.testing.assert_array_equal(getattr(back, f), getattr(batch, f))


def test_metadata_required_and_names_checked(tmp_path):
    table = to_table(make_batch(), META).replace_schema_metadata({})
    with pytest.raises(SchemaError, match="no grade_ray metadata"):
        read_meta(write(tmp_path, table))
    with pytest.raises(SchemaError, match="unknown task 'pctr'"):
        META.task_index("pctr")
    with pytest.raises(SchemaError, match="unknown task kind"):
        SessionMeta(("a",), ("probability",), ("click",), ())


def corrupt(column: str, row: int, fn):
    table = to_table(make_batch(), META)
    values = table.column(column).to_pylist()
    values[row] = fn(values[row])
    arrays = [
        pa.array(values, table.schema.field(column).type) if c == column else table.column(c)
        for c in table.column_names
    ]
    return pa.Table.from_arrays(arrays, schema=table.schema)


BAD = {
    "nan score": ("scores", lambda v: [[float("nan"), *v[0][1:]], *v[1:]], "NaN or inf"),
    "nan label": ("labels", lambda v: [[v[0][0], float("nan")], *v[1:]], "NaN or inf in labels"),
    "inf label": ("labels", lambda v: [*v[:-1], [float("inf"), 0.0]], "NaN or inf in labels"),
    "prob > 1": ("scores", lambda v: [[1.5, *v[0][1:]], *v[1:]], "outside \\[0, 1\\]"),
    "negative value": ("scores", lambda v: [[v[0][0], v[0][1], -1.0], *v[1:]], "negative"),
    "wrong task count": ("scores", lambda v: [v[0][:2], *v[1:]], "needs 3 scores"),
    "labels length": ("labels", lambda v: v[:-1], "different number of items"),
    "empty list": ("item_ids", lambda v: [], "empty candidate list"),
    "context length": ("context", lambda v: v[:1], "context length"),
    "inf context": ("context", lambda v: [float("inf"), v[1]], "NaN or inf in context"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_names_file_row_column(tmp_path, kind):
    column, fn, msg = BAD[kind]
    path = write(tmp_path, corrupt(column, 2, fn))
    with pytest.raises(SchemaError, match=msg) as e:
        list(iter_batches(path))
    assert str(path) in str(e.value) and "row 2" in str(e.value) and repr(column) in str(e.value)


@pytest.mark.parametrize(
    "unit, tz", [("s", None), ("ms", None), ("us", "UTC"), ("ns", "Asia/Shanghai")]
)
def test_timestamp_ts_is_read_as_whole_seconds(tmp_path, unit, tz):
    """`ts` may be a Parquet timestamp of any unit (logs usually carry milliseconds): it is
    read as epoch seconds, floored, also before 1970; nothing is refused or rejected."""
    seconds = np.array([1_700_000_000, 1_700_000_000, 1_700_000_001, -2, 0, 5])
    frac = np.array([0.0, 0.123, 0.999, 0.5, 0.0, 0.25])  # pre-1970: -2 + 0.5 = -1.5 s
    per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    ticks = seconds * per_s + np.round(frac * per_s).astype(np.int64)
    table = to_table(make_batch(), META)
    i = table.schema.get_field_index("ts")
    table = table.set_column(i, "ts", pa.array(ticks, pa.timestamp(unit, tz=tz)))
    for on_error in ("raise", "reject"):
        back, _, report = read_sessions(write(tmp_path, table), on_error=on_error)
        assert report.rows_rejected == 0
        want = seconds if unit != "s" else ticks
        np.testing.assert_array_equal(back.ts, want)


def test_directory_read_follows_links_and_refuses_broken_ones(tmp_path, capsys):
    """Shards and day directories linked into the data directory are read (each once, a
    link loop too); a broken link stops the read naming it, instead of silently leaving
    its data out."""
    from grade_ray.cli import main
    from grade_ray.data.reading import list_files

    store = tmp_path / "store"
    with ShardWriter(store / "day1", META, rows_per_shard=3) as w:
        w.write(make_batch(6))
    other = make_batch(4)
    other.request_id += 100
    with ShardWriter(store / "day2", META) as w:
        w.write(other)
    data = tmp_path / "data"
    data.mkdir()
    (data / "day1").symlink_to(store / "day1", target_is_directory=True)
    (data / "day2.parquet").symlink_to(next((store / "day2").glob("*.parquet")))
    (data / "again").symlink_to(store / "day1", target_is_directory=True)  # same dir twice
    (store / "day1" / "loop").symlink_to(data, target_is_directory=True)
    files = list_files(data)
    assert [f.relative_to(data).parts[0] for f in files] == ["again", "again", "day2.parquet"]
    back, _, report = read_sessions(data)
    assert report.rows_read == 10 and sorted(back.request_id) == [*range(6), *range(100, 104)]

    (data / "day3").symlink_to(tmp_path / "unmounted" / "day3", target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="day3: broken symbolic link"):
        list_files(data)
    rc = main(["pretrain", "--config", "configs/smoke.yaml", "--set", f"data.train_path={data}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "day3: broken symbolic link" in err[0], err


def test_missing_column(tmp_path):
    path = write(tmp_path, to_table(make_batch(), META).drop_columns(["labels"]))
    with pytest.raises(SchemaError, match="missing column"):
        list(iter_batches(path))


def test_reject_mode_accounts_for_every_row(tmp_path):
    table = corrupt("scores", 1, BAD["nan score"][1])
    values = table.column("item_ids").to_pylist()
    values[4] = []
    table = table.set_column(
        table.schema.get_field_index("item_ids"), "item_ids", pa.array(values, pa.list_(pa.int64()))
    )
    path = write(tmp_path, table)
    report = ReadReport()
    rejects = tmp_path / "rej.parquet"
    got = list(iter_batches(path, on_error="reject", rejects_path=rejects, report=report))
    assert report.rows_read == 6 and report.rows_rejected == 2 and report.rows_used == 4
    assert sum(len(b) for b in got) == report.rows_used
    rej = pq.read_table(rejects)
    assert sorted(rej.column("source_row").to_pylist()) == [1, 4]
    assert any("NaN" in r for r in rej.column("reject_reason").to_pylist())
    assert sum(report.reasons.values()) == 2
    # the training plan validates through the same path: same accounting, same rows kept
    plan = DataPlan.build(path, rounds=1, batch_size=10, on_error="reject", rejects_path=rejects)
    assert (plan.report.rows_read, plan.report.rows_used) == (6, 4)
    assert sorted(np.concatenate([t.rows for t in plan.rounds[0]]).tolist()) == [0, 2, 3, 5]


def test_files_must_agree_on_tasks_and_labels(tmp_path):
    other = SessionMeta(
        ("ctr", "cvr", "gpm"), ("prob", "prob", "value"), ("click", "order"), ("a", "b")
    )
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", to_table(make_batch(), META), "a.parquet")
    write(tmp_path / "d", to_table(make_batch(), other), "b.parquet")
    for read in (
        lambda: list(iter_batches(tmp_path / "d")),
        lambda: DataPlan.build(tmp_path / "d", rounds=1, batch_size=4),
    ):
        with pytest.raises(SchemaError, match="differ from"):
            read()


@pytest.mark.ray
def test_ray_data_reader_sees_every_row(ray_session, tmp_path):
    from grade_ray.data.reading import read_ray_dataset

    with ShardWriter(tmp_path, META, rows_per_shard=4) as w:
        w.write(make_batch(10))
    ds = read_ray_dataset(tmp_path)
    assert ds.count() == 10
    assert sorted(r["request_id"] for r in ds.take_all()) == list(range(10))


@pytest.mark.parametrize(
    "width_column, other",
    [("scores", "nan score"), ("scores", "prob > 1"), ("labels", "nan label")],
)
def test_reject_mode_checks_every_row_when_another_row_has_a_bad_width(
    tmp_path, width_column, other
):
    """Row 1 has one value too few for its first item, row 4 a bad value in the same
    column: both must be rejected, and no NaN may reach the batches."""
    table = corrupt(width_column, 1, lambda v: [v[0][:-1], *v[1:]])
    column, fn, _ = BAD[other]
    assert column == width_column
    values = table.column(column).to_pylist()
    values[4] = fn(values[4])
    table = table.set_column(
        table.schema.get_field_index(column),
        column,
        pa.array(values, table.schema.field(column).type),
    )
    path = write(tmp_path, table)
    report = ReadReport()
    got = list(
        iter_batches(path, on_error="reject", rejects_path=tmp_path / "r.parquet", report=report)
    )
    assert report.rows_rejected == 2, report.summary()
    assert sorted(pq.read_table(tmp_path / "r.parquet").column("source_row").to_pylist()) == [1, 4]
    assert all(np.isfinite(b.scores).all() and np.isfinite(b.labels).all() for b in got)


def test_more_time_windows_than_requests_is_refused_before_training(tmp_path):
    """Each round's window needs a request: 6 requests fill 6 windows (or 12 rounds over 2
    passes), 7 windows are refused up front instead of an empty round crashing mid-run."""
    path = write(tmp_path, to_table(make_batch(6), META))
    plan = DataPlan.build(path, rounds=12, batch_size=4, data_passes=2)
    assert [sum(len(t) for t in r) for r in plan.rounds] == [1] * 12
    with pytest.raises(SchemaError, match="6 usable training requests cannot fill 7 time"):
        DataPlan.build(path, rounds=7, batch_size=4)
