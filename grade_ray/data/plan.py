"""Training-round plan: which logged rows each rollout task covers.

One validation pass over the logs (rows read/used/rejected are counted; bad
rows raise or go to a rejects file) records, for every good row, its file,
row number and time. Rows are ordered by time and cut into training rounds
(the paper retrains daily) and each round into tasks of ``batch_size``
requests. A task names its rows (file + row numbers), so any worker can load
it, a failed task can be redone, and the driver can account for every request
exactly once. The plan holds only integers; data is read task by task.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade_ray.data.schema import (
    ReadReport,
    RejectsWriter,
    SessionBatch,
    SessionMeta,
    list_files,
    normalize_table,
    read_meta,
    table_to_batch,
    validate_table,
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
        if on_error == "reject" and rejects_path is None:
            base = Path(path) if Path(path).is_dir() else Path(path).parent
            rejects_path = base / "rejects.parquet"
        rejects = RejectsWriter(rejects_path if on_error == "reject" else None)
        file_idx, row_idx, ts_all = [], [], []
        try:
            for fi, f in enumerate(files):
                offset = 0
                for rb in pq.ParquetFile(f).iter_batches(batch_size=read_batch):
                    table = pa.Table.from_batches([rb])
                    good, rej, rep = validate_table(table, meta, f, offset, on_error)
                    report.add(rep)
                    rejects.write(rej)
                    keep = np.ones(table.num_rows, dtype=bool)
                    if rej is not None:
                        keep[np.asarray(rej.column("source_row").to_numpy()) - offset] = False
                    rows = np.flatnonzero(keep) + offset
                    file_idx.append(np.full(len(rows), fi, dtype=np.int32))
                    row_idx.append(rows.astype(np.int64))
                    ts_all.append(np.asarray(good.column("ts").to_numpy(), dtype=np.int64))
                    offset += table.num_rows
        finally:
            rejects.close()
        if report.rows_rejected:
            report.rejects_path = str(rejects_path)
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
    """Cut one round's rows (time order) into per-file tasks of <= batch_size rows."""
    tasks: list[Task] = []
    # Keep time order across tasks but group consecutive rows of the same file.
    f = fidx[window]
    breaks = np.flatnonzero(np.diff(f)) + 1
    for run in np.split(window, breaks):
        if len(run) == 0:
            continue
        for start in range(0, len(run), batch_size):
            part = run[start : start + batch_size]
            rows = np.sort(ridx[part])
            tasks.append(Task(round_, len(tasks), files[int(fidx[part[0]])], rows))
    return tasks


class TaskReader:
    """Loads tasks' rows. Keeps the last few files decoded as padded arrays (bounded
    memory: ``max_files`` session files), so a task is a numpy gather."""

    def __init__(self, meta: SessionMeta, max_files: int = 1) -> None:
        self.meta = meta
        self.max_files = max_files
        self._cache: OrderedDict[str, SessionBatch] = OrderedDict()

    def _file(self, file: str) -> SessionBatch:
        if file in self._cache:
            self._cache.move_to_end(file)
            return self._cache[file]
        batch = table_to_batch(normalize_table(pq.read_table(file)), self.meta)
        self._cache[file] = batch
        while len(self._cache) > self.max_files:
            self._cache.popitem(last=False)
        return batch

    def load(self, task: Task) -> SessionBatch:
        """The task's rows as a padded batch (rows were validated when the plan was built)."""
        return self._file(task.file).take(task.rows).trim()
