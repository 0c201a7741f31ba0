"""Scored impressions -> session Parquet (``grade_ray.data.sessions``), with stats and a README.

Groups impressions into requests, sets short lists aside, pads each request into
a :class:`~grade_ray.data.sessions.SessionBatch` row (position j = the j-th
impression in time order = logged_position) and writes one directory of shards
per split; the metadata and the README carry the licence notice.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade_ray.data.sessions import SessionBatch, SessionMeta, ShardWriter
from grade_ray.datasets.kuairand.dataset import (
    ATTRIBUTION,
    BINARY_LABELS,
    LABEL_NAMES,
    LICENCE_NOTICE,
)
from grade_ray.datasets.kuairand.grouping import Requests, group_requests, select_requests
from grade_ray.datasets.kuairand.raw import Impressions, UserTable
from grade_ray.datasets.kuairand.scoring import UpstreamBundle, rounded, task_aucs

log = logging.getLogger(__name__)


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


def split_stats(req: Requests, imp: Impressions, probs: np.ndarray, tasks: Sequence[str]) -> dict:
    """Counts, mean list length, label rates (watch_ratio: mean) and upstream AUC of a split."""
    if not len(req):
        return {"requests": 0, "impressions": 0}
    rows = imp.take(req.order)
    rates = {n: rounded(float((rows.labels[:, i] > 0).mean())) for i, n in enumerate(BINARY_LABELS)}
    rates["watch_ratio_mean"] = rounded(float(rows.labels[:, -1].mean()))
    return {
        "requests": len(req),
        "impressions": len(rows),
        "users": int(len(np.unique(req.user_id))),
        "dates": sorted(int(d) for d in np.unique(req.date)),
        "mean_list_len": rounded(float(req.lengths.mean())),
        "max_list_len": int(req.lengths.max()),
        "label_positive_rate": rates,
        "upstream_auc": task_aucs(rows, probs[req.order], tasks),
    }


def source_metadata(
    split: str, dates: Sequence[int], files: Sequence[str], bundle: UpstreamBundle
) -> dict:
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
    stats = split_stats(req, imp, probs, bundle.cfg.tasks)
    if not len(req):
        log.warning("split %r has no requests; nothing written to %s", split, out)
        return stats
    meta = SessionMeta(
        task_names=bundle.cfg.tasks,
        task_kinds=("prob",) * len(bundle.cfg.tasks),
        label_names=LABEL_NAMES,
        context_names=tuple(bundle.encoder.context_names()),
        source=source_metadata(split, stats["dates"], files, bundle),
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


def group_and_write(
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


def prepare_dir(path: Path, overwrite: bool) -> Path:
    """Create ``path``; refuse (or, with overwrite, clear) existing Parquet shards in it."""
    if path.exists() and any(path.glob("*.parquet")):
        if not overwrite:
            raise FileExistsError(f"{path} already holds Parquet files; pass overwrite=True")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_docs(out: Path, report: dict, rejected: pa.Table | None, write_rejects: bool) -> None:
    if write_rejects and rejected is not None:
        notice = {b"licence_notice": LICENCE_NOTICE.encode(), b"attribution": ATTRIBUTION.encode()}
        rejected = rejected.replace_schema_metadata({**(rejected.schema.metadata or {}), **notice})
        pq.write_table(rejected, out / "rejects.parquet")
        report["rows"]["rejects_path"] = str(out / "rejects.parquet")
    (out / "README.md").write_text(_readme(report))


def rows_summary(r: dict) -> str:
    s = f"rows read {r['rows_read']}, valid {r['rows_valid']}, rejected {r['rows_rejected']}"
    if r.get("rows_duplicate_dropped"):
        s += f", duplicates dropped {r['rows_duplicate_dropped']}"
    if r["rejected_by_reason"]:
        s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected_by_reason"].items())) + ")"
    return s


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
        "Layout: one directory of Parquet shards per split (`grade_ray.data.sessions` format;",
        "task, label and context names in the file metadata, with this licence notice);",
        "`upstream/` holds the upstream model (weights.pt: a plain state_dict; upstream.json:",
        "architecture and vocabularies) for converting further days with `convert_more`.",
        "",
        f"Rows: {rows_summary(report['rows'])}.",
        "",
        "Full numbers (per-task AUC, label rates, row accounting) are in the JSON report.",
        "",
    ]
    return "\n".join(lines)
