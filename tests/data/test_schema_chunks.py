"""Reading and planning files larger than one read chunk.

Real logs are read 8,192 rows at a time from shards of 50,000 rows; these tests use a
10,000-row file read 1,000 rows at a time, so every row-number computation crosses chunk
boundaries. Request ids equal file row numbers, so any off-by-a-chunk mistake shows.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, TaskReader
from grade_ray.data.reading import iter_batches, iter_validated
from grade_ray.data.sessions import SchemaError, SessionBatch, SessionMeta, ShardWriter
from grade_ray.data.validation import ReadReport

META = SessionMeta(("ctr", "cvr", "gmv"), ("prob", "prob", "value"), ("click", "order"), ("a", "b"))
ROWS, CHUNK = 10_000, 1_000


def big_batch(rows: int = ROWS, first_id: int = 0, seed: int = 0) -> SessionBatch:
    rng = np.random.default_rng(seed)
    n = 3
    lengths = rng.integers(1, n + 1, rows)
    mask = np.arange(n)[None] < lengths[:, None]
    return SessionBatch(
        request_id=first_id + np.arange(rows, dtype=np.int64),
        user_id=rng.integers(0, 50, rows),
        ts=1_700_000_000 + rng.permutation(rows).astype(np.int64),  # time is not row order
        context=rng.random((rows, 2), dtype=np.float32),
        item_ids=(rng.integers(1, 100, (rows, n)) * mask).astype(np.int64),
        scores=rng.random((rows, n, 3), dtype=np.float32) * mask[..., None],
        labels=rng.integers(0, 2, (rows, n, 2)).astype(np.float32) * mask[..., None],
        mask=mask,
    )


def write(path, batch: SessionBatch) -> None:
    with ShardWriter(path, META, rows_per_shard=50_000) as w:
        w.write(batch)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    write(d, big_batch())
    return d


# bad rows: (row, what) across different chunks, including both chunk edges
BAD_ROWS = {
    5: "nan label",
    999: "inf label",
    1000: "nan score",
    4321: "inf label",
    9000: "nan label",
    9998: "nan last score",  # the last value of a row followed by an empty row at chunk end
    9999: "empty",
}


def corrupt(batch: SessionBatch, row: int, what: str) -> None:
    if what == "nan label":
        batch.labels[row, 0, 1] = np.nan
    elif what == "inf label":
        batch.labels[row, 0, 0] = -np.inf
    elif what == "nan score":
        batch.scores[row, 0, 2] = np.nan
    elif what == "nan last score":
        batch.scores[row, batch.mask[row].sum() - 1, -1] = np.nan
    elif what == "empty":
        batch.mask[row] = False


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirty")
    batch = big_batch()
    for row, what in BAD_ROWS.items():
        corrupt(batch, row, what)
    write(d, batch)
    return d


def test_file_is_really_read_in_many_chunks(clean):
    (f,) = clean.glob("*.parquet")
    assert pq.ParquetFile(f).metadata.num_rows == ROWS
    chunks = list(iter_validated(clean, batch_size=CHUNK))
    assert [c.offset for c in chunks] == list(range(0, ROWS, CHUNK))


def test_chunked_read_yields_every_row_once_in_order(clean):
    report = ReadReport()
    ids = np.concatenate([b.request_id for b in iter_batches(clean, CHUNK, report=report)])
    np.testing.assert_array_equal(ids, np.arange(ROWS))
    assert (report.rows_read, report.rows_used, report.rows_rejected) == (ROWS, ROWS, 0)


def test_plan_names_every_row_exactly_once(clean):
    plan = DataPlan.build(clean, rounds=3, batch_size=700, read_batch=CHUNK)
    rows = np.concatenate([t.rows for r in plan.rounds for t in r])
    assert len(rows) == plan.num_requests == ROWS
    np.testing.assert_array_equal(np.sort(rows), np.arange(ROWS))
    reader = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS)
    last = -1
    for r in plan.rounds:
        ts = []
        for t in r:
            b = reader.load(t)
            np.testing.assert_array_equal(b.request_id, t.rows)  # the rows the task names
            ts.append(b.ts)
        ts = np.concatenate(ts)
        assert ts.min() > last  # rounds follow time across chunks
        last = ts.max()


@pytest.mark.parametrize("row, what", sorted(BAD_ROWS.items()))
def test_error_names_the_absolute_row(tmp_path, row, what):
    batch = big_batch()
    corrupt(batch, row, what)
    write(tmp_path, batch)
    (f,) = tmp_path.glob("*.parquet")
    column = {"nan label": "labels", "inf label": "labels"}.get(
        what, "scores" if "score" in what else "item_ids"
    )
    with pytest.raises(SchemaError) as e:
        list(iter_batches(tmp_path, CHUNK))
    msg = str(e.value)
    assert f"{f}: row {row}, column {column!r}" in msg, msg
    with pytest.raises(SchemaError, match=f"row {row}, "):
        DataPlan.build(tmp_path, rounds=1, batch_size=500, read_batch=CHUNK)


def test_reject_mode_across_chunks(dirty, tmp_path):
    report = ReadReport()
    rejects = tmp_path / "rejects.parquet"
    got = list(iter_batches(dirty, CHUNK, "reject", rejects, report))
    bad = sorted(BAD_ROWS)
    good = np.setdiff1d(np.arange(ROWS), bad)
    np.testing.assert_array_equal(np.concatenate([b.request_id for b in got]), good)
    assert (report.rows_read, report.rows_used, report.rows_rejected) == (
        ROWS,
        ROWS - len(bad),
        len(bad),
    )
    rej = pq.read_table(rejects)
    assert rej.column("source_row").to_pylist() == bad
    assert rej.column("request_id").to_pylist() == bad
    reasons = dict(
        zip(rej.column("source_row").to_pylist(), rej.column("reject_reason").to_pylist())
    )
    assert "labels: NaN or inf in labels" == reasons[9000] == reasons[999]
    assert reasons[1000] == "scores: NaN or inf in scores"


def test_plan_with_rejects_and_cache_across_chunks(dirty, tmp_path):
    plan = DataPlan.build(
        dirty,
        rounds=2,
        batch_size=600,
        on_error="reject",
        rejects_path=tmp_path / "rej.parquet",
        read_batch=CHUNK,
        cache_dir=tmp_path / "cache",
    )
    good = np.setdiff1d(np.arange(ROWS), sorted(BAD_ROWS))
    rows = np.concatenate([t.rows for r in plan.rounds for t in r])
    np.testing.assert_array_equal(np.sort(rows), good)
    assert plan.report.rows_rejected == len(BAD_ROWS)
    assert plan.cache  # decoded rows, keyed by file row number
    cached = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache)
    parquet = TaskReader(plan.meta, columns=ROLLOUT_COLUMNS)
    for r in plan.rounds:
        for t in r:
            a, b = cached.load(t), parquet.load(t)
            np.testing.assert_array_equal(a.request_id, t.rows)
            np.testing.assert_array_equal(a.scores, b.scores)
            np.testing.assert_array_equal(a.labels, b.labels)
    assert cached.reads["parquet"] == 0


def test_two_files_count_rows_per_file(tmp_path):
    """Row numbers restart in each file; a file's rows are numbered past chunk borders."""
    a, b = big_batch(3_000), big_batch(2_500, first_id=3_000, seed=1)
    corrupt(b, 2_345, "nan label")
    with ShardWriter(tmp_path, META, rows_per_shard=3_000) as w:
        w.write(SessionBatch.concat([a, b]))
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) == 2
    with pytest.raises(SchemaError, match=f"{files[1]}: row 2345, column 'labels'"):
        list(iter_batches(tmp_path, CHUNK))
    plan = DataPlan.build(
        tmp_path,
        rounds=1,
        batch_size=400,
        on_error="reject",
        read_batch=CHUNK,
        rejects_path=tmp_path / "rej.parquet",
    )
    reader = TaskReader(plan.meta)
    ids = np.concatenate([reader.load(t).request_id for t in plan.rounds[0]])
    np.testing.assert_array_equal(np.sort(ids), np.setdiff1d(np.arange(5_500), [5_345]))


def test_any_per_row_matches_a_loop_with_empty_rows_anywhere():
    """The per-row reduction behind every value check: empty rows first, between and last
    (the case that once hid a bad last value of the row before) and all-empty input."""
    from grade_ray.data.validation import _any_per_row

    rng = np.random.default_rng(0)
    cases = [np.array([0, 0]), np.array([3, 0]), np.array([0, 2, 0, 0]), np.array([], int)]
    cases += [rng.integers(0, 4, rng.integers(1, 30)) for _ in range(200)]
    for lengths in cases:
        flags = rng.random(int(lengths.sum())) < 0.2
        ends = np.cumsum(lengths)
        want = [bool(flags[e - n : e].any()) for n, e in zip(lengths, ends)]
        np.testing.assert_array_equal(_any_per_row(flags, lengths), want, str(lengths))
