"""FusionPolicy with stacked experts computes what the per-expert policy computed, starts
from the same weights, and loads policies saved in the per-expert layout.

The reference is :class:`grade_ray.models.policy_reference.PerExpertFusionPolicy`, the
earlier implementation kept verbatim (one ``nn.Sequential`` per expert).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grade_ray.models.policy import FusionPolicy
from grade_ray.models.policy_reference import PerExpertFusionPolicy, stacked_to_per_expert

SHAPES = [  # (context_dim, num_tasks, num_experts, expert_hidden)
    (16, 4, 4, 64),  # the defaults
    (3, 2, 1, 4),
    (7, 5, 3, 9),
]


def pair(d: int, k: int, e: int, h: int, seed: int = 0):
    """The two implementations with the same, far-from-uniform weights and a non-trivial
    context standardisation."""
    torch.manual_seed(seed)
    old = PerExpertFusionPolicy(d, k, num_experts=e, expert_hidden=h)
    for p in old.parameters():
        nn.init.normal_(p, std=0.5)
    old.set_normalization(torch.randn(d), torch.rand(d) + 0.5)
    new = FusionPolicy(d, k, num_experts=e, expert_hidden=h)
    new.load_state_dict(old.state_dict())  # the per-expert keys
    return old, new


@pytest.mark.parametrize("shape", SHAPES)
def test_stacked_forward_and_gradients_equal_the_per_expert_reference(shape):
    d, k, e, h = shape
    old, new = pair(d, k, e, h)
    x = 3 * torch.randn(257, d)
    torch.testing.assert_close(new(x), old(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(new.pi(x), old.pi(x), rtol=0, atol=1e-6)
    # the same gradients, parameter by parameter (through the per-expert key mapping)
    target = torch.randn(257, k)
    for m in (old, new):
        m.zero_grad()
        (m.pi(x) * target).sum().backward()
    g_new = stacked_to_per_expert({n: p.grad for n, p in new.named_parameters()})
    g_old = {n: p.grad for n, p in old.named_parameters()}
    assert sorted(g_new) == sorted(g_old)
    scale = max(float(g.abs().max()) for g in g_old.values())  # ~40 with these weights
    for name, g in g_old.items():  # float32 summation order: ~1e-7 of the largest entry
        torch.testing.assert_close(g_new[name], g, rtol=0, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_same_seed_gives_the_same_initial_weights(shape):
    d, k, e, h = shape
    torch.manual_seed(7)
    new = FusionPolicy(d, k, num_experts=e, expert_hidden=h)
    torch.manual_seed(7)
    old = PerExpertFusionPolicy(d, k, num_experts=e, expert_hidden=h)
    got, want = stacked_to_per_expert(new.state_dict()), old.state_dict()
    assert sorted(got) == sorted(want)
    for name, v in want.items():
        assert torch.equal(got[name], v), name


def test_a_policy_saved_in_the_per_expert_layout_loads_with_identical_outputs(tmp_path):
    old, _ = pair(16, 4, 4, 64, seed=3)
    state = old.state_dict()
    assert "experts.3.3.bias" in state and "expert_w1" not in state  # the old keys
    torch.save(state, tmp_path / "policy_state.pt")
    loaded = torch.load(tmp_path / "policy_state.pt", weights_only=True)
    new = FusionPolicy(16, 4)
    new.load_state_dict(loaded)  # strict: every key used, none missing
    x = 2 * torch.randn(64, 16)
    with torch.no_grad():
        torch.testing.assert_close(new.pi(x), old.pi(x), rtol=0, atol=1e-6)
    assert torch.equal(new.x_mean, old.x_mean) and torch.equal(new.x_std, old.x_std)
    assert torch.equal(new.expert_w2[2], old.experts[2][3].weight)


def test_a_wrapped_policy_loads_old_keys_under_its_prefix():
    """load_state_dict of a module holding the policy (serving's wrapper, DDP's ``module.``)
    hands the policy its keys with a prefix; the conversion works there too."""
    old, _ = pair(5, 3, 2, 6, seed=1)
    outer = nn.ModuleDict({"policy": FusionPolicy(5, 3, num_experts=2, expert_hidden=6)})
    outer.load_state_dict({f"policy.{k}": v for k, v in old.state_dict().items()})
    x = torch.randn(9, 5)
    torch.testing.assert_close(outer["policy"](x), old(x), rtol=0, atol=1e-6)


def test_an_incomplete_old_state_dict_is_refused_naming_the_missing_keys():
    old, _ = pair(5, 3, 2, 6)
    state = old.state_dict()
    del state["experts.1.3.weight"]
    with pytest.raises(RuntimeError, match="expert_w2"):
        FusionPolicy(5, 3, num_experts=2, expert_hidden=6).load_state_dict(state)


def test_its_own_state_dict_round_trips():
    _, new = pair(7, 5, 3, 9)
    again = FusionPolicy(7, 5, num_experts=3, expert_hidden=9)
    again.load_state_dict(new.state_dict())
    x = torch.randn(11, 7)
    assert torch.equal(again(x), new(x))
    assert not any(k.startswith("experts.") for k in new.state_dict())


def test_an_empty_batch_gives_empty_logits():
    _, new = pair(16, 4, 4, 64)
    assert new(torch.zeros(0, 16)).shape == (0, 4)
