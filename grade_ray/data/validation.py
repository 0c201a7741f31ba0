"""Row validation: every row of a session table checked; bad rows raised or set aside, counted.

Validation names file, row and column and checks every row: types, lengths, NaN/inf,
probability and value ranges, labels >= 0, logged positions in [0, MAX_LOGGED_POSITION),
at most ``max_candidates`` candidates (``data.max_candidates``) and request ids unique
over the whole read (:class:`SeenIds`). With ``on_error="reject"`` bad rows go to a
rejects file (never beside the input data: a path the caller gives, or a file per input
under the directory of :func:`read_scope`) with the reason and their row number in the
source file, and are counted in a :class:`ReadReport` (rows read/used/rejected). The
format checked against is :mod:`grade_ray.data.sessions`; reading files is
:mod:`grade_ray.data.reading`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade_ray.config import error_brief
from grade_ray.data.sessions import (
    CONTEXT,
    ITEM_IDS,
    LABELS,
    LOGGED_POSITION,
    REQUEST_ID,
    REQUIRED_COLUMNS,
    SCHEMA,
    SCORES,
    TS,
    SchemaError,
    SessionMeta,
    list_lengths,
)

MAX_CANDIDATES = 1_000
"""Default longest candidate list a row may have (``data.max_candidates``)."""
MAX_LOGGED_POSITION = 100_000
"""Logged positions are 0-based ranks below this (larger ones are logging bugs)."""

REJECT_REASON = "reject_reason"
SOURCE_FILE = "source_file"
SOURCE_ROW = "source_row"
"""Columns a rejects file adds to the session columns (a file with them is not session data)."""


@dataclasses.dataclass
class ReadReport:
    """Accounting for one read: nothing is dropped without being counted."""

    rows_read: int = 0
    rows_used: int = 0
    rows_rejected: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    rejects_path: str | None = None

    def add(self, other: ReadReport) -> None:
        self.rows_read += other.rows_read
        self.rows_used += other.rows_used
        self.rows_rejected += other.rows_rejected
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def summary(self) -> str:
        s = f"rows read {self.rows_read}, used {self.rows_used}, rejected {self.rows_rejected}"
        if self.reasons:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        if self.rejects_path:
            s += f"; rejects in {self.rejects_path}"
        return s


@dataclasses.dataclass(frozen=True)
class ReadScope:
    """What every session read in a job shares (see :func:`read_scope`)."""

    max_candidates: int = MAX_CANDIDATES
    """Rows with more candidates than this are bad rows (raised, or rejected and counted)."""
    rejects_dir: Path | None = None
    """Where reject-mode reads given no rejects path write theirs, one file per input
    (:func:`rejects_file`); None: such reads count their rejected rows without keeping them."""


_SCOPE: contextvars.ContextVar[ReadScope] = contextvars.ContextVar(
    "grade_ray_read_scope",
    default=ReadScope(),  # noqa: B039 (frozen)
)


@contextlib.contextmanager
def read_scope(
    max_candidates: int = MAX_CANDIDATES, rejects_dir: str | Path | None = None
) -> Iterator[ReadScope]:
    """Within the block, session reads that do not say otherwise allow ``max_candidates``
    candidates per row and write reject-mode rejects under ``rejects_dir`` (a job passes its
    run directory's ``rejects/``; rejects never go beside the input data)."""
    token = _SCOPE.set(ReadScope(int(max_candidates), Path(rejects_dir) if rejects_dir else None))
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)


def current_scope() -> ReadScope:
    """The innermost :func:`read_scope` in effect (the defaults outside any)."""
    return _SCOPE.get()


def rejects_file(rejects_dir: str | Path, source: str | Path) -> Path:
    """``rejects_dir/NAME-HASH.parquet`` for the input ``source`` (file or directory): one
    file per input, so the training and the held-out data keep separate rejects."""
    src = os.path.realpath(source)
    digest = hashlib.sha1(src.encode()).hexdigest()[:8]
    return Path(rejects_dir) / f"{Path(src).name}-{digest}.parquet"


class _Flags:
    """Per-row problems of one table; the first problem found in a row is its reason."""

    def __init__(self, n_rows: int) -> None:
        self.bad = np.zeros(n_rows, dtype=bool)
        self.reasons: list[tuple[str, str] | None] = [None] * n_rows
        self.detail: dict[int, str] = {}

    def flag(self, mask: np.ndarray, column: str, message: str) -> None:
        for r in np.flatnonzero(mask & ~self.bad):
            self.reasons[r] = (column, message)
        self.bad |= mask

    def flag_row(self, row: int, column: str, message: str, detail: str) -> None:
        if not self.bad[row]:
            self.reasons[row], self.detail[row] = (column, message), detail
            self.bad[row] = True

    def text(self, row: int) -> str:
        column, message = self.reasons[row]
        detail = self.detail.get(row)
        return f"{column}: {message}" + (f" ({detail})" if detail else "")


def _row_problems(table: pa.Table, meta: SessionMeta, max_candidates: int) -> _Flags:
    """Check every row of a normalized table: nulls, list lengths, NaN/inf, value ranges."""
    f = _Flags(table.num_rows)
    has_pos = LOGGED_POSITION in table.column_names
    for col in REQUIRED_COLUMNS + ((LOGGED_POSITION,) if has_pos else ()):
        f.flag(_is_null(table.column(col)), col, "null value")

    n_items = list_lengths(table.column(ITEM_IDS))
    f.flag(n_items == 0, ITEM_IDS, "empty candidate list")
    f.flag(
        n_items > max_candidates,
        ITEM_IDS,
        f"more than {max_candidates} candidates (data.max_candidates; raise it or split the "
        "request)",
    )
    f.flag(_any_per_row(_values_null(table.column(ITEM_IDS)), n_items), ITEM_IDS, "null item id")
    ctx_len = list_lengths(table.column(CONTEXT))
    f.flag(ctx_len != meta.context_dim, CONTEXT, f"context length != {meta.context_dim}")
    ctx_vals = _flat_values(table.column(CONTEXT))
    f.flag(_any_per_row(~np.isfinite(ctx_vals), ctx_len), CONTEXT, "NaN or inf in context")

    if has_pos:
        pos = table.column(LOGGED_POSITION)
        pos_len = list_lengths(pos)
        f.flag(pos_len != n_items, LOGGED_POSITION, "logged_position length != item_ids length")
        p = _flat_values(pos)
        f.flag(
            _any_per_row(~((p >= 0) & (p < MAX_LOGGED_POSITION)), pos_len),
            LOGGED_POSITION,
            f"logged_position outside [0, {MAX_LOGGED_POSITION}) or null",
        )
    for col, names, kinds in (
        (SCORES, meta.task_names, meta.task_kinds),
        (LABELS, meta.label_names, ("label",) * meta.num_labels),
    ):
        _check_nested(table.column(col), col, names, kinds, n_items, f)
    return f


def _check_nested(
    column: pa.ChunkedArray,
    col: str,
    names: Sequence[str],
    kinds: Sequence[str],
    n_items: np.ndarray,
    f: _Flags,
) -> None:
    """scores / labels: N_q items of ``len(names)`` finite values each, in each kind's range.

    Every check looks at every row: an item with the wrong width is flagged without hiding
    the other rows' values from the NaN and range checks.
    """
    width = len(names)
    outer = list_lengths(column)
    f.flag(outer != n_items, col, f"{col} has a different number of items than item_ids")
    inner = pc.list_flatten(column)
    inner_len = list_lengths(inner)
    f.flag(
        _any_per_row(inner_len != width, outer),
        col,
        f"each item needs {width} {col} values ({', '.join(names)})",
    )
    if f.bad.all():
        return
    vals = _flat_values(inner)  # nulls inside are NaN
    f.flag(
        _any_per_row(_any_per_row(~np.isfinite(vals), inner_len), outer),
        col,
        f"NaN or inf in {col}",
    )
    ok = inner_len == width
    first = (np.cumsum(inner_len) - inner_len)[ok]
    for k, (name, kind) in enumerate(zip(names, kinds)):
        v = vals[first + k]
        out = np.zeros(len(inner_len), dtype=bool)
        if kind == "prob":
            out[ok] = (v < 0) | (v > 1)
            msg = f"task {name!r} is a probability outside [0, 1]"
        elif kind == "value":
            out[ok] = v < 0
            msg = f"task {name!r} is a negative value"
        else:
            out[ok] = v < 0
            msg = f"label {name!r} is negative"
        f.flag(_any_per_row(out, outer), col, msg)


def _is_null(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _values_null(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _is_null(pc.list_flatten(col))


def _flat_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), dtype=np.float64)


def _any_per_row(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """flags: (sum(lengths),) bool -> (len(lengths),) whether any flag is set in each row."""
    # flags set up to each row's end minus up to its start: empty rows anywhere (also last,
    # where reduceat's clamped start would cut the row before short) count 0
    ends = np.cumsum(lengths, dtype=np.int64)
    upto = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return upto[ends] > upto[ends - lengths]


class SeenIds:
    """Request ids read so far in one read (sorted runs merged as they grow: memory 16 bytes
    per id, O(log n) runs to search). Each id keeps where it was first read."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted ids, file << 40 | row)

    def where(self, loc: int) -> str:
        return f"{self.files[loc >> 40]} row {loc & ((1 << 40) - 1)}"

    def locations(self, file: str, rows: np.ndarray) -> np.ndarray:
        if not self.files or self.files[-1] != file:
            self.files.append(file)
        return (np.int64(len(self.files) - 1) << np.int64(40)) | rows.astype(np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 ids -> (n,) location of each id's first read, -1 where unseen."""
        out = np.full(len(ids), -1, dtype=np.int64)
        for keys, locs in self._runs:
            i = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            hit = (keys[i] == ids) & (out < 0)
            out[hit] = locs[i[hit]]
        return out

    def add(self, ids: np.ndarray, locs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        order = np.argsort(ids, kind="stable")
        self._runs.append((ids[order], locs[order]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a, la), (b, lb) = self._runs.pop(-2), self._runs.pop()
            keys, locs_ = np.concatenate([a, b]), np.concatenate([la, lb])
            order = np.argsort(keys, kind="stable")
            self._runs.append((keys[order], locs_[order]))


def _flag_duplicates(table: pa.Table, f: _Flags, seen: SeenIds, file: str, row_offset: int) -> None:
    """Flag rows whose request_id was read before (in this table or earlier in the read);
    the first good row with an id keeps it."""
    ok = np.flatnonzero(~f.bad)
    if len(ok) == 0:
        return
    ids = np.asarray(pc.fill_null(table.column(REQUEST_ID), 0).to_numpy(), np.int64)[ok]
    locs = seen.locations(file, ok + row_offset)
    prior = seen.find(ids)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    again = np.arange(len(ids)) != first[inverse]
    dup = (prior >= 0) | again
    where = np.where(prior >= 0, prior, locs[first[inverse]])
    for i in np.flatnonzero(dup):
        f.flag_row(
            int(ok[i]),
            REQUEST_ID,
            "duplicate request_id",
            f"request_id {int(ids[i])} was first read at {seen.where(int(where[i]))}",
        )
    seen.add(ids[~dup], locs[~dup])


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether values of type ``got`` can stand for ``want`` (same nesting, numeric kinds)."""
    if pa.types.is_null(got):
        return True  # an all-null column: every row is flagged as null
    if pa.types.is_list(want):
        nested = pa.types.is_list(got) or pa.types.is_large_list(got)
        if not (nested or pa.types.is_fixed_size_list(got)):
            return False
        return _compatible(got.value_type, want.value_type)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_floating(want):
        return pa.types.is_integer(got) or pa.types.is_floating(got)
    return got == want


def _check_columns(table: pa.Table, file: str) -> None:
    names = table.column_names
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise SchemaError(f"{file}: duplicate column(s) {dup}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise SchemaError(
            f"{file}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}"
        )
    for c in names:
        if c not in SCHEMA.names:
            continue
        want, got = SCHEMA.field(c).type, table.schema.field(c).type
        if got != want and not _compatible(got, want) and not (c == TS and _is_time(got)):
            hint = (
                " (one list of per-candidate values per item: N_q x K)"
                if c in (SCORES, LABELS)
                else ""
            )
            raise SchemaError(f"{file}: column {c!r} has type {got}, expected {want}{hint}")


def _is_time(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t)


def normalize_table(table: pa.Table, file: str = "<table>") -> pa.Table:
    """Cast known columns to the canonical types (e.g. float64 lists, timestamps).

    ``logged_position`` values beyond int32 stay int64 (the row checks flag them); a value
    that cannot be converted at all raises :class:`SchemaError` naming file and column.
    """
    arrays, fields = [], []
    for name in table.column_names:
        col = table.column(name)
        if name in SCHEMA.names:
            col = _cast(col, SCHEMA.field(name).type, name, file)
            fields.append(pa.field(name, col.type))
        else:
            fields.append(table.schema.field(name))
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _cast(col: pa.ChunkedArray, want: pa.DataType, name: str, file: str) -> pa.ChunkedArray:
    try:
        if name == TS and _is_time(col.type):
            if pa.types.is_timestamp(col.type) and col.type.unit != "s":
                col = pc.floor_temporal(col, unit="second")  # ms/us/ns logs: whole seconds
            return pc.cast(col.cast(pa.timestamp("s")), pa.int64())
        return col if col.type == want else col.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        if name == LOGGED_POSITION:
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return col.cast(pa.list_(pa.int64()))
        raise SchemaError(
            f"{file}: column {name!r}: values do not convert from {col.type} to {want} "
            f"({error_brief(e)})"
        ) from None


REJECTS_SCHEMA = pa.schema(
    [
        *(f.with_nullable(True) for f in SCHEMA if f.name != LOGGED_POSITION),
        pa.field(LOGGED_POSITION, pa.list_(pa.int64())),
        pa.field(REJECT_REASON, pa.string()),
        pa.field(SOURCE_FILE, pa.string()),
        pa.field(SOURCE_ROW, pa.int64()),
    ]
)
"""Rows of a rejects file: the session columns as read, the reason, source file and row."""


def rejects_table(
    rows: pa.Table, reasons: list[str], file: str, source_rows: np.ndarray
) -> pa.Table:
    """Rows of a session table as a rejects file holds them (:data:`REJECTS_SCHEMA`)."""
    cols = []
    for field in REJECTS_SCHEMA:
        if field.name == REJECT_REASON:
            cols.append(pa.array(reasons, pa.string()))
        elif field.name == SOURCE_FILE:
            cols.append(pa.array([file] * rows.num_rows, pa.string()))
        elif field.name == SOURCE_ROW:
            cols.append(pa.array(source_rows.astype(np.int64), pa.int64()))
        elif field.name in rows.column_names:
            cols.append(rows.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(rows.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=REJECTS_SCHEMA).replace_schema_metadata(
        rows.schema.metadata
    )


def validate_table(
    table: pa.Table,
    meta: SessionMeta,
    file: str = "<table>",
    row_offset: int = 0,
    on_error: str = "raise",
    *,
    max_candidates: int | None = None,
    seen: SeenIds | None = None,
) -> tuple[pa.Table, pa.Table | None, ReadReport]:
    """Check every row. Returns (good rows, rejected rows with a ``reject_reason`` column and
    their ``source_file`` / ``source_row``, report).

    ``on_error="raise"`` raises :class:`SchemaError` at the first bad row naming
    file, row (0-based within the file) and column; ``"reject"`` sets bad rows aside.
    ``max_candidates``: default the :func:`read_scope`'s. ``seen``: request ids read before
    (a read passes one across its chunks and files); duplicates are bad rows.
    """
    if on_error not in ("raise", "reject"):
        raise ValueError(f"on_error must be 'raise' or 'reject', got {on_error!r}")
    _check_columns(table, file)
    table = normalize_table(table, file)
    limit = _SCOPE.get().max_candidates if max_candidates is None else max_candidates
    flags = _row_problems(table, meta, limit)
    _flag_duplicates(table, flags, seen if seen is not None else SeenIds(), file, row_offset)
    report = ReadReport(rows_read=table.num_rows)
    if not flags.bad.any():
        report.rows_used = table.num_rows
        return table, None, report
    idx = np.flatnonzero(flags.bad)
    if on_error == "raise":
        col, _ = flags.reasons[idx[0]]
        raise SchemaError(
            f"{file}: row {row_offset + int(idx[0])}, column {col!r}: "
            f"{flags.text(int(idx[0])).split(': ', 1)[1]} ({len(idx)} bad row(s) in this chunk; "
            "reject mode (data.on_error=reject) sets bad rows aside)"
        )
    rejected = rejects_table(
        table.take(pa.array(idx)), [flags.text(int(i)) for i in idx], file, idx + row_offset
    )
    good = table.filter(pa.array(~flags.bad))
    report.rows_used = good.num_rows
    report.rows_rejected = len(idx)
    for i in idx:
        key = "{}: {}".format(*flags.reasons[i])
        report.reasons[key] = report.reasons.get(key, 0) + 1
    return good, rejected, report


class RejectsWriter:
    """Rejected rows (with reasons) of one read into one Parquet file, written aside and
    moved into place when the read ends: a read of the whole input replaces the file (and
    removes it when nothing was rejected), a read stopped early publishes only where no
    file exists yet. Without a path, rows are counted (``rows``) but not kept."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.rows = 0
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, rejected: pa.Table | None) -> None:
        if rejected is None or rejected.num_rows == 0:
            return
        self.rows += rejected.num_rows
        if self.path is None:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
            self._writer = pq.ParquetWriter(self._tmp, rejected.schema)
        self._writer.write_table(rejected.cast(self._writer.schema))

    def close(self, complete: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if complete or not self.path.exists():
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
        elif complete and self.path is not None and self.rows == 0:
            self.path.unlink(missing_ok=True)  # an older read's rejects: stale now
