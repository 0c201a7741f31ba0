"""scripts/learner_compiled.py stays runnable, and its compiled update is the eager one."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_learner_compiled_script_times_three_paths_that_agree(tmp_path, run_script):
    args = ["--repeats", "1", "--out", str(tmp_path)]
    res = run_script("learner_compiled.py", args, {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads((tmp_path / "learner_compiled.json").read_text())
    assert len(got["requests_per_s"]) == 3 and min(got["requests_per_s"].values()) > 0
    # one update from the same weights: the compiled loss moves them as the eager one does
    assert got["update_max_abs"] > 1e-4
    assert got["compiled_vs_eager_weights_max_abs_diff"] <= 1e-5
    assert "| compiled loss |" in res.stdout
