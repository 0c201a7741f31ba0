"""scripts/scale_out.py stays runnable: a small run of every part on this machine."""

from __future__ import annotations

import json

import pytest

ENV = {"RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}


def test_bad_worker_counts_are_refused_in_one_line(tmp_path, run_script):
    res = run_script("scale_out.py", ["--out", str(tmp_path), "--workers", "0"], ENV)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "--workers" in res.stderr


@pytest.mark.slow
def test_every_part_measures_and_writes_one_table(tmp_path, run_script):
    args = ["--out", str(tmp_path), "--workers", "1", "2", "--requests", "4096", "--repeats", "1"]
    res = run_script("scale_out.py", args, ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "scale_out.json").read_text())
    for mode in ("rollout_only", "on_policy", "pipelined"):
        for n in (1, 2):
            assert out[f"training.{mode}.{n}"] > 0
    assert out["learner.cpu, 1 thread"] > 0 and out["stage1.cpu, 1 thread"] > 0
    assert out["ddp.learner_workers_1"] > 0 and out["ddp.learner_workers_2"] > 0
    md = (tmp_path / "scale_out.md").read_text()
    assert md.startswith("Measured on: ") and "| 2 |" in md
