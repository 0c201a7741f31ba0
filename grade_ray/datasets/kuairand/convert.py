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

The steps live in rooms of their own: :mod:`.dataset` (licence, columns, label
order, options), :mod:`.raw` (reading, cleaning), :mod:`.grouping` (requests),
:mod:`.features` (vocabularies, context, upstream inputs), :mod:`.scoring` (the
upstream bundle) and :mod:`.sessions` (Parquet, stats, README).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grade_ray.datasets.kuairand.dataset import LABEL_NAMES, KuaiRandError, KuaiRandOptions
from grade_ray.datasets.kuairand.raw import (
    Impressions,
    LogRows,
    UserTable,
    VideoTable,
    clean_log,
    read_log,
    read_users,
    read_videos,
)
from grade_ray.datasets.kuairand.scoring import (
    UpstreamBundle,
    load_upstream,
    rounded,
    task_aucs,
    train_upstream,
)
from grade_ray.datasets.kuairand.sessions import (
    group_and_write,
    prepare_dir,
    rows_summary,
    source_metadata,
    write_docs,
)
from grade_ray.datasets.kuairand.upstream import DEFAULT_TASKS, UpstreamConfig

log = logging.getLogger(__name__)


def _read_tables(
    log_path: str | Path | Sequence[str | Path], user_path: str | Path, video_path: str | Path
) -> tuple[LogRows, UserTable, VideoTable, Impressions, dict[str, Any], pa.Table | None]:
    """Read the log and both tables, clean the log: (rows read, users, videos, valid
    impressions, row accounting, rejected rows or None)."""
    rows = read_log(log_path)
    users, videos = read_users(user_path), read_videos(video_path)
    return rows, users, videos, *clean_log(rows, users, videos)


def _write_report(
    out: Path, name: str, report: dict[str, Any], rejected: pa.Table | None, write_rejects: bool
) -> None:
    """README.md (and, with ``write_rejects``, rejects.parquet), then ``out/name`` (JSON)."""
    write_docs(out, report, rejected, write_rejects)
    (out / name).write_text(json.dumps(report, indent=1, sort_keys=True))


def _split_dates(date: np.ndarray, upstream_train_days: int, eval_days: int) -> tuple[list, list]:
    """Distinct dates -> (first upstream_train_days dates, the rest)."""
    dates = sorted(int(d) for d in np.unique(date))
    if upstream_train_days < 1 or eval_days < 1:
        raise KuaiRandError("upstream_train_days and eval_days must be >= 1")
    if upstream_train_days + eval_days >= len(dates):
        raise KuaiRandError(
            f"the log has {len(dates)} dates {dates}: upstream_train_days={upstream_train_days} "
            f"+ eval_days={eval_days} must leave at least one date for the train split"
        )
    return dates[:upstream_train_days], dates[upstream_train_days:]


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
    dirs = {s: prepare_dir(out / s, overwrite) for s in ("train", "eval")}
    rows, users, videos, imp, rows_report, rejected = _read_tables(log_path, user_path, video_path)
    train_dates, scored_dates = _split_dates(imp.date, upstream_train_days, eval_days)
    is_train = np.isin(imp.date, train_dates)
    bundle, history = train_upstream(users, videos, imp.take(np.flatnonzero(is_train)), cfg, opts)
    bundle.save(out)
    scored = imp.take(np.flatnonzero(~is_train))
    probs = bundle.score(users, videos, scored)  # raises LeakageError on a training date
    splits, counts = group_and_write(
        scored, probs, users, bundle, rows.files, dirs, scored_dates[-eval_days:], rows_per_shard
    )
    rows_report.update(rows_upstream_train=int(is_train.sum()), **counts)
    report = {
        "source": source_metadata("all", [*train_dates, *scored_dates], rows.files, bundle),
        "options": dataclasses.asdict(opts),
        "rows": rows_report,
        "upstream": _upstream_report(bundle, history, train_dates, is_train, imp, scored, probs),
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_report(out, "upstream_report.json", report, rejected, write_rejects)
    log.info("converted KuaiRand in %.1fs: %s", report["seconds"], rows_summary(rows_report))
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
        by_date[str(int(d))] = task_aucs(scored.take(idx), probs[idx], tasks)
    return {
        "tasks": list(tasks),
        "config": dataclasses.asdict(bundle.cfg),
        "train_dates": train_dates,
        "train_impressions": int(is_train.sum()),
        "train_positives": {t: int(train_labels[:, LABEL_NAMES.index(t)].sum()) for t in tasks},
        "epoch_loss": [rounded(x) for x in history["epoch_loss"]],
        "train_auc": {t: rounded(v) for t, v in history["train_auc"].items()},
        "scored_impressions": len(scored),
        "auc_scored_days": task_aucs(scored, probs, tasks),
        "auc_by_date": by_date,
    }


def _load_and_score(
    log_path: str | Path | Sequence[str | Path],
    bundle: UpstreamBundle,
    user_path: str | Path,
    video_path: str | Path,
    dates: Sequence[int] | None,
) -> tuple[LogRows, UserTable, Impressions, np.ndarray, dict, pa.Table | None]:
    rows, users, videos, imp, report, rejected = _read_tables(log_path, user_path, video_path)
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
    Raises :class:`~grade_ray.datasets.kuairand.scoring.LeakageError` for any date the
    model trained on or before it.
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
    report["auc"] = task_aucs(imp, probs, bundle.cfg.tasks)
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
    Raises :class:`~grade_ray.datasets.kuairand.scoring.LeakageError` if a date to
    convert is not after the model's training days.
    """
    t0 = time.perf_counter()
    bundle = load_upstream(model_dir)
    out = prepare_dir(Path(out_path), overwrite)
    rows, users, imp, probs, rows_report, rejected = _load_and_score(
        log_path, bundle, user_path, video_path, dates
    )
    stats, counts = group_and_write(
        imp, probs, users, bundle, rows.files, {"more": out}, None, rows_per_shard
    )
    rows_report.update(counts)
    report = {
        "source": source_metadata("more", stats["more"].get("dates", []), rows.files, bundle),
        "rows": rows_report,
        "upstream": {
            "tasks": list(bundle.cfg.tasks),
            "train_dates": bundle.encoder.train_dates,
            "auc": task_aucs(imp, probs, bundle.cfg.tasks),
        },
        "splits": stats,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_report(out, "report.json", report, rejected, write_rejects)
    log.info("converted %s in %.1fs: %s", rows.files, report["seconds"], rows_summary(rows_report))
    return report
