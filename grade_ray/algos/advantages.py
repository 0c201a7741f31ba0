"""Group-relative advantages: each request's G rewards are compared with their own group.

Registered scalings (``ADVANTAGES.get(name)``), each ``fn(rewards (B, G), eps) -> (B, G)``:

- ``std``:  A = (R - mean_G R) / (std_G R + eps), population std (GRPO / GRADE default)
- ``mean``: A = R - mean_G R (Dr. GRPO style, no scale normalisation)
- ``batch``: A = (R - mean_G R) / std_batch(R - mean_G R): one scale for the whole rollout
  batch, so requests keep their relative weight (the gradient follows the batch's mean
  reward, not each request's standardised reward) at the magnitude of ``std``
- ``none``: A = R

``group_advantages`` applies one and zeroes groups with (numerically) zero reward variance:
they carry no learning signal in any mode.
"""

from __future__ import annotations

import torch

from grade_ray.algos.registry import Registry

ADVANTAGES: Registry = Registry("advantage")


def _group_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and population std over G, computed in float64. (B, G) -> (B, 1), (B, 1)."""
    r = rewards.to(torch.float64)
    mean = r.mean(-1, keepdim=True)
    std = (r - mean).pow(2).mean(-1, keepdim=True).sqrt()
    return mean, std


@ADVANTAGES.register("std")
def std_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A = (R - mean_G R) / (std_G R + eps), std the population std. (B, G) -> (B, G)."""
    mean, std = _group_stats(rewards)
    return ((rewards.to(torch.float64) - mean) / (std + eps)).to(rewards.dtype)


@ADVANTAGES.register("mean")
def mean_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A = R - mean_G R. (B, G) -> (B, G)."""
    mean, _ = _group_stats(rewards)
    return (rewards.to(torch.float64) - mean).to(rewards.dtype)


@ADVANTAGES.register("batch")
def batch_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A = (R - mean_G R) / (std over all (B, G) entries of R - mean_G R + eps). (B, G)."""
    mean, _ = _group_stats(rewards)
    centred = rewards.to(torch.float64) - mean
    return (centred / (centred.pow(2).mean().sqrt() + eps)).to(rewards.dtype)


@ADVANTAGES.register("none")
def raw_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A = R. (B, G) -> (B, G)."""
    return rewards.clone()


def group_advantages(
    rewards: torch.Tensor, mode: str, eps: float = 1e-6, zero_var_tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of G samples per request, relative to their group.

    rewards: (B, G) float; mode: a name in ADVANTAGES ("std", "mean", "none").
    Returns (adv (B, G) in rewards' dtype, zero_var (B,) bool). A group is zero-variance when
    std_G R <= zero_var_tol or all its rewards are identical; its advantages are exactly 0 in
    every mode (no policy gradient; count them with ``zero_var.sum()``). No gradient.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    fn = ADVANTAGES.get(mode)
    with torch.no_grad():
        _, std = _group_stats(rewards)
        same = rewards.amax(-1) == rewards.amin(-1)
        zero_var = (std.squeeze(-1) <= zero_var_tol) | same
        adv = fn(rewards, eps)
        adv = adv.masked_fill(zero_var.unsqueeze(-1), 0.0)
    return adv, zero_var
