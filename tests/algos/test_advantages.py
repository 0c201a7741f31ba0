"""Group-relative advantages: hand values, shift/scale invariance, zero-variance groups."""

from __future__ import annotations

import math

import pytest
import torch

from grade_ray.algos.advantages import ADVANTAGES, group_advantages


def test_std_advantage_by_hand():
    adv, zero_var = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), "std", eps=0.0)
    a = 1 / math.sqrt(2 / 3)  # population std of (1, 2, 3) is sqrt(2/3)
    assert adv[0].tolist() == pytest.approx([-a, 0.0, a])
    assert zero_var.tolist() == [False]


def test_mean_and_none_by_hand():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert group_advantages(r, "mean")[0][0].tolist() == pytest.approx([-2.0, -1.0, 3.0])
    assert group_advantages(r, "none")[0][0].tolist() == pytest.approx([1.0, 2.0, 6.0])


@pytest.mark.parametrize("mode", ADVANTAGES.names())
def test_zero_variance_groups_get_exactly_zero(mode):
    r = torch.tensor([[0.7] * 20, [0.1, 0.2, 0.3] + [0.1] * 17, [0.3] * 20])
    adv, zero_var = group_advantages(r, mode)
    assert zero_var.tolist() == [True, False, True]
    assert bool((adv[0] == 0).all()) and bool((adv[2] == 0).all())
    assert bool((adv[1] != 0).any())


def test_std_mode_invariant_to_shift_and_positive_scale():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(32, 20, generator=g)
    base, _ = group_advantages(r, "std", eps=1e-9)
    shift = torch.randn(32, 1, generator=g)
    scale = torch.rand(32, 1, generator=g) * 10 + 0.1
    moved, _ = group_advantages(r * scale + shift, "std", eps=1e-9)
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
    # mean mode: shift-invariant, scales linearly
    m0, _ = group_advantages(r, "mean")
    m1, _ = group_advantages(r * 3.0 + shift, "mean")
    torch.testing.assert_close(m1, 3.0 * m0, atol=1e-5, rtol=1e-5)


def test_std_mode_has_zero_mean_unit_population_std():
    r = torch.rand(16, 20, generator=torch.Generator().manual_seed(1))
    adv, _ = group_advantages(r, "std", eps=0.0)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(-1, unbiased=False), torch.ones(16))


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match=r"\['batch', 'mean', 'none', 'std'\]"):
        group_advantages(torch.rand(2, 3), "rank")


def test_batch_advantage_by_hand_keeps_requests_relative_scale():
    r = torch.tensor([[1.0, 3.0], [10.0, 30.0]], dtype=torch.float64)
    adv, _ = group_advantages(r, "batch", eps=0.0)
    # centred: [[-1, 1], [-10, 10]]; one std over all entries: sqrt((1 + 1 + 100 + 100) / 4)
    s = (202 / 4) ** 0.5
    torch.testing.assert_close(
        adv, torch.tensor([[-1 / s, 1 / s], [-10 / s, 10 / s]], dtype=torch.float64)
    )
    std_adv, _ = group_advantages(r, "std", eps=0.0)
    assert torch.equal(std_adv[0], std_adv[1])  # std mode forgets the 10x
    assert adv.pow(2).mean().item() == pytest.approx(1.0)
