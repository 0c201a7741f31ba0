"""The Ray Serve part of ``grade-ray bench``: HTTP latency and throughput of ``grade-ray
serve`` under a bounded loopback load.

The export is deployed (one replica, TorchScript) on the bench's Ray with its HTTP proxy on
127.0.0.1; for each client count (1 and 8) the clients send :data:`REQUESTS` requests in
all (split evenly), each a one-request ranking call (context (1, D) + scores of
:data:`CANDIDATES` candidates), over one keep-alive connection per client, after
:data:`WARMUP` untimed requests. Latency is per request, as the client sees it (JSON
encoding excluded, the client threads' own Python time included: the clients share the
machine and the GIL with nothing else of the bench running); requests/s = requests /
wall time of the level. Keys ``serve.c{N}.p50_ms``, ``.p99_ms``, ``.requests_per_s``. Only
when the ``grade_ray[serve]`` extra is installed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REQUESTS = 200
CLIENTS = (1, 8)
CANDIDATES = 100
WARMUP = 20


def request_body(export_dir: str | Path, candidates: int = CANDIDATES, seed: int = 0) -> bytes:
    """One ranking request for the export: a context around its training mean and
    ``candidates`` candidates' scores in [0, 1)."""
    md = json.loads((Path(export_dir) / "metadata.json").read_text())
    pre = md["context"]["preprocessing"]
    rng = np.random.default_rng(seed)
    mean, std = np.asarray(pre["mean"]), np.asarray(pre["std"])
    x = mean + std * rng.standard_normal(len(mean))
    s = rng.uniform(0.0, 1.0, (candidates, len(md["tasks"]["names"])))
    return json.dumps({"context": [x.tolist()], "scores": s.tolist()}).encode()


def _client(host: str, port: int, body: bytes, n: int, out: list[float], start) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/json"}
    try:
        start.wait()
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            out.append(time.perf_counter() - t0)
            if resp.status != 200:
                raise RuntimeError(f"serve answered {resp.status}: {data[:200]!r}")
    finally:
        conn.close()


def load(url: str, body: bytes, requests: int, clients: int) -> dict[str, float]:
    """``requests`` POSTs of ``body`` to ``url`` from ``clients`` threads -> p50/p99 (ms),
    requests/s."""
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    per = [requests // clients + (i < requests % clients) for i in range(clients)]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        try:
            _client(host, int(port), body, per[i], lat[i], start)
        except BaseException as e:
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: raised below
        start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    ms = np.concatenate([np.asarray(x) for x in lat]) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests_per_s": float(len(ms) / wall),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_serve(
    export_dir: str | Path,
    requests: int = REQUESTS,
    clients: tuple[int, ...] = CLIENTS,
    warmup: int = WARMUP,
) -> dict[str, Any]:
    """Deploy ``export_dir`` with Ray Serve on the connected Ray, measure, shut it down.
    Returns {} (and logs why) when ray[serve] is not installed."""
    from grade_ray.serving.serve import deploy, serve_missing, shutdown

    missing = serve_missing()
    if missing:
        log.info("skipping the Serve benchmark: %s", missing)
        return {}
    url = deploy(export_dir, port=_free_port(), replica_cpus=0.5)
    try:
        body = request_body(export_dir)
        load(url, body, warmup, 1)
        out: dict[str, Any] = {
            "serve.requests_per_level": float(requests),
            "serve.candidates": float(CANDIDATES),
            "serve.load_avg_1m": os.getloadavg()[0],
        }
        for c in clients:
            for k, v in load(url, body, requests, c).items():
                out[f"serve.c{c}.{k}"] = v
        log.info("serve latency: %s", out)
        return out
    finally:
        shutdown(url)
