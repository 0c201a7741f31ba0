"""``grade-ray submit`` and ``grade-ray jobs``: grade_ray commands as Ray jobs.

``grade-ray submit -- train --config configs/smoke.yaml --set ...`` submits the
job ``python -m grade_ray train ...`` through Ray's job-submission API
(:class:`ray.job_submission.JobSubmissionClient`, the dashboard's HTTP port,
8265 by default). The job runs on the head node. Its code comes from one of:

- a **working dir**: by default the project root, uploaded to the cluster
  (``runtime_env.working_dir``; ``.venv``, ``runs``, ``.git`` and caches left out);
- a **wheel** (``--wheel``): a local ``.whl`` is uploaded inside a staged
  working dir and pip-installed on the cluster
  (``pip: ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/.wheels/<name>.whl"]``); a URL or
  a path that exists only on the cluster goes to ``pip`` as is. The staged
  working dir still carries ``configs/`` and the other project files, but not
  the ``grade_ray/`` package, so the installed wheel is the code that runs.

By default ``submit`` waits, streaming the job's logs, and exits 0 when the job
SUCCEEDED; on FAILED or STOPPED it prints the status, Ray's message and the
last log lines, and exits 1.

**Token auth.** Ray 2.60 protects the dashboard with a bearer token when the
cluster runs with token auth. Ray's own client sends the token only when
``RAY_AUTH_MODE=token`` is set in the client's environment. Here the token is
looked up the way Ray looks it up (``RAY_AUTH_TOKEN``, then the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and sent as an
``Authorization: Bearer`` header whenever one is found, unless
``RAY_AUTH_MODE=disabled``. So a client with the cluster's token file needs no
other setting. A missing or wrong token gives a 401/403 and a clear error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from grade_ray.config import error_brief
from grade_ray.options import command_names

log = logging.getLogger(__name__)

# gitignore-style patterns left out of the uploaded working dir
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    "venv/",
    "runs/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "build/",
    "dist/",
    ".whl/",
    ".gl/",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TAIL_LINES = 50
WHEEL_DIR = ".wheels"


class JobError(RuntimeError):
    """A job could not be submitted or queried; the message says what to change."""


@dataclass
class JobOutcome:
    """Where a job ended (or stands): its status, Ray's message and its last log lines."""

    job_id: str
    status: str
    message: str
    logs_tail: str

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


# ---------------------------------------------------------------- connection


def project_root() -> Path:
    """The source checkout holding this package, else the current directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def resolve_address(address: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``address``, else RAY_ADDRESS; a dashboard URL such as ``http://HOST:8265``."""
    env = os.environ if env is None else env
    address = address or env.get("RAY_ADDRESS")
    if not address:
        raise JobError(
            "no cluster address: pass --address http://HOST:8265 (the Ray dashboard) "
            "or set RAY_ADDRESS=http://HOST:8265"
        )
    address = address.rstrip("/")
    # HOST:PORT without a scheme: Ray would take it for a GCS address and wait ~40 s
    return address if "://" in address else f"http://{address}"


def resolve_auth_token(
    env: Mapping[str, str] | None = None, home: Path | None = None
) -> str | None:
    """The Ray auth token, found where Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ``~/.ray/auth_token``. None when there is none or RAY_AUTH_MODE=disabled."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        log.debug("auth token from RAY_AUTH_TOKEN")
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {e}") from e
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        log.debug("auth token from %s", path)
        return token
    path = (home or Path.home()) / ".ray" / "auth_token"
    if path.is_file():
        token = path.read_text().strip()
        if token:
            log.debug("auth token from %s", path)
            return token
    return None


@contextmanager
def _api_server_address(address: str):
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its ``address``
    # argument; pin it so an explicit --address always wins.
    old = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = old


def connect(address: str | None = None, token: str | None = None):
    """A :class:`JobSubmissionClient` for ``address`` (or RAY_ADDRESS), token attached."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = token or resolve_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _api_server_address(url):
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        hint = (
            "no token was found: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or write the "
            "cluster's token to ~/.ray/auth_token"
            if not token
            else "the token was refused: use the cluster's token"
        )
        raise JobError(f"{url}: {hint}\n{e}") from e
    except (ConnectionError, RuntimeError) as e:  # RuntimeError: answered, not as Ray's API
        raise JobError(
            f"cannot reach the Ray dashboard at {url} ({error_brief(e)}); check --address / "
            "RAY_ADDRESS (the dashboard's HTTP address, port 8265 by default)"
        ) from e


def _client(client, address: str | None):
    return client if client is not None else connect(address)


# ---------------------------------------------------------------- submission


def build_entrypoint(args: Sequence[str], python: str = "python") -> str:
    """The job's shell command: ``python -m grade_ray ARGS`` (each argument quoted)."""
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise JobError("nothing to run: give a grade-ray command after --, e.g. -- train ...")
    return shlex.join([python, "-m", "grade_ray", *args])


def _is_remote(spec: str) -> bool:
    return "://" in spec


def build_runtime_env(
    working_dir: str | Path | None = None,
    wheel: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    staging: Path | None = None,
) -> dict[str, Any]:
    """The job's runtime_env: the uploaded working dir, or a wheel (see the module doc).

    A local ``wheel`` needs ``staging``, an empty folder that must live until the
    job is submitted (the upload happens then).
    """
    env: dict[str, Any] = {"excludes": list(DEFAULT_EXCLUDES)}
    wd = Path(working_dir or project_root()).resolve()
    if not wd.is_dir():
        raise JobError(f"working dir {wd} is not a directory")
    if wheel is None:
        env["working_dir"] = str(wd)
    elif _is_remote(wheel) or not Path(wheel).exists():
        # a URL, or a path on the cluster's nodes: pip installs it there
        if not _is_remote(wheel):
            log.info("%s is not a local file; the cluster's pip must find it", wheel)
        env["working_dir"] = str(wd)
        env["excludes"].append("/grade_ray/")  # the wheel's package, not the checkout's
        env["pip"] = [wheel]
    else:
        whl = Path(wheel).resolve()
        if whl.suffix != ".whl":
            raise JobError(f"--wheel {whl}: not a .whl file")
        if staging is None:
            raise JobError("a local wheel needs a staging folder")
        ignore = shutil.ignore_patterns(*(p.strip("/") for p in DEFAULT_EXCLUDES), "grade_ray")
        shutil.copytree(wd, staging, ignore=ignore, dirs_exist_ok=True)
        (staging / WHEEL_DIR).mkdir(exist_ok=True)
        shutil.copy2(whl, staging / WHEEL_DIR / whl.name)
        env["working_dir"] = str(staging)
        env["pip"] = [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{WHEEL_DIR}/{whl.name}"]
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def submit_job(
    args: Sequence[str],
    *,
    address: str | None = None,
    working_dir: str | Path | None = None,
    wheel: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    python: str = "python",
    client=None,
) -> str:
    """Submit ``python -m grade_ray ARGS`` as a Ray job; returns its submission id."""
    entrypoint = build_entrypoint(args, python)
    client = _client(client, address)
    with tempfile.TemporaryDirectory(prefix="grade_ray_job_") as tmp:
        runtime_env = build_runtime_env(working_dir, wheel, env_vars, Path(tmp) / "wd")
        log.info("submitting: %s", entrypoint)
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"tool": "grade-ray submit"},
            )
        except RuntimeError as e:
            raise JobError(f"job submission failed: {e}") from e
    log.info("submitted job %s", job_id)
    return job_id


# ---------------------------------------------------------------- following


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def job_status(job_id: str, *, address: str | None = None, client=None) -> JobOutcome:
    """The job's status, Ray's message and its last log lines."""
    client = _client(client, address)
    try:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
    except RuntimeError as e:
        raise JobError(f"job {job_id}: {e}") from e
    return JobOutcome(job_id, str(info.status), info.message or "", _tail(logs))


def _stream(client, job_id: str, out: IO[str], timeout: float | None) -> None:
    async def run() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    async def bounded() -> None:
        await asyncio.wait_for(run(), timeout)

    asyncio.run(bounded())


def _ask(call, job_id: str, *args):
    """``call(job_id, *args)`` on the dashboard: an unknown job or a lost connection is a
    :class:`JobError` (one line from the CLI; a lost connection leaves the job running)."""
    try:
        return call(job_id, *args)
    except RuntimeError as e:  # the dashboard answered with an error (unknown job, ...)
        raise JobError(f"job {job_id}: {e}") from e
    except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
        raise JobError(
            f"lost the connection to the Ray dashboard ({type(e).__name__}); job {job_id} "
            f"keeps running on the cluster: grade-ray jobs status {job_id}"
        ) from e


def _poll(client, job_id: str, out: IO[str] | None, deadline: float | None, poll_s: float) -> str:
    printed = ""
    while True:
        status = str(_ask(client.get_job_status, job_id))
        if out is not None:
            logs = _ask(client.get_job_logs, job_id)
            new = logs[len(printed) :] if logs.startswith(printed) else logs
            if new:
                out.write(new)
                out.flush()
            printed = logs
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status}")
        time.sleep(poll_s)


def wait_for_job(
    job_id: str,
    *,
    address: str | None = None,
    client=None,
    out: IO[str] | None = None,
    timeout: float | None = None,
    poll_s: float = 1.0,
) -> JobOutcome:
    """Wait until the job ends; stream its logs to ``out`` (None: quietly).

    Raises TimeoutError after ``timeout`` seconds (the job keeps running).
    """
    client = _client(client, address)
    deadline = None if timeout is None else time.monotonic() + timeout
    streamed = False
    if out is not None:
        try:
            _stream(client, job_id, out, timeout)
            streamed = True
        except TimeoutError as e:
            raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s") from e
        except Exception as e:  # noqa: BLE001 - any stream failure falls back to polling
            log.warning("log stream of %s broke (%s); polling instead", job_id, e)
    # the stream ends when the job does; poll for the final status (and the logs if
    # the stream broke: printed from the start, since the stream's position is lost)
    _poll(client, job_id, None if streamed else out, deadline, poll_s)
    return job_status(job_id, client=client)


def list_jobs(*, address: str | None = None, client=None) -> list[dict[str, Any]]:
    """Submitted jobs, oldest first: id, status, start/end (epoch ms), entrypoint, message."""
    client = _client(client, address)
    rows = []
    for d in client.list_jobs():
        if not d.submission_id:  # plain drivers (ray.init) are not submitted jobs
            continue
        rows.append(
            {
                "job_id": d.submission_id,
                "status": str(d.status),
                "start_time": d.start_time,
                "end_time": d.end_time,
                "entrypoint": d.entrypoint,
                "message": d.message or "",
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def job_logs(job_id: str, *, address: str | None = None, client=None) -> str:
    client = _client(client, address)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as e:
        raise JobError(f"job {job_id}: {e}") from e


def stop_job(job_id: str, *, address: str | None = None, client=None, wait_s: float = 0.0) -> bool:
    """Ask the job to stop; True if it was running. ``wait_s`` > 0: wait that long for it."""
    client = _client(client, address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as e:
        raise JobError(f"job {job_id}: {e}") from e
    deadline = time.monotonic() + wait_s
    while wait_s > 0 and time.monotonic() < deadline:
        if str(_ask(client.get_job_status, job_id)) in TERMINAL:
            break
        time.sleep(0.5)
    return stopped


# ---------------------------------------------------------------- CLI


def report(outcome: JobOutcome, err: IO[str] | None = None) -> None:
    """Print where a job ended; for a failed job, Ray's message and the last log lines."""
    err = err or sys.stderr
    if outcome.ok:
        print(f"job {outcome.job_id} SUCCEEDED", file=err)
        return
    summary = outcome.message.strip().splitlines()[0] if outcome.message.strip() else ""
    print(f"\n==== job {outcome.job_id} {outcome.status} ====", file=err)
    if summary:
        print(f"message: {summary}", file=err)
    n = len(outcome.logs_tail.splitlines())
    print(f"---- last {n} log lines ----", file=err)
    print(outcome.logs_tail, file=err)
    print(f"==== end of job {outcome.job_id} ({outcome.status}) ====", file=err)


def _env_pairs(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobError(f"--env {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.command_args or [])
    if command and command[0] == "--":
        command = command[1:]
    try:
        if not command:
            raise JobError("nothing to run: give a grade-ray command after --, e.g. -- train ...")
        known = command_names()
        if known and command[0] not in known:
            raise JobError(f"unknown grade-ray command {command[0]!r}; one of {known}")
        if command[0] in ("submit", "jobs"):
            raise JobError(f"{command[0]!r} runs on your machine, not as a job")
        client = connect(args.address)
        job_id = submit_job(
            command,
            working_dir=args.working_dir,
            wheel=args.wheel,
            env_vars=_env_pairs(args.env),
            submission_id=args.submission_id,
            python=args.python,
            client=client,
        )
        print(f"submitted job {job_id}", file=sys.stderr)
        if args.no_wait:
            print(job_id)
            return 0
        try:
            outcome = wait_for_job(job_id, client=client, out=sys.stdout, timeout=args.timeout)
        except TimeoutError as e:
            print(
                f"grade-ray: {e}; it keeps running (grade-ray jobs stop {job_id})",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(
                f"\ngrade-ray: stopped following; job {job_id} keeps running "
                f"(grade-ray jobs logs {job_id} --follow / grade-ray jobs stop {job_id})",
                file=sys.stderr,
            )
            return 130
    except JobError as e:
        print(f"grade-ray: error: {e}", file=sys.stderr)
        return 2
    report(outcome)
    return 0 if outcome.ok else 1


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        client = connect(args.address)
        if args.jobs_command == "list":
            rows = list_jobs(client=client)
            if not rows:
                print("no submitted jobs")
            for r in rows:
                print(
                    f"{r['job_id']}  {r['status']:<9}  {_when(r['start_time'])}  {r['entrypoint']}"
                )
            return 0
        if args.jobs_command == "logs":
            if args.follow:
                outcome = wait_for_job(args.job_id, client=client, out=sys.stdout)
                report(outcome)
                return 0 if outcome.ok else 1
            sys.stdout.write(job_logs(args.job_id, client=client))
            return 0
        if args.jobs_command == "status":
            outcome = job_status(args.job_id, client=client)
            print(outcome.status)
            if outcome.status in ("FAILED", "STOPPED"):
                report(outcome)
                return 1
            return 0
        if args.jobs_command == "stop":
            was_running = stop_job(args.job_id, client=client, wait_s=args.wait)
            print(
                f"stop requested for {args.job_id}"
                if was_running
                else f"{args.job_id} was not running"
            )
            if args.wait:
                status = job_status(args.job_id, client=client).status
                print(status)
                if status not in TERMINAL:
                    print(
                        f"grade-ray: {args.job_id} is still {status} after --wait {args.wait:g} s",
                        file=sys.stderr,
                    )
                    return 1
            return 0
    except JobError as e:
        print(f"grade-ray: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.jobs_command)


def add_parser(sub) -> None:
    """Add ``submit`` and ``jobs`` to the ``grade-ray`` subcommands."""
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        default=None,
        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)",
    )
    _add_submit(sub, address)
    _add_jobs(sub, address)


def _add_submit(sub, address: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "submit",
        parents=[address],
        help="run a grade-ray command as a Ray job on a cluster",
        description=(
            "Submit `python -m grade_ray COMMAND ...` as a Ray job, stream its logs and exit "
            "0 if it succeeded. Example: grade-ray submit --address http://127.0.0.1:8265 "
            "-- train --config configs/smoke.yaml --set run_dir=/mnt/checkpoints/run1. "
            "Token auth: the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token is sent unless RAY_AUTH_MODE=disabled."
        ),
    )
    p.add_argument(
        "--working-dir",
        default=None,
        help="folder uploaded as the job's working dir (default: the project root; "
        ".venv, runs, .git and caches are left out)",
    )
    p.add_argument(
        "--wheel",
        default=None,
        help="run the grade_ray of this wheel (a local .whl is uploaded; a URL or a path on "
        "the cluster is passed to pip) instead of the uploaded source",
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after S seconds")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks)")
    p.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--python",
        default="python",
        help="Python on the cluster that runs the job (default: python on its PATH)",
    )
    p.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the grade-ray command line to run, e.g. -- train --config configs/smoke.yaml",
    )
    p.set_defaults(fn=cmd_submit)


def _add_jobs(sub, address: argparse.ArgumentParser) -> None:
    p = sub.add_parser("jobs", help="list, follow, inspect or stop submitted Ray jobs")
    js = p.add_subparsers(dest="jobs_command", required=True)
    js.add_parser("list", parents=[address], help="submitted jobs, oldest first")
    q = js.add_parser("logs", parents=[address], help="a job's logs")
    q.add_argument("job_id")
    q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    q = js.add_parser(
        "status", parents=[address], help="a job's status (exit 1 if FAILED or STOPPED)"
    )
    q.add_argument("job_id")
    q = js.add_parser("stop", parents=[address], help="stop a job")
    q.add_argument("job_id")
    q.add_argument("--wait", type=float, default=0.0, help="wait up to S seconds for it to end")
    p.set_defaults(fn=cmd_jobs)
