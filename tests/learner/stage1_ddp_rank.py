"""One DDP rank of tests/learner/test_stage1_ddp.py (run as a script; not a test module).

usage: stage1_ddp_rank.py RANK WORLD PORT DATA STEPS OUT
Runs STEPS Stage 1 steps of a SupervisedLearner around a DistributedDataParallel policy on
this rank's half of the first ROWS requests at DATA, then saves (weights, score scale) to OUT.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from grade_ray.config import load_config  # noqa: E402
from grade_ray.data.reading import read_sessions  # noqa: E402
from grade_ray.learner.supervised import SupervisedLearner, SupervisedSettings  # noqa: E402
from grade_ray.models.policy import build_policy  # noqa: E402
from grade_ray.spec import RewardSpec  # noqa: E402

ROWS = 512


def setup(data: str):
    """(cfg, start policy, the batch, reward spec): the same in every process."""
    cfg = load_config([ROOT / "configs" / "smoke.yaml"], ["pretrain.lr=0.05"])
    batch, meta, _ = read_sessions(data, max_rows=ROWS)
    torch.manual_seed(0)
    policy = build_policy(cfg.policy, meta.context_dim, meta.num_tasks)
    with torch.no_grad():  # a non-zero last layer: the gradient reaches every parameter
        policy.tower[-1].weight.normal_(0, 0.3)
    return cfg, policy, batch, RewardSpec.from_config(cfg.reward, meta)


def learner(cfg, model, spec) -> SupervisedLearner:
    return SupervisedLearner(model, SupervisedSettings.from_config(cfg), spec)


def main(argv: list[str]) -> None:
    rank, world, port = (int(a) for a in argv[:3])
    data, steps, out = argv[3], int(argv[4]), argv[5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        cfg, policy, batch, spec = setup(data)
        half = ROWS // world
        shard = batch.slice(rank * half, (rank + 1) * half)
        lrn = learner(cfg, DistributedDataParallel(policy), spec)
        for _ in range(steps):
            lrn.step(shard)
        torch.save(
            {"state": lrn.module.state_dict(), "log_scale": lrn.log_scale.detach().clone()}, out
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
