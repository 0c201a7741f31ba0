"""Session reads lose nothing and accept nothing silently (issue 14, findings 1-3 and 7).

Every row is checked whatever its neighbours hold; duplicate request ids, negative labels,
out-of-range logged positions and over-long candidate lists are bad rows; files that are
not session data (rejects files, other formats, truncated or corrupt Parquet, broken
metadata, wrong column types) raise a :class:`SchemaError` naming the file; rejects never go
into the input data directory; one long list does not pad a whole streamed batch.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grade_ray.data.plan import DataPlan
from grade_ray.data.reading import (
    iter_batches,
    iter_validated,
    length_segments,
    read_meta,
    read_sessions,
)
from grade_ray.data.sessions import (
    META_KEY,
    SchemaError,
    SessionBatch,
    SessionMeta,
    ShardWriter,
    to_table,
)
from grade_ray.data.validation import ReadReport, read_scope, rejects_file

META = SessionMeta(("ctr", "cvr", "gmv"), ("prob", "prob", "value"), ("click", "order"), ("a", "b"))


def batch(b: int = 8, n: int = 4, first_id: int = 0, seed: int = 0) -> SessionBatch:
    rng = np.random.default_rng(seed)
    mask = np.ones((b, n), bool)
    return SessionBatch(
        request_id=first_id + np.arange(b, dtype=np.int64),
        user_id=rng.integers(0, 3, b),
        ts=np.arange(b, dtype=np.int64),
        context=rng.random((b, 2), dtype=np.float32),
        item_ids=rng.integers(1, 100, (b, n)).astype(np.int64),
        scores=rng.random((b, n, 3), dtype=np.float32),
        labels=rng.integers(0, 2, (b, n, 2)).astype(np.float32),
        mask=mask,
    )


def write(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def edit(table: pa.Table, name: str, row: int, fn) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = fn(values[row])
    return with_column(table, name, values)


# -- finding 2: duplicates, negative labels, logged positions -------------------------------


def test_duplicate_request_id_across_files_is_named_and_rejected(tmp_path):
    d = tmp_path / "logs"
    write(d / "a.parquet", to_table(batch(6), META))
    write(d / "b.parquet", to_table(batch(6, first_id=4, seed=1), META))  # ids 4, 5 again
    with pytest.raises(SchemaError) as e:
        list(iter_batches(d))
    msg = str(e.value)
    assert f"{d / 'b.parquet'}: row 0, column 'request_id': duplicate request_id" in msg
    assert f"first read at {d / 'a.parquet'} row 4" in msg
    report = ReadReport()
    got = list(
        iter_batches(d, on_error="reject", rejects_path=tmp_path / "r.parquet", report=report)
    )
    assert (report.rows_read, report.rows_used, report.rows_rejected) == (12, 10, 2)
    ids = np.concatenate([b.request_id for b in got])
    assert sorted(ids.tolist()) == list(range(10)) and len(set(ids.tolist())) == 10
    rej = pq.read_table(tmp_path / "r.parquet")
    assert rej.column("source_row").to_pylist() == [0, 1]
    assert rej.column("source_file").to_pylist() == [str(d / "b.parquet")] * 2


def test_duplicate_within_one_chunk_keeps_the_first(tmp_path):
    t = with_column(to_table(batch(5), META), "request_id", [7, 8, 7, 9, 8])
    path = write(tmp_path / "s.parquet", t)
    report = ReadReport()
    got = list(
        iter_batches(path, on_error="reject", rejects_path=tmp_path / "r.parquet", report=report)
    )
    assert np.concatenate([b.request_id for b in got]).tolist() == [7, 8, 9]
    assert report.reasons == {"request_id: duplicate request_id": 2}
    # a plan counts each request once
    plan = DataPlan.build(
        path, rounds=1, batch_size=10, on_error="reject", rejects_path=tmp_path / "p.parquet"
    )
    assert plan.num_requests == 3


@pytest.mark.parametrize(
    "column, fn, message",
    [
        ("labels", lambda v: [[-1.0, 0.0], *v[1:]], "label 'click' is negative"),
        ("logged_position", lambda v: [-1, *v[1:]], "logged_position outside"),
        ("logged_position", lambda v: [100_000, *v[1:]], "logged_position outside"),
        ("logged_position", lambda v: [3_000_000_000, *v[1:]], "logged_position outside"),
        ("item_ids", lambda v: [None, *v[1:]], "null item id"),
        ("context", lambda v: [None, v[1]], "NaN or inf in context"),
        ("scores", lambda v: [[None, 0.5, 1.0], *v[1:]], "NaN or inf in scores"),
    ],
)
def test_more_bad_values_are_bad_rows(tmp_path, column, fn, message):
    t = to_table(batch(), META)
    if column == "logged_position":
        t = t.set_column(
            t.schema.get_field_index(column),
            pa.field(column, pa.list_(pa.int64())),
            t.column(column).cast(pa.list_(pa.int64())),
        )
    path = write(tmp_path / "s.parquet", edit(t, column, 3, fn))
    with pytest.raises(SchemaError, match=f"row 3, column '{column}': {message}"):
        list(iter_batches(path))
    report = ReadReport()
    got = list(
        iter_batches(path, on_error="reject", rejects_path=tmp_path / "r.parquet", report=report)
    )
    assert (report.rows_used, report.rows_rejected) == (7, 1)
    assert 3 not in np.concatenate([b.request_id for b in got]).tolist()


# -- finding 3: candidates per request ------------------------------------------------------


def test_max_candidates_raises_or_rejects(tmp_path):
    long = batch(1, n=50, first_id=100)
    parts = [batch(3), long, batch(3, first_id=3, seed=2)]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.concat_tables([to_table(p, META) for p in parts]), path)
    with pytest.raises(SchemaError, match="row 3, column 'item_ids': more than 40 candidates"):
        list(iter_batches(path, max_candidates=40))
    with read_scope(max_candidates=40):  # what a job sets from data.max_candidates
        with pytest.raises(SchemaError, match="more than 40 candidates"):
            read_sessions(path)
        report = ReadReport()
        got = list(
            iter_batches(path, on_error="reject", rejects_path=tmp_path / "r", report=report)
        )
    assert report.rows_rejected == 1 and sum(len(b) for b in got) == 6
    assert len(list(iter_batches(path, max_candidates=50))) >= 1  # at the limit: fine


def test_one_long_list_does_not_pad_the_batch(tmp_path):
    parts = [batch(300, n=5), batch(1, n=900, first_id=300), batch(300, n=5, first_id=301)]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.concat_tables([to_table(p, META) for p in parts]), path)
    got = list(iter_batches(path, batch_size=4096))
    assert [b.request_id[0] for b in got][0] == 0
    np.testing.assert_array_equal(np.concatenate([b.request_id for b in got]), np.arange(601))
    cells = sum(b.mask.size for b in got)
    assert cells <= 2 * (600 * 5 + 900) + 2 * (1 << 18)  # not 601 x 900
    assert max(b.mask.size for b in got) < 601 * 900 // 2


def test_length_segments():
    assert length_segments(np.array([100] * 4096)) == [(0, 4096)]
    assert length_segments(np.array([20, 30, 25] * 500)) == [(0, 1500)]
    segs = length_segments(np.array([100] * 4000 + [20_000] + [100] * 95))
    assert segs[0] == (0, 4000) and segs[-1][1] == 4096
    assert all(b > a for a, b in segs)
    assert [i for a, b in segs for i in range(a, b)] == list(range(4096))


# -- finding 2: rejects files and where rejects go ------------------------------------------


def test_a_rejects_file_in_the_data_is_an_error_not_a_skip(tmp_path):
    d = tmp_path / "logs"
    write(d / "part-0.parquet", to_table(batch(), META))
    bad = edit(to_table(batch(first_id=50), META), "scores", 1, lambda v: [[2.0, 0, 0], *v[1:]])
    write(d / "rejects-part.parquet", bad)  # a session file whose name mentions rejects
    report = ReadReport()
    rows = sum(
        len(b)
        for b in iter_batches(d, on_error="reject", rejects_path=tmp_path / "r", report=report)
    )
    assert rows == report.rows_used == 15 and report.rows_read == 16
    list(iter_batches(d / "part-0.parquet", on_error="reject", rejects_path=d / "rejects.parquet"))
    assert not (d / "rejects.parquet").exists()  # nothing rejected: nothing written
    list(iter_batches(d / "rejects-part.parquet", on_error="reject", rejects_path=d / "x.parquet"))
    with pytest.raises(SchemaError, match="x.parquet: this is a rejects file"):
        list(iter_batches(d, on_error="reject", rejects_path=tmp_path / "r"))


def test_rejects_go_to_the_scope_never_beside_the_data(tmp_path):
    d = tmp_path / "logs"
    path = write(
        d / "s.parquet",
        edit(to_table(batch(), META), "labels", 2, lambda v: [[float("nan"), 0], *v[1:]]),
    )
    report = ReadReport()
    list(iter_batches(d, on_error="reject", report=report))
    assert report.rows_rejected == 1 and report.rejects_path is None
    assert sorted(p.name for p in d.iterdir()) == ["s.parquet"]
    run = tmp_path / "run"
    with read_scope(rejects_dir=run / "rejects"):
        report = ReadReport()
        list(iter_batches(d, on_error="reject", report=report))
    want = rejects_file(run / "rejects", d)
    assert report.rejects_path == str(want) and want.parent == run / "rejects"
    assert pq.read_table(want).column("source_row").to_pylist() == [2]
    assert sorted(p.name for p in d.iterdir()) == ["s.parquet"]
    assert path.exists()


def test_a_partial_read_does_not_clobber_a_whole_reads_rejects(tmp_path):
    t = to_table(batch(20), META)
    for r in (1, 15):
        t = edit(t, "scores", r, lambda v: [[float("nan"), 0, 0], *v[1:]])
    path = write(tmp_path / "s.parquet", t)
    rej = tmp_path / "r.parquet"
    list(iter_batches(path, batch_size=5, on_error="reject", rejects_path=rej))
    assert pq.read_table(rej).column("source_row").to_pylist() == [1, 15]
    for _ in iter_batches(path, batch_size=5, on_error="reject", rejects_path=rej):
        break  # stops after the first chunk
    assert pq.read_table(rej).column("source_row").to_pylist() == [1, 15]
    assert not list(tmp_path.glob("*.tmp"))


# -- finding 7: files that are not (good) session data raise naming the file --------------


def test_unreadable_files_raise_naming_the_file(tmp_path):
    good = write(tmp_path / "good.parquet", to_table(batch(2000), META))
    data = good.read_bytes()
    cases = {
        "text.parquet": b"request_id,user_id\n1,2\n",
        "empty.parquet": b"",
        "truncated.parquet": data[: len(data) // 2],
    }
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    cases["corrupt.parquet"] = bytes(corrupt)
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(SchemaError, match=str(p)):
            list(iter_batches(p))
        with pytest.raises(SchemaError, match=str(p)):
            DataPlan.build(p, rounds=1, batch_size=10)


@pytest.mark.parametrize(
    "value, match",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"format_version": 1, "task_names": ["a"]}).encode(), "lacks"),
        (
            json.dumps(
                {
                    "format_version": 1,
                    "task_names": "ctr",
                    "task_kinds": ["prob"],
                    "label_names": ["click"],
                    "context_names": [],
                }
            ).encode(),
            "list of strings",
        ),
        (META.to_json().replace('"prob"', '"probability"', 1).encode(), "unknown task kind"),
        (
            META.to_json().replace('"format_version": 1', '"format_version": 7').encode(),
            "format_version=7",
        ),
    ],
)
def test_broken_metadata_raises_naming_the_file(tmp_path, value, match):
    t = to_table(batch(), META).replace_schema_metadata({META_KEY: value})
    p = write(tmp_path / "s.parquet", t)
    with pytest.raises(SchemaError, match=match) as e:
        read_meta(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "column, array, match",
    [
        ("scores", pa.array([[0.1, 0.2]] * 8, pa.list_(pa.float32())), "column 'scores' has type"),
        ("labels", pa.array(["x"] * 8), "column 'labels' has type string"),
        ("request_id", pa.array([1.5] * 8), "column 'request_id' has type double"),
        ("context", pa.array([["a", "b"]] * 8), "column 'context' has type"),
        ("request_id", pa.array([2**63 + i for i in range(8)], pa.uint64()), "do not convert"),
    ],
)
def test_wrong_types_raise_naming_file_and_column(tmp_path, column, array, match):
    t = to_table(batch(), META)
    t = t.set_column(t.schema.get_field_index(column), column, array)
    p = write(tmp_path / "s.parquet", t)
    for on_error in ("raise", "reject"):
        with pytest.raises(SchemaError, match=match) as e:
            list(iter_batches(p, on_error=on_error, rejects_path=tmp_path / "r.parquet"))
        assert str(p) in str(e.value)


def test_files_must_agree_on_context_features(tmp_path):
    other = SessionMeta(META.task_names, META.task_kinds, META.label_names, ("a", "c"))
    d = tmp_path / "d"
    write(d / "a.parquet", to_table(batch(), META))
    write(d / "b.parquet", to_table(batch(first_id=10), other))
    with pytest.raises(SchemaError, match="context features"):
        list(iter_validated(d))


def test_shard_writer_round_trip_keeps_int32_positions(tmp_path):
    with ShardWriter(tmp_path, META) as w:
        w.write(batch())
    back, _, _ = read_sessions(tmp_path)
    assert back.position.dtype == np.int32
