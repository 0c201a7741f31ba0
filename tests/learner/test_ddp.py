"""GRPOLearner under DDP (two CPU processes, gloo), as Ray Train runs it with
``learner.num_workers=2``, without Ray. Each rank is ``ddp_rank.py`` in its own process.

* Equal shards: DDP averages the two ranks' minibatch gradients, and each rank's loss is a
  mean over its rows, so one step on two halves of a batch is one step on the whole batch.
  Two ranks (one minibatch of B/2 each) therefore match one worker (one minibatch of B) up to
  float summation order. Measured here: at most 6e-8 on any parameter after the two Adam
  steps (epochs_per_batch=2), which move parameters by up to 2e-2. The test allows
  ``TOL = 1e-5`` absolute on every parameter and checks the update itself is > 100 x TOL.
* Unequal shards: a rank with fewer rows still runs as many minibatches as the largest
  (else DDP's all-reduce waits forever); both ranks step the same number of times and end
  with identical weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from grade_ray import keys

TOL = 1e-5
TIMEOUT_S = 90
RANK_SCRIPT = Path(__file__).resolve().parent / "ddp_rank.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(rows: list[tuple[int, int]], minibatch_size: int, tmp_path) -> list[dict]:
    """Run one process per (lo, hi) shard; returns each rank's saved result."""
    port = _free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(len(rows))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), str(r), str(len(rows)), str(port)]
            + [str(lo), str(hi), str(minibatch_size), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r, (lo, hi) in enumerate(rows)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode()[-2000:])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0].decode()[-2000:])
    for r, o in enumerate(outs):
        assert o.exists(), f"rank {r} did not finish (DDP out of step?):\n{logs[r]}"
    return [torch.load(o, weights_only=True) for o in outs]


def test_two_ranks_on_equal_halves_match_one_worker_on_the_whole_batch(tmp_path):
    sys.path.insert(0, str(RANK_SCRIPT.parent))
    import ddp_rank

    from grade_ray.learner.grpo import GRPOLearner

    settings, policy, train = ddp_rank.setup(minibatch_size=10_000)  # one minibatch
    n = len(train[keys.REQUEST_ID])
    single = GRPOLearner(policy, settings, seed=0)
    single.update(train)
    a, b = run_ranks([(0, n // 2), (n // 2, n)], n // 2, tmp_path)
    assert a["steps"] == b["steps"] == settings.epochs_per_batch  # one minibatch per epoch
    ref = single.module.state_dict()
    start = ddp_rank.t.make_policy().state_dict()
    for k in ref:
        assert torch.equal(a["state"][k], b["state"][k]), k  # DDP keeps the ranks identical
        torch.testing.assert_close(a["state"][k], ref[k], rtol=0, atol=TOL, msg=k)
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    assert moved > 100 * TOL  # the comparison is not trivially satisfied


def test_unequal_shards_step_the_same_number_of_times(tmp_path):
    n, mbs = 256, 64
    a, b = run_ranks([(0, 192), (192, n)], mbs, tmp_path)
    assert a["steps"] == b["steps"] == 2 * (192 // mbs)  # the larger shard sets the count
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
