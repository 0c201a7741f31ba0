"""Reading session files: list them, read their metadata, stream validated rows as batches.

Every read checks every row (:func:`~grade_ray.data.validation.validate_table`) and counts what
it read, used and rejected in a :class:`~grade_ray.data.validation.ReadReport`. Streamed
batches are cut where one long candidate list would pad the rest (:func:`length_segments`),
so memory follows the data, not the longest list times the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade_ray.config import error_brief
from grade_ray.data.sessions import (
    ITEM_IDS,
    META_KEY,
    SCORES,
    SchemaError,
    SessionBatch,
    SessionMeta,
    list_lengths,
    table_to_batch,
)
from grade_ray.data.validation import (
    REJECT_REASON,
    SOURCE_ROW,
    ReadReport,
    RejectsWriter,
    SeenIds,
    current_scope,
    rejects_file,
    validate_table,
)

log = logging.getLogger(__name__)

PAD_FLOOR_CELLS = 1 << 18
"""A streamed batch is cut only when its padded (rows x longest list) cells exceed both
twice its real cells and this floor, so ordinary batches are never cut."""


def list_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every ``*.parquet`` below a directory (sorted), following
    symbolic links to files and directories (each directory once). A broken link below the
    directory raises: it may stand for data that is not mounted, which would otherwise be
    left out without a word."""
    p = Path(path)
    if p.is_dir():
        files = sorted(_parquet_below(p))
        if not files:
            raise FileNotFoundError(f"no *.parquet files under {p}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"no such session file or directory: {p}")
    return [p]


def _parquet_below(root: Path) -> Iterator[Path]:
    seen = {root.resolve()}
    for top, dirs, names in os.walk(root, followlinks=True):
        for name in dirs + names:
            f = Path(top, name)
            if f.is_symlink() and not f.exists():
                raise FileNotFoundError(
                    f"{f}: broken symbolic link in the data directory (to {os.readlink(f)}); "
                    "mount or remove it"
                )
        kept = []
        for d in sorted(dirs):  # a linked directory reached twice (or a link loop) is read once
            real = Path(top, d).resolve()
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        for name in names:
            if name.endswith(".parquet") and Path(top, name).is_file():
                yield Path(top, name)


def _unreadable(file: str | Path, e: BaseException) -> SchemaError:
    return SchemaError(
        f"{file}: not a readable Parquet file ({error_brief(e)}); is it truncated or in "
        "another format?"
    )


def parquet_metadata(file: str | Path) -> pq.FileMetaData:
    """A file's Parquet footer (row counts, row groups); an unreadable file raises naming it."""
    try:
        return pq.ParquetFile(file).metadata
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(file, e) from None


def _file_schema(file: str | Path) -> pa.Schema:
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(file, e) from None
    if REJECT_REASON in schema.names:
        raise SchemaError(
            f"{file}: this is a rejects file (it has a {REJECT_REASON!r} column), not "
            "session data; move it out of the data directory"
        )
    return schema


def file_meta(file: str | Path) -> SessionMeta:
    """Metadata of one session file; a missing or malformed one raises naming the file."""
    md = _file_schema(file).metadata or {}
    if META_KEY not in md:
        raise SchemaError(
            f"{file}: no grade_ray metadata (task and label names); write sessions with "
            "grade_ray.data.sessions.ShardWriter or convert them with `grade-ray data`"
        )
    try:
        return SessionMeta.from_json(md[META_KEY])
    except SchemaError as e:
        raise SchemaError(f"{file}: grade_ray metadata: {e}") from None


def read_meta(path: str | Path) -> SessionMeta:
    """Metadata of the first file at ``path``; raises if absent or malformed."""
    return file_meta(list_files(path)[0])


@dataclasses.dataclass
class ValidatedChunk:
    """One validated Parquet record batch: its file, the file row of its first row, the
    good rows as a table and which of its rows were kept."""

    file_index: int
    file: str
    offset: int
    good: pa.Table
    kept: np.ndarray  # (rows in the record batch,) bool

    @property
    def rows(self) -> np.ndarray:
        """(good rows,) int64 row numbers of the good rows in their file."""
        return np.flatnonzero(self.kept).astype(np.int64) + self.offset


def iter_validated(
    path: str | Path,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    report: ReadReport | None = None,
    files: Sequence[Path | str] | None = None,
    *,
    max_candidates: int | None = None,
    rejects: RejectsWriter | None = None,
) -> Iterator[ValidatedChunk]:
    """Validate every row of the session files at ``path``, one record batch at a time.

    Every file must have the first file's tasks, labels and context features; request ids
    must be unique over the whole read. ``report`` (if given) is updated in place. With
    ``on_error="reject"`` bad rows go to ``rejects_path``, by default a file under the
    :func:`read_scope`'s ``rejects_dir`` (none there: counted only), and the report names
    it. ``max_candidates``: default the scope's. Unreadable files raise naming the file.
    ``rejects``: a writer the caller owns (and closes) instead of ``rejects_path``, for a
    caller that rejects more rows of its own into the same file.
    """
    if on_error not in ("raise", "reject"):
        raise ValueError(f"on_error must be 'raise' or 'reject', got {on_error!r}")
    scope = current_scope()
    files = [str(f) for f in (files if files is not None else list_files(path))]
    meta = file_meta(files[0])
    if on_error == "reject" and rejects_path is None and scope.rejects_dir is not None:
        rejects_path = rejects_file(scope.rejects_dir, path)
    limit = scope.max_candidates if max_candidates is None else max_candidates
    owned = rejects is None
    if owned:
        rejects = RejectsWriter(rejects_path if on_error == "reject" else None)
    return _validated_chunks(
        files,
        meta,
        batch_size,
        on_error,
        rejects,
        report if report is not None else ReadReport(),
        limit,
        owned,
    )


def _validated_chunks(
    files: list[str],
    meta: SessionMeta,
    batch_size: int,
    on_error: str,
    rejects: RejectsWriter,
    report: ReadReport,
    max_candidates: int,
    owned: bool = True,
) -> Iterator[ValidatedChunk]:
    seen = SeenIds()
    complete = False
    try:
        for fi, f in enumerate(files):
            _check_same_meta(f, meta, files[0])
            offset = 0
            for rb in _record_batches(f, batch_size):
                good, rej, rep = validate_table(
                    pa.Table.from_batches([rb]),
                    meta,
                    f,
                    offset,
                    on_error,
                    max_candidates=max_candidates,
                    seen=seen,
                )
                report.add(rep)
                rejects.write(rej)
                kept = np.ones(rb.num_rows, dtype=bool)
                if rej is not None:
                    kept[np.asarray(rej.column(SOURCE_ROW).to_numpy()) - offset] = False
                yield ValidatedChunk(fi, f, offset, good, kept)
                offset += rb.num_rows
        complete = True
    finally:
        if owned:
            rejects.close(complete)
        if rejects.rows and rejects.path is not None:
            report.rejects_path = str(rejects.path)
        elif rejects.rows:
            log.warning(
                "%d row(s) rejected and counted but not kept (this read has no rejects file)",
                rejects.rows,
            )


def _check_same_meta(file: str, meta: SessionMeta, first: str) -> None:
    m = file_meta(file)
    if (m.task_names, m.label_names) != (meta.task_names, meta.label_names):
        raise SchemaError(
            f"{file}: tasks {list(m.task_names)} / labels {list(m.label_names)} differ from "
            f"{first}'s {list(meta.task_names)} / {list(meta.label_names)}"
        )
    if (m.task_kinds, m.context_names) != (meta.task_kinds, meta.context_names):
        raise SchemaError(
            f"{file}: task kinds {list(m.task_kinds)} / context features "
            f"{list(m.context_names)} differ from {first}'s {list(meta.task_kinds)} / "
            f"{list(meta.context_names)}"
        )


def _record_batches(file: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    """A file's record batches; a truncated or corrupt file raises naming it and the row."""
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=batch_size)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{file}: not a readable Parquet file ({error_brief(e)})") from None
    row = 0
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise SchemaError(
                f"{file}: rows from {row} on cannot be read ({error_brief(e)}); the file is "
                "truncated or corrupt"
            ) from None
        row += rb.num_rows
        yield rb


def length_segments(lengths: np.ndarray, floor: int = PAD_FLOOR_CELLS) -> list[tuple[int, int]]:
    """Cut consecutive rows with candidate-list ``lengths`` (R,) into [start, stop) runs whose
    padded size (rows x longest list) stays within max(2 x their real cells, ``floor``).

    Rows keep their order. Batches of similar lengths are one run; a long list gets a run of
    its own instead of padding every other row to its length.
    """
    n = len(lengths)
    if n == 0:
        return []
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    if n * int(lengths.max()) <= max(2 * int(lengths.sum()), floor):
        return [(0, n)]
    out, start, longest, real = [], 0, 0, 0
    for i, length in enumerate(lengths.tolist()):
        top = max(longest, length)
        if i > start and (i - start + 1) * top > max(2 * (real + length), floor):
            out.append((start, i))
            start, longest, real = i, length, length
        else:
            longest, real = top, real + length
    out.append((start, n))
    return out


def row_lengths(table: pa.Table) -> np.ndarray:
    """(R,) candidates per row of a session table."""
    return list_lengths(table.column(ITEM_IDS if ITEM_IDS in table.column_names else SCORES))


def iter_batches(
    path: str | Path,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    report: ReadReport | None = None,
    files: Sequence[Path] | None = None,
    *,
    max_candidates: int | None = None,
) -> Iterator[SessionBatch]:
    """Stream validated :class:`SessionBatch` es of at most ``batch_size`` rows, in file order.

    Memory is bounded by one Parquet record batch: a record batch whose lists differ much
    in length is split (:func:`length_segments`) rather than padded to its longest list.
    Arguments as :func:`iter_validated`.
    """
    files = list(files) if files is not None else list_files(path)
    meta = file_meta(files[0])
    chunks = iter_validated(
        path, batch_size, on_error, rejects_path, report, files, max_candidates=max_candidates
    )
    return _batches(chunks, meta)


def _batches(chunks: Iterator[ValidatedChunk], meta: SessionMeta) -> Iterator[SessionBatch]:
    for chunk in chunks:
        for start, stop in length_segments(row_lengths(chunk.good)):
            yield table_to_batch(chunk.good.slice(start, stop - start), meta)


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
