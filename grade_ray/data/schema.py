"""The logged-session format: one Arrow schema, its metadata, validation, I/O.

One row per request::

    request_id        int64            unique per request
    user_id           int64
    ts                int64            request time (seconds since epoch)
    context           list<float32>    fixed length D; the only policy input
    item_ids          list<int64>      N_q candidates in logged order
    scores            list<list<f32>>  N_q x K upstream predictions
    labels            list<list<f32>>  N_q x L observed feedback
    logged_position   list<int32>      optional; rank the item was shown at

The Parquet file's key-value metadata (key ``grade_ray``) carries a JSON
:class:`SessionMeta`: task names and kinds (``prob`` in [0, 1] or ``value``
>= 0), label names, the context feature names and free-form provenance.

Readers turn a table into a :class:`SessionBatch` of padded numpy arrays, the
shape every other module consumes. Validation names file, row and column;
with ``on_error="reject"`` bad rows go to a rejects file with the reason and
are counted. Every read returns a :class:`ReadReport` (rows read/used/rejected).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

META_KEY = b"grade_ray"
FORMAT_VERSION = 1
TASK_KINDS = ("prob", "value")

REQUEST_ID = "request_id"
USER_ID = "user_id"
TS = "ts"
CONTEXT = "context"
ITEM_IDS = "item_ids"
SCORES = "scores"
LABELS = "labels"
LOGGED_POSITION = "logged_position"
REQUIRED_COLUMNS = (REQUEST_ID, USER_ID, TS, CONTEXT, ITEM_IDS, SCORES, LABELS)

SCHEMA = pa.schema(
    [
        pa.field(REQUEST_ID, pa.int64(), nullable=False),
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(TS, pa.int64(), nullable=False),
        pa.field(CONTEXT, pa.list_(pa.float32()), nullable=False),
        pa.field(ITEM_IDS, pa.list_(pa.int64()), nullable=False),
        pa.field(SCORES, pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field(LABELS, pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field(LOGGED_POSITION, pa.list_(pa.int32())),
    ]
)


class SchemaError(ValueError):
    """Bad logged-session input; the message names file, row and column."""


@dataclasses.dataclass(frozen=True)
class SessionMeta:
    """What a session file's columns mean; stored as JSON in Parquet metadata."""

    task_names: tuple[str, ...]
    """Names of the K upstream score columns, in order (e.g. ctr, cvr, gmv, profit)."""
    task_kinds: tuple[str, ...]
    """Per task: ``prob`` (validated in [0, 1]) or ``value`` (validated >= 0)."""
    label_names: tuple[str, ...]
    """Names of the L feedback columns, in order (e.g. click, order, gmv)."""
    context_names: tuple[str, ...]
    """Names of the D context features, in order."""
    source: dict = dataclasses.field(default_factory=dict)
    """Free-form provenance (generator, seed, licence notice, date range)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_names", tuple(self.task_names))
        object.__setattr__(self, "task_kinds", tuple(self.task_kinds))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "context_names", tuple(self.context_names))
        if len(self.task_kinds) != len(self.task_names):
            raise SchemaError(
                f"task_kinds has {len(self.task_kinds)} entries but task_names has "
                f"{len(self.task_names)}; give one kind per task"
            )
        bad = [k for k in self.task_kinds if k not in TASK_KINDS]
        if bad:
            raise SchemaError(f"unknown task kind(s) {bad}; valid kinds: {list(TASK_KINDS)}")
        for what, names in (("task", self.task_names), ("label", self.label_names)):
            if not names:
                raise SchemaError(f"at least one {what} name is required")
            if len(set(names)) != len(names):
                raise SchemaError(f"duplicate {what} names: {list(names)}")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def context_dim(self) -> int:
        return len(self.context_names)

    def task_index(self, name: str) -> int:
        """Index of task ``name``; an unknown name raises listing the valid ones."""
        if name not in self.task_names:
            raise SchemaError(f"unknown task {name!r}; tasks in this data: {list(self.task_names)}")
        return self.task_names.index(name)

    def label_index(self, name: str) -> int:
        """Index of label ``name``; an unknown name raises listing the valid ones."""
        if name not in self.label_names:
            raise SchemaError(
                f"unknown label {name!r}; labels in this data: {list(self.label_names)}"
            )
        return self.label_names.index(name)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionMeta:
        d = json.loads(text)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise SchemaError(
                f"session metadata format_version={version}; this grade_ray reads "
                f"version {FORMAT_VERSION}"
            )
        return cls(**d)


@dataclasses.dataclass
class SessionBatch:
    """Requests as padded arrays. N is the longest candidate list in the batch.

    context: (B, D) float32; scores: (B, N, K) float32; labels: (B, N, L)
    float32; mask: (B, N) bool (True = real candidate); item_ids: (B, N) int64
    (0 where padded, all 0 when read without that column); request_id, user_id, ts: (B,) int64.
    """

    request_id: np.ndarray
    user_id: np.ndarray
    ts: np.ndarray
    context: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    position: np.ndarray | None = None
    """(B, N) int32 logged rank of each candidate; None = the logged order (0, 1, ...)."""

    def __post_init__(self) -> None:
        if self.position is None:
            b, n = self.mask.shape
            self.position = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy()

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    def slice(self, start: int, stop: int) -> SessionBatch:
        """Rows [start, stop), trimmed to the longest list among them."""
        n = max(int(self.mask[start:stop].sum(axis=1).max(initial=1)), 1)
        return SessionBatch(
            request_id=self.request_id[start:stop],
            user_id=self.user_id[start:stop],
            ts=self.ts[start:stop],
            context=self.context[start:stop],
            item_ids=self.item_ids[start:stop, :n],
            scores=self.scores[start:stop, :n],
            labels=self.labels[start:stop, :n],
            mask=self.mask[start:stop, :n],
            position=self.position[start:stop, :n],
        )

    def trim(self) -> SessionBatch:
        """Drop padding columns beyond the longest list in this batch."""
        n = max(int(self.mask.sum(axis=1).max(initial=1)), 1)
        if n == self.mask.shape[1]:
            return self
        return self.slice(0, len(self))

    def take(self, idx: np.ndarray) -> SessionBatch:
        """Rows at ``idx`` (any order)."""
        return SessionBatch(
            **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)}
        )

    @staticmethod
    def concat(batches: Sequence[SessionBatch]) -> SessionBatch:
        """Stack batches, padding every list to the longest."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        n = max(b.mask.shape[1] for b in batches)

        def pad(name: str, a: np.ndarray) -> np.ndarray:
            if name not in _PER_CANDIDATE or a.shape[1] == n:
                return a
            width = [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
            return np.pad(a, width)

        return SessionBatch(
            **{
                f.name: np.concatenate([pad(f.name, getattr(b, f.name)) for b in batches])
                for f in dataclasses.fields(SessionBatch)
            }
        )


_PER_CANDIDATE = ("item_ids", "scores", "labels", "mask", "position")


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


# ---------------------------------------------------------------------------
# Writing


def to_table(batch: SessionBatch, meta: SessionMeta, logged_position: bool = True) -> pa.Table:
    """Padded batch -> Arrow table with list columns cut back to each row's length."""
    lengths = batch.mask.sum(axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = batch.mask.reshape(-1)
    b, d = batch.context.shape
    k, n_labels = batch.scores.shape[2], batch.labels.shape[2]
    if k != meta.num_tasks or n_labels != meta.num_labels or d != meta.context_dim:
        raise SchemaError(
            f"batch has K={k}, L={n_labels}, D={d} but metadata names K={meta.num_tasks}, "
            f"L={meta.num_labels}, D={meta.context_dim}"
        )

    def nested(arr: np.ndarray, width: int) -> pa.Array:
        inner = pa.FixedSizeListArray.from_arrays(
            pa.array(arr.reshape(-1, width)[flat].reshape(-1), pa.float32()), width
        ).cast(pa.list_(pa.float32()))
        return pa.ListArray.from_arrays(pa.array(offsets), inner)

    cols = {
        REQUEST_ID: pa.array(batch.request_id, pa.int64()),
        USER_ID: pa.array(batch.user_id, pa.int64()),
        TS: pa.array(batch.ts, pa.int64()),
        CONTEXT: pa.ListArray.from_arrays(
            pa.array(np.arange(b + 1, dtype=np.int32) * d),
            pa.array(batch.context.reshape(-1), pa.float32()),
        ),
        ITEM_IDS: pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(batch.item_ids.reshape(-1)[flat], pa.int64())
        ),
        SCORES: nested(batch.scores, k),
        LABELS: nested(batch.labels, n_labels),
    }
    if logged_position:
        cols[LOGGED_POSITION] = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(batch.position.reshape(-1)[flat], pa.int32())
        )
    schema = SCHEMA if logged_position else SCHEMA.remove(SCHEMA.get_field_index(LOGGED_POSITION))
    table = pa.Table.from_pydict(cols, schema=schema)
    return table.replace_schema_metadata({META_KEY: meta.to_json().encode()})


class ShardWriter:
    """Streams batches into numbered Parquet shards of at most ``rows_per_shard`` rows.

    Memory stays bounded by one shard's buffer. Shards are named
    ``{prefix}-{i:05d}.parquet`` in ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        meta: SessionMeta,
        rows_per_shard: int = 100_000,
        prefix: str = "part",
    ) -> None:
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be > 0, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.paths: list[Path] = []
        self.rows_written = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def write(self, batch: SessionBatch) -> None:
        start = 0
        while start < len(batch):
            if self._writer is None:
                path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.parquet"
                self._writer = pq.ParquetWriter(path, to_table(batch.slice(0, 1), self.meta).schema)
                self.paths.append(path)
                self._rows_in_shard = 0
            take = min(len(batch) - start, self.rows_per_shard - self._rows_in_shard)
            self._writer.write_table(to_table(batch.slice(start, start + take), self.meta))
            self._rows_in_shard += take
            self.rows_written += take
            start += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer = None

    def close(self) -> list[Path]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Reading and validation


def list_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every ``*.parquet`` below a directory (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if "rejects" not in f.name)
        if not files:
            raise FileNotFoundError(f"no *.parquet files under {p}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"no such session file or directory: {p}")
    return [p]


def read_meta(path: str | Path) -> SessionMeta:
    """Metadata of the first file at ``path``; raises if absent."""
    f = list_files(path)[0]
    md = pq.read_schema(f).metadata or {}
    if META_KEY not in md:
        raise SchemaError(
            f"{f}: no grade_ray metadata (task and label names); write sessions with "
            "grade_ray.data.schema.ShardWriter or convert them with `grade-ray data`"
        )
    return SessionMeta.from_json(md[META_KEY])


def _row_problems(table: pa.Table, meta: SessionMeta) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Per-row validation. Returns (bad: (R,) bool, reason per bad row as (column, message))."""
    n_rows = table.num_rows
    reasons: list[tuple[str, str] | None] = [None] * n_rows
    bad = np.zeros(n_rows, dtype=bool)

    def flag(mask: np.ndarray, column: str, message: str) -> None:
        for r in np.flatnonzero(mask & ~bad):
            reasons[r] = (column, message)
        bad[:] |= mask

    for col in REQUIRED_COLUMNS + (
        (LOGGED_POSITION,) if LOGGED_POSITION in table.column_names else ()
    ):
        flag(
            np.asarray(table.column(col).is_null().to_numpy(zero_copy_only=False)),
            col,
            "null value",
        )

    n_items = _list_len(table.column(ITEM_IDS))
    flag(n_items == 0, ITEM_IDS, "empty candidate list")
    ctx_len = _list_len(table.column(CONTEXT))
    flag(ctx_len != meta.context_dim, CONTEXT, f"context length != {meta.context_dim}")
    ctx_vals = _flat_values(table.column(CONTEXT))
    flag(_any_per_row(~np.isfinite(ctx_vals), ctx_len), CONTEXT, "NaN or inf in context")

    cols = [(SCORES, meta.num_tasks), (LABELS, meta.num_labels)]
    if LOGGED_POSITION in table.column_names:
        flag(
            _list_len(table.column(LOGGED_POSITION)) != n_items,
            LOGGED_POSITION,
            "logged_position length != item_ids length",
        )
    for col, width in cols:
        outer = _list_len(table.column(col))
        flag(outer != n_items, col, f"{col} has a different number of items than item_ids")
        inner_col = pc.list_flatten(table.column(col))
        inner_len = _list_len(inner_col)
        per_row_bad_width = _any_per_row(inner_len != width, outer)
        flag(
            per_row_bad_width,
            col,
            f"each item needs {width} {col} values "
            f"({', '.join(meta.task_names if col == SCORES else meta.label_names)})",
        )
        if bad.all():
            continue
        vals = _flat_values(inner_col)
        if (inner_len == width).all():
            per_item = vals.reshape(-1, width)
            items_per_row = outer
            flag(
                _any_per_row(~np.isfinite(per_item).all(axis=1), items_per_row),
                col,
                f"NaN or inf in {col}",
            )
            if col == SCORES:
                for k, kind in enumerate(meta.task_kinds):
                    v = per_item[:, k]
                    if kind == "prob":
                        out = (v < 0) | (v > 1)
                        msg = f"task {meta.task_names[k]!r} is a probability outside [0, 1]"
                    else:
                        out = v < 0
                        msg = f"task {meta.task_names[k]!r} is a negative value"
                    flag(_any_per_row(out, items_per_row), col, msg)
    return bad, [r for r in reasons if r is not None]


def _list_len(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(
        pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False), dtype=np.int64
    )


def _flat_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), dtype=np.float64)


def _any_per_row(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """flags: (sum(lengths),) bool -> (len(lengths),) whether any flag is set in each row."""
    if flags.size == 0:
        return np.zeros(len(lengths), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counts = np.add.reduceat(flags.astype(np.int64), np.minimum(starts, flags.size - 1))
    return (counts > 0) & (lengths > 0)


def _check_columns(table: pa.Table, file: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"{file}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}"
        )
    for c in table.column_names:
        if c in SCHEMA.names:
            want = SCHEMA.field(c).type
            got = table.schema.field(c).type
            if got != want and not _castable(got, want):
                raise SchemaError(f"{file}: column {c!r} has type {got}, expected {want}")


def _castable(got: pa.DataType, want: pa.DataType) -> bool:
    try:
        pa.array([], got).cast(want)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def normalize_table(table: pa.Table) -> pa.Table:
    """Cast known columns to the canonical types (e.g. float64 lists, timestamps)."""
    arrays, fields = [], []
    for name in table.column_names:
        col = table.column(name)
        if name in SCHEMA.names:
            want = SCHEMA.field(name).type
            if name == TS and pa.types.is_timestamp(col.type):
                col = pc.cast(col.cast(pa.timestamp("s")), pa.int64())
            elif col.type != want:
                col = col.cast(want)
            fields.append(pa.field(name, want))
        else:
            fields.append(table.schema.field(name))
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def validate_table(
    table: pa.Table,
    meta: SessionMeta,
    file: str = "<table>",
    row_offset: int = 0,
    on_error: str = "raise",
) -> tuple[pa.Table, pa.Table | None, ReadReport]:
    """Check every row. Returns (good rows, rejected rows with a ``reason`` column, report).

    ``on_error="raise"`` raises :class:`SchemaError` at the first bad row naming
    file, row (0-based within the file) and column; ``"reject"`` sets bad rows aside.
    """
    if on_error not in ("raise", "reject"):
        raise ValueError(f"on_error must be 'raise' or 'reject', got {on_error!r}")
    _check_columns(table, file)
    table = normalize_table(table)
    bad, reasons = _row_problems(table, meta)
    report = ReadReport(rows_read=table.num_rows)
    if not bad.any():
        report.rows_used = table.num_rows
        return table, None, report
    idx = np.flatnonzero(bad)
    if on_error == "raise":
        col, msg = reasons[0]
        raise SchemaError(
            f"{file}: row {row_offset + int(idx[0])}, column {col!r}: {msg} "
            f"({len(idx)} bad row(s) in this chunk; pass on_error='reject' to set them aside)"
        )
    rejected = (
        table.take(pa.array(idx))
        .append_column("reject_reason", pa.array([f"{c}: {m}" for c, m in reasons]))
        .append_column("source_file", pa.array([file] * len(idx)))
        .append_column("source_row", pa.array((idx + row_offset).astype(np.int64)))
    )
    good = table.filter(pa.array(~bad))
    report.rows_used = good.num_rows
    report.rows_rejected = len(idx)
    for c, m in reasons:
        key = f"{c}: {m}"
        report.reasons[key] = report.reasons.get(key, 0) + 1
    return good, rejected, report


def table_to_batch(table: pa.Table, meta: SessionMeta) -> SessionBatch:
    """Validated Arrow table -> padded :class:`SessionBatch` (vectorized, no Python row loop).

    A table read without the ``item_ids`` column (rollouts do not need it) gives zero item ids.
    """
    b = table.num_rows
    has_items = ITEM_IDS in table.column_names
    lengths = _list_len(table.column(ITEM_IDS if has_items else SCORES))
    n = int(lengths.max(initial=1)) if b else 1
    k, n_labels, d = meta.num_tasks, meta.num_labels, meta.context_dim
    mask = np.arange(n)[None, :] < lengths[:, None]

    full = bool(b) and bool((lengths == n).all())  # no padding needed: a plain reshape

    def padded(flat: np.ndarray, width: int | None, dtype) -> np.ndarray:
        shape = (b, n) if width is None else (b, n, width)
        if full:
            return np.ascontiguousarray(flat, dtype=dtype).reshape(shape)
        out = np.zeros(shape, dtype=dtype)
        out[mask] = flat if width is None else flat.reshape(-1, width)
        return out

    scores = np.asarray(
        pc.list_flatten(pc.list_flatten(table.column(SCORES))).to_numpy(), np.float32
    )
    labels = np.asarray(
        pc.list_flatten(pc.list_flatten(table.column(LABELS))).to_numpy(), np.float32
    )
    if has_items:
        items = padded(
            np.asarray(pc.list_flatten(table.column(ITEM_IDS)).to_numpy(), np.int64),
            None,
            np.int64,
        )
    else:
        items = np.zeros((b, n), np.int64)
    ctx = np.asarray(pc.list_flatten(table.column(CONTEXT)).to_numpy(), np.float32).reshape(b, d)
    return SessionBatch(
        request_id=np.asarray(table.column(REQUEST_ID).to_numpy(), np.int64),
        user_id=np.asarray(table.column(USER_ID).to_numpy(), np.int64),
        ts=np.asarray(table.column(TS).to_numpy(), np.int64),
        context=ctx,
        item_ids=items,
        scores=padded(scores, k, np.float32),
        labels=padded(labels, n_labels, np.float32),
        mask=mask,
        position=None
        if LOGGED_POSITION not in table.column_names
        else padded(
            np.asarray(pc.list_flatten(table.column(LOGGED_POSITION)).to_numpy(), np.int32),
            None,
            np.int32,
        ),
    )


class RejectsWriter:
    """Appends rejected rows (with reasons) to one Parquet file, opened lazily."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._writer: pq.ParquetWriter | None = None

    def write(self, rejected: pa.Table | None) -> None:
        if rejected is None or rejected.num_rows == 0:
            return
        if self.path is None:
            raise ValueError("rows were rejected but no rejects path was given")
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, rejected.schema)
        self._writer.write_table(rejected.cast(self._writer.schema))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclasses.dataclass
class ValidatedChunk:
    """One validated Parquet record batch: its file, the file row of its first row, the
    good rows as a table and which of its rows were kept."""

    file_index: int
    file: str
    offset: int
    good: pa.Table
    kept: np.ndarray  # (rows in the record batch,) bool


def iter_validated(
    path: str | Path,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    report: ReadReport | None = None,
    files: Sequence[Path | str] | None = None,
) -> Iterator[ValidatedChunk]:
    """Validate every row of the session files at ``path``, one record batch at a time.

    Every file must name the same tasks and labels as the first. ``report`` (if given) is
    updated in place; with ``on_error="reject"`` bad rows go to ``rejects_path`` (default:
    ``rejects.parquet`` beside the data) and the report names it.
    """
    files = [str(f) for f in files] if files is not None else [str(f) for f in list_files(path)]
    meta = read_meta(files[0])
    if on_error == "reject" and rejects_path is None:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        rejects_path = base / "rejects.parquet"
    rejects = RejectsWriter(rejects_path if on_error == "reject" else None)
    report = report if report is not None else ReadReport()
    try:
        for fi, f in enumerate(files):
            m = read_meta(f)
            if m.task_names != meta.task_names or m.label_names != meta.label_names:
                raise SchemaError(
                    f"{f}: tasks {list(m.task_names)} / labels {list(m.label_names)} differ from "
                    f"{files[0]}'s {list(meta.task_names)} / {list(meta.label_names)}"
                )
            offset = 0
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                good, rej, rep = validate_table(
                    pa.Table.from_batches([rb]), meta, f, offset, on_error
                )
                report.add(rep)
                rejects.write(rej)
                kept = np.ones(rb.num_rows, dtype=bool)
                if rej is not None:
                    kept[np.asarray(rej.column("source_row").to_numpy()) - offset] = False
                yield ValidatedChunk(fi, f, offset, good, kept)
                offset += rb.num_rows
    finally:
        rejects.close()
        if report.rows_rejected:
            report.rejects_path = str(rejects_path)


def iter_batches(
    path: str | Path,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    report: ReadReport | None = None,
    files: Sequence[Path] | None = None,
) -> Iterator[SessionBatch]:
    """Stream validated :class:`SessionBatch` es of at most ``batch_size`` rows.

    Memory is bounded by one Parquet record batch. ``report`` (if given) is
    updated in place; with ``on_error="reject"`` bad rows go to ``rejects_path``
    (default: ``rejects.parquet`` beside the data).
    """
    files = list(files) if files is not None else list_files(path)
    meta = read_meta(files[0])
    for chunk in iter_validated(path, batch_size, on_error, rejects_path, report, files):
        if chunk.good.num_rows:
            yield table_to_batch(chunk.good, meta)


def read_sessions(
    path: str | Path,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    max_rows: int | None = None,
) -> tuple[SessionBatch, SessionMeta, ReadReport]:
    """Read everything at ``path`` into one padded batch (for data that fits in memory)."""
    report = ReadReport()
    meta = read_meta(path)
    parts: list[SessionBatch] = []
    rows = 0
    for b in iter_batches(path, on_error=on_error, rejects_path=rejects_path, report=report):
        parts.append(b)
        rows += len(b)
        if max_rows is not None and rows >= max_rows:
            break
    if not parts:
        raise SchemaError(f"{path}: no usable rows ({report.summary()})")
    batch = SessionBatch.concat(parts)
    if max_rows is not None:
        batch = batch.slice(0, max_rows)
    log.info("read %s: %s", path, report.summary())
    return batch, meta, report


def read_ray_dataset(path: str | Path, **read_kwargs):
    """Ray Data dataset over the session files (validated per block when consumed)."""
    import ray.data

    files = [str(f) for f in list_files(path)]
    return ray.data.read_parquet(files, **read_kwargs)
