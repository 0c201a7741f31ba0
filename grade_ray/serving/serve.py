"""``grade-ray serve EXPORT_DIR``: an exported policy as a Ray Serve application over HTTP.

One deployment (``FusionPolicy``) holds a :class:`~grade_ray.serving.service.FusionService`
per replica and answers at ``http://HOST:PORT/`` (``--host`` defaults to 127.0.0.1: nothing
beyond this machine reaches it unless asked)::

    GET  /   -> {"tasks": [...], "context": {"dim": D, "names": [...]}, "fusion": ..., ...}
    POST /   {"context": [[x_1 .. x_D], ...]}                       (B, D) raw features
             -> {"weights": [[w_1 .. w_K], ...], "tasks": [...]}
    POST /   {"context": (B, D), "scores": (B, N, K) | one request's (N, K),
              "mask": (B, N) | (N,) true = real candidate (optional)}
             -> + "fused_scores" (B, N) (null where masked) and "ranking" (B, N) candidate
                  indices, best first (masked ones last)

Answers are FusionService's (``weights``, ``fuse``, ``order``) and so are the input
checks: a bad request gets HTTP 400 with ``{"error": "<the one-line message>"}``, the
message FusionService raises for the same arrays (plus checks of the JSON itself: not
JSON, not an object, unknown or missing keys, a body over :data:`MAX_BODY_BYTES`).

The export's files travel to the replicas with the application (a few hundred kB), so a
cluster (``--address``) needs no shared file system; each replica checks them against the
manifest again when it loads. Without ``--address`` / ``RAY_ADDRESS`` Serve runs on the
embedded local Ray (:func:`grade_ray.raysession.init_ray`: loopback only). Needs the
``grade_ray[serve]`` extra (``ray[serve]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from grade_ray.config import UserError
from grade_ray.serving.export import MANIFEST_FILE, RequestError, verify_export
from grade_ray.serving.service import BACKENDS, FusionService

log = logging.getLogger(__name__)

APP_NAME = "grade_ray"
DEPLOYMENT_NAME = "FusionPolicy"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 16 << 20
"""Largest request body a replica reads (bounds its memory per request)."""
REQUEST_KEYS = ("context", "scores", "mask")
SERVE_EXTRA = "pip install 'grade_ray[serve]'"


def serve_missing() -> str | None:
    """Why Ray Serve cannot run here (its HTTP packages are missing), or None."""
    try:
        import ray.serve  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as e:
        return f"Ray Serve is not installed ({e}): {SERVE_EXTRA}"
    return None


# ---------------------------------------------------------------------------
# Requests and answers (plain functions: the deployment is a thin HTTP wrapper)


def parse_request(body: bytes) -> dict[str, Any]:
    """A request body -> its JSON object, checked for keys; :class:`RequestError` if not."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body has {len(body)} bytes, the limit is {MAX_BODY_BYTES}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not JSON ({e})") from None
    if not isinstance(payload, dict):
        raise RequestError(
            'request body must be a JSON object like {"context": [[...]], "scores": ...}, '
            f"got {type(payload).__name__}"
        )
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"unknown request keys {unknown}; expected {list(REQUEST_KEYS)}")
    if "context" not in payload:
        raise RequestError('request has no "context" (batch, D) array')
    if "mask" in payload and "scores" not in payload:
        raise RequestError('"mask" needs "scores" (it marks their real candidates)')
    for key in ("context", "scores"):  # numpy would read a true among numbers as 1.0
        if key in payload and _holds_bool(payload[key]):
            raise RequestError(f'"{key}" holds true/false; it takes numbers only')
    return payload


def _holds_bool(value: Any) -> bool:
    """Whether nested JSON lists hold a true or false anywhere."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, list):
            stack.extend(v)
    return False


def answer(service: FusionService, payload: dict[str, Any]) -> dict[str, Any]:
    """A parsed request -> the JSON answer, through ``service``'s checked API."""
    weights = service.weights(payload["context"])
    out: dict[str, Any] = {"tasks": list(service.task_names), "weights": weights.tolist()}
    if "scores" in payload:
        fused = service.fuse(weights, payload["scores"], payload.get("mask"))
        out["fused_scores"] = _json_floats(fused)
        out["ranking"] = service.order(fused).tolist()
    return out


def describe(service: FusionService) -> dict[str, Any]:
    """What ``GET /`` answers: the policy's inputs and outputs."""
    md = service.metadata
    return {
        "tasks": list(service.task_names),
        "task_kinds": list(service.task_kinds),
        "context": {"dim": service.context_dim, "names": list(service.context_names)},
        "fusion": md["fusion"],
        "backend": service.backend,
        "config_hash": md["training"]["config_hash"],
        "usage": 'POST {"context": (B, D), "scores": (B, N, K) optional, "mask": (B, N) optional}',
    }


def _json_floats(a: np.ndarray) -> list:
    """(B, N) float32 -> nested lists, -inf/NaN (masked candidates) as None (JSON null)."""
    obj = a.astype(object)
    obj[~np.isfinite(a)] = None
    return obj.tolist()


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------
# The deployment


def read_export(export_dir: str | Path) -> dict[str, bytes]:
    """The export's files (those its manifest lists, and the manifest), checked first."""
    d = Path(export_dir)
    names = [*verify_export(d), MANIFEST_FILE]
    return {n: (d / n).read_bytes() for n in names}


def deployment():
    """The Serve deployment class (built here: ``ray.serve`` is an optional extra)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name=DEPLOYMENT_NAME)
    class FusionDeployment:
        def __init__(self, files: dict[str, bytes], backend: str) -> None:
            self._dir = tempfile.TemporaryDirectory(prefix="grade_ray-serve-")
            for name, data in files.items():
                (Path(self._dir.name) / name).write_bytes(data)
            self.service = FusionService.load(self._dir.name, backend)  # verifies again

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse(describe(self.service))
            if request.method != "POST":
                return JSONResponse({"error": "use POST (or GET for a description)"}, 405)
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
                return JSONResponse(
                    {"error": f"request body has {size} bytes, the limit is {MAX_BODY_BYTES}"},
                    413,
                )
            try:
                return JSONResponse(answer(self.service, parse_request(await request.body())))
            except RequestError as e:
                return JSONResponse({"error": one_line(e)}, 400)
            except Exception as e:  # a bug, not a bad request: logged in the replica
                log.exception("request failed")
                return JSONResponse({"error": f"internal error ({type(e).__name__})"}, 500)

    return FusionDeployment


def deploy(
    export_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    backend: str = "torchscript",
    replicas: int = 1,
    replica_cpus: float = 1.0,
    address: str | None = None,
) -> str:
    """Start Serve (HTTP on ``host:port``) on the connected Ray, or on ``address``, or on an
    embedded local Ray, and deploy the export; returns its URL. The export is loaded here
    first, so a bad one fails with its one-line message before anything starts."""
    missing = serve_missing()
    if missing:
        raise UserError(missing)
    if replicas < 1 or replica_cpus < 0 or not 0 < port < 65536:
        raise UserError("--replicas must be >= 1, --replica-cpus >= 0, --port in 1..65535")
    FusionService.load(export_dir, backend)
    files = read_export(export_dir)

    from ray import serve

    from grade_ray.raysession import init_ray

    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    app = (
        deployment()
        .options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus})
        .bind(files, backend)
    )
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"


def shutdown(url: str | None = None, timeout: float = 30.0) -> bool:
    """Remove this application; stop Serve too when no other application runs on it (a
    shared cluster may serve others). Nothing to do when Ray or Serve is not running.

    With ``url`` (what :func:`deploy` returned), when Serve was stopped, wait up to
    ``timeout`` s for its HTTP port to stop accepting connections: Serve's proxy closes
    its socket a moment after ``serve.shutdown()`` returns, and a request in that window
    is accepted, then reset. Returns False only when the port still listens after that."""
    import ray

    if not ray.is_initialized():
        return True
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve never started (interrupted before serve.start)
        return True
    if APP_NAME in apps:
        serve.delete(APP_NAME)
    if set(apps) <= {APP_NAME}:
        serve.shutdown()
        if url is not None:
            return _wait_closed(url, timeout)
    return True


def _wait_closed(url: str, timeout: float) -> bool:
    """Poll ``url``'s host:port until a TCP connect is refused (True) or ``timeout`` s."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    # a wildcard bind answers on loopback
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        parts.hostname or "", parts.hostname
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, parts.port), timeout=1.0):
                pass
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# CLI


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    # `kill PID` (and a container stop) stops it like Ctrl-C, from the start: Ray's driver
    # would otherwise exit on SIGTERM without removing the application.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    url = None
    try:
        url = deploy(
            args.export_dir,
            host=args.host,
            port=args.port,
            backend=args.backend,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            address=args.address,
        )
        print(f"serving {args.export_dir} at {url} (Ctrl-C or SIGTERM stops it)", flush=True)
        print(
            f'  curl -s {url} -d \'{{"context": [[...D values...]], "scores": [[...K '
            "values per candidate...]]}'",
            flush=True,
        )
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not shutdown(url):
        print(f"warning: Serve stopped, but {url} still accepts connections", file=sys.stderr)
    print("stopped", flush=True)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``grade-ray serve EXPORT_DIR [--port 8000] [--host 127.0.0.1] [--address ...]``."""
    p = subparsers.add_parser(
        "serve", help="serve an exported policy over HTTP with Ray Serve (grade_ray[serve])"
    )
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory from `grade-ray export`")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default 8000)")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address the HTTP proxy binds (default 127.0.0.1; 0.0.0.0 opens it to the network)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)",
    )
    p.add_argument("--backend", choices=BACKENDS.names(), default="torchscript")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the deployment")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    p.set_defaults(fn=cmd_serve)
