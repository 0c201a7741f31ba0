"""One DDP rank of tests/learner/test_ddp.py (run as a script; not a test module).

usage: ddp_rank.py RANK WORLD PORT LO HI MINIBATCH OUT
Trains a GRPOLearner wrapped in DistributedDataParallel on rows [LO, HI) of the synthetic
batch of test_grpo_learner.py, then saves (steps, weights, loss) to OUT.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_grpo_learner as t  # noqa: E402

from grade_ray import keys  # noqa: E402
from grade_ray.learner.grpo import GRPOLearner  # noqa: E402


def setup(minibatch_size: int):
    """(settings, start policy, training batch): the same in every process."""
    settings = dataclasses.replace(t.SETTINGS, minibatch_size=minibatch_size)
    batch = t.one_task_batch()
    train = t.rollout(GRPOLearner(t.make_policy(), settings), batch, seed=1)
    return settings, t.make_policy(), train


def main(argv: list[str]) -> None:
    rank, world, port, lo, hi, mbs = (int(a) for a in argv[:6])
    out = argv[6]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        settings, policy, train = setup(mbs)
        shard = {k: (v if np.ndim(v) == 0 else v[lo:hi]) for k, v in train.items()}
        learner = GRPOLearner(DistributedDataParallel(policy), settings, seed=rank)
        steps = [0]
        step = learner._step

        def counting_step(*a, **k):
            steps[0] += 1
            return step(*a, **k)

        learner._step = counting_step
        stats = learner.update(shard)
        torch.save(
            {
                "steps": steps[0],
                "state": learner.module.state_dict(),
                "loss": stats[keys.LEARNER_LOSS],
            },
            out,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
