"""Serving an exported policy: per-request fusion weights, fused scores and rankings.

:class:`FusionService` reads an export directory written by
:func:`grade_ray.serving.export.export_policy` (TorchScript + JSON; nothing is
unpickled) and answers, for a batch of requests::

    weights(context)                  context (B, D) -> w (B, K) on the simplex
    fused_scores(context, scores)     scores (B, N, K) -> s (B, N), s_i = sum_k w_k phi(p_ik)
    rank(context, scores)             -> (B, N) candidate indices, best first

Loading checks the export before answering anything: every file against
``manifest.json`` (metadata included), the metadata's structure, and the model on
test contexts (weights of the right shape, on the simplex). A damaged or edited
export raises :class:`RequestError`.

Input policy (bad requests raise :class:`RequestError`, never a wrong answer):

- arrays of any real numeric dtype (float16/32/64, signed/unsigned ints) are
  cast to float32; bool, complex, string and object arrays are rejected (a bool
  or string context is a caller bug, not a feature vector);
- shapes are checked: context (B, D) with D = the exported feature count,
  scores (B, N, K) with K = the exported task count (or one request's (N, K)
  with context (1, D)), mask (B, N) bool;
- NaN/inf (also values that overflow float32) are rejected naming the rows;
  padded (masked-out) candidates may hold anything;
- scores are checked as training checks them: a ``prob`` task in [0, 1], a
  ``value`` task >= 0 (``log_product`` fusion needs every score >= 0);
- every answer's weights are checked to be finite and on the simplex.

Work is done in bounded chunks (:data:`CHUNK_ROWS` requests through the network,
:data:`CHUNK_CELLS` request x candidate cells through the fusion), so memory beyond
the caller's arrays and the answer does not grow with the batch.

Backends are registered by name (``BACKENDS``): ``torchscript`` (the export),
``eager`` (the same weights in an in-framework :class:`FusionPolicy`, for
parity checks and benchmarks) and ``onnx`` (``policy.onnx`` from ``grade-ray export
--onnx`` through onnxruntime; the ``grade_ray[onnx]`` extra).
``grade-ray infer`` (:mod:`grade_ray.serving.infer`) scores session files;
``grade-ray serve`` (:mod:`grade_ray.serving.serve`) answers over HTTP with Ray Serve,
one ``FusionService`` per replica.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade_ray.algos.fusion import FUSIONS, fuse
from grade_ray.algos.registry import Registry
from grade_ray.data.sessions import TASK_KINDS, SessionMeta
from grade_ray.models.policy import FusionPolicy
from grade_ray.serving.export import (
    EXPORT_FORMAT_VERSION,
    METADATA_FILE,
    ONNX_EXTRA,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    RequestError,
    sha256_file,
    verify_export,
)

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FusionService", "RequestError", "serving_latency"]

CHUNK_ROWS = 16_384
"""Requests per call into the network (bounds its activations)."""
CHUNK_CELLS = 1 << 20
"""Request x candidate cells per fusion chunk (bounds the fusion's temporaries)."""
SIMPLEX_TOL = 1e-4
"""Served weights must be >= -tol and sum to 1 within tol."""

# Benchmark keys (milliseconds per ``weights()`` call on one request batch).
LAT_P50_B1 = "serving.p50_ms_b1"
LAT_P99_B1 = "serving.p99_ms_b1"
LAT_P50_B256 = "serving.p50_ms_b256"
LAT_P99_B256 = "serving.p99_ms_b256"
EAGER_PREFIX = "serving.eager_"  # same keys for the eager backend: serving.eager_p50_ms_b1 ...
ONNX_PREFIX = "serving.onnx_"  # and for onnxruntime, when the export has policy.onnx


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
    """The ONNX export (``grade-ray export --onnx``) through onnxruntime on as many CPU
    threads as torch uses at load time; needs the file and the package. The file must have
    the sha256 metadata.json records (metadata itself is covered by the manifest)."""
    entry = metadata["files"].get("onnx")
    if entry is None:
        raise RequestError(
            f"{export_dir} has no ONNX export; re-export with `grade-ray export RUN --out "
            f"{export_dir} --onnx`"
        )
    try:
        import onnxruntime as ort
    except ImportError:
        raise RequestError(
            f"the onnx backend needs the 'onnxruntime' package: {ONNX_EXTRA}"
        ) from None
    path = export_dir / ONNX_FILE
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise RequestError(
            f"{path} is missing or does not match the sha256 in {METADATA_FILE}; re-export it"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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


def _bad_rows(bad: np.ndarray, first: int = 0, limit: int = 5) -> str:
    rows = np.flatnonzero(bad) + first
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{rows[:limit].tolist()}{more}"


# ---------------------------------------------------------------------------
# Export metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """metadata.json, checked for what serving relies on; anything off raises
    :class:`RequestError` naming the file and the key."""
    try:
        md = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"{path} is not valid JSON ({e}); re-export the run") from None
    if not isinstance(md, dict):
        raise RequestError(f"{path} must hold a JSON object; re-export the run")
    version = md.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise RequestError(
            f"{path}: export format_version={version}; this grade_ray reads version "
            f"{EXPORT_FORMAT_VERSION} (re-export the run with this version)"
        )
    try:
        _check_metadata(md)
    except (KeyError, TypeError) as e:
        raise RequestError(f"{path}: missing or malformed {e}; re-export the run") from None
    except ValueError as e:
        raise RequestError(f"{path}: {e}; re-export the run") from None
    return md


def _check_metadata(md: dict[str, Any]) -> None:
    """Raise KeyError/TypeError/ValueError (naming the key) unless ``md`` is usable."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    def strings(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    ctx, tasks, fusion, arch = md["context"], md["tasks"], md["fusion"], md["architecture"]
    dim = ctx["dim"]
    need(isinstance(dim, int) and dim >= 1, f"context.dim={dim!r} must be an integer >= 1")
    need(strings(ctx["names"]) and len(ctx["names"]) in (0, dim), "context.names: D names")
    pre = ctx["preprocessing"]
    for key in ("mean", "std"):
        v = pre[key]
        need(
            isinstance(v, list) and len(v) == dim and all(_finite(x) for x in v),
            f"context.preprocessing.{key} must be {dim} finite numbers",
        )
    names, kinds = tasks["names"], tasks["kinds"]
    need(strings(names) and names and len(set(names)) == len(names), "tasks.names")
    need(strings(kinds) and len(kinds) == len(names), "tasks.kinds: one kind per task")
    need(all(k in TASK_KINDS for k in kinds), f"tasks.kinds {kinds}: valid {list(TASK_KINDS)}")
    need(fusion["form"] in FUSIONS, f"fusion.form={fusion['form']!r}: valid {FUSIONS.names()}")
    need(_finite(fusion["eps"]) and fusion["eps"] > 0, "fusion.eps must be a number > 0")
    need(
        arch["context_dim"] == dim and arch["num_tasks"] == len(names),
        "architecture.context_dim / num_tasks disagree with context.dim / tasks.names",
    )
    need(isinstance(md["files"], dict) and "torchscript" in md["files"], "files.torchscript")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
        self.task_kinds: tuple[str, ...] = tuple(metadata["tasks"]["kinds"])
        self.num_tasks: int = len(self.task_names)
        self.fusion: str = metadata["fusion"]["form"]
        self.fusion_eps: float = metadata["fusion"]["eps"]

    @classmethod
    def load(
        cls, export_dir: str | Path, backend: str = "torchscript", verify: bool = True
    ) -> FusionService:
        """Read ``export_dir`` (metadata.json + policy.ts). ``verify`` checks every file
        against manifest.json; the metadata and the model's answers are always checked."""
        d = Path(export_dir)
        md_path = d / METADATA_FILE
        if not md_path.exists():
            raise FileNotFoundError(
                f"no {METADATA_FILE} in {d} (write one with `grade-ray export`)"
            )
        if verify:
            verify_export(d)
        metadata = read_metadata(md_path)
        make = BACKENDS.get(backend)
        try:
            predict = make(d, metadata)
        except RequestError:
            raise
        except Exception as e:  # torch.jit / onnxruntime raise many kinds on a bad file
            raise RequestError(
                f"{d}: the {backend} model does not load ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); re-export"
            ) from e
        service = cls(predict, metadata, backend)
        service._self_test(d)
        log.info(
            "loaded %s policy from %s (D=%d, tasks %s, fusion %s)",
            backend,
            d,
            service.context_dim,
            list(service.task_names),
            service.fusion,
        )
        return service

    def _self_test(self, d: Path) -> None:
        """The model must map contexts around the training data to weights on the simplex."""
        pre = self.metadata["context"]["preprocessing"]
        mean, std = np.asarray(pre["mean"], np.float64), np.asarray(pre["std"], np.float64)
        x = (mean + np.array([[0.0], [1.0], [-1.0]]) * std).astype(np.float32)
        try:
            w = np.asarray(self._predict(x))
        except Exception as e:  # a model of another shape fails inside the backend
            raise RequestError(
                f"{d}: the model fails on {self.context_dim}-feature contexts "
                f"({type(e).__name__}); it does not match {METADATA_FILE}: re-export"
            ) from e
        if w.shape != (len(x), self.num_tasks) or not _on_simplex(w).all():
            raise RequestError(
                f"{d}: the model returns {w.shape} weights {np.round(w, 3).tolist()} for "
                f"contexts at the training mean, not {self.num_tasks} weights on the simplex "
                "per request; the export is damaged or not a fusion policy: re-export"
            )

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
        """Raise unless session data ``meta`` has this policy's tasks (names, order, kinds)
        and features."""
        if tuple(meta.task_names) != self.task_names:
            raise RequestError(
                f"data tasks {list(meta.task_names)} differ from the policy's "
                f"{list(self.task_names)} (names and order must match)"
            )
        if tuple(meta.task_kinds) != self.task_kinds:
            raise RequestError(
                f"data task kinds {list(meta.task_kinds)} differ from the policy's "
                f"{list(self.task_kinds)}"
            )
        if meta.context_dim != self.context_dim or (
            meta.context_names and self.context_names and meta.context_names != self.context_names
        ):
            raise RequestError(
                f"data context features {list(meta.context_names)} differ from the policy's "
                f"{list(self.context_names)}"
            )

    def _check_shapes(self, scores: Any, mask: Any, batch: int):
        """-> scores (B, N, K) float32, mask (B, N) bool or None (all real)."""
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
            return s, None
        try:
            m = np.asarray(mask)
        except ValueError as e:  # ragged nested lists
            raise RequestError(f"mask is not a rectangular array: {e}") from None
        if m.dtype != np.bool_:
            raise RequestError(
                f"mask must be a bool array (True = real candidate), got dtype {m.dtype}"
            )
        m = m[None] if single and m.ndim == 1 else m
        if m.shape != s.shape[:2]:
            raise RequestError(f"mask has shape {m.shape}, scores need {s.shape[:2]}")
        empty = ~m.any(axis=1) if m.shape[1] else np.zeros(len(m), bool)
        if empty.any():
            raise RequestError(
                f"mask marks no real candidate in requests {_bad_rows(empty)}: there is "
                "nothing to rank (send such requests without scores, or drop them)"
            )
        return s, m

    def _check_values(self, s: np.ndarray, m: np.ndarray, first: int) -> np.ndarray:
        """Rows of scores (b, N, K) with mask (b, N), starting at request ``first``; returns
        them with 0 where masked, or raises naming the requests."""
        bad = (~np.isfinite(s).all(axis=2) & m).any(axis=1)
        if bad.any():
            raise RequestError(
                f"NaN or inf in scores of real candidates in requests {_bad_rows(bad, first)}"
            )
        if self.fusion == "log_product":
            neg = ((s < 0).any(axis=2) & m).any(axis=1)
            if neg.any():
                raise RequestError(
                    f"negative scores in requests {_bad_rows(neg, first)}; log_product fusion "
                    "(sum_k w_k log(p_k + eps)) needs scores >= 0"
                )
        for k, (name, kind) in enumerate(zip(self.task_names, self.task_kinds)):
            v = s[..., k]
            out = ((v < 0) | (v > 1)) if kind == "prob" else (v < 0)
            bad = (out & m).any(axis=1)
            if bad.any():
                want = "a probability in [0, 1]" if kind == "prob" else "a value >= 0"
                raise RequestError(
                    f"task {name!r} must be {want} (as in training) but is not in requests "
                    f"{_bad_rows(bad, first)}"
                )
        return np.where(m[..., None], s, np.float32(0))

    # -- API ------------------------------------------------------------------
    def predict_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Checked contexts (B, D) float32 -> weights (B, K) float32 and (B,) bool rows whose
        weights are not finite (contexts far outside the training range). Runs in chunks of
        :data:`CHUNK_ROWS`; finite weights off the simplex raise (a damaged model)."""
        w = np.empty((len(x), self.num_tasks), dtype=np.float32)
        for a in range(0, len(x), CHUNK_ROWS):
            part = np.asarray(self._predict(x[a : a + CHUNK_ROWS]))
            if part.shape != (min(CHUNK_ROWS, len(x) - a), self.num_tasks):
                raise RequestError(f"the model returned shape {part.shape}; re-export it")
            w[a : a + len(part)] = part
        finite = np.isfinite(w).all(axis=1)
        off = finite & ~_on_simplex(w)
        if off.any():
            raise RequestError(
                f"the model gave weights off the simplex for context rows {_bad_rows(off)} "
                f"(e.g. {np.round(w[np.flatnonzero(off)[0]], 4).tolist()}); the export is "
                "damaged or not a fusion policy: re-export it"
            )
        return w, ~finite

    def weights(self, context: Any) -> np.ndarray:
        """context: (B, D) raw features -> fusion weights (B, K) float32, rows on the simplex."""
        x = self.check_context(context)
        if len(x) == 0:
            return np.zeros((0, self.num_tasks), dtype=np.float32)
        w, bad = self.predict_rows(x)
        if bad.any():
            raise RequestError(
                f"context rows {_bad_rows(bad)} gave non-finite weights (values far outside "
                "the training range overflow the network)"
            )
        return w

    def fuse(self, weights: np.ndarray, scores: Any, mask: Any = None) -> np.ndarray:
        """weights (B, K); scores (B, N, K) | (N, K); mask (B, N) | (N,) bool -> (B, N) float32.

        s_i = sum_k w_k phi(p_ik); masked-out candidates get -inf. Fused in chunks of
        :data:`CHUNK_CELLS` request x candidate cells.
        """
        w = as_real_float32(weights, "weights")
        if w.ndim != 2 or w.shape[1] != self.num_tasks:
            raise RequestError(f"weights must be (batch, {self.num_tasks}), got shape {w.shape}")
        off = ~(np.isfinite(w).all(axis=1) & _on_simplex(w))
        if off.any():
            raise RequestError(
                f"weights rows {_bad_rows(off)} are not on the simplex (finite, >= 0, "
                "summing to 1), e.g. "
                f"{np.round(w[np.flatnonzero(off)[0]], 4).tolist()}; pass FusionService.weights"
            )
        s, m = self._check_shapes(scores, mask, len(w))
        b, n = s.shape[:2]
        out = np.empty((b, n), dtype=np.float32)
        step = max(1, CHUNK_CELLS // max(n, 1))
        for a in range(0, b, step):
            mc = np.ones((min(step, b - a), n), bool) if m is None else m[a : a + step]
            sc = self._check_values(s[a : a + step], mc, a)
            out[a : a + step] = self._fuse_chunk(w[a : a + step], sc, mc)
        return out

    def _fuse_chunk(self, w: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
        """(b, K) weights, checked (b, N, K) scores, (b, N) mask -> (b, N), -inf where masked."""
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


def _on_simplex(w: np.ndarray) -> np.ndarray:
    """(B, K) -> (B,) rows that are weights on the simplex (within :data:`SIMPLEX_TOL`)."""
    with np.errstate(invalid="ignore"):
        return (w >= -SIMPLEX_TOL).all(axis=1) & (np.abs(w.sum(axis=1) - 1) <= SIMPLEX_TOL)


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

    Runs on ``threads`` torch (and onnxruntime) threads (restored afterwards), for the
    TorchScript export (``serving.p50_ms_b1`` ...), the eager in-framework policy
    (``serving.eager_p50_ms_b1`` ...) and, when the export has ``policy.onnx`` and
    onnxruntime is installed, onnxruntime (``serving.onnx_p50_ms_b1`` ...). Each timed
    call includes the input checks. Contexts are drawn around the exported feature mean/std.
    """
    import importlib.util

    backends = [("torchscript", "serving."), ("eager", EAGER_PREFIX)]
    has_onnx = read_metadata(Path(export_dir) / METADATA_FILE)["files"].get("onnx")
    if has_onnx and importlib.util.find_spec("onnxruntime") is not None:
        backends.append(("onnx", ONNX_PREFIX))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, float] = {}
        for backend, prefix in backends:
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
