"""KuaiRand-Pure logs -> logged-session Parquet, with our own upstream MMoE scores.

KuaiRand (Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset
with Randomly Exposed Videos", CIKM 2022, https://kuairand.com) is real
Kuaishou short-video feedback, licensed CC BY-SA 4.0. Everything this module
writes is derived from it: the session metadata (``source``) and the README it
writes carry the licence notice and the attribution, and so must any copy.

Pipeline (:func:`convert_kuairand`)::

    log (CSV or Parquet, one row per impression) + user table + video table
      -> clean: bad rows (NaN in a required field, user missing from the user
         table, unknown video, invalid date or label) set aside with a reason
      -> fit vocabularies on the first ``upstream_train_days`` dates only
      -> train an MMoE (grade_ray.datasets.kuairand.upstream) on those dates
      -> score the later dates (a date <= the last training date raises LeakageError)
      -> group impressions into requests (user x day, or user sessions split by
         a time gap), ordered by time_ms (= logged_position)
      -> out_dir/train (earlier scored days), out_dir/eval (last ``eval_days``)

Label columns (L = 8, in this order): click, long_view, like, follow, comment,
forward, hate (0/1 from the log) and watch_ratio (the log's ``watch_ratio``
column if present, else play_time_ms / duration_ms; clipped to [0, 5]; 0 when
duration_ms <= 0).

Context (fixed length D, float32; names in the metadata): per user-table
categorical (user_active_degree, is_* flags, onehot_feat0..17) a one-hot over
the values seen on the training days (at most ``max_categories`` - 1 most
frequent, plus ``<other>`` for the rest, unseen values and nothing else;
missing is its own value); log1p of the four count columns (the ``*_range``
columns are bucketings of those counts and are left out); then request-time
features: sin/cos of the hour of the first impression, day of week one-hot,
log1p(list length).

Upstream inputs per impression: the same user categoricals as embeddings, the
log1p counts, sin/cos hour, and only *basic* video features (video_type,
upload_type, music_type, first tag, optionally video_id and author_id
embeddings; log duration, log aspect ratio, days since upload, with missing
flags). The statistic columns of ``item_features.parquet`` aggregate the whole
KuaiRand period (they leak the future) and are never read. Day of week is not
an upstream input: the scored days are weekdays the model never trained on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from grade_ray.data.schema import SessionBatch, SessionMeta, ShardWriter
from grade_ray.datasets.kuairand.upstream import (
    DEFAULT_TASKS,
    UpstreamConfig,
    binary_auc,
    fit_mmoe,
    load_mmoe,
    predict_proba,
    save_mmoe,
)

log = logging.getLogger(__name__)

LICENCE_NOTICE = (
    "Derived from KuaiRand-Pure (Gao et al., 'KuaiRand: An Unbiased Sequential "
    "Recommendation Dataset with Randomly Exposed Videos', CIKM 2022, https://kuairand.com), "
    "licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). This derived "
    "data is distributed under the same licence. Changes: impressions grouped into requests, "
    "features encoded, upstream-model scores added, bad rows set aside."
)
ATTRIBUTION = (
    "Chongming Gao, Shijun Li, Yuan Zhang, Jiawei Chen, Biao Li, Wenqiang Lei, Peng Jiang, "
    "Xiangnan He. KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly "
    "Exposed Videos. CIKM 2022."
)

# label name -> log column (0/1); watch_ratio is derived
BINARY_LABELS = {
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
}
WATCH_RATIO = "watch_ratio"
LABEL_NAMES = (*BINARY_LABELS, WATCH_RATIO)
WATCH_RATIO_MAX = 5.0

LOG_KEYS = ("user_id", "video_id", "date", "hourmin", "time_ms")
LOG_REQUIRED = (*LOG_KEYS, *BINARY_LABELS.values())
LOG_PLAY = ("play_time_ms", "duration_ms")

USER_CATEGORICAL = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    *(f"onehot_feat{i}" for i in range(18)),
)
USER_COUNTS = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
VIDEO_CATEGORICAL = ("video_type", "upload_type", "music_type", "tag")
VIDEO_IDS = ("video_id", "author_id")
ID_FEATURES = ("user_id", *VIDEO_IDS)
VIDEO_DENSE = ("video_duration", "server_width", "server_height", "upload_dt")

STRING_COLUMNS = ("user_active_degree", "video_type", "upload_type", "tag", "upload_dt")
GROUP_BY = ("user_day", "session")
MISSING = "<missing>"
OTHER = "<other>"
DOW = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MODEL_DIR = "upstream"
WEIGHTS_FILE = "weights.pt"
BUNDLE_FILE = "upstream.json"
BUNDLE_VERSION = 1


class LeakageError(ValueError):
    """Asked to score a day the upstream model was trained on (or an earlier one)."""


@dataclasses.dataclass(frozen=True)
class KuaiRandOptions:
    """How impressions become requests and how features are encoded."""

    group_by: str = "user_day"
    """'user_day' (one request per user and date) or 'session' (split a user-day at time gaps)."""
    session_gap_s: float = 1800.0
    """With group_by='session': a gap longer than this (seconds) starts a new request."""
    min_list_len: int = 2
    """Requests with fewer impressions are not written (their rows are counted)."""
    max_categories: int = 16
    """Context one-hot width per user categorical (most frequent values + '<other>')."""
    max_video_vocab: int = 1000
    """Largest vocabulary of a video categorical (tag, music_type, ...; most frequent kept)."""
    max_id_vocab: int = 200_000
    """Largest user_id / video_id / author_id vocabulary (most frequent kept)."""
    use_id_features: bool = True
    """Give the upstream model user_id, video_id and author_id embeddings."""

    def __post_init__(self) -> None:
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by={self.group_by!r}: use one of {list(GROUP_BY)}")
        if self.session_gap_s <= 0:
            raise ValueError(f"session_gap_s must be > 0, got {self.session_gap_s}")
        if self.min_list_len < 1:
            raise ValueError(f"min_list_len must be >= 1, got {self.min_list_len}")
        if self.max_categories < 2 or min(self.max_video_vocab, self.max_id_vocab) < 1:
            raise ValueError("max_categories must be >= 2, max_video_vocab and max_id_vocab >= 1")


# ---------------------------------------------------------------------------
# Reading


def _paths(path: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [path] if isinstance(path, (str, Path)) else list(path)
    out = [Path(p) for p in items]
    for p in out:
        if not p.exists():
            raise FileNotFoundError(f"no such KuaiRand file: {p}")
    if not out:
        raise ValueError("no log file given")
    return out


def _read_columns(path: Path, wanted: Sequence[str]) -> pa.Table:
    """The columns of ``wanted`` present in a CSV (optionally compressed) or Parquet file.

    CSV columns are read as float64, except the text columns in STRING_COLUMNS,
    so that type inference on the first block cannot disagree with later rows.
    """
    if ".csv" in path.suffixes:
        with pcsv.open_csv(path) as reader:
            names = reader.schema.names
        keep = [c for c in wanted if c in names]
        types = {c: pa.string() if c in STRING_COLUMNS else pa.float64() for c in keep}
        opts = pcsv.ConvertOptions(include_columns=keep, column_types=types)
        return pcsv.read_csv(path, convert_options=opts)
    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in wanted if c in names])


def _require(table: pa.Table, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; present: {table.column_names}")


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
        raise ValueError(f"{files}: give every file {WATCH_RATIO} or every file {list(LOG_PLAY)}")
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
        raise ValueError(
            f"{path}: {what} has null/NaN values (rows {np.flatnonzero(~np.isfinite(x))[:5]})"
        )
    ids = x.astype(np.int64)
    order = np.argsort(ids, kind="stable")
    dup = ids[order][1:] == ids[order][:-1]
    if dup.any():
        raise ValueError(
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
        raise ValueError(f"upload_dt has unsupported type {col.type}")
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

    Accounting: ``rows_read``, ``rows_valid``, ``rows_rejected``, ``rejected_by_reason``
    and ``duplicate_impressions`` (same user, video and time_ms; kept, only counted).
    """
    reason, user_row, video_row, day = _reject_reasons(rows, users, videos)
    ok = reason == ""
    c = rows.cols
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
    bad_reasons, counts = np.unique(reason[~ok].astype(str), return_counts=True)
    key = np.stack([imp.user_id, imp.video_id, imp.time_ms], 1)
    report = {
        "rows_read": len(rows),
        "rows_valid": len(imp),
        "rows_rejected": int((~ok).sum()),
        "rejected_by_reason": {str(r): int(n) for r, n in zip(bad_reasons, counts)},
        "duplicate_impressions": int(len(key) - len(np.unique(key, axis=0))) if len(key) else 0,
    }
    for why, n in report["rejected_by_reason"].items():
        log.warning("rejected %d log rows: %s", n, why)
    rejected = None
    if not ok.all():
        bad = np.flatnonzero(~ok)
        data = {k: v[bad] for k, v in c.items()}
        data["reject_reason"] = reason[bad].astype(str)
        data["log_file"] = np.asarray(rows.files, dtype=object)[rows.log_file[bad]].astype(str)
        data["log_row"] = rows.log_row[bad]
        rejected = pa.table(data)
    return imp, report, rejected


# ---------------------------------------------------------------------------
# Grouping into requests


@dataclasses.dataclass
class Requests:
    """Impressions grouped into requests.

    order: (M',) indices into the impressions, request by request, each in time
    order; offsets: (R+1,) request r owns order[offsets[r]:offsets[r+1]];
    request_id, user_id, date, ts (seconds), hour: (R,) int64.
    """

    order: np.ndarray
    offsets: np.ndarray
    request_id: np.ndarray
    user_id: np.ndarray
    date: np.ndarray
    day: np.ndarray
    ts: np.ndarray
    hour: np.ndarray
    user_row: np.ndarray
    """(R,) row of the request's user in the :class:`UserTable`."""

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def group_requests(
    imp: Impressions, group_by: str = "user_day", session_gap_s: float = 1800.0
) -> Requests:
    """Group impressions by (user, date) and, for 'session', at gaps > session_gap_s.

    Within a request impressions are ordered by time_ms (ties: log order). A
    session never crosses a date boundary. request_id = date * 10**11 +
    user_id * 10**4 + (index of the session within its user-day).
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}: use one of {list(GROUP_BY)}")
    m = len(imp)
    order = np.lexsort((imp.src, imp.time_ms, imp.date, imp.user_id))
    u, d, t = imp.user_id[order], imp.date[order], imp.time_ms[order]
    day_start = np.ones(m, dtype=bool)
    day_start[1:] = (u[1:] != u[:-1]) | (d[1:] != d[:-1])
    new = day_start.copy()
    if group_by == "session":
        new[1:] |= (t[1:] - t[:-1]) > session_gap_s * 1000.0
    starts = np.flatnonzero(new)
    r = np.arange(len(starts))
    first_of_day = np.maximum.accumulate(np.where(day_start[starts], r, 0)) if len(r) else r
    session = r - first_of_day
    if len(r) and (u.max() >= 10**7 or session.max() >= 10**4 or d.max() >= 9 * 10**7):
        raise ValueError("user_id >= 1e7 or > 1e4 sessions per user-day: request ids would collide")
    return Requests(
        order=order,
        offsets=np.append(starts, m).astype(np.int64),
        request_id=d[starts] * 10**11 + u[starts] * 10**4 + session,
        user_id=u[starts],
        date=d[starts],
        day=imp.day[order][starts],
        ts=t[starts] // 1000,
        hour=imp.hour[order][starts],
        user_row=imp.user_row[order][starts],
    )


def select_requests(req: Requests, keep: np.ndarray) -> Requests:
    """Requests where keep (R,) bool is True, sorted by (ts, request_id)."""
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((req.request_id[idx], req.ts[idx]))]
    lengths = req.lengths[idx]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = req.offsets[idx]
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    order = req.order[np.repeat(starts, lengths) + within]
    names = ("request_id", "user_id", "date", "day", "ts", "hour", "user_row")
    fields = {f: getattr(req, f)[idx] for f in names}
    return Requests(order=order, offsets=offsets, **fields)


# ---------------------------------------------------------------------------
# Encoding


def _fit_vocab(values: np.ndarray, max_size: int) -> list[str]:
    """Most frequent values (ties by value), at most ``max_size``."""
    if values.size == 0:
        return []
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    order = np.lexsort((uniq, -counts))[:max_size]
    return [str(v) for v in uniq[order]]


def _encode(values: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    """(M,) strings -> (M,) int64 codes: 1 + index in vocab, 0 = not in vocab."""
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    return np.array([lookup.get(v, 0) for v in uniq], dtype=np.int64)[inv.reshape(-1)]


@dataclasses.dataclass
class KuaiRandEncoder:
    """Vocabularies fitted on the upstream training days; turns tables into features."""

    user_vocab: dict[str, list[str]]
    """User categorical -> values (context one-hot slot i+1; slot 0 = '<other>')."""
    video_vocab: dict[str, list[str]]
    """Video categorical -> values (upstream embedding index i+1; 0 = unknown)."""
    id_vocab: dict[str, list[str]]
    """user_id / video_id / author_id -> ids seen on the training days (empty: no id features)."""
    train_dates: list[int]
    """Dates (yyyymmdd) the vocabularies and the upstream model were fitted on."""

    @classmethod
    def fit(
        cls, users: UserTable, videos: VideoTable, train: Impressions, opts: KuaiRandOptions
    ) -> KuaiRandEncoder:
        """Fit on training-day impressions only. train: impressions of the training dates."""
        rows = np.unique(train.user_row)  # each training-day user counted once
        user_vocab = {
            c: _fit_vocab(users.cats[c][rows], opts.max_categories - 1) for c in USER_CATEGORICAL
        }
        video_vocab = {
            c: _fit_vocab(videos.cats[c][train.video_row], opts.max_video_vocab)
            for c in VIDEO_CATEGORICAL
        }
        id_vocab = {}
        if opts.use_id_features:
            id_vocab["user_id"] = _fit_vocab(
                users.cats["user_id"][train.user_row], opts.max_id_vocab
            )
            for c in VIDEO_IDS:
                id_vocab[c] = _fit_vocab(videos.cats[c][train.video_row], opts.max_id_vocab)
        dates = sorted(int(d) for d in np.unique(train.date))
        return cls(user_vocab, video_vocab, id_vocab, dates)

    # -- context (policy input) ------------------------------------------------
    def context_names(self) -> list[str]:
        names = []
        for c in USER_CATEGORICAL:
            names += [f"{c}={OTHER}"] + [f"{c}={v}" for v in self.user_vocab[c]]
        names += [f"log1p_{c}" for c in USER_COUNTS]
        names += ["hour_sin", "hour_cos", *(f"dow={d}" for d in DOW), "log1p_list_len"]
        return names

    def user_context(self, users: UserTable) -> np.ndarray:
        """(U, Du) float32: one-hot user categoricals then log1p counts."""
        blocks = []
        for c in USER_CATEGORICAL:
            codes = _encode(users.cats[c], self.user_vocab[c])
            blocks.append(np.eye(len(self.user_vocab[c]) + 1, dtype=np.float32)[codes])
        blocks.append(_log1p_counts(users))
        return np.concatenate(blocks, axis=1)

    def request_context(self, user_ctx: np.ndarray, req: Requests) -> np.ndarray:
        """(R, D) float32 = [user_ctx[user_row], hour sin/cos, dow one-hot, log1p(list len)].

        user_ctx: (U, Du) from :meth:`user_context`; hour and day are the first impression's.
        """
        dow = np.eye(7, dtype=np.float32)[(req.day + 3) % 7]  # 1970-01-01 was a Thursday
        parts = [user_ctx[req.user_row], _hour_features(req.hour), dow]
        parts.append(np.log1p(req.lengths)[:, None].astype(np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32)

    # -- upstream inputs -------------------------------------------------------
    def embedding_names(self) -> list[str]:
        """Names of the upstream ``cats`` columns after the USER_CATEGORICAL ones, in order."""
        return [*VIDEO_CATEGORICAL, *(c for c in ID_FEATURES if c in self.id_vocab)]

    def upstream_inputs(
        self, users: UserTable, videos: VideoTable, imp: Impressions
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Per impression: dense (M, F) float32, cats (M, C) int64, cat_sizes (C,).

        cats columns: USER_CATEGORICAL, then :meth:`embedding_names`; index 0 = unknown.
        dense: log1p user counts (4), hour sin/cos (2), then (value, missing flag) for
        log1p duration in s, log aspect ratio and log1p days since upload (6).
        """
        cats, sizes = [], []
        for c in USER_CATEGORICAL:
            cats.append(_encode(users.cats[c], self.user_vocab[c])[imp.user_row])
            sizes.append(len(self.user_vocab[c]) + 1)
        for c in self.embedding_names():  # fixed order (JSON round trips sort dict keys)
            vocab = self.video_vocab[c] if c in self.video_vocab else self.id_vocab[c]
            table, row = (users, imp.user_row) if c == "user_id" else (videos, imp.video_row)
            cats.append(_encode(table.cats[c], vocab)[row])
            sizes.append(len(vocab) + 1)
        v = {k: a[imp.video_row] for k, a in videos.dense.items()}
        age = imp.day - v["upload_day"]
        aspect = np.log(v["height"] / v["width"])
        dense = [_log1p_counts(users)[imp.user_row], _hour_features(imp.hour)]
        for x in (np.log1p(v["duration_ms"] / 1000.0), aspect, np.log1p(np.maximum(age, 0))):
            ok = np.isfinite(x)
            dense.append(np.stack([np.where(ok, x, 0.0), (~ok).astype(np.float64)], 1))
        return np.concatenate(dense, 1).astype(np.float32), np.stack(cats, 1), sizes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KuaiRandEncoder:
        return cls(**d)


def _log1p_counts(users: UserTable) -> np.ndarray:
    """(U, 4) float32 log1p of the (non-negative) count columns."""
    return np.stack([np.log1p(np.maximum(users.counts[c], 0)) for c in USER_COUNTS], 1).astype(
        np.float32
    )


def _hour_features(hour: np.ndarray) -> np.ndarray:
    """(M,) hour 0..23 -> (M, 2) float32 [sin, cos] of the hour angle."""
    a = 2 * np.pi * hour.astype(np.float64) / 24.0
    return np.stack([np.sin(a), np.cos(a)], 1).astype(np.float32)


# ---------------------------------------------------------------------------
# Upstream model bundle


def check_no_leakage(dates: np.ndarray, train_dates: Sequence[int]) -> None:
    """Raise LeakageError unless every date to score is after the last training date."""
    if not len(train_dates) or not len(dates):
        return
    boundary = max(int(d) for d in train_dates)
    bad = np.unique(np.asarray(dates)[np.asarray(dates) <= boundary])
    if bad.size:
        raise LeakageError(
            f"refusing to score dates {bad.tolist()}: the upstream model was trained on "
            f"{list(train_dates)}; only dates after {boundary} can be scored (filter them with dates=)"
        )


@dataclasses.dataclass
class UpstreamBundle:
    """A trained upstream model with everything needed to score new logs."""

    model: Any
    cfg: UpstreamConfig
    encoder: KuaiRandEncoder
    options: KuaiRandOptions
    architecture: dict[str, Any]

    def score(self, users: UserTable, videos: VideoTable, imp: Impressions) -> np.ndarray:
        """(M, K) float32 probabilities; raises LeakageError for any training (or earlier) date."""
        check_no_leakage(imp.date, self.encoder.train_dates)
        out = np.empty((len(imp), len(self.cfg.tasks)), dtype=np.float32)
        step = 200_000
        for s in range(0, len(imp), step):
            dense, cats, _ = self.encoder.upstream_inputs(
                users, videos, imp.take(np.arange(s, min(s + step, len(imp))))
            )
            out[s : s + step] = predict_proba(self.model, dense, cats)
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/upstream/{weights.pt, upstream.json}``; returns that directory."""
        d = Path(out_dir) / MODEL_DIR
        d.mkdir(parents=True, exist_ok=True)
        save_mmoe(self.model, d / WEIGHTS_FILE)
        bundle = {
            "format_version": BUNDLE_VERSION,
            "architecture": self.architecture,
            "encoder": self.encoder.to_dict(),
            "options": dataclasses.asdict(self.options),
            "label_names": list(LABEL_NAMES),
        }
        (d / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1, sort_keys=True))
        return d


def load_upstream(model_dir: str | Path) -> UpstreamBundle:
    """Load a bundle saved by :meth:`UpstreamBundle.save` (``model_dir`` = convert out_dir or its upstream/)."""
    d = Path(model_dir)
    if not (d / BUNDLE_FILE).exists():
        d = d / MODEL_DIR
    if not (d / BUNDLE_FILE).exists():
        raise FileNotFoundError(f"no {BUNDLE_FILE} in {model_dir} or {model_dir}/{MODEL_DIR}")
    meta = json.loads((d / BUNDLE_FILE).read_text())
    if meta.get("format_version") != BUNDLE_VERSION:
        raise ValueError(
            f"{d / BUNDLE_FILE}: format_version {meta.get('format_version')}, expected {BUNDLE_VERSION}"
        )
    model, cfg = load_mmoe(d / WEIGHTS_FILE, meta["architecture"])
    return UpstreamBundle(
        model,
        cfg,
        KuaiRandEncoder.from_dict(meta["encoder"]),
        KuaiRandOptions(**meta["options"]),
        meta["architecture"],
    )


def train_upstream(
    users: UserTable,
    videos: VideoTable,
    train: Impressions,
    cfg: UpstreamConfig,
    opts: KuaiRandOptions,
) -> tuple[UpstreamBundle, dict[str, Any]]:
    """Fit vocabularies and the MMoE on training-day impressions. Returns (bundle, history)."""
    unknown = [t for t in cfg.tasks if t not in BINARY_LABELS]
    if unknown:
        raise ValueError(f"unknown upstream task(s) {unknown}; choose from {list(BINARY_LABELS)}")
    encoder = KuaiRandEncoder.fit(users, videos, train, opts)
    dense, cats, sizes = encoder.upstream_inputs(users, videos, train)
    y = train.labels[:, [LABEL_NAMES.index(t) for t in cfg.tasks]]
    for t, n in zip(cfg.tasks, y.sum(axis=0)):
        if n < 50:
            log.warning("upstream task %r has only %d positives on the training days", t, int(n))
    model, history = fit_mmoe(dense, cats, y, sizes, cfg)
    history["train_auc"] = {
        t: binary_auc(y[:, k], predict_proba(model, dense, cats)[:, k])
        for k, t in enumerate(cfg.tasks)
    }
    return UpstreamBundle(model, cfg, encoder, opts, model.architecture(cfg)), history


# ---------------------------------------------------------------------------
# Sessions


def session_batch(
    req: Requests, imp: Impressions, probs: np.ndarray, context: np.ndarray
) -> SessionBatch:
    """Requests -> padded :class:`SessionBatch` (N = longest list).

    probs: (M, K) per impression; context: (R, D). Position j in a row is the
    j-th impression of the request in time order (= logged_position).
    """
    lengths = req.lengths
    r, n = len(req), int(lengths.max(initial=1))
    row = np.repeat(np.arange(r), lengths)
    pos = np.arange(len(req.order)) - np.repeat(req.offsets[:-1], lengths)
    mask = np.zeros((r, n), dtype=bool)
    mask[row, pos] = True
    item_ids = np.zeros((r, n), dtype=np.int64)
    item_ids[row, pos] = imp.video_id[req.order]
    scores = np.zeros((r, n, probs.shape[1]), dtype=np.float32)
    scores[row, pos] = probs[req.order]
    labels = np.zeros((r, n, imp.labels.shape[1]), dtype=np.float32)
    labels[row, pos] = imp.labels[req.order]
    return SessionBatch(
        request_id=req.request_id,
        user_id=req.user_id,
        ts=req.ts,
        context=context,
        item_ids=item_ids,
        scores=scores,
        labels=labels,
        mask=mask,
    )


def _task_aucs(imp: Impressions, probs: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """Per-task ROC AUC of probs (M, K) against the impressions' labels."""
    return {
        t: _round(binary_auc(imp.labels[:, LABEL_NAMES.index(t)], probs[:, k]))
        for k, t in enumerate(tasks)
    }


def _round(x: float) -> float | None:
    return None if x != x else round(float(x), 5)  # NaN -> null in JSON


def _split_stats(req: Requests, imp: Impressions, probs: np.ndarray, tasks: Sequence[str]) -> dict:
    """Counts, mean list length, label rates (watch_ratio: mean) and upstream AUC of a split."""
    if not len(req):
        return {"requests": 0, "impressions": 0}
    rows = imp.take(req.order)
    rates = {n: _round(float((rows.labels[:, i] > 0).mean())) for i, n in enumerate(BINARY_LABELS)}
    rates["watch_ratio_mean"] = _round(float(rows.labels[:, -1].mean()))
    return {
        "requests": len(req),
        "impressions": len(rows),
        "users": int(len(np.unique(req.user_id))),
        "dates": sorted(int(d) for d in np.unique(req.date)),
        "mean_list_len": _round(float(req.lengths.mean())),
        "max_list_len": int(req.lengths.max()),
        "label_positive_rate": rates,
        "upstream_auc": _task_aucs(rows, probs[req.order], tasks),
    }


def _source(split: str, dates: Sequence[int], files: Sequence[str], bundle: UpstreamBundle) -> dict:
    o = bundle.options
    return {
        "dataset": "KuaiRand-Pure",
        "licence": "CC BY-SA 4.0",
        "licence_notice": LICENCE_NOTICE,
        "attribution": ATTRIBUTION,
        "url": "https://kuairand.com",
        "generator": "grade_ray.datasets.kuairand.convert",
        "log_files": [Path(f).name for f in files],
        "split": split,
        "dates": [int(d) for d in dates],
        "group_by": o.group_by,
        "session_gap_s": o.session_gap_s,
        "min_list_len": o.min_list_len,
        "upstream_model": "MMoE (grade_ray.datasets.kuairand.upstream)",
        "upstream_train_dates": list(bundle.encoder.train_dates),
    }


def _write_split(
    out: Path,
    split: str,
    req: Requests,
    imp: Impressions,
    probs: np.ndarray,
    user_ctx: np.ndarray,
    bundle: UpstreamBundle,
    files: Sequence[str],
    rows_per_shard: int,
) -> dict:
    """Write one split's sessions to ``out`` (Parquet shards); returns its stats."""
    stats = _split_stats(req, imp, probs, bundle.cfg.tasks)
    if not len(req):
        log.warning("split %r has no requests; nothing written to %s", split, out)
        return stats
    meta = SessionMeta(
        task_names=bundle.cfg.tasks,
        task_kinds=("prob",) * len(bundle.cfg.tasks),
        label_names=LABEL_NAMES,
        context_names=tuple(bundle.encoder.context_names()),
        source=_source(split, stats["dates"], files, bundle),
    )
    index = np.arange(len(req))
    with ShardWriter(out, meta, rows_per_shard=rows_per_shard) as writer:
        for s in range(0, len(req), rows_per_shard):  # bounded memory: one shard at a time
            part = select_requests(req, (index >= s) & (index < s + rows_per_shard))
            context = bundle.encoder.request_context(user_ctx, part)
            writer.write(session_batch(part, imp, probs, context))
    stats["files"] = [str(p) for p in writer.paths]
    log.info("%s: %d requests, %d impressions -> %s", split, len(req), stats["impressions"], out)
    return stats


def _group_and_write(
    imp: Impressions,
    probs: np.ndarray,
    users: UserTable,
    bundle: UpstreamBundle,
    files: Sequence[str],
    dirs: dict[str, Path],
    eval_dates: Sequence[int] | None,
    rows_per_shard: int,
) -> tuple[dict[str, dict], dict[str, int]]:
    """Group scored impressions into requests, set short lists aside, write the splits.

    dirs: split name -> directory. With ``eval_dates``, requests on those dates go
    to 'eval' and the others to 'train'; without, the one split takes all.
    Returns (stats per split, row counts in sessions / in short lists).
    """
    opts = bundle.options
    req = group_requests(imp, opts.group_by, opts.session_gap_s)
    long_enough = req.lengths >= opts.min_list_len
    if eval_dates is None:
        (name,) = dirs
        keep = {name: long_enough}
    else:
        in_eval = np.isin(req.date, np.asarray(list(eval_dates), dtype=np.int64))
        keep = {"train": long_enough & ~in_eval, "eval": long_enough & in_eval}
    user_ctx = bundle.encoder.user_context(users)
    stats = {
        name: _write_split(
            dirs[name],
            name,
            select_requests(req, k),
            imp,
            probs,
            user_ctx,
            bundle,
            files,
            rows_per_shard,
        )
        for name, k in keep.items()
    }
    counts = {
        "rows_in_sessions": int(req.lengths[long_enough].sum()),
        "rows_in_short_lists": int(req.lengths[~long_enough].sum()),
    }
    return stats, counts


def _prepare_dir(path: Path, overwrite: bool) -> Path:
    """Create ``path``; refuse (or, with overwrite, clear) existing Parquet shards in it."""
    if path.exists() and any(path.glob("*.parquet")):
        if not overwrite:
            raise FileExistsError(f"{path} already holds Parquet files; pass overwrite=True")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split_dates(date: np.ndarray, upstream_train_days: int, eval_days: int) -> tuple[list, list]:
    """Distinct dates -> (first upstream_train_days dates, the rest)."""
    dates = sorted(int(d) for d in np.unique(date))
    if upstream_train_days < 1 or eval_days < 1:
        raise ValueError("upstream_train_days and eval_days must be >= 1")
    if upstream_train_days + eval_days >= len(dates):
        raise ValueError(
            f"the log has {len(dates)} dates {dates}: upstream_train_days={upstream_train_days} "
            f"+ eval_days={eval_days} must leave at least one date for the train split"
        )
    return dates[:upstream_train_days], dates[upstream_train_days:]


def _write_docs(out: Path, report: dict, rejected: pa.Table | None, write_rejects: bool) -> None:
    if write_rejects and rejected is not None:
        pq.write_table(rejected, out / "rejects.parquet")
        report["rows"]["rejects_path"] = str(out / "rejects.parquet")
    (out / "README.md").write_text(_readme(report))


def convert_kuairand(
    log_path: str | Path | Sequence[str | Path],
    user_path: str | Path,
    video_path: str | Path,
    out_dir: str | Path,
    *,
    upstream_train_days: int,
    eval_days: int = 1,
    group_by: str = "user_day",
    session_gap_s: float = 1800.0,
    min_list_len: int = 2,
    seed: int = 0,
    epochs: int = 2,
    tasks: Sequence[str] = DEFAULT_TASKS,
    upstream: UpstreamConfig | None = None,
    max_categories: int = 16,
    use_id_features: bool = True,
    write_rejects: bool = False,
    rows_per_shard: int = 100_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """KuaiRand-Pure log(s) + user/video tables -> ``out_dir/{train,eval}`` sessions.

    Trains the upstream MMoE on the first ``upstream_train_days`` dates, scores
    the later dates with it, writes the last ``eval_days`` scored dates to
    ``eval`` and the others to ``train``. Also writes ``upstream/`` (weights +
    JSON vocabularies, for :func:`convert_more`), ``upstream_report.json``,
    ``README.md`` (licence + attribution) and, with ``write_rejects``,
    ``rejects.parquet``. ``upstream`` (if given) overrides tasks, epochs and seed.
    Returns the report (also in ``upstream_report.json``).
    """
    t0 = time.perf_counter()
    opts = KuaiRandOptions(
        group_by, session_gap_s, min_list_len, max_categories, use_id_features=use_id_features
    )
    cfg = upstream or UpstreamConfig(tasks=tuple(tasks), epochs=epochs, seed=seed)
    out = Path(out_dir)
    dirs = {s: _prepare_dir(out / s, overwrite) for s in ("train", "eval")}
    rows = read_log(log_path)
    users, videos = read_users(user_path), read_videos(video_path)
    imp, rows_report, rejected = clean_log(rows, users, videos)
    train_dates, scored_dates = _split_dates(imp.date, upstream_train_days, eval_days)
    is_train = np.isin(imp.date, train_dates)
    bundle, history = train_upstream(users, videos, imp.take(np.flatnonzero(is_train)), cfg, opts)
    bundle.save(out)
    scored = imp.take(np.flatnonzero(~is_train))
    probs = bundle.score(users, videos, scored)  # raises LeakageError on a training date
    splits, counts = _group_and_write(
        scored, probs, users, bundle, rows.files, dirs, scored_dates[-eval_days:], rows_per_shard
    )
    rows_report.update(rows_upstream_train=int(is_train.sum()), **counts)
    report = {
        "source": _source("all", [*train_dates, *scored_dates], rows.files, bundle),
        "options": dataclasses.asdict(opts),
        "rows": rows_report,
        "upstream": _upstream_report(bundle, history, train_dates, is_train, imp, scored, probs),
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_docs(out, report, rejected, write_rejects)
    (out / "upstream_report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    log.info("converted KuaiRand in %.1fs: %s", report["seconds"], _rows_summary(rows_report))
    return report


def _upstream_report(
    bundle: UpstreamBundle,
    history: dict,
    train_dates: list,
    is_train: np.ndarray,
    imp: Impressions,
    scored: Impressions,
    probs: np.ndarray,
) -> dict:
    tasks = bundle.cfg.tasks
    train_labels = imp.labels[is_train]
    by_date = {}
    for d in np.unique(scored.date):
        idx = np.flatnonzero(scored.date == d)
        by_date[str(int(d))] = _task_aucs(scored.take(idx), probs[idx], tasks)
    return {
        "tasks": list(tasks),
        "config": dataclasses.asdict(bundle.cfg),
        "train_dates": train_dates,
        "train_impressions": int(is_train.sum()),
        "train_positives": {t: int(train_labels[:, LABEL_NAMES.index(t)].sum()) for t in tasks},
        "epoch_loss": [_round(x) for x in history["epoch_loss"]],
        "train_auc": {t: _round(v) for t, v in history["train_auc"].items()},
        "scored_impressions": len(scored),
        "auc_scored_days": _task_aucs(scored, probs, tasks),
        "auc_by_date": by_date,
    }


def _rows_summary(r: dict) -> str:
    s = f"rows read {r['rows_read']}, valid {r['rows_valid']}, rejected {r['rows_rejected']}"
    if r["rejected_by_reason"]:
        s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected_by_reason"].items())) + ")"
    return s


def _load_and_score(
    log_path: str | Path | Sequence[str | Path],
    bundle: UpstreamBundle,
    user_path: str | Path,
    video_path: str | Path,
    dates: Sequence[int] | None,
) -> tuple[LogRows, UserTable, Impressions, np.ndarray, dict, pa.Table | None]:
    rows = read_log(log_path)
    users, videos = read_users(user_path), read_videos(video_path)
    imp, report, rejected = clean_log(rows, users, videos)
    if dates is not None:
        sel = np.isin(imp.date, np.asarray(list(dates), dtype=np.int64))
        report["rows_outside_dates"] = int((~sel).sum())
        imp = imp.take(np.flatnonzero(sel))
    return rows, users, imp, bundle.score(users, videos, imp), report, rejected


def score_log(
    log_path: str | Path | Sequence[str | Path],
    model_dir: str | Path,
    *,
    user_path: str | Path,
    video_path: str | Path,
    dates: Sequence[int] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Score a further log with a trained upstream model (no grouping).

    Returns (table with user_id, video_id, date, time_ms, the labels and one
    ``p_<task>`` column per task, one row per valid impression; row accounting).
    Raises :class:`LeakageError` for any date the model trained on or before it.
    """
    bundle = load_upstream(model_dir)
    _, _, imp, probs, report, _ = _load_and_score(log_path, bundle, user_path, video_path, dates)
    cols = {
        "user_id": imp.user_id,
        "video_id": imp.video_id,
        "date": imp.date,
        "time_ms": imp.time_ms,
    }
    cols.update({n: imp.labels[:, i] for i, n in enumerate(LABEL_NAMES)})
    cols.update({f"p_{t}": probs[:, k] for k, t in enumerate(bundle.cfg.tasks)})
    report["auc"] = _task_aucs(imp, probs, bundle.cfg.tasks)
    return pa.table(cols), report


def convert_more(
    log_path: str | Path | Sequence[str | Path],
    model_dir: str | Path,
    out_path: str | Path,
    *,
    user_path: str | Path,
    video_path: str | Path,
    dates: Sequence[int] | None = None,
    write_rejects: bool = False,
    rows_per_shard: int = 100_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a further log with an already-trained upstream model (from ``model_dir``).

    Uses the stored vocabularies and grouping options; writes sessions to
    ``out_path`` plus ``report.json`` and ``README.md``. ``dates`` restricts the
    log to those dates (other rows are counted as ``rows_outside_dates``).
    Raises :class:`LeakageError` if a date to convert is not after the model's training days.
    """
    t0 = time.perf_counter()
    bundle = load_upstream(model_dir)
    out = _prepare_dir(Path(out_path), overwrite)
    rows, users, imp, probs, rows_report, rejected = _load_and_score(
        log_path, bundle, user_path, video_path, dates
    )
    stats, counts = _group_and_write(
        imp, probs, users, bundle, rows.files, {"more": out}, None, rows_per_shard
    )
    rows_report.update(counts)
    report = {
        "source": _source("more", stats["more"].get("dates", []), rows.files, bundle),
        "rows": rows_report,
        "upstream": {
            "tasks": list(bundle.cfg.tasks),
            "train_dates": bundle.encoder.train_dates,
            "auc": _task_aucs(imp, probs, bundle.cfg.tasks),
        },
        "splits": stats,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_docs(out, report, rejected, write_rejects)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    log.info("converted %s in %.1fs: %s", rows.files, report["seconds"], _rows_summary(rows_report))
    return report


def _readme(report: dict) -> str:
    """README for an output directory: licence, attribution, layout and the numbers."""
    src = report["source"]
    gap = f" (new request after {src['session_gap_s']} s)" if src["group_by"] == "session" else ""
    lines = [
        "# KuaiRand-Pure logged sessions (grade_ray)",
        "",
        "## Licence and attribution",
        "",
        LICENCE_NOTICE,
        "",
        f"Please cite: {ATTRIBUTION}",
        "",
        "## Contents",
        "",
        f"Generated by `grade_ray.datasets.kuairand.convert` from {', '.join(src['log_files'])}.",
        f"Requests: impressions grouped by `{src['group_by']}`{gap}, at least "
        f"{src['min_list_len']} impressions each, in time order (= logged_position).",
        f"Upstream scores ({', '.join(report['upstream']['tasks'])}) come from an MMoE trained on "
        f"dates {src['upstream_train_dates']} only; no scored request is from those dates.",
        f"Labels: {', '.join(LABEL_NAMES)}.",
        "",
        "| split | dates | requests | impressions | mean list length |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["splits"].items():
        lines.append(
            f"| {name} | {s.get('dates', [])} | {s['requests']} | {s['impressions']} | "
            f"{s.get('mean_list_len', 0)} |"
        )
    lines += [
        "",
        "Layout: one directory of Parquet shards per split (`grade_ray.data.schema` format;",
        "task, label and context names in the file metadata, with this licence notice);",
        "`upstream/` holds the upstream model (weights.pt: a plain state_dict; upstream.json:",
        "architecture and vocabularies) for converting further days with `convert_more`.",
        "",
        f"Rows: {_rows_summary(report['rows'])}.",
        "",
        "Full numbers (per-task AUC, label rates, row accounting) are in the JSON report.",
        "",
    ]
    return "\n".join(lines)
