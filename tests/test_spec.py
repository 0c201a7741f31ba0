"""Reward settings resolved against data metadata; position-bias correction."""

from __future__ import annotations

import pytest
import torch

from grade_ray.config import ConfigError, RewardConfig
from grade_ray.data.sessions import SessionMeta
from grade_ray.spec import RewardSpec

META = SessionMeta(
    ("ctr", "cvr", "gmv", "profit"),
    ("prob", "prob", "value", "value"),
    ("click", "order", "gmv", "profit"),
    ("x",),
)


def test_names_resolve_to_indices():
    spec = RewardSpec.from_config(RewardConfig(), META)
    assert spec.post_coef == (1.0, 10.0, 0.0, 0.0)
    assert spec.prior_terms == (((0,), 1.0), ((0, 1), 10.0))
    assert spec.rules == ((0, 2), (0, 3))


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("post_gains", {"buy": 1.0}, "labels in this data"),
        ("prior_gains", {"ctr*pcvr": 1.0}, "tasks in this data"),
        ("format_rules", ("cvr>=pctr",), "tasks in this data"),
    ],
)
def test_unknown_names_list_the_valid_ones(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        RewardSpec.from_config(RewardConfig(**{field: value}), META)


def test_post_gain_clamps_and_inverse_propensity():
    labels = torch.tensor([[[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0.0, 0, 0, 0]]])
    position = torch.tensor([[0, 5, 95]])
    plain = RewardSpec.from_config(RewardConfig(post_gains={"click": 1.0, "order": -3.0}), META)
    assert plain.post_gain(labels, position).tolist() == [[1.0, 0.0, 0.0]]  # 1 - 3 -> 0
    ips = RewardSpec.from_config(
        RewardConfig(propensity="inverse", propensity_scale=5.0, propensity_min=0.1), META
    )
    g = ips.post_gain(labels, position)
    # exam(0) = 1, exam(5) = 1/2 -> (1 + 10) * 2; exam(95) floored at 0.1 but gain is 0
    assert g[0].tolist() == pytest.approx([1.0, 22.0, 0.0])
    assert ips.post_gain(labels)[0].tolist() == pytest.approx([1.0, 11.0, 0.0])  # no positions
