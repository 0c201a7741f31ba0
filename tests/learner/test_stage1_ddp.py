"""Stage 1's SupervisedLearner under DDP (two CPU processes, gloo), as Ray Train runs it with
``learner.num_workers=2``, without Ray. Each rank is ``stage1_ddp_rank.py``.

DDP averages the ranks' gradients of the model; the score scale (``log_scale``) is a
parameter outside the model, which the learner averages itself. So a DDP step on two
halves equals one single-process step on the mean of the two halves' losses, for the
score scale as well as the weights. Without the score scale's all-reduce the two ranks'
scales drift apart and, through the loss, so do their gradients and weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TOL = 1e-5
TIMEOUT_S = 90
STEPS = 3
RANK_SCRIPT = Path(__file__).resolve().parent / "stage1_ddp_rank.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(data: str, world: int, tmp_path) -> list[dict]:
    port = _free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), str(r), str(world), str(port), data]
            + [str(STEPS), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode()[-2000:])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0].decode()[-2000:])
    for r, o in enumerate(outs):
        assert o.exists(), f"rank {r} did not finish:\n{logs[r]}"
    return [torch.load(o, weights_only=True) for o in outs]


def test_two_ranks_step_like_one_process_on_the_mean_of_both_halves(smoke_data, tmp_path):
    sys.path.insert(0, str(RANK_SCRIPT.parent))
    import stage1_ddp_rank as r

    cfg, policy, batch, spec = r.setup(smoke_data[0])
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = r.learner(cfg, policy, spec)
    half = r.ROWS // 2
    halves = [batch.slice(0, half), batch.slice(half, r.ROWS)]
    for _ in range(STEPS):  # what DDP computes: the gradient of the halves' mean loss
        loss = sum(ref.loss(h).loss for h in halves) / 2
        ref.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref.optimizer.step()
    a, b = run_ranks(smoke_data[0], 2, tmp_path)
    for k, v in ref.module.state_dict().items():
        assert torch.equal(a["state"][k], b["state"][k]), k  # the ranks stay identical
        torch.testing.assert_close(a["state"][k], v, rtol=0, atol=TOL, msg=k)
    assert torch.equal(a["log_scale"], b["log_scale"])
    torch.testing.assert_close(a["log_scale"], ref.log_scale.detach(), rtol=0, atol=TOL)
    moved = max(float((v - start[k]).abs().max()) for k, v in ref.module.state_dict().items())
    assert (
        moved > 100 * TOL and abs(float(ref.log_scale.detach())) > 100 * TOL
    )  # not trivially equal
