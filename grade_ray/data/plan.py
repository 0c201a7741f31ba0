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
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from grade_ray.data.schema import (
    CONTEXT,
    LABELS,
    LOGGED_POSITION,
    REQUEST_ID,
    SCORES,
    TS,
    USER_ID,
    ReadReport,
    SessionBatch,
    SessionMeta,
    iter_validated,
    list_files,
    normalize_table,
    read_meta,
    table_to_batch,
)

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

    @property
    def num_requests(self) -> int:
        return sum(len(t) for r in self.rounds for t in r)

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
    ) -> DataPlan:
        """Validate every row once and cut time-ordered good rows into rounds and tasks.

        The logs are split into ``rounds // data_passes`` time windows, visited
        ``data_passes`` times in order; ``requests_per_round`` > 0 keeps the
        first that many requests of each window.
        """
        if rounds % data_passes:
            raise ValueError(
                f"grpo.rounds={rounds} must be a multiple of grpo.data_passes={data_passes}"
            )
        files = [str(f) for f in list_files(path)]
        meta = read_meta(files[0])
        report = ReadReport()
        file_idx, row_idx, ts_all = [], [], []
        for chunk in iter_validated(path, read_batch, on_error, rejects_path, report, files):
            rows = np.flatnonzero(chunk.kept) + chunk.offset
            file_idx.append(np.full(len(rows), chunk.file_index, dtype=np.int32))
            row_idx.append(rows.astype(np.int64))
            ts_all.append(np.asarray(chunk.good.column("ts").to_numpy(), dtype=np.int64))
        if report.rows_used == 0:
            raise ValueError(f"{path}: no usable rows ({report.summary()})")
        fidx, ridx, ts = (np.concatenate(a) for a in (file_idx, row_idx, ts_all))
        order = np.argsort(ts, kind="stable")
        windows = np.array_split(order, rounds // data_passes)
        plan_rounds = []
        for r in range(rounds):
            window = windows[r % len(windows)]
            if requests_per_round:
                window = window[:requests_per_round]
            plan_rounds.append(_tasks(r, window, fidx, ridx, files, batch_size))
        log.info("data plan: %s; %d rounds", report.summary(), rounds)
        return cls(files, meta, report, plan_rounds, (int(ts.min()), int(ts.max())))


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
    at most one, and some are empty when there are fewer tasks than workers.
    """
    if n < 1:
        raise ValueError(f"need at least one lane, got {n}")
    bounds = [len(tasks) * j // n for j in range(n + 1)]
    return [tasks[bounds[j] : bounds[j + 1]] for j in range(n)]


# Columns a rollout needs (item ids are not read: ranking uses scores, labels and positions).
ROLLOUT_COLUMNS = (REQUEST_ID, USER_ID, TS, CONTEXT, SCORES, LABELS, LOGGED_POSITION)


class TaskReader:
    """Loads tasks' rows. Keeps the last few files decoded as padded arrays (bounded
    memory: ``max_files`` session files), so a task is a numpy gather.

    ``columns``: the columns to decode (default: all; :data:`ROLLOUT_COLUMNS` for rollouts).
    ``use_threads``: let Arrow decode on its thread pool; rollout actors pass False so a
    worker uses the one CPU it reserved.
    """

    def __init__(
        self,
        meta: SessionMeta,
        max_files: int = 1,
        columns: tuple[str, ...] | None = None,
        use_threads: bool = True,
    ) -> None:
        self.meta = meta
        self.max_files = max_files
        self.columns = columns
        self.use_threads = use_threads
        self._cache: OrderedDict[str, SessionBatch] = OrderedDict()

    def _file(self, file: str) -> SessionBatch:
        if file in self._cache:
            self._cache.move_to_end(file)
            return self._cache[file]
        columns = None
        if self.columns is not None:
            present = pq.read_schema(file).names
            columns = [c for c in self.columns if c in present]
        table = pq.read_table(file, columns=columns, use_threads=self.use_threads)
        batch = table_to_batch(normalize_table(table), self.meta)
        self._cache[file] = batch
        while len(self._cache) > self.max_files:
            self._cache.popitem(last=False)
        return batch

    def load(self, task: Task) -> SessionBatch:
        """The task's rows as a padded batch (rows were validated when the plan was built)."""
        return self._file(task.file).take(task.rows).trim()
