"""SIGKILL `grade-ray train --local` at points through a run, resume, compare with an
uninterrupted run (issue 14, finding 4).

Each case runs the CLI in a child process (``crash_driver.py``) that kills itself with
SIGKILL at one point: in Stage 1, with Stage 1's result or the reward's fit half written,
while writing the decoded cache, in a round's update, with a checkpoint half written,
between a round's checkpoint and its metrics row, with a metrics row half written, between
logging a round and the next one, and after the last round before the final policy is
written. ``train --local --resume`` then finishes the run. After each: the metrics hold
every Stage 1 epoch and Stage 2 round exactly once and equal the uninterrupted run's, every
training request is counted once, and the final policy is
bit-identical. A run directory that already holds a run is refused without ``--resume``;
a truncated checkpoint falls back to the round before, or is named when none loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grade_ray import keys
from grade_ray.cli import main
from grade_ray.runlog import load_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "crash_driver.py"
ROUNDS, EPOCHS, REQUESTS = 4, 2, 2000  # smoke data: 2,000 training requests
OVERRIDES = ["--set", f"grpo.rounds={ROUNDS}", "--set", f"pretrain.epochs={EPOCHS}"]
VOLATILE = (
    "time",
    "step",
    keys.PERF_ROUND_S,
    keys.PERF_REQUESTS_PER_S,
    keys.PERF_STAGE1_REQUESTS_PER_S,
    keys.PRETRAIN_WORKER_PID,
)

# (point, n): where the child kills itself, on the n-th time it gets there. The default run
# takes the points around checkpoint and metrics writes; the others are marked slow.
SLOW = (
    "decoded cache, second shard",
    "round 1, in the update",
    "after the last round, before policy.pt",
)
POINTS = {
    "stage1, second epoch": ("stage1-step", 11),
    "decoded cache, second shard": ("cache-write", 2),
    "round 1, in the update": ("grpo-update", 2),
    "round 1, checkpoint half written": ("checkpoint-half-written", 2),
    "stage1 done, pretrain.pt half written": ("pretrain-half-written", 1),
    "reward fit half written": ("reward-fit-half-written", 1),
    "round 2, after the checkpoint, before its metrics row": ("after-checkpoint-before-log", 3),
    "round 0, metrics row half written": ("metrics-line-half-written", 1),
    "round 2, after its metrics row": ("after-log", 3),
    "after the last round, before policy.pt": ("after-log", 4),
}


def argv(run: Path, *extra: str) -> list[str]:
    return ["train", "--local", "--config", str(ROOT / "configs" / "smoke.yaml")] + [
        "--run-dir",
        str(run),
        *OVERRIDES,
        *extra,
    ]


def child(point: str, n: int, run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(DRIVER), point, str(n), "--", *argv(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def new_run(tmp: Path, smoke_data) -> Path:
    run = tmp / "run"
    run.mkdir(parents=True)
    (run / "data").symlink_to(Path(smoke_data[0]).parent)  # the session's simulated logs
    return run


def rows(run: Path, stage: int) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_metrics(run)
        if r.get("stage") == stage
    ]


@pytest.fixture(scope="module")
def reference(smoke_data, tmp_path_factory):
    run = new_run(tmp_path_factory.mktemp("uninterrupted"), smoke_data)
    done = child("none", 0, run)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def assert_like_reference(run: Path, ref: Path) -> None:
    s2 = rows(run, 2)
    assert [r[keys.ROUND] for r in s2] == list(range(ROUNDS))  # each round once
    assert sum(r[keys.ROLLOUT_REQUESTS] for r in s2) == REQUESTS  # each request once
    assert all(r[keys.ROLLOUT_REQUESTS] == r["rollout/unique_requests"] for r in s2)
    assert s2 == rows(ref, 2)
    assert [r["epoch"] for r in rows(run, 1)] == list(range(EPOCHS))
    assert rows(run, 1) == rows(ref, 1)
    assert len(read_metrics(run)) == len((run / "metrics.csv").read_text().splitlines()) - 1
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["rounds"], summary["requests"]) == (ROUNDS, REQUESTS)
    assert summary["data"]["rows_used"] == REQUESTS
    a = load_checkpoint(run / "policy.pt")["state_dict"]
    b = load_checkpoint(ref / "policy.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_is_complete(reference):
    assert [r[keys.ROUND] for r in rows(reference, 2)] == list(range(ROUNDS))


@pytest.mark.parametrize(
    "where", [pytest.param(w, marks=pytest.mark.slow) if w in SLOW else w for w in POINTS]
)
def test_killed_run_resumes_to_the_uninterrupted_result(where, reference, smoke_data, tmp_path):
    point, n = POINTS[where]
    run = new_run(tmp_path, smoke_data)
    killed = child(point, n, run)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert not (run / "policy.pt").exists() or "stage1" not in point
    assert main(argv(run, "--resume")) == 0
    assert_like_reference(run, reference)


def test_train_refuses_a_run_dir_that_holds_a_run(reference, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(reference, run, symlinks=True)
    before = (run / "metrics.jsonl").read_text()
    assert main(argv(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a Stage 2 run" in err[0] and "--resume" in err[0]
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended or overwritten
    assert main(argv(run, "--resume")) == 0  # finished: nothing to redo
    assert_like_reference(run, reference)


def test_truncated_checkpoint_falls_back_or_is_named(reference, tmp_path, capsys, caplog):
    run = tmp_path / "copy"
    shutil.copytree(reference, run, symlinks=True)
    (run / "policy.pt").unlink()
    for name in ("round-0003.pt", "round-0002.pt"):
        p = run / "checkpoints" / name
        p.write_bytes(p.read_bytes()[:1000])
    assert main(argv(run, "--resume")) == 0  # from round 1: rounds 2 and 3 again
    assert "round-0003.pt does not load" in caplog.text
    assert_like_reference(run, reference)
    for p in (run / "checkpoints").glob("round-*.pt"):
        p.write_bytes(b"not a checkpoint")
    assert main(argv(run, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("grade-ray: error: no round checkpoint of") and "round-0000.pt" in err


def test_resume_and_stage1_reuse_refuse_other_settings(reference, smoke_data, tmp_path, capsys):
    """A resume continues only what the checkpoints were made with: a changed setting that
    changes training is named and refused before anything is written (where it runs and
    evaluation may change); a saved Stage 1 result is reused only with its own Stage 1
    settings, whatever Stage 2's."""
    run = tmp_path / "copy"
    shutil.copytree(reference, run, symlinks=True)
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    assert main(argv(run, "--resume", "--set", "grpo.lr=0.05")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "round-0003.pt was made with other settings" in err[0], err
    assert "grpo.lr: 0.001 -> 0.05" in err[0]
    assert {p: (run / p).read_bytes() for p in before} == before
    on_ray = [a for a in argv(run, "--resume", "--set", "grpo.lr=0.05") if a != "--local"]
    assert main(on_ray) == 2  # the Ray path checks the same, before it starts anything
    assert "grpo.lr: 0.001 -> 0.05" in capsys.readouterr().err
    assert {p: (run / p).read_bytes() for p in before} == before
    # free to change: evaluation, and the rollout pool's width (scaling out a running job)
    assert main(argv(run, "--resume", "--set", "eval.bootstrap=50")) == 0
    for name in ("round-0003.pt", "round-0002.pt"):
        (run / "checkpoints" / name).unlink()
    (run / "policy.pt").unlink()
    assert main(argv(run, "--resume", "--set", "rollout.num_workers=1")) == 0
    assert [r[keys.ROUND] for r in rows(run, 2)] == list(range(ROUNDS))  # rounds 2, 3 again

    stage1_only = new_run(tmp_path / "s1", smoke_data)
    (stage1_only / "checkpoints").mkdir()
    sp = reference / "checkpoints" / "pretrain.pt"
    shutil.copy(sp, stage1_only / "checkpoints" / sp.name)
    assert main(argv(stage1_only, "--set", "pretrain.epochs=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrain.pt was made with other settings" in err[0], err
    assert f"pretrain.epochs: {EPOCHS} -> 3" in err[0] and "to train Stage 1 again" in err[0]
    assert not (stage1_only / "config.yaml").exists()
    assert main(argv(stage1_only, "--set", "grpo.lr=0.002")) == 0  # Stage 2 settings: reused
    assert not rows(stage1_only, 1)  # Stage 1 was not trained again
