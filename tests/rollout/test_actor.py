"""RayRollout: the weights the driver broadcasts are the weights the actors roll out with."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grade_ray.data.plan import DataPlan, TaskReader
from grade_ray.learner.loop import new_policy, rollout_spec
from grade_ray.rollout.actor import RayRollout
from grade_ray.rollout.worker import RolloutWorker


@pytest.mark.ray
def test_actor_rolls_out_with_the_broadcast_weights_bitwise(ray_session, smoke_cfg, smoke_data):
    """Two weight versions through the object store: each actor batch equals an in-process
    worker's on the same weights, task and seed, value for value."""
    cfg = smoke_cfg.replace(**{"rollout.num_workers": 1, "rollout.num_cpus_per_worker": 0.5})
    plan = DataPlan.build(smoke_data[0], rounds=1, batch_size=200)
    task = plan.rounds[0][0]
    spec = rollout_spec(cfg, plan.meta, smoke_data[0])
    policy = new_policy(cfg, plan.meta, smoke_data[0])
    local = RolloutWorker(copy.deepcopy(policy), spec)
    pool = RayRollout(cfg, plan.meta, spec)
    try:
        for version, seed in ((1, 11), (2, 12)):  # the second must replace the first
            torch.manual_seed(version)
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn_like(p), alpha=0.3)
            state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            pool.set_weights(state, version)
            (got,) = pool.collect(pool.submit([task], 5.0, version, [seed]))
            local.set_weights(state, version)
            local.reseed(seed)
            want = local.rollout(TaskReader(plan.meta).load(task), 5.0)
            assert got.keys() == want.keys()
            for k, v in want.items():
                np.testing.assert_array_equal(got[k], v, err_msg=k)
    finally:
        pool.close()
