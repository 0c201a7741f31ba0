"""Raw KuaiRand tables -> valid impressions.

Reads the impression log (original CSV layout or Parquet, one row per
impression), the user table and the *basic* video table, then validates every
log row: bad rows (NaN in a required field, user missing from the user table,
unknown video, invalid date or label) are set aside with a reason and counted.
The statistic columns of ``item_features.parquet`` aggregate the whole KuaiRand
period (they leak the future) and are never read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from grade_ray.config import error_brief
from grade_ray.datasets.kuairand.dataset import (
    BINARY_LABELS,
    LOG_PLAY,
    LOG_REQUIRED,
    USER_CATEGORICAL,
    USER_COUNTS,
    VIDEO_CATEGORICAL,
    VIDEO_DENSE,
    VIDEO_IDS,
    WATCH_RATIO,
    WATCH_RATIO_MAX,
    KuaiRandError,
)

log = logging.getLogger(__name__)

STRING_COLUMNS = ("user_active_degree", "video_type", "upload_type", "tag", "upload_dt")
MISSING = "<missing>"


# ---------------------------------------------------------------------------
# Reading


def _paths(path: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [path] if isinstance(path, (str, Path)) else list(path)
    out = [Path(p) for p in items]
    for p in out:
        if not p.exists():
            raise FileNotFoundError(f"no such KuaiRand file: {p}")
    if not out:
        raise KuaiRandError("no log file given")
    return out


def _read_columns(path: Path, wanted: Sequence[str]) -> pa.Table:
    """The columns of ``wanted`` present in a CSV (optionally compressed) or Parquet file.

    CSV columns are read as float64, except the text columns in STRING_COLUMNS,
    so that type inference on the first block cannot disagree with later rows.
    """
    try:
        if ".csv" in path.suffixes:
            try:
                with pcsv.open_csv(path) as reader:
                    names = reader.schema.names
                keep = [c for c in wanted if c in names]
                types = {c: pa.string() if c in STRING_COLUMNS else pa.float64() for c in keep}
                opts = pcsv.ConvertOptions(include_columns=keep, column_types=types)
                return pcsv.read_csv(path, convert_options=opts)
            except pa.ArrowInvalid as e:
                raise KuaiRandError(_csv_problem(path, wanted, e)) from None
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[c for c in wanted if c in names])
    except (pa.ArrowException, OSError) as e:
        raise KuaiRandError(
            f"{path}: not readable as a KuaiRand table ({error_brief(e)})"
        ) from None


def _csv_problem(path: Path, numeric: Sequence[str], error: Exception) -> str:
    """Where a CSV that Arrow refused goes wrong: the first line with another number of
    fields, else the first value of a numeric column that is not a number (line numbers
    count the header as line 1)."""
    bad: list[str] = []

    def on_invalid(row) -> str:
        if not bad:
            where = f"line {row.number}" if row.number is not None else "a line"
            bad.append(
                f"{where} has {row.actual_columns} fields, the header {row.expected_columns}"
            )
        return "skip"

    parse = pcsv.ParseOptions(invalid_row_handler=on_invalid)
    try:  # every column as text: only the field counts can fail here
        text = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False),  # line numbers are known
            parse_options=parse,
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(numeric, pa.string())),
        )
    except pa.ArrowException:
        text = None
    if not bad and text is not None:
        for col in (c for c in numeric if c not in STRING_COLUMNS and c in text.column_names):
            values = text.column(col).to_pylist()
            for i, v in enumerate(values):
                if v in (None, ""):
                    continue
                try:
                    float(v)
                except ValueError:
                    bad.append(f"line {i + 2}, column {col!r}: {v!r} is not a number")
                    break
            if bad:
                break
    return f"{path}: " + (bad[0] if bad else f"not a readable CSV ({error_brief(error)})")


def _require(table: pa.Table, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KuaiRandError(f"{path}: missing column(s) {missing}; present: {table.column_names}")


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """Numeric column -> (M,) float64 with NaN for nulls (ids and ms timestamps are exact)."""
    arr = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(arr, dtype=np.float64)


def _strings(col: pa.ChunkedArray) -> np.ndarray:
    """Any column -> (M,) object array of category strings; null / NaN / '' -> MISSING.

    Integral floats print as integers (3.0 -> '3') so CSV and Parquet agree.
    """
    t = col.type
    if pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t):
        x = _floats(col)
        ok = np.isfinite(x)
        out = np.full(x.shape, MISSING, dtype=object)
        integral = ok & (x == np.round(x))
        out[integral] = x[integral].astype(np.int64).astype(str)
        out[ok & ~integral] = x[ok & ~integral].astype(str)
        return out
    s = pc.fill_null(pc.cast(col, pa.string()), MISSING).to_numpy(zero_copy_only=False)
    out = np.asarray(s, dtype=object)
    out[out == ""] = MISSING
    return out


@dataclasses.dataclass
class LogRows:
    """Impression log as columns. Every array is (M,): one entry per row read."""

    cols: dict[str, np.ndarray]
    """Required log columns as float64 (NaN = null)."""
    log_file: np.ndarray
    """Index into ``files`` of each row's source file."""
    log_row: np.ndarray
    """Row index within that file."""
    files: list[str]

    def __len__(self) -> int:
        return int(self.log_row.shape[0])


def read_log(path: str | Path | Sequence[str | Path]) -> LogRows:
    """One or more log files (original CSV layout or Parquet) -> :class:`LogRows`."""
    parts, files = [], []
    for i, p in enumerate(_paths(path)):
        t = _read_columns(p, (*LOG_REQUIRED, *LOG_PLAY, WATCH_RATIO))
        _require(t, LOG_REQUIRED, p)
        if WATCH_RATIO not in t.column_names:
            _require(t, LOG_PLAY, p)
        cols = {c: _floats(t[c]) for c in t.column_names}
        cols["_log_file"] = np.full(t.num_rows, i, dtype=np.int64)
        cols["_log_row"] = np.arange(t.num_rows, dtype=np.int64)
        parts.append(cols)
        files.append(str(p))
    names = set.intersection(*(set(c) for c in parts))
    if WATCH_RATIO not in names and not set(LOG_PLAY) <= names:
        raise KuaiRandError(
            f"{files}: give every file {WATCH_RATIO} or every file {list(LOG_PLAY)}"
        )
    cols = {c: np.concatenate([d[c] for d in parts]) for c in sorted(names)}
    rows = LogRows(cols, cols.pop("_log_file"), cols.pop("_log_row"), files)
    log.info("read %d log rows from %s", len(rows), files)
    return rows


@dataclasses.dataclass
class UserTable:
    """User features. ids: (U,) int64 sorted; cats: col -> (U,) str (USER_CATEGORICAL and
    user_id); counts: col -> (U,) float64 (NaN = missing)."""

    ids: np.ndarray
    cats: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    def lookup(self, user_id: np.ndarray) -> np.ndarray:
        """(M,) ids -> (M,) row index, -1 where the user is not in the table."""
        return _lookup(self.ids, user_id)


@dataclasses.dataclass
class VideoTable:
    """Basic video features only. ids: (V,) int64 sorted; cats: col -> (V,) str;
    dense: duration_ms, width, height, upload_day (days since epoch) -> (V,) float64 (NaN = missing).
    """

    ids: np.ndarray
    cats: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]

    def lookup(self, video_id: np.ndarray) -> np.ndarray:
        """(M,) ids -> (M,) row index, -1 where the video is not in the table."""
        return _lookup(self.ids, video_id)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == ids) if len(sorted_ids) else pos < 0
    return np.where(found, pos_c, -1).astype(np.int64)


def _sorted_ids(col: pa.ChunkedArray, path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Key column -> (ids sorted (N,), permutation (N,)); raises on nulls or duplicates."""
    x = _floats(col)
    if not np.isfinite(x).all():
        raise KuaiRandError(
            f"{path}: {what} has null/NaN values (rows {np.flatnonzero(~np.isfinite(x))[:5]})"
        )
    ids = x.astype(np.int64)
    order = np.argsort(ids, kind="stable")
    dup = ids[order][1:] == ids[order][:-1]
    if dup.any():
        raise KuaiRandError(
            f"{path}: duplicate {what} values, e.g. {ids[order][1:][dup][:5].tolist()}"
        )
    return ids[order], order


def read_users(path: str | Path) -> UserTable:
    """``user_features.parquet`` / ``user_features_pure.csv`` -> :class:`UserTable`."""
    p = _paths(path)[0]
    t = _read_columns(p, ("user_id", *USER_CATEGORICAL, *USER_COUNTS))
    _require(t, ("user_id", *USER_CATEGORICAL, *USER_COUNTS), p)
    ids, order = _sorted_ids(t["user_id"], p, "user_id")
    cats = {c: _strings(t[c])[order] for c in USER_CATEGORICAL}
    cats["user_id"] = ids.astype(str).astype(object)
    counts = {c: _floats(t[c])[order] for c in USER_COUNTS}
    return UserTable(ids, cats, counts)


def _upload_day(col: pa.ChunkedArray) -> np.ndarray:
    """upload_dt (date, timestamp or 'YYYY-MM-DD' string) -> (V,) float64 days since epoch."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.strptime(col, format="%Y-%m-%d", unit="s", error_is_null=True)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.date32())
    if not pa.types.is_date32(col.type):
        raise KuaiRandError(f"upload_dt has unsupported type {col.type}")
    return _floats(pc.cast(col, pa.int32()))


def read_videos(path: str | Path) -> VideoTable:
    """``video_features_basic_pure.csv`` / ``item_features.parquet`` -> :class:`VideoTable`.

    Only basic columns are read; the statistic columns (whole-period aggregates) leak.
    """
    p = _paths(path)[0]
    t = _read_columns(p, (*VIDEO_IDS, *VIDEO_CATEGORICAL, *VIDEO_DENSE))
    _require(t, ("video_id", *VIDEO_CATEGORICAL), p)
    ids, order = _sorted_ids(t["video_id"], p, "video_id")
    cats = {c: _strings(t[c])[order] for c in VIDEO_CATEGORICAL if c != "tag"}
    # primary tag: the first of a comma-separated list
    first = pc.list_element(pc.split_pattern(pc.cast(t["tag"], pa.string()), ","), 0)
    cats["tag"] = _strings(first)[order]
    cats["video_id"] = ids.astype(str).astype(object)
    author = t["author_id"] if "author_id" in t.column_names else pa.nulls(len(ids), pa.int64())
    cats["author_id"] = _strings(author)[order]
    nan = np.full(len(ids), np.nan)

    def dense(c: str) -> np.ndarray:
        return _floats(t[c])[order] if c in t.column_names else nan

    upload = _upload_day(t["upload_dt"])[order] if "upload_dt" in t.column_names else nan
    return VideoTable(
        ids,
        cats,
        {
            "duration_ms": dense("video_duration"),
            "width": dense("server_width"),
            "height": dense("server_height"),
            "upload_day": upload,
        },
    )


# ---------------------------------------------------------------------------
# Cleaning


@dataclasses.dataclass
class Impressions:
    """Valid impressions; every array is (M,) except labels (M, L)."""

    user_id: np.ndarray
    video_id: np.ndarray
    date: np.ndarray
    """yyyymmdd int64."""
    day: np.ndarray
    """Days since 1970-01-01 int64 (for day of week and video age)."""
    hour: np.ndarray
    """Hour of day 0..23 from hourmin."""
    time_ms: np.ndarray
    labels: np.ndarray
    """(M, L) float32, columns LABEL_NAMES."""
    user_row: np.ndarray
    video_row: np.ndarray
    src: np.ndarray
    """Index of the row in the :class:`LogRows` it came from."""

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def take(self, idx: np.ndarray) -> Impressions:
        return Impressions(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def _date_to_day(date: np.ndarray) -> np.ndarray:
    """yyyymmdd (M,) float64 -> days since epoch (M,) float64, NaN where invalid."""
    uniq, inv = np.unique(np.nan_to_num(date, nan=-1.0), return_inverse=True)
    days = np.full(len(uniq), np.nan)
    for i, d in enumerate(uniq):  # one iteration per distinct date
        if d == int(d) and 19000101 <= d <= 29991231:
            try:
                s = str(int(d))
                days[i] = (dt.date(int(s[:4]), int(s[4:6]), int(s[6:])) - dt.date(1970, 1, 1)).days
            except ValueError:
                pass
    return days[inv.reshape(-1)]


def _watch_ratio(cols: dict[str, np.ndarray]) -> np.ndarray:
    """(M,) in [0, 5]: the log's watch_ratio if present, else play_time_ms / duration_ms."""
    if WATCH_RATIO in cols:
        wr = cols[WATCH_RATIO]
    else:
        dur = cols["duration_ms"]
        with np.errstate(divide="ignore", invalid="ignore"):
            wr = np.where(dur > 0, cols["play_time_ms"] / np.where(dur > 0, dur, 1.0), 0.0)
        wr = np.where(np.isnan(cols["play_time_ms"]) | np.isnan(dur), np.nan, wr)
    return np.clip(wr, 0.0, WATCH_RATIO_MAX)


def _reject_reasons(
    rows: LogRows, users: UserTable, videos: VideoTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (reason (M,) object, '' = good; user_row, video_row, day: (M,))."""
    c = rows.cols
    reason = np.full(len(rows), "", dtype=object)

    def flag(bad: np.ndarray, why: str) -> None:
        reason[bad & (reason == "")] = why

    required = [*LOG_REQUIRED, WATCH_RATIO] if WATCH_RATIO in c else [*LOG_REQUIRED, *LOG_PLAY]
    for col in required:
        flag(~np.isfinite(c[col]), f"NaN in {col}")
    day = _date_to_day(c["date"])
    flag(~np.isfinite(day), "invalid date (expected yyyymmdd)")
    for col in BINARY_LABELS.values():
        flag((c[col] != 0) & (c[col] != 1), f"{col} not 0/1")
    flag((c["hourmin"] < 0) | (c["hourmin"] >= 2400), "hourmin outside [0, 2400)")
    ok = reason == ""
    user_row = np.full(len(rows), -1, dtype=np.int64)
    video_row = np.full(len(rows), -1, dtype=np.int64)
    user_row[ok] = users.lookup(c["user_id"][ok])
    video_row[ok] = videos.lookup(c["video_id"][ok])
    flag(ok & (user_row < 0), "user_id not in user table")
    flag(ok & (video_row < 0), "video_id not in video table")
    for col in USER_COUNTS:
        vals = np.where(user_row >= 0, users.counts[col][np.maximum(user_row, 0)], 0.0)
        flag(~np.isfinite(vals), f"NaN in user feature {col}")
    return reason, user_row, video_row, day


def clean_log(
    rows: LogRows, users: UserTable, videos: VideoTable
) -> tuple[Impressions, dict[str, Any], pa.Table | None]:
    """Validate every row. Returns (valid impressions, accounting, rejected rows or None).

    Accounting: ``rows_read`` = ``rows_valid`` + ``rows_rejected`` +
    ``rows_duplicate_dropped`` (a valid row equal to an earlier one in every column read:
    the same impression logged twice, which would otherwise make a request of one video
    shown "twice", or count its gain twice); ``rejected_by_reason``; and
    ``duplicate_impressions`` (rows kept that share user, video and time_ms with another
    but differ elsewhere; only counted).
    """
    reason, user_row, video_row, day = _reject_reasons(rows, users, videos)
    c = rows.cols
    bad = reason != ""
    valid = np.flatnonzero(~bad)
    first = np.zeros(len(valid), bool)
    if len(valid):
        every = np.stack([c[k][valid] for k in sorted(c)], 1)
        first[np.unique(every, axis=0, return_index=True)[1]] = True
    duplicate = np.zeros(len(reason), bool)
    duplicate[valid[~first]] = True
    ok = ~bad & ~duplicate
    labels = np.stack([c[col][ok] for col in BINARY_LABELS.values()] + [_watch_ratio(c)[ok]], 1)
    imp = Impressions(
        user_id=c["user_id"][ok].astype(np.int64),
        video_id=c["video_id"][ok].astype(np.int64),
        date=c["date"][ok].astype(np.int64),
        day=day[ok].astype(np.int64),
        hour=(c["hourmin"][ok].astype(np.int64) // 100) % 24,
        time_ms=c["time_ms"][ok].astype(np.int64),
        labels=labels.astype(np.float32),
        user_row=user_row[ok],
        video_row=video_row[ok],
        src=np.flatnonzero(ok),
    )
    bad_reasons, counts = np.unique(reason[bad].astype(str), return_counts=True)
    key = np.stack([imp.user_id, imp.video_id, imp.time_ms], 1)
    report = {
        "rows_read": len(rows),
        "rows_valid": len(imp),
        "rows_rejected": int(bad.sum()),
        "rows_duplicate_dropped": int(duplicate.sum()),
        "rejected_by_reason": {str(r): int(n) for r, n in zip(bad_reasons, counts)},
        "duplicate_impressions": int(len(key) - len(np.unique(key, axis=0))) if len(key) else 0,
    }
    for why, n in report["rejected_by_reason"].items():
        log.warning("rejected %d log rows: %s", n, why)
    if duplicate.any():
        log.info("dropped %d log rows identical to an earlier row", int(duplicate.sum()))
    rejected = None
    if bad.any():
        data = {k: v[bad] for k, v in c.items()}
        data["reject_reason"] = reason[bad].astype(str)
        data["log_file"] = np.asarray(rows.files, dtype=object)[rows.log_file[bad]].astype(str)
        data["log_row"] = rows.log_row[bad]
        rejected = pa.table(data)
    return imp, report, rejected
