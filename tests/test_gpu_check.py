"""scripts/gpu_check.py stays runnable: its CPU dry run (the GPU run needs CUDA)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path, run_script):
    env = {"GPU_CHECK_DEVICE": "cpu", "RAY_ADDRESS": ""}
    res = run_script("gpu_check.py", [str(tmp_path)], env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["checks"] and all(out["checks"].values())
    assert out["learner.samples_per_s_cuda"] > 0
