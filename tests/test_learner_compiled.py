"""scripts/learner_compiled.py stays runnable, and its compiled update is the eager one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_learner_compiled_script_times_three_paths_that_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "learner_compiled.py"), "--repeats", "1"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads((tmp_path / "learner_compiled.json").read_text())
    assert len(got["requests_per_s"]) == 3 and min(got["requests_per_s"].values()) > 0
    # one update from the same weights: the compiled loss moves them as the eager one does
    assert got["update_max_abs"] > 1e-4
    assert got["compiled_vs_eager_weights_max_abs_diff"] <= 1e-5
    assert "| compiled loss |" in res.stdout
