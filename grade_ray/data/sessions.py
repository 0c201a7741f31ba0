"""The logged-session format: one Arrow schema, its metadata, padded batches, writing.

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

A table becomes a :class:`SessionBatch` of padded numpy arrays
(:func:`table_to_batch`), the shape every other module consumes; :func:`to_table` and
:class:`ShardWriter` turn batches back into tables and Parquet shards. Checking rows is
:mod:`grade_ray.data.validation`, reading files :mod:`grade_ray.data.reading`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade_ray.config import UserError

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


class SchemaError(UserError, ValueError):
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
        """Parse metadata JSON; anything malformed raises :class:`SchemaError`."""
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise SchemaError(f"session metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise SchemaError(f"session metadata must be a JSON object, got {type(d).__name__}")
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise SchemaError(
                f"session metadata format_version={version}; this grade_ray reads "
                f"version {FORMAT_VERSION}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names[:4] if n not in d]
        if unknown or missing:
            raise SchemaError(
                f"session metadata has unknown key(s) {unknown} / lacks {missing}; keys: {names}"
            )
        for n in names[:4]:
            v = d[n]
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise SchemaError(f"session metadata {n!r} must be a list of strings, got {v!r}")
        if not isinstance(d.get("source", {}), dict):
            raise SchemaError("session metadata 'source' must be a JSON object")
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


def table_to_batch(table: pa.Table, meta: SessionMeta) -> SessionBatch:
    """Validated Arrow table -> padded :class:`SessionBatch` (vectorized, no Python row loop).

    A table read without the ``item_ids`` column (rollouts do not need it) gives zero item ids.
    """
    b = table.num_rows
    has_items = ITEM_IDS in table.column_names
    lengths = list_lengths(table.column(ITEM_IDS if has_items else SCORES))
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


def list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(R,) int64 length of each list in a list column (0 where null)."""
    return np.asarray(
        pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False), dtype=np.int64
    )


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
