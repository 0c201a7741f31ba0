"""Serving an exported policy: per-request fusion weights, fused scores and rankings.

:class:`FusionService` reads an export directory written by
:func:`grade_ray.serving.export.export_policy` (TorchScript + JSON; nothing is
unpickled) and answers, for a batch of requests::

    weights(context)                  context (B, D) -> w (B, K) on the simplex
    fused_scores(context, scores)     scores (B, N, K) -> s (B, N), s_i = sum_k w_k phi(p_ik)
    rank(context, scores)             -> (B, N) candidate indices, best first

Input policy (bad requests raise :class:`RequestError`, never a wrong answer):

- arrays of any real numeric dtype (float16/32/64, signed/unsigned ints) are
  cast to float32; bool, complex, string and object arrays are rejected (a bool
  or string context is a caller bug, not a feature vector);
- shapes are checked: context (B, D) with D = the exported feature count,
  scores (B, N, K) with K = the exported task count (or one request's (N, K)
  with context (1, D)), mask (B, N) bool;
- NaN/inf (also values that overflow float32) are rejected naming the rows;
  padded (masked-out) candidates may hold anything;
- ``log_product`` fusion needs scores >= 0 on real candidates.

Backends are registered by name (``BACKENDS``): ``torchscript`` (the export),
``eager`` (the same weights in an in-framework :class:`FusionPolicy`, for
parity checks and benchmarks) and ``onnx`` (only where onnxruntime and an ONNX
file exist). Ray Serve is not wired in: ``ray.serve`` does not import in this
environment (its HTTP dependencies are not installed); a deployment would hold
one ``FusionService`` per replica and call :meth:`FusionService.rank`.

``grade-ray infer EXPORT_DIR --data SESSIONS --out OUT.parquet`` scores
logged sessions in bounded memory and writes one row per request.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.algos.registry import Registry
from grade_ray.data.schema import (
    ReadReport,
    SchemaError,
    SessionMeta,
    iter_batches,
    list_files,
    read_meta,
)
from grade_ray.models.policy import FusionPolicy
from grade_ray.runlog import Progress
from grade_ray.serving.export import (
    EXPORT_FORMAT_VERSION,
    METADATA_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    sha256_file,
)

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

# Benchmark keys (milliseconds per ``weights()`` call on one request batch).
LAT_P50_B1 = "serving.p50_ms_b1"
LAT_P99_B1 = "serving.p99_ms_b1"
LAT_P50_B256 = "serving.p50_ms_b256"
LAT_P99_B256 = "serving.p99_ms_b256"
EAGER_PREFIX = "serving.eager_"  # same keys for the eager backend: serving.eager_p50_ms_b1 ...


class RequestError(ValueError):
    """A serving request the policy cannot answer correctly; the message says how to fix it."""


# ---------------------------------------------------------------------------
# Backends: fn(export_dir, metadata) -> predict, predict: (B, D) float32 -> (B, K) float32

Predict = Callable[[np.ndarray], np.ndarray]
BACKENDS: Registry[Callable[[Path, dict[str, Any]], Predict]] = Registry("serving backend")


def _load_torchscript(export_dir: Path) -> torch.jit.ScriptModule:
    return torch.jit.load(str(export_dir / TORCHSCRIPT_FILE), map_location="cpu").eval()


@BACKENDS.register("torchscript")
def torchscript_backend(export_dir: Path, metadata: dict[str, Any]) -> Predict:
    """The exported TorchScript module."""
    module = _load_torchscript(export_dir)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return predict


@BACKENDS.register("eager")
def eager_backend(export_dir: Path, metadata: dict[str, Any]) -> Predict:
    """A plain :class:`FusionPolicy` holding the exported module's weights."""
    arch = metadata["architecture"]
    policy = FusionPolicy(
        arch["context_dim"],
        arch["num_tasks"],
        num_experts=arch["num_experts"],
        expert_hidden=arch["expert_hidden"],
    )
    prefix = "policy."
    state = {
        k[len(prefix) :]: v
        for k, v in _load_torchscript(export_dir).state_dict().items()
        if k.startswith(prefix)
    }
    policy.load_state_dict(state)
    policy.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return policy.pi(torch.from_numpy(x)).numpy()

    return predict


@BACKENDS.register("onnx")
def onnx_backend(export_dir: Path, metadata: dict[str, Any]) -> Predict:
    """The ONNX export through onnxruntime (needs both the file and the package)."""
    if metadata["files"].get("onnx") is None:
        raise RequestError(f"{export_dir} has no ONNX export ({'; '.join(metadata['notes'])})")
    try:
        import onnxruntime as ort
    except ImportError:
        raise RequestError("the onnx backend needs the 'onnxruntime' package") from None
    sess = ort.InferenceSession(str(export_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    name = metadata["input"]["name"]

    def predict(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    return predict


# ---------------------------------------------------------------------------
# Input checks


def as_real_float32(a: Any, name: str) -> np.ndarray:
    """Any real numeric array-like -> float32 ndarray; bool/complex/str/object raise.

    Values that overflow float32 become inf and are caught by the finiteness checks.
    """
    try:
        arr = np.asarray(a)
    except ValueError as e:  # ragged nested lists
        raise RequestError(f"{name} is not a rectangular array: {e}") from None
    if arr.dtype.kind not in "fiu":
        raise RequestError(
            f"{name} has dtype {arr.dtype}; pass a real numeric array (float or int, cast to "
            "float32). bool, complex, string and object arrays are rejected"
        )
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # torch.from_numpy wants writable memory


def _bad_rows(bad: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(bad)
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{rows[:limit].tolist()}{more}"


class FusionService:
    """An exported fusion policy behind a checked numpy API.

    Build with :meth:`load`. ``backend`` picks the executor (``BACKENDS``).
    """

    def __init__(self, predict: Predict, metadata: dict[str, Any], backend: str) -> None:
        self._predict = predict
        self.metadata = metadata
        self.backend = backend
        self.context_dim: int = metadata["context"]["dim"]
        self.context_names: tuple[str, ...] = tuple(metadata["context"]["names"])
        self.task_names: tuple[str, ...] = tuple(metadata["tasks"]["names"])
        self.num_tasks: int = len(self.task_names)
        self.fusion: str = metadata["fusion"]["form"]
        self.fusion_eps: float = metadata["fusion"]["eps"]

    @classmethod
    def load(
        cls, export_dir: str | Path, backend: str = "torchscript", verify: bool = True
    ) -> FusionService:
        """Read ``export_dir`` (metadata.json + policy.ts); ``verify`` checks file sha256s."""
        d = Path(export_dir)
        md_path = d / METADATA_FILE
        if not md_path.exists():
            raise FileNotFoundError(
                f"no {METADATA_FILE} in {d} (write one with `grade-ray export`)"
            )
        metadata = json.loads(md_path.read_text())
        version = metadata.get("format_version")
        if version != EXPORT_FORMAT_VERSION:
            raise RequestError(
                f"{md_path}: export format_version={version}; this grade_ray reads version "
                f"{EXPORT_FORMAT_VERSION} (re-export the run with this version)"
            )
        if verify:
            for kind, f in metadata["files"].items():
                if f is None:
                    continue
                got = sha256_file(d / f["path"])
                if got != f["sha256"]:
                    raise RequestError(
                        f"{d / f['path']} ({kind}) does not match the sha256 in {md_path}; "
                        "the export was modified or truncated: re-export it"
                    )
        predict = BACKENDS.get(backend)(d, metadata)
        log.info(
            "loaded %s policy from %s (D=%d, tasks %s, fusion %s)",
            backend,
            d,
            metadata["context"]["dim"],
            metadata["tasks"]["names"],
            metadata["fusion"]["form"],
        )
        return cls(predict, metadata, backend)

    # -- checks ---------------------------------------------------------------
    def check_context(self, context: Any) -> np.ndarray:
        """context: (B, D) real numeric -> (B, D) float32, or :class:`RequestError`."""
        x = as_real_float32(context, "context")
        if x.ndim != 2:
            hint = " (one request: context[None, :])" if x.ndim == 1 else ""
            raise RequestError(
                f"context must be 2-D (batch, {self.context_dim}), got shape {x.shape}{hint}"
            )
        if x.shape[1] != self.context_dim:
            raise RequestError(
                f"context has {x.shape[1]} features per request, the policy expects "
                f"{self.context_dim} ({', '.join(self.context_names[:8])}"
                f"{', ...' if self.context_dim > 8 else ''})"
            )
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise RequestError(
                f"NaN or inf in context (after casting to float32) at rows {_bad_rows(bad)}"
            )
        return x

    def check_meta(self, meta: SessionMeta) -> None:
        """Raise unless session data ``meta`` has this policy's tasks (in order) and features."""
        if tuple(meta.task_names) != self.task_names:
            raise RequestError(
                f"data tasks {list(meta.task_names)} differ from the policy's "
                f"{list(self.task_names)} (names and order must match)"
            )
        if meta.context_dim != self.context_dim or (
            meta.context_names and self.context_names and meta.context_names != self.context_names
        ):
            raise RequestError(
                f"data context features {list(meta.context_names)} differ from the policy's "
                f"{list(self.context_names)}"
            )

    def _check_scores(self, scores: Any, mask: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """-> scores (B, N, K) float32 (0 where masked), mask (B, N) bool."""
        s = as_real_float32(scores, "scores")
        single = s.ndim == 2
        if single:
            s = s[None]
        if s.ndim != 3:
            raise RequestError(
                f"scores must be (batch, candidates, {self.num_tasks}) or one request's "
                f"(candidates, {self.num_tasks}), got shape {s.shape}"
            )
        if s.shape[2] != self.num_tasks:
            raise RequestError(
                f"scores have {s.shape[2]} tasks per candidate, the policy fuses "
                f"{self.num_tasks} ({', '.join(self.task_names)}, in this order)"
            )
        if s.shape[0] != batch:
            raise RequestError(
                f"scores are for {s.shape[0]} request(s) but context has {batch} row(s)"
                + (
                    " (a single request's (N, K) scores need context of shape (1, D))"
                    if single
                    else ""
                )
            )
        if mask is None:
            m = np.ones(s.shape[:2], dtype=bool)
        else:
            m = np.asarray(mask)
            if m.dtype != np.bool_:
                raise RequestError(
                    f"mask must be a bool array (True = real candidate), got dtype {m.dtype}"
                )
            m = m[None] if single and m.ndim == 1 else m
            if m.shape != s.shape[:2]:
                raise RequestError(f"mask has shape {m.shape}, scores need {s.shape[:2]}")
        bad = (~np.isfinite(s).all(axis=2) & m).any(axis=1)
        if bad.any():
            raise RequestError(
                f"NaN or inf in scores of real candidates in requests {_bad_rows(bad)}"
            )
        if self.fusion == "log_product":
            neg = ((s < 0).any(axis=2) & m).any(axis=1)
            if neg.any():
                raise RequestError(
                    f"negative scores in requests {_bad_rows(neg)}; log_product fusion "
                    "(sum_k w_k log(p_k + eps)) needs scores >= 0"
                )
        return np.where(m[..., None], s, np.float32(0)), m

    # -- API ------------------------------------------------------------------
    def weights(self, context: Any) -> np.ndarray:
        """context: (B, D) raw features -> fusion weights (B, K) float32, rows on the simplex."""
        x = self.check_context(context)
        if len(x) == 0:
            return np.zeros((0, self.num_tasks), dtype=np.float32)
        w = self._predict(x)
        bad = ~np.isfinite(w).all(axis=1)
        if bad.any():
            raise RequestError(
                f"context rows {_bad_rows(bad)} gave non-finite weights (values far outside "
                "the training range overflow the network)"
            )
        return w

    def fuse(self, weights: np.ndarray, scores: Any, mask: Any = None) -> np.ndarray:
        """weights (B, K); scores (B, N, K) | (N, K); mask (B, N) | (N,) bool -> (B, N) float32.

        s_i = sum_k w_k phi(p_ik); masked-out candidates get -inf.
        """
        w = as_real_float32(weights, "weights")
        if w.ndim != 2 or w.shape[1] != self.num_tasks:
            raise RequestError(f"weights must be (batch, {self.num_tasks}), got shape {w.shape}")
        s, m = self._check_scores(scores, mask, len(w))
        fused = fuse(self.fusion, torch.from_numpy(s), torch.from_numpy(w), self.fusion_eps)
        return np.where(m, fused.numpy(), np.float32(-np.inf))

    def fused_scores(self, context: Any, scores: Any, mask: Any = None) -> np.ndarray:
        """context (B, D); scores (B, N, K), or one request's (N, K) with context (1, D);
        mask (B, N) | (N,) bool -> fused scores (B, N) float32 (-inf where masked)."""
        return self.fuse(self.weights(context), scores, mask)

    @staticmethod
    def order(fused: np.ndarray) -> np.ndarray:
        """fused (B, N) -> (B, N) int64 candidate indices, best first; ties keep logged order,
        -inf (masked) last."""
        return np.argsort(-fused, axis=1, kind="stable")

    def rank(self, context: Any, scores: Any, mask: Any = None) -> np.ndarray:
        """Same inputs as :meth:`fused_scores` -> (B, N) int64 candidate order (indices into
        each request's candidate list), best first; masked candidates come last."""
        return self.order(self.fused_scores(context, scores, mask))


# ---------------------------------------------------------------------------
# Batch inference over logged sessions


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


def run_infer(
    export_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4096,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    backend: str = "torchscript",
) -> dict[str, Any]:
    """Score every request in ``data`` (Parquet file/dir) and write ``out`` (Parquet).

    Streams ``batch_size`` requests at a time (memory bounded by one batch);
    output rows: request_id, weights (K,), ranking (N_q,) candidate indices best
    first. Returns the read accounting and timing.
    """
    service = FusionService.load(export_dir, backend)
    files = list_files(data)
    service.check_meta(read_meta(files[0]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if on_error == "reject" and rejects_path is None:
        rejects_path = out.with_name(out.stem + ".rejects.parquet")
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    progress = Progress("infer", total)
    report = ReadReport()
    schema = _out_schema(service, export_dir, data)
    t0 = time.perf_counter()
    batches = iter_batches(data, batch_size, on_error, rejects_path, report, files)
    written = _write_scored(service, batches, report, progress, schema, out)
    seconds = time.perf_counter() - t0
    log.info("infer: %s; wrote %d rows to %s in %.1fs", report.summary(), written, out, seconds)
    return {
        "rows_read": report.rows_read,
        "rows_used": report.rows_used,
        "rows_rejected": report.rows_rejected,
        "rows_written": written,
        "rejects_path": report.rejects_path,
        "out": str(out),
        "seconds": seconds,
    }


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


def _write_scored(
    service: FusionService,
    batches,
    report: ReadReport,
    progress: Progress,
    schema: pa.Schema,
    out: Path,
) -> int:
    """Weights and rankings of every batch into ``out`` (written aside, then moved into
    place); returns the rows written. Progress counts the rows read (rejects included)."""
    tmp = out.with_name(out.name + ".tmp")
    written, seen = 0, 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for b in batches:
            w = service.weights(b.context)
            order = service.order(service.fuse(w, b.scores, b.mask))
            writer.write_table(
                _result_table(b.request_id, w, order, b.mask.sum(axis=1)).cast(schema)
            )
            written += len(b)
            progress.update(report.rows_read - seen)
            seen = report.rows_read
    tmp.replace(out)
    return written


# ---------------------------------------------------------------------------
# Latency benchmark


def _percentiles_ms(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t0
    return float(np.percentile(times, 50) / 1e6), float(np.percentile(times, 99) / 1e6)


def serving_latency(
    export_dir: str | Path,
    threads: int = 1,
    repeats_b1: int = 500,
    repeats_b256: int = 200,
    warmup: int = 50,
) -> dict[str, float]:
    """p50/p99 latency (ms) of :meth:`FusionService.weights` for batch 1 and 256.

    Runs on ``threads`` torch threads (restored afterwards), for the TorchScript
    export (``serving.p50_ms_b1`` ...) and the eager in-framework policy
    (``serving.eager_p50_ms_b1`` ...). Each timed call includes the input
    checks. Contexts are drawn around the exported feature mean/std.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, float] = {}
        for backend, prefix in (("torchscript", "serving."), ("eager", EAGER_PREFIX)):
            service = FusionService.load(export_dir, backend)
            pre = service.metadata["context"]["preprocessing"]
            rng = np.random.default_rng(0)
            mean, std = np.asarray(pre["mean"]), np.asarray(pre["std"])
            for b, reps in ((1, repeats_b1), (256, repeats_b256)):
                x = (mean + std * rng.standard_normal((b, len(mean)))).astype(np.float32)
                p50, p99 = _percentiles_ms(lambda x=x, s=service: s.weights(x), warmup, reps)
                out[f"{prefix}p50_ms_b{b}"] = p50
                out[f"{prefix}p99_ms_b{b}"] = p99
        log.info("serving latency (%d thread(s)): %s", threads, out)
        return out
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------
# CLI


def cmd_infer(args: argparse.Namespace) -> int:
    try:
        result = run_infer(
            args.export_dir,
            args.data,
            args.out,
            batch_size=args.batch_size,
            on_error=args.on_error,
            rejects_path=args.rejects,
            backend=args.backend,
        )
    except (RequestError, SchemaError) as e:
        print(f"grade-ray: error: {e}", file=sys.stderr)
        return 2
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
        "--on-error",
        choices=("raise", "reject"),
        default="raise",
        help="bad input rows: stop (default) or set aside to a rejects file and count them",
    )
    p.add_argument("--rejects", help="rejects file (default OUT.rejects.parquet)")
    p.add_argument("--backend", choices=BACKENDS.names(), default="torchscript")
    p.set_defaults(fn=cmd_infer)
