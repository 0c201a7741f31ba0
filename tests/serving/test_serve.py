"""``grade-ray serve``: the request handling (always) and the Ray Serve application over real
HTTP on the shared local Ray (needs the grade_ray[serve] extra)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from grade_ray.cli import main
from grade_ray.serving.export import export_policy
from grade_ray.serving.serve import MAX_BODY_BYTES, _wait_closed, answer, parse_request
from grade_ray.serving.service import FusionService, RequestError

SERVE_REASON = (
    "the grade_ray[serve] extra (ray[serve]) is not installed: pip install 'grade_ray[serve]'"
)


@pytest.fixture(scope="module")
def export_dir(personalised_run, tmp_path_factory):
    run = personalised_run(tmp_path_factory.mktemp("serve_run"), seed=5)
    export_policy(run, run / "export")
    return run / "export"


@pytest.fixture(scope="module")
def service(export_dir):
    return FusionService.load(export_dir)


def _good(service, b=3, n=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, service.context_dim)).astype(np.float32)
    s = rng.uniform(0.0, 1.0, (b, n, service.num_tasks)).astype(np.float32)
    mask = np.ones((b, n), bool)
    mask[0, [2, 5]] = False
    return x, s, mask


def _bad_requests(service):
    """(JSON body, the message FusionService or the request parser gives for it)."""
    d, k = service.context_dim, service.num_tasks
    x, s, _ = _good(service)
    cases = []

    def expect(fn):
        with pytest.raises(RequestError) as e:
            fn()
        return " ".join(str(e.value).split())

    for ctx in ([[0.0] * (d - 1)], [0.0] * d, [[float("nan")] * d], [["a"] * d]):
        body = json.dumps({"context": ctx}).encode()
        cases.append((body, expect(lambda c=ctx: service.weights(c))))
    s_bad = s.copy()
    s_bad[1, 3, 0] = 1.5  # a probability > 1
    for scores in (s_bad, s[..., : k - 1], s[:2]):
        body = json.dumps({"context": x.tolist(), "scores": scores.tolist()}).encode()
        cases.append((body, expect(lambda sc=scores: service.fused_scores(x, sc))))
    mask_int = np.ones(s.shape[:2], int).tolist()
    body = json.dumps({"context": x.tolist(), "scores": s.tolist(), "mask": mask_int}).encode()
    cases.append((body, expect(lambda: service.fused_scores(x, s, np.array(mask_int)))))
    ragged = [[True] * s.shape[1]] * (len(s) - 1) + [[True]]
    empty = np.ones(s.shape[:2], bool)
    empty[2] = False  # a request with no real candidate
    for mask in (ragged, empty.tolist()):
        body = json.dumps({"context": x.tolist(), "scores": s.tolist(), "mask": mask}).encode()
        cases.append((body, expect(lambda m=mask: service.fused_scores(x, s, m))))
    for body in (
        b"{not json",
        b"[1, 2]",
        b'{"ctx": [[0]]}',
        b"{}",
        b'{"context": [[0]], "mask": []}',
        json.dumps({"context": [[True] + [0.5] * (d - 1)]}).encode(),  # read as 1.0 by numpy
        json.dumps({"context": x.tolist(), "scores": [[[0.5] * (k - 1) + [False]]]}).encode(),
    ):
        cases.append((body, expect(lambda b=body: parse_request(b))))
    return cases


# ---------------------------------------------------------------------------
# request handling without Ray


def test_answer_is_fusion_service(service):
    x, s, mask = _good(service)
    got = answer(service, parse_request(json.dumps({"context": x.tolist()}).encode()))
    np.testing.assert_array_equal(np.float32(got["weights"]), service.weights(x))
    assert got["tasks"] == list(service.task_names) and "ranking" not in got
    body = {"context": x.tolist(), "scores": s.tolist(), "mask": mask.tolist()}
    got = answer(service, parse_request(json.dumps(body).encode()))
    fused = service.fused_scores(x, s, mask)
    want = np.where(np.isfinite(fused), fused, np.nan)
    np.testing.assert_array_equal(np.array(got["fused_scores"], dtype=np.float64), want)
    assert got["fused_scores"][0][2] is None  # masked: null in JSON
    np.testing.assert_array_equal(got["ranking"], service.rank(x, s, mask))


def test_bad_requests_raise_the_service_message(service):
    cases = _bad_requests(service)
    assert len({m for _, m in cases}) == len(cases)  # each case is a different check
    for body, message in cases:
        with pytest.raises(RequestError) as e:
            answer(service, parse_request(body))
        assert " ".join(str(e.value).split()) == message
    with pytest.raises(RequestError, match="limit is"):
        parse_request(b" " * (MAX_BODY_BYTES + 1))


def test_serve_without_the_extra_is_one_line(export_dir, monkeypatch, capsys):
    import grade_ray.serving.serve as serve_mod

    monkeypatch.setattr(serve_mod, "serve_missing", lambda: "Ray Serve is not installed (x)")
    assert main(["serve", str(export_dir), "--port", "1"]) == 2
    assert capsys.readouterr().err.strip() == "grade-ray: error: Ray Serve is not installed (x)"


# ---------------------------------------------------------------------------
# the Ray Serve application over HTTP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening_hosts(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a listening TCP socket on ``port`` (from /proc/net)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                hosts.add(addr)
    return hosts


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_wait_closed_returns_once_the_port_stops_listening(bind):
    """What `grade-ray serve` waits on before it prints "stopped": True only after the
    listener has closed (probed on loopback for a wildcard bind), False on timeout."""
    listener = socket.create_server((bind, 0))
    port = listener.getsockname()[1]
    url = f"http://{bind}:{port}/"
    assert not _wait_closed(url, timeout=0.3)  # still listening: times out

    closer = threading.Timer(0.5, listener.close)
    start = time.monotonic()
    closer.start()
    try:
        assert _wait_closed(url, timeout=10)
        assert time.monotonic() - start >= 0.5
        assert not _listening_hosts(port)
    finally:
        closer.cancel()
        listener.close()


@pytest.mark.ray
def test_serve_over_http(ray_session, export_dir, service):
    pytest.importorskip("ray.serve", reason=SERVE_REASON)
    pytest.importorskip("starlette", reason=SERVE_REASON)
    from grade_ray.serving.serve import deploy, shutdown

    port = _free_port()
    url = deploy(export_dir, port=port, replica_cpus=0.5)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        assert _listening_hosts(port) == {"0100007F"}  # 127.0.0.1 only

        with urllib.request.urlopen(url, timeout=60) as r:  # GET: what the policy takes
            info = json.loads(r.read())
        assert info["tasks"] == list(service.task_names)
        assert info["context"]["dim"] == service.context_dim

        x, s, mask = _good(service)
        status, got = _post(url, json.dumps({"context": x.tolist()}).encode())
        assert status == 200
        np.testing.assert_array_equal(np.float32(got["weights"]), service.weights(x))
        body = {"context": x.tolist(), "scores": s.tolist(), "mask": mask.tolist()}
        status, got = _post(url, json.dumps(body).encode())
        assert status == 200
        fused = service.fused_scores(x, s, mask)
        np.testing.assert_array_equal(
            np.array(got["fused_scores"], dtype=np.float64),
            np.where(np.isfinite(fused), fused, np.nan),
        )
        np.testing.assert_array_equal(got["ranking"], service.rank(x, s, mask))
        one = {"context": x[:1].tolist(), "scores": s[0].tolist()}  # one request's (N, K)
        status, got = _post(url, json.dumps(one).encode())
        assert status == 200
        np.testing.assert_array_equal(got["ranking"], service.rank(x[:1], s[0]))

        for body, message in _bad_requests(service):
            status, got = _post(url, body)
            assert (status, got) == (400, {"error": message}), body[:80]

        # the bench's load generator (grade-ray bench's Serve part) on the same app
        from grade_ray.jobs.bench.serve_load import load, request_body

        res = load(url, request_body(export_dir, candidates=10), requests=18, clients=4)
        assert res["requests_per_s"] > 0 and 0 < res["p50_ms"] <= res["p99_ms"]
        with pytest.raises(RuntimeError, match="serve answered 400"):
            load(url, b'{"context": [[1]]}', requests=4, clients=2)
    finally:
        closed = shutdown(url)
    # shutdown(url) returns once Serve's proxy has closed its socket (a request just after
    # serve.shutdown() would otherwise be accepted, then reset)
    assert closed and not _listening_hosts(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.ray
def test_cli_serve_answers_and_stops_on_sigterm(
    ray_session, export_dir, service, capsys, monkeypatch
):
    """`grade-ray serve EXPORT --port P` in this process (so on the session's Ray): it
    prints its URL, answers like FusionService, and SIGTERM stops Serve and returns 0."""
    pytest.importorskip("ray.serve", reason=SERVE_REASON)
    pytest.importorskip("starlette", reason=SERVE_REASON)
    import os
    import signal
    import threading

    import grade_ray.serving.serve as serve_mod

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    x, s, _ = _good(service, b=2)
    seen: dict = {}

    deployed = threading.Event()
    real_deploy = serve_mod.deploy

    def deploy(*args, **kwargs):
        url = real_deploy(*args, **kwargs)
        deployed.set()
        return url

    monkeypatch.setattr(serve_mod, "deploy", deploy)

    def client() -> None:  # the CLI blocks the main thread until SIGTERM
        try:
            if deployed.wait(300):
                body = json.dumps({"context": x.tolist(), "scores": s.tolist()}).encode()
                seen["answer"] = _post(url, body)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert main(["serve", str(export_dir), "--port", str(port), "--replica-cpus", "0.5"]) == 0
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    out = capsys.readouterr().out
    assert f"at {url} (Ctrl-C or SIGTERM stops it)" in out and out.rstrip().endswith("stopped")
    status, got = seen["answer"]
    assert status == 200
    np.testing.assert_array_equal(got["ranking"], service.rank(x, s))
    # "stopped" is printed once the port no longer listens: nothing answers any more
    assert not _listening_hosts(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_bench_serve_is_skipped_without_the_extra(export_dir, monkeypatch):
    import grade_ray.serving.serve as serve_mod
    from grade_ray.jobs.bench.serve_load import bench_serve

    monkeypatch.setattr(serve_mod, "serve_missing", lambda: "Ray Serve is not installed (x)")
    monkeypatch.setattr(serve_mod, "deploy", lambda *a, **k: pytest.fail("deployed anyway"))
    assert bench_serve(export_dir) == {}
