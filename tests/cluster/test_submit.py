"""``grade-ray submit`` / ``grade-ray jobs`` against a real two-node Ray cluster.

The module fixture starts a Ray head (2 CPUs) and a second node offering the
custom resource ``rollout`` (1 CPU, rollout=2), both on this machine, each with
its own ports and temp dir and with token auth on (a fresh token, not the
user's). A smoke training job goes through ``grade-ray submit``; its rollout
actors must land on the rollout node. A job with a bad config must come back
FAILED with the config error in what ``submit`` prints. Teardown stops only
the processes the fixture started (and their descendants) and checks that
none is left. Two nodes on one machine need separate temp dirs: with a shared
session dir their runtime-env agents unpack the job's working dir into the
same folder and delete the driver's working directory under it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grade_ray import cli
from grade_ray.cluster import submit
from grade_ray.config import load_config
from grade_ray.runlog import read_metrics

pytestmark = [pytest.mark.cluster]
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "configs/smoke.yaml"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
# workers bind OS-picked ports, not Ray's default 10002-19999 shared with other Rays here
RANDOM_PORTS = ["--min-worker-port=0", "--max-worker-port=0"]
SMALL = [
    "--set",
    "rollout.num_workers=2",
    "--set",
    "rollout.num_cpus_per_worker=0.25",
    "--set",
    "learner.num_cpus_per_worker=0.25",
]


# ---------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(p.name))
    return kids


def _family(pid: int) -> list[int]:
    """``pid`` and all its descendants (Ray workers call setsid: not in its group)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> dict[int, str]:
    """SIGTERM our ``ray start --block`` processes, SIGKILL what outlives the grace.

    Returns {pid: cmdline} of the processes that had to be killed. Touches nothing
    but these processes and their descendants (collected while they shut down:
    orphans are re-parented away from the tree). A head that ran a Train job
    often takes longer than any sensible grace to go down by itself.
    """
    family = {q for p in procs if p.poll() is None for q in _family(p.pid)}
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # ray start --block shuts its node down
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        family |= {q for p in procs if p.poll() is None for q in _family(p.pid)}
        if not any(_alive(q) for q in family):
            break
        time.sleep(0.2)
    killed = {q: _cmdline(q) for q in sorted(family) if _alive(q)}
    for q in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
    return killed


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ---------------------------------------------------------------- the cluster


@dataclass
class LocalCluster:
    root: Path
    address: str  # dashboard URL
    gcs_port: int
    token: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    rollout_node_ids: list[str] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *RANDOM_PORTS]
                    + args,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def nodes(self) -> list[dict]:
        import requests

        r = requests.get(
            f"{self.address}/api/v0/nodes",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = START_TIMEOUT_S) -> list[dict]:
        deadline, err = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"`ray start` exited with code {dead[0].returncode}")
            try:
                alive = self.nodes()
                if len(alive) >= n:
                    submit.connect(self.address, token=self.token)  # the job server is up too
                    return alive
            except Exception as e:  # noqa: BLE001 - not up yet
                err = e
            time.sleep(1.0)
        raise TimeoutError(f"{n} node(s) not alive after {timeout:g} s (last error: {err})")

    def diagnostics(self) -> str:
        """The `ray start` outputs and the tails of the nodes' main logs."""
        parts = []
        for log in self.logs:
            parts.append(f"---- {log.name} ----\n{_tail_file(log, 60)}")
        for logs_dir in sorted(self.root.glob("*/session_latest/logs")):
            for name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err",
                         "dashboard.log", "dashboard.err"):  # fmt: skip
                f = logs_dir / name
                if f.exists() and f.stat().st_size:
                    parts.append(f"---- {f} ----\n{_tail_file(f, 30)}")
        return "\n".join(parts)


def _tail_file(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(unreadable: {e})"


@contextlib.contextmanager
def local_cluster(head_cpus: float = 2, nodes: tuple[tuple[float, float], ...] = ((1, 2),)):
    """A Ray head with ``head_cpus`` CPUs plus one node per (CPUs, rollout) in ``nodes``.

    Everything binds its own free ports (the dashboard to 127.0.0.1) and lives
    under a fresh short temp dir; token auth is on with a fresh token.
    """
    root = Path(tempfile.mkdtemp(prefix="grc", dir="/tmp"))  # short: Unix socket paths
    token = secrets.token_hex(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
    )
    gcs, dash, client, agent, *agents = _free_ports(4 + len(nodes))
    c = LocalCluster(root, f"http://127.0.0.1:{dash}", gcs, token, env)
    try:
        c.start(
            "head",
            [
                "--head",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--num-cpus={head_cpus:g}",
                f"--temp-dir={root / 'h'}",
            ],
        )
        c.wait_nodes(1)
        for i, ((cpus, rollout), port) in enumerate(zip(nodes, agents)):
            c.start(
                f"node{i}",
                [
                    f"--address=127.0.0.1:{gcs}",
                    f"--dashboard-agent-listen-port={port}",
                    f"--num-cpus={cpus:g}",
                    f"--resources={json.dumps({'rollout': rollout})}",
                    f"--temp-dir={root / f'n{i}'}",  # its own: see the module docstring
                ],
            )
        alive = c.wait_nodes(1 + len(nodes))
        c.rollout_node_ids = sorted(
            n["node_id"] for n in alive if n["resources_total"].get("rollout", 0) > 0
        )
    except Exception as e:  # noqa: BLE001 - show the cluster's logs, then clean up
        report = c.diagnostics()
        _stop(c.procs)
        shutil.rmtree(root, ignore_errors=True)
        raise ClusterStartError(f"could not start the test cluster: {e}\n{report}") from e
    try:
        yield c
    finally:
        killed = _stop(c.procs)
        if killed:
            log.info("killed %d process(es) after the grace period", len(killed))
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        strays = {q: _cmdline(q) for q in pids if _alive(q) and str(root) in _cmdline(q)}
        # A stopped job's driver can still be exiting when its status reads STOPPED (Ray
        # sends SIGTERM, then waits): kill what is left, and fail only if that fails.
        for q in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(q, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(q) for q in strays) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
        survivors = {q: c for q, c in strays.items() if _alive(q)}
        if survivors:
            raise AssertionError(f"processes of the test cluster survived SIGKILL: {survivors}")


class ClusterStartError(RuntimeError):
    pass


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and a rollout node (1 CPU, rollout=2): 3 CPUs in all."""
    if not (BIN / "ray").exists():
        pytest.skip(f"no `ray` next to {sys.executable}")
    try:
        ctx = local_cluster(head_cpus=2, nodes=((1, 2),))
        c = ctx.__enter__()
    except ClusterStartError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield c
    finally:
        ctx.__exit__(None, None, None)


@pytest.fixture
def client_env(cluster, monkeypatch):
    """The client side: the cluster's token in RAY_AUTH_TOKEN, no RAY_ADDRESS around."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    monkeypatch.chdir(ROOT)
    return cluster


def _job_id(text: str) -> str:
    m = re.search(r"submitted job (\S+)", text)
    assert m, text
    return m.group(1)


# ---------------------------------------------------------------- on the cluster


def test_submit_smoke_training_runs_rollouts_on_the_rollout_node(client_env, capsys):
    cluster = client_env
    run_dir = cluster.root / "run"
    rc = cli.main(
        ["submit", "--address", cluster.address, "--", "train", "--config", SMOKE, *SMALL]
        + ["--set", f"run_dir={run_dir}"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, f"{out[-4000:]}\n{err[-4000:]}"
    job_id = _job_id(err)
    assert f"job {job_id} SUCCEEDED" in err
    assert f"policy: {run_dir}/policy.pt" in out  # the job's own output came back

    rounds = load_config([ROOT / SMOKE]).grpo.rounds
    stage2 = [r for r in read_metrics(run_dir) if r.get("stage") == 2]
    assert sorted({int(r["round"]) for r in stage2}) == list(range(rounds))
    assert (run_dir / "policy.pt").exists()

    actors = json.loads((run_dir / "rollout_actors.json").read_text())
    assert len(actors) == 2
    assert len(cluster.rollout_node_ids) == 1
    assert {a["node_id"] for a in actors} == set(cluster.rollout_node_ids)

    assert submit.job_status(job_id, address=cluster.address).status == "SUCCEEDED"
    listed = {j["job_id"]: j for j in submit.list_jobs(address=cluster.address)}
    assert listed[job_id]["status"] == "SUCCEEDED"
    assert "python -m grade_ray train" in listed[job_id]["entrypoint"]


def test_failed_job_reports_status_and_the_error(client_env, capsys):
    cluster = client_env
    rc = cli.main(
        ["submit", "--address", cluster.address, "--", "train", "--config", SMOKE]
        + ["--set", "grpo.rounds=0", "--set", f"run_dir={cluster.root / 'bad'}"]
    )
    out, err = capsys.readouterr()
    assert rc == 1, f"{out[-4000:]}\n{err[-4000:]}"
    job_id = _job_id(err)
    assert f"==== job {job_id} FAILED ====" in err
    tail = err.split(f"==== job {job_id} FAILED ====", 1)[1]
    assert "exit code 2" in tail  # Ray's status message
    assert "grpo.rounds must be >= 1" in tail  # the config error, in the last log lines

    outcome = submit.job_status(job_id, address=cluster.address)
    assert (outcome.status, outcome.ok) == ("FAILED", False)
    assert "grpo.rounds must be >= 1" in outcome.logs_tail
    assert cli.main(["jobs", "status", job_id, "--address", cluster.address]) == 1


def test_stop_and_auth_errors(client_env, tmp_path, monkeypatch, capsys):
    cluster = client_env
    job_id = submit.submit_job(
        ["simulate", "--config", SMOKE, "--set", "simulator.num_requests=2000000"]
        + ["--set", f"run_dir={cluster.root / 'stopped'}"],
        address=cluster.address,
    )
    assert cli.main(["jobs", "stop", job_id, "--wait", "60", "--address", cluster.address]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "STOPPED"
    outcome = submit.wait_for_job(job_id, address=cluster.address, timeout=60)
    assert outcome.status == "STOPPED"
    assert cli.main(["jobs", "list", "--address", cluster.address]) == 0
    assert re.search(rf"^{job_id}\s+STOPPED\s", capsys.readouterr().out, re.M)

    with pytest.raises(submit.JobError, match="token was refused"):
        submit.connect(cluster.address, token="not-the-token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(submit.JobError, match="no token was found"):
        submit.connect(cluster.address)
    assert cli.main(["jobs", "list", "--address", cluster.address]) == 2
    assert "no token was found" in capsys.readouterr().err


# ---------------------------------------------------------------- no cluster


def test_auth_token_lookup_follows_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    f = tmp_path / "tok"
    f.write_text("from-path\n")
    look = submit.resolve_auth_token
    assert look({}, home) == "from-home"
    assert look({"RAY_AUTH_TOKEN_PATH": str(f)}, home) == "from-path"
    assert look({"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(f)}, home) == "env"
    assert look({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "env"}, home) is None
    assert look({}, tmp_path / "nobody") is None
    with pytest.raises(submit.JobError, match="cannot be read"):
        look({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_address_entrypoint_and_runtime_env(tmp_path):
    with pytest.raises(submit.JobError, match="--address"):
        submit.resolve_address(None, {})
    assert submit.resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert submit.resolve_address("http://a:1", {"RAY_ADDRESS": "http://b:2"}) == "http://a:1"
    # HOST:PORT is the dashboard's HTTP address (Ray alone would wait ~40 s for a GCS there)
    assert submit.resolve_address("127.0.0.1:8265", {}) == "http://127.0.0.1:8265"

    ep = submit.build_entrypoint(["--", "train", "--set", "run_dir=/x y"])
    assert ep == "python -m grade_ray train --set 'run_dir=/x y'"
    with pytest.raises(submit.JobError, match="nothing to run"):
        submit.build_entrypoint(["--"])

    env = submit.build_runtime_env()
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", "runs/", ".git/", "__pycache__/"} <= set(env["excludes"])

    wheel = tmp_path / "grade_ray-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    staged = tmp_path / "wd"
    env = submit.build_runtime_env(wheel=str(wheel), staging=staged, env_vars={"A": "1"})
    assert env["working_dir"] == str(staged)
    assert env["pip"] == [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/.wheels/{wheel.name}"]
    assert (staged / ".wheels" / wheel.name).exists()
    assert (staged / "configs" / "smoke.yaml").exists()
    assert not (staged / "grade_ray").exists()  # the wheel's package runs, not the checkout's
    assert env["env_vars"] == {"A": "1"}
    remote = submit.build_runtime_env(wheel="https://example.com/grade_ray-0.1.0-py3-none-any.whl")
    assert remote["pip"] == ["https://example.com/grade_ray-0.1.0-py3-none-any.whl"]
    assert "/grade_ray/" in remote["excludes"]


def test_submit_needs_a_known_command(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["submit", "--address", "http://127.0.0.1:1", "--", "trian"]) == 2
    assert "unknown grade-ray command 'trian'" in capsys.readouterr().err
    assert cli.main(["submit", "--", "train"]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_following_a_job_names_an_unknown_job_or_a_lost_connection(capsys):
    """While following or polling a job, the dashboard answering 404 or going away is one
    line (exit 2, not the 1 of a failed job), and a lost connection says the job runs on."""
    import requests

    class Dashboard:
        def __init__(self, error):
            self.error = error

        def get_job_status(self, job_id):
            raise self.error

        get_job_logs = get_job_status

        async def tail_job_logs(self, job_id):
            raise self.error
            yield ""  # an async generator, as Ray's

    gone = Dashboard(requests.exceptions.ConnectionError("connection refused"))
    with pytest.raises(submit.JobError, match="job j1 keeps running on the cluster"):
        submit.wait_for_job("j1", client=gone, out=None)
    unknown = Dashboard(
        RuntimeError("Request failed with status code 404: Job nope does not exist.")
    )
    with pytest.raises(submit.JobError, match="job nope: .*does not exist"):
        submit.wait_for_job("nope", client=unknown, out=io.StringIO())
    with pytest.raises(submit.JobError, match="keeps running"):
        submit.stop_job(
            "j1",
            client=type("D", (Dashboard,), {"stop_job": lambda s, j: True})(
                requests.exceptions.ConnectionError("reset")
            ),
            wait_s=1,
        )


def test_jobs_stop_wait_says_when_the_job_still_runs(monkeypatch, capsys):
    """`grade-ray jobs stop --wait S ID`: exit 1 and one line when the job has not ended."""
    from grade_ray.cli import main

    class Dashboard:
        def stop_job(self, job_id):
            return True

        def get_job_status(self, job_id):
            return "RUNNING"

        def get_job_info(self, job_id):
            return type("Info", (), {"status": "RUNNING", "message": ""})()

        def get_job_logs(self, job_id):
            return ""

    monkeypatch.setattr(submit, "connect", lambda address: Dashboard())
    assert main(["jobs", "stop", "--wait", "0.2", "j1"]) == 1
    captured = capsys.readouterr()
    assert "RUNNING" in captured.out and "still RUNNING after --wait" in captured.err
