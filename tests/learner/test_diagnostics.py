"""Training-health warnings: each fires on its symptom and stays quiet on noise."""

from __future__ import annotations

from grade_ray import keys
from grade_ray.learner.diagnostics import failure_warnings

NS = "eval/north_star"


def _round(post: float, ns: float, **extra: float) -> dict[str, float]:
    return {keys.ROLLOUT_R_POST: post, NS: ns, **extra}


def _hacking(history) -> list[str]:
    return [w for w in failure_warnings(history, NS) if "reward hacking" in w]


def test_reward_hacking_needs_a_material_move_in_both():
    # R_post up 10% while the business metric falls 2%: warn
    assert _hacking([_round(0.150, 5.60), _round(0.158, 5.55), _round(0.165, 5.49)])
    # tiny moves between rounds (noise, different days) do not
    assert not _hacking([_round(0.1509, 5.4304), _round(0.1510, 5.4284)])
    # both improving, or R_post flat, do not
    assert not _hacking([_round(0.150, 5.50), _round(0.160, 5.60)])
    assert not _hacking([_round(0.150, 5.60), _round(0.150, 5.40)])
    # judged over the last 3 rounds only: an old rise does not count
    old = [_round(0.10, 5.9), _round(0.15, 5.6)]
    assert not _hacking(old + [_round(0.15, 5.6), _round(0.15, 5.6), _round(0.15, 5.6)])
    assert not _hacking([_round(0.150, 5.60)])  # one round: nothing to compare
    assert not failure_warnings([_round(0.15, 5.6), _round(0.2, 5.0)], None)  # no metric


def test_polarization_spread_and_spikes():
    w = failure_warnings([{keys.POLICY_POLARIZED: 0.8, keys.POLICY_SPREAD: 0.001}])
    assert any("polarization" in x for x in w) and any("no personalization" in x for x in w)
    calm = [{keys.LEARNER_KL: 0.01, keys.LEARNER_LOSS: 0.1} for _ in range(3)]
    assert not failure_warnings(calm)
    spiked = calm + [{keys.LEARNER_KL: 0.5, keys.LEARNER_LOSS: 0.1}]
    assert [x for x in failure_warnings(spiked) if "instability" in x and "kl" in x]
