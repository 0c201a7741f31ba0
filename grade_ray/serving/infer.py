"""``grade-ray infer EXPORT_DIR --data SESSIONS --out OUT.parquet``: batch scoring of logged
sessions with an exported policy, in bounded memory.

Rows are validated as training validates them (:func:`grade_ray.data.reading.iter_validated`:
the same checks, ``--max-candidates``), read ``--batch-size`` at a time and cut where one
long candidate list would pad the rest (:func:`~grade_ray.data.reading.length_segments`).
Each request gives one output row: request_id, weights (K,) and ranking (its candidate
indices, best first). Rows whose context drives the network to non-finite weights are bad
rows too. Bad rows stop the run naming file, row (in the source file) and column, or with
``--on-error reject`` go to the rejects file (default ``OUT.rejects.parquet``) with the
reason and their source row, and are counted. The output is written aside and moved into
place at the end; a failed run leaves no partial output. Neither file may go into the
input data directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade_ray.data.reading import (
    ValidatedChunk,
    file_meta,
    iter_validated,
    length_segments,
    list_files,
    parquet_metadata,
    row_lengths,
)
from grade_ray.data.sessions import CONTEXT, SchemaError, SessionMeta, table_to_batch
from grade_ray.data.validation import MAX_CANDIDATES, ReadReport, RejectsWriter, rejects_table
from grade_ray.runlog import Progress
from grade_ray.serving.service import BACKENDS, FusionService, RequestError

log = logging.getLogger(__name__)

# Columns of the `grade-ray infer` output.
OUT_REQUEST_ID = "request_id"  # int64
OUT_WEIGHTS = "weights"  # list<float32>, K values in the export's task order
OUT_RANKING = "ranking"  # list<int32>, candidate indices (logged order) best first
OUT_META_KEY = b"grade_ray_infer"
OUT_SCHEMA = pa.schema(
    [
        pa.field(OUT_REQUEST_ID, pa.int64(), nullable=False),
        pa.field(OUT_WEIGHTS, pa.list_(pa.float32()), nullable=False),
        pa.field(OUT_RANKING, pa.list_(pa.int32()), nullable=False),
    ]
)
NONFINITE = "gives non-finite weights (values far outside the training range)"


def _result_table(
    request_id: np.ndarray, weights: np.ndarray, order: np.ndarray, lengths: np.ndarray
) -> pa.Table:
    """(B,) ids, (B, K) weights, (B, N) order, (B,) real candidates -> one row per request."""
    b, k = weights.shape
    keep = np.arange(order.shape[1])[None, :] < lengths[:, None]  # masked ones sort last
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.Table.from_arrays(
        [
            pa.array(request_id, pa.int64()),
            pa.ListArray.from_arrays(
                pa.array(np.arange(b + 1, dtype=np.int32) * k),
                pa.array(weights.reshape(-1), pa.float32()),
            ),
            pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(order[keep].astype(np.int32), pa.int32())
            ),
        ],
        schema=OUT_SCHEMA,
    )


def _outside(path: Path, data: Path, what: str) -> None:
    """Refuse to write ``path`` over the input data file or into the input directory."""
    if data.is_dir():
        if path.resolve().is_relative_to(data.resolve()):
            raise RequestError(
                f"{what} {path} is inside the input data directory {data}; write it elsewhere "
                "(a later read of the directory would take it for session data)"
            )
    elif path.resolve() == data.resolve():
        raise RequestError(f"{what} {path} is the input data file; write it elsewhere")


def run_infer(
    export_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    backend: str = "torchscript",
    max_candidates: int = MAX_CANDIDATES,
) -> dict[str, Any]:
    """Score every request in ``data`` (Parquet file/dir) and write ``out`` (Parquet).

    Streams ``batch_size`` requests at a time (memory bounded by one batch and
    ``max_candidates``); output rows: request_id, weights (K,), ranking (N_q,) candidate
    indices best first. Returns the read accounting and timing.
    """
    if batch_size < 1 or max_candidates < 1:
        raise RequestError("--batch-size and --max-candidates must be >= 1")
    service = FusionService.load(export_dir, backend)
    files = list_files(data)
    meta = file_meta(files[0])
    try:
        service.check_meta(meta)
    except RequestError as e:
        raise RequestError(f"{files[0]}: {e}") from None
    out, rejects_path = _output_paths(Path(out), Path(data), on_error, rejects_path)
    total = sum(parquet_metadata(f).num_rows for f in files)
    report = ReadReport()
    rejects = RejectsWriter(rejects_path if on_error == "reject" else None)
    chunks = iter_validated(
        data,
        batch_size,
        on_error,
        report=report,
        files=files,
        max_candidates=max_candidates,
        rejects=rejects,
    )
    t0 = time.perf_counter()
    scorer = _Scorer(service, meta, rejects, report, on_error)
    complete = False
    try:
        written = _write(
            scorer, chunks, Progress("infer", total), _out_schema(service, export_dir, data), out
        )
        complete = True
    finally:
        rejects.close(complete)
    seconds = time.perf_counter() - t0
    log.info("infer: %s; wrote %d rows to %s in %.1fs", report.summary(), written, out, seconds)
    return {
        "rows_read": report.rows_read,
        "rows_used": report.rows_used,
        "rows_rejected": report.rows_rejected,
        "rows_written": written,
        "rejects_path": str(rejects_path) if report.rows_rejected and rejects_path else None,
        "reasons": dict(report.reasons),
        "out": str(out),
        "seconds": seconds,
    }


def _output_paths(
    out: Path, data: Path, on_error: str, rejects_path: str | Path | None
) -> tuple[Path, str | Path | None]:
    """The output and rejects paths (default rejects: ``OUT.rejects.parquet`` beside the
    output), refused inside the input data directory; creates the output's directory."""
    if on_error == "reject" and rejects_path is None:
        rejects_path = out.with_name(out.stem + ".rejects.parquet")
    _outside(out, data, "--out")
    if rejects_path is not None:
        _outside(Path(rejects_path), data, "the rejects file")
        if Path(rejects_path).resolve() == out.resolve():
            raise RequestError(
                f"the rejects file {rejects_path} is the --out file; give them different paths"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, rejects_path


def _out_schema(service: FusionService, export_dir: str | Path, data: str | Path) -> pa.Schema:
    """:data:`OUT_SCHEMA` with what produced the scores (tasks, fusion, config hash, inputs)."""
    provenance = {
        "tasks": list(service.task_names),
        "fusion": service.metadata["fusion"],
        "config_hash": service.metadata["training"]["config_hash"],
        "export_dir": str(export_dir),
        "data": str(data),
    }
    return OUT_SCHEMA.with_metadata({OUT_META_KEY: json.dumps(provenance).encode()})


def _write(scorer: _Scorer, chunks, progress: Progress, schema: pa.Schema, out: Path) -> int:
    """Score every chunk into ``out`` (written aside, then moved into place; removed if
    anything fails); returns the rows written."""
    tmp = out.with_name(out.name + ".tmp")
    written = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in chunks:
                for table in scorer.score(chunk):
                    writer.write_table(table.cast(schema))
                    written += table.num_rows
                progress.update(len(chunk.kept))
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


class _Scorer:
    """Weights and rankings of validated chunks; rows the network cannot score are bad rows
    (raised naming their source row, or rejected into the read's rejects file)."""

    def __init__(
        self,
        service: FusionService,
        meta: SessionMeta,
        rejects: RejectsWriter,
        report: ReadReport,
        on_error: str,
    ) -> None:
        self.service, self.meta, self.rejects = service, meta, rejects
        self.report, self.on_error = report, on_error

    def score(self, chunk: ValidatedChunk):
        rows = chunk.rows
        for a, b in length_segments(row_lengths(chunk.good)):
            part = chunk.good.slice(a, b - a)
            batch = table_to_batch(part, self.meta)
            w, bad = self.service.predict_rows(self.service.check_context(batch.context))
            if bad.any():
                keep = np.flatnonzero(~bad)
                self._bad_rows(chunk.file, part, rows[a:b], np.flatnonzero(bad))
                batch, w = batch.take(keep).trim(), w[keep]
            if len(batch) == 0:
                continue
            order = self.service.order(self.service.fuse(w, batch.scores, batch.mask))
            yield _result_table(batch.request_id, w, order, batch.mask.sum(axis=1))

    def _bad_rows(self, file: str, part: pa.Table, src: np.ndarray, idx: np.ndarray) -> None:
        if self.on_error == "raise":
            raise SchemaError(
                f"{file}: row {int(src[idx[0]])}, column {CONTEXT!r}: {NONFINITE} "
                f"({len(idx)} such row(s) here; --on-error reject sets them aside)"
            )
        reason = f"{CONTEXT}: {NONFINITE}"
        self.rejects.write(
            rejects_table(part.take(pa.array(idx)), [reason] * len(idx), file, src[idx])
        )
        self.report.rows_used -= len(idx)
        self.report.rows_rejected += len(idx)
        self.report.reasons[reason] = self.report.reasons.get(reason, 0) + len(idx)


# ---------------------------------------------------------------------------
# CLI


def cmd_infer(args: argparse.Namespace) -> int:
    result = run_infer(
        args.export_dir,
        args.data,
        args.out,
        batch_size=args.batch_size,
        on_error=args.on_error,
        rejects_path=args.rejects,
        backend=args.backend,
        max_candidates=args.max_candidates,
    )
    print(json.dumps(result, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``grade-ray infer EXPORT_DIR --data SESSIONS --out OUT.parquet``."""
    p = subparsers.add_parser(
        "infer", help="batch-score logged sessions with an exported policy (weights + ranking)"
    )
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory from `grade-ray export`")
    p.add_argument("--data", required=True, help="session Parquet file or directory")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--batch-size", type=int, default=4096, help="requests per streamed batch")
    p.add_argument(
        "--max-candidates",
        type=int,
        default=MAX_CANDIDATES,
        help=f"longest candidate list a request may have (default {MAX_CANDIDATES})",
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "reject"),
        default="raise",
        help="bad input rows: stop (default) or set aside to a rejects file and count them",
    )
    p.add_argument("--rejects", help="rejects file (default OUT.rejects.parquet)")
    p.add_argument("--backend", choices=BACKENDS.names(), default="torchscript")
    p.set_defaults(fn=cmd_infer)
