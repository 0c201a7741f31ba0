"""Training-round plan: which logged rows each rollout task covers.

One validation pass over the logs (rows read/used/rejected are counted; bad
rows raise or go to a rejects file) records, for every good row, its file,
row number and time. Rows are ordered by time and cut into training rounds
(the paper retrains daily) and each round into per-file tasks of ``batch_size``
requests (:func:`lanes` deals a round's tasks to workers as contiguous runs). A task names its rows (file + row numbers), so any worker can load
it, a failed task can be redone, and the driver can account for every request
exactly once. The plan holds only integers; data is read task by task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade_ray.data.reading import (
    PAD_FLOOR_CELLS,
    file_meta,
    iter_validated,
    list_files,
    parquet_metadata,
    row_lengths,
)
from grade_ray.data.sessions import (
    CONTEXT,
    LABELS,
    LOGGED_POSITION,
    REQUEST_ID,
    SCORES,
    TS,
    USER_ID,
    SchemaError,
    SessionBatch,
    SessionMeta,
    table_to_batch,
)
from grade_ray.data.validation import ReadReport, normalize_table

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """Rows ``rows`` of session file ``file`` (one rollout call)."""

    round: int
    index: int
    file: str
    rows: np.ndarray  # (n,) int64 row numbers within the file, ascending

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclasses.dataclass
class DataPlan:
    """Validated rows grouped into rounds of tasks."""

    files: list[str]
    meta: SessionMeta
    report: ReadReport
    rounds: list[list[Task]]
    ts_range: tuple[int, int]
    cache: dict[str, str] = dataclasses.field(default_factory=dict)
    """Session file -> its decoded cache file (empty when built without ``cache_dir``)."""
    file_rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    """Per file of :attr:`files`: the row numbers of its validated rows, ascending."""

    @property
    def num_requests(self) -> int:
        return sum(len(t) for r in self.rounds for t in r)

    def epoch_tasks(self, batch_size: int) -> list[Task]:
        """Every validated row once, in file order, as per-file tasks of <= ``batch_size``
        rows (Stage 1's pass over the logs: what streaming the files in order reads)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.file_rows:
            raise ValueError("this plan holds no per-file rows (built by DataPlan.build?)")
        tasks: list[Task] = []
        for file, rows in zip(self.files, self.file_rows):
            for start in range(0, len(rows), batch_size):
                tasks.append(Task(0, len(tasks), file, rows[start : start + batch_size]))
        return tasks

    @classmethod
    def build(
        cls,
        path: str | Path,
        *,
        rounds: int,
        batch_size: int,
        data_passes: int = 1,
        requests_per_round: int = 0,
        on_error: str = "raise",
        rejects_path: str | Path | None = None,
        read_batch: int = 8192,
        cache_dir: str | Path | None = None,
        max_candidates: int | None = None,
    ) -> DataPlan:
        """Validate every row once and cut time-ordered good rows into rounds and tasks.

        The logs are split into ``rounds // data_passes`` time windows, visited
        ``data_passes`` times in order; ``requests_per_round`` > 0 keeps the
        first that many requests of each window. With ``cache_dir``, the rows this pass
        validates are also written there as decoded columns (see :class:`DecodedCache`), so
        rollout workers memory-map them instead of decoding Parquet every round.
        ``max_candidates``: rows with longer lists are bad rows (default: the read scope's).
        """
        if rounds % data_passes:
            raise ValueError(
                f"grpo.rounds={rounds} must be a multiple of grpo.data_passes={data_passes}"
            )
        files = [str(f) for f in list_files(path)]
        meta = file_meta(files[0])
        report = ReadReport()
        fidx, ridx, ts, cached = _scan(
            path, files, report, on_error, rejects_path, read_batch, cache_dir, max_candidates
        )
        if len(ts) < rounds // data_passes:
            raise SchemaError(
                f"{path}: {len(ts)} usable training requests cannot fill "
                f"{rounds // data_passes} time windows (grpo.rounds={rounds} / "
                f"grpo.data_passes={data_passes}; a round needs at least one request): lower "
                "grpo.rounds or give more data"
            )
        order = np.argsort(ts, kind="stable")
        windows = np.array_split(order, rounds // data_passes)
        plan_rounds = []
        for r in range(rounds):
            window = windows[r % len(windows)]
            if requests_per_round:
                window = window[:requests_per_round]
            plan_rounds.append(_tasks(r, window, fidx, ridx, files, batch_size))
        log.info("data plan: %s; %d rounds", report.summary(), rounds)
        # the scan visits files in order and each file's rows ascending
        bounds = np.cumsum(np.bincount(fidx, minlength=len(files)))[:-1]
        file_rows = np.split(ridx, bounds)
        ts_range = (int(ts.min()), int(ts.max()))
        return cls(files, meta, report, plan_rounds, ts_range, cached, file_rows)


def _scan(
    path: str | Path,
    files: list[str],
    report: ReadReport,
    on_error: str,
    rejects_path: str | Path | None,
    read_batch: int,
    cache_dir: str | Path | None,
    max_candidates: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One validating pass over the logs: (file index, row, ts) of every good row.

    Also writes the decoded cache when ``cache_dir`` is set and the cache does not
    already fit ``files``; a failed pass leaves no partial cache behind.
    """
    file_idx, row_idx, ts_all = [], [], []
    cache = DecodedCache(cache_dir) if cache_dir else None
    if cache is not None and not cache.fits(files):
        cache = None
    try:
        chunks = iter_validated(
            path, read_batch, on_error, rejects_path, report, files, max_candidates=max_candidates
        )
        for chunk in chunks:
            rows = chunk.rows
            file_idx.append(np.full(len(rows), chunk.file_index, dtype=np.int32))
            row_idx.append(rows.astype(np.int64))
            ts_all.append(np.asarray(chunk.good.column("ts").to_numpy(), dtype=np.int64))
            if cache is not None:
                cache.add(chunk.file, chunk.good, rows)
    except BaseException:
        if cache is not None:
            cache.abort()
        raise
    cached = cache.close() if cache is not None else {}
    if report.rows_used == 0:
        raise SchemaError(f"{path}: no usable rows ({report.summary()})")
    fidx, ridx, ts = (np.concatenate(a) for a in (file_idx, row_idx, ts_all))
    return fidx, ridx, ts, cached


def _tasks(
    round_: int,
    window: np.ndarray,
    fidx: np.ndarray,
    ridx: np.ndarray,
    files: list[str],
    batch_size: int,
) -> list[Task]:
    """Cut one round's rows into per-file tasks of <= batch_size rows.

    Rounds follow time; inside a round the rows go in (file, row) order, so each task reads
    one file and a worker that takes a run of consecutive tasks decodes each file once,
    however the rows of a day are spread over the files.
    """
    order = window[np.lexsort((ridx[window], fidx[window]))]
    f = fidx[order]
    breaks = np.flatnonzero(np.diff(f)) + 1
    tasks: list[Task] = []
    for run in np.split(order, breaks):
        if len(run) == 0:
            continue
        for start in range(0, len(run), batch_size):
            part = run[start : start + batch_size]
            tasks.append(Task(round_, len(tasks), files[int(fidx[part[0]])], ridx[part]))
    return tasks


def lanes(tasks: list[Task], n: int) -> list[list[Task]]:
    """Deal a round's tasks to ``n`` workers as contiguous runs of (nearly) equal length.

    Worker j gets the j-th run, so consecutive tasks of one file stay with one worker (each
    file is decoded by as few workers as possible). Returns n lists; their lengths differ by
    at most one, the longer ones first (so a round's last, partial step keeps each task on
    its lane's worker), and some are empty when there are fewer tasks than workers.
    """
    if n < 1:
        raise ValueError(f"need at least one lane, got {n}")
    q, r = divmod(len(tasks), n)
    bounds = [j * q + min(j, r) for j in range(n + 1)]
    return [tasks[bounds[j] : bounds[j + 1]] for j in range(n)]


def split_for_ranks(tasks: list[Task], world: int, setting: str = "rollout.batch_size") -> list:
    """Split the largest tasks until every rank gets at least one (DDP needs every rank
    to take part in every step). ``setting``: the batch size to name when that cannot be."""
    tasks = list(tasks)
    while len(tasks) < world:
        i = max(range(len(tasks)), key=lambda j: len(tasks[j]))
        t = tasks[i]
        if len(t) < 2:
            raise ValueError(
                f"a step has fewer requests than learner workers ({world}); "
                f"lower learner.num_workers or raise {setting}"
            )
        h = len(t) // 2
        tasks[i : i + 1] = [
            dataclasses.replace(t, rows=t.rows[:h]),
            dataclasses.replace(t, index=t.index + 100_000, rows=t.rows[h:]),
        ]
    return tasks


def deal_steps(
    tasks: list[Task], per_step: int, world: int, rank: int, setting: str = "rollout.batch_size"
) -> list[list[Task]]:
    """Rank ``rank``'s tasks of each step when ``per_step`` tasks (over all ``world`` ranks)
    make a step.

    The tasks are dealt into ``per_step`` lanes (contiguous runs, :func:`lanes`); step s
    takes the s-th task of every lane, in lane order, and rank r takes every world-th of
    them from the r-th, so a reader keeps reading the same files from step to step. Every
    rank gets the same number of steps, each with at least one task (a last, short step
    has its largest tasks split; ``setting`` is named when a task is too small to split).
    """
    dealt = lanes(tasks, per_step)
    steps = [
        [lane[s] for lane in dealt if s < len(lane)]
        for s in range(max((len(lane) for lane in dealt), default=0))
    ]
    return [split_for_ranks(s, world, setting)[rank::world] for s in steps]


# Columns a rollout needs (item ids are not read: ranking uses scores, labels and positions).
ROLLOUT_COLUMNS = (REQUEST_ID, USER_ID, TS, CONTEXT, SCORES, LABELS, LOGGED_POSITION)
SOURCE_ROW = "source_row"
"""Cache column: the row's number in its session file (what a :class:`Task` names)."""
CHECKSUM_KEY = b"grade_ray_sha256"
"""Record-batch metadata key of a cache batch's content checksum (:func:`content_digest`)."""
CACHE_VERSION = 1
CACHE_MAX_DISK_SHARE = 0.5
STALE_TMP_S = 24 * 3600
"""Temporary cache files older than this were left by a killed writer and are removed."""
"""The decoded cache is skipped when it would fill more than this share of the free disk."""


class DecodedCache:
    """Decoded rollout columns of validated rows, one Arrow IPC file per session file.

    Parquet's nested ``list<list<float>>`` columns cost rollout workers about as much to
    decode as the rollout math itself, every round, while the plan's validation pass has
    just decoded every row. This writes those rows (rollout columns + their file row
    numbers) to ``cache_dir`` as uncompressed Arrow IPC, which workers memory-map
    (:class:`TaskReader`). A cache file is named by the session file's path, size and
    modification time, so a changed file gets a new one; an existing one is reused. Files
    are written under a temporary name and renamed when complete. ``cache_dir`` may be
    deleted at any time (the next plan rewrites what it needs); on a cluster it must be
    shared storage like the run directory, else workers fall back to Parquet. Every record
    batch carries a sha256 of its content (:data:`CHECKSUM_KEY`); a plan reuses a file only
    when every checksum and its row numbers match, else it is removed and written again.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths: dict[str, str] = {}
        self._file: str | None = None
        self._final: Path | None = None
        self._reuse: Path | None = None
        self._tmp: Path | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows = (0, 0)  # (count, sum) of the current file's good rows
        for tmp in self.dir.glob("*.tmp"):  # left by killed writers
            try:
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass

    def fits(self, files: list[str], max_share: float = CACHE_MAX_DISK_SHARE) -> bool:
        """Whether the cache for ``files`` takes at most ``max_share`` of the free space
        where it goes (estimated from the Parquet metadata: rollout-column values x their
        width, plus a quarter for list offsets; files already cached count 0). Logs a
        warning when it does not."""
        need = 0.0
        for f in files:
            if self.path_for(f).exists():
                continue
            md = parquet_metadata(f)
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    if col.path_in_schema.split(".")[0] in ROLLOUT_COLUMNS:
                        width = 8 if col.physical_type in ("INT64", "DOUBLE") else 4
                        need += 1.25 * col.num_values * width
        free = shutil.disk_usage(self.dir).free
        if need > max_share * free:
            log.warning(
                "decoded cache skipped: it would take ~%.1f GB of the %.1f GB free in %s; "
                "rollout workers decode Parquet instead (set data.cache_dir elsewhere)",
                need / 1e9,
                free / 1e9,
                self.dir,
            )
            return False
        return True

    def path_for(self, file: str) -> Path:
        st = os.stat(file)
        key = f"{CACHE_VERSION}|{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.dir / f"{Path(file).stem}-{digest}.arrow"

    def add(self, file: str, good: pa.Table, rows: np.ndarray) -> None:
        """Validated rows ``good`` of ``file`` with their file row numbers (ascending)."""
        if file != self._file:
            self._finish()
            self._file, self._final = file, self.path_for(file)
            self._rows = (0, 0)
            if self._final.exists():  # written by an earlier plan: checked when the file ends
                self._reuse, self._final = self._final, None
        self._rows = (self._rows[0] + len(rows), self._rows[1] + int(rows.sum()))
        if self._final is None or good.num_rows == 0:
            return
        cols = [c for c in ROLLOUT_COLUMNS if c in good.column_names]
        table = normalize_table(good.select(cols)).append_column(
            SOURCE_ROW, pa.array(rows, pa.int64())
        )
        if self._writer is None:
            self._tmp = self._final.with_name(f"{self._final.name}.{uuid.uuid4().hex}.tmp")
            self._writer = pa.ipc.new_file(str(self._tmp), table.schema)
        for batch in table.to_batches():
            self._writer.write_batch(batch, custom_metadata={CHECKSUM_KEY: content_digest(batch)})

    def _finish(self) -> None:
        if self._reuse is not None:
            if _cache_matches(self._reuse, self._rows):
                self.paths[self._file] = str(self._reuse)
            else:  # truncated or from other rows: not used, rewritten by the next plan
                log.warning("decoded cache %s does not match %s; removed", self._reuse, self._file)
                self._reuse.unlink(missing_ok=True)
        elif self._writer is not None:
            self._writer.close()
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish()
        self._writer = self._tmp = self._final = self._reuse = None

    def _publish(self) -> None:
        """Move the finished temporary file into place without replacing a file another
        writer (a second learner rank, a concurrent sweep trial) published meanwhile."""
        try:
            os.link(self._tmp, self._final)
        except FileExistsError:
            pass  # another writer won; its file holds the same rows
        except OSError:  # no hard links on this filesystem
            if not self._final.exists():
                os.replace(self._tmp, self._final)
        self._tmp.unlink(missing_ok=True)
        self.paths[self._file] = str(self._final)

    def close(self) -> dict[str, str]:
        """Finish the last file; returns session file -> cache file."""
        self._finish()
        return dict(self.paths)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
        self._writer = self._tmp = self._final = self._reuse = None


def _well_formed(table: pa.Table, meta: SessionMeta) -> np.ndarray:
    """(R,) bool: rows whose lists have the shapes :func:`table_to_batch` needs (no null
    lists; scores, labels, positions per candidate; K and L values per item; D context
    values). Cheap (list lengths only); values are not checked."""

    def lengths(col: pa.ChunkedArray) -> np.ndarray:
        return np.asarray(
            pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False), np.int64
        )

    def per_row_all(ok_items: np.ndarray, outer: np.ndarray) -> np.ndarray:
        bad = np.concatenate([[0], np.cumsum(~ok_items)])
        ends = np.cumsum(np.maximum(outer, 0))
        return (bad[ends] - bad[ends - np.maximum(outer, 0)]) == 0

    ok = np.ones(table.num_rows, dtype=bool)
    n = lengths(table.column(SCORES))
    ok &= n > 0
    ok &= lengths(table.column(CONTEXT)) == meta.context_dim
    for col, width in ((SCORES, meta.num_tasks), (LABELS, meta.num_labels)):
        outer = lengths(table.column(col))
        ok &= outer == n
        ok &= per_row_all(lengths(pc.list_flatten(table.column(col))) == width, outer)
    for col in (LOGGED_POSITION, "item_ids"):
        if col in table.column_names:
            ok &= lengths(table.column(col)) == n
    for col in (REQUEST_ID, USER_ID, TS):
        if col in table.column_names:
            ok &= ~np.asarray(table.column(col).is_null().to_numpy(zero_copy_only=False))
    return ok


def content_digest(batch: pa.RecordBatch) -> bytes:
    """Hex sha256 of a record batch's content: column names, types, null masks, list
    lengths and values (not how the buffers happen to be laid out)."""
    h = hashlib.sha256()
    for name, col in zip(batch.schema.names, batch.columns):
        h.update(name.encode() + b"\0")
        _hash_array(h, col)
    return h.hexdigest().encode()


def _hash_array(h, arr: pa.Array) -> None:
    h.update(f"{arr.type}|{len(arr)}|{arr.null_count}".encode())
    if arr.null_count:
        h.update(np.asarray(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        h.update(np.asarray(lengths, np.int64).tobytes())
        _hash_array(h, pc.list_flatten(arr))
    else:
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())


def _cache_matches(path: Path, rows: tuple[int, int]) -> bool:
    """Whether a cache file opens, every batch matches its checksum, and it holds ``rows`` =
    (count, sum) of file row numbers."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        got = []
        for i in range(reader.num_record_batches):
            batch, md = reader.get_batch_with_custom_metadata(i)
            if md is None or md.get(CHECKSUM_KEY) != content_digest(batch):
                log.warning("decoded cache %s: batch %d does not match its checksum", path, i)
                return False
            got.append(np.asarray(batch.column(SOURCE_ROW).to_numpy(), np.int64))
    except (OSError, pa.ArrowException, KeyError):
        return False
    got = np.concatenate(got) if got else np.zeros(0, np.int64)
    return (len(got), int(got.sum())) == rows


class TaskReader:
    """Loads tasks' rows. Keeps the last few files decoded as padded arrays (bounded
    memory: ``max_files`` session files), so a task is a numpy gather. A file whose
    candidate lists differ so much in length that padding it whole would take more than
    twice its real size is kept as an Arrow table instead and decoded task by task.

    ``columns``: the columns to decode (default: all; :data:`ROLLOUT_COLUMNS` for rollouts).
    ``use_threads``: let Arrow decode on its thread pool; rollout actors pass False so a
    worker uses the one CPU it reserved. ``cache``: session file -> decoded cache file
    (:attr:`DataPlan.cache`); such files are memory-mapped instead of decoded (a cache file
    this worker cannot read is skipped, with one warning, for the Parquet file). It is used
    only when ``columns`` are rollout columns (the cache holds no others). ``max_files``:
    decoded files kept, at least the number of lanes this reader serves (each lane reads
    its own run of files). ``reads`` counts file reads from the cache and from Parquet.
    """

    def __init__(
        self,
        meta: SessionMeta,
        max_files: int = 1,
        columns: tuple[str, ...] | None = None,
        use_threads: bool = True,
        cache: dict[str, str] | None = None,
    ) -> None:
        self.meta = meta
        self.max_files = max_files
        self.columns = columns
        self.use_threads = use_threads
        # the cache holds the rollout columns only: a reader asking for more reads Parquet
        usable = columns is not None and set(columns) <= set(ROLLOUT_COLUMNS)
        self.cache = dict(cache or {}) if usable else {}
        self.reads = {"cache": 0, "parquet": 0}
        self._files: OrderedDict[str, tuple[SessionBatch | pa.Table, np.ndarray | None]] = (
            OrderedDict()
        )

    def _read(self, file: str) -> tuple[SessionBatch | pa.Table, np.ndarray | None]:
        cached = self.cache.get(file)
        if cached is not None:
            try:
                table = pa.ipc.open_file(pa.memory_map(cached, "r")).read_all()
                rows = np.asarray(table.column(SOURCE_ROW).to_numpy(), np.int64)
                self.reads["cache"] += 1
                return self._decoded(table), rows
            except (OSError, pa.ArrowException, KeyError) as e:
                log.warning("decoded cache %s unreadable here (%s); reading %s", cached, e, file)
                del self.cache[file]
        self.reads["parquet"] += 1
        columns = None
        if self.columns is not None:
            present = pq.read_schema(file).names
            columns = [c for c in self.columns if c in present]
        table = normalize_table(
            pq.read_table(file, columns=columns, use_threads=self.use_threads), file
        )
        ok = _well_formed(table, self.meta)
        if ok.all():
            return self._decoded(table), None
        # rows the plan rejected may not even decode (wrong widths, null lists): leave them out
        return self._decoded(table.filter(pa.array(ok))), np.flatnonzero(ok).astype(np.int64)

    def _decoded(self, table: pa.Table) -> SessionBatch | pa.Table:
        """The whole file padded, unless one long list would blow that up (then the table)."""
        lengths = row_lengths(table)
        if len(lengths) * int(lengths.max(initial=1)) <= max(
            2 * int(lengths.sum()), PAD_FLOOR_CELLS
        ):
            return table_to_batch(table, self.meta)
        return table

    def _file(self, file: str) -> tuple[SessionBatch | pa.Table, np.ndarray | None]:
        if file in self._files:
            self._files.move_to_end(file)
            return self._files[file]
        self._files[file] = self._read(file)
        while len(self._files) > self.max_files:
            self._files.popitem(last=False)
        return self._files[file]

    def load(self, task: Task) -> SessionBatch:
        """The task's rows as a padded batch (rows were validated when the plan was built)."""
        batch, source_rows = self._file(task.file)
        idx = task.rows
        if source_rows is not None:  # cache rows are the file's good rows, ascending
            idx = np.searchsorted(source_rows, task.rows)
            ok = idx < len(source_rows)
            if not ok.all() or not (source_rows[idx] == task.rows).all():
                where = self.cache.get(task.file)
                raise RuntimeError(
                    f"decoded cache {where} lacks rows of {task.file} that the plan names; "
                    "delete the cache directory and rebuild the plan"
                    if where
                    else f"{task.file} has malformed rows that the plan names (did the file "
                    "change after the plan was built?)"
                )
        if isinstance(batch, pa.Table):
            return table_to_batch(batch.take(pa.array(idx)), self.meta)
        return batch.take(idx).trim()
