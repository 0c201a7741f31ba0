"""Context-aware recalibration of the upstream model's probability predictions.

R_prior ranks by the upstream model's predicted value; where that model is
miscalibrated for some users (a segment's pCVR too flat, or blind to its price
taste), R_prior pulls the policy toward the model's belief. Recalibrating the
predictions on the logged labels, per context, removes that pull. For a
probability task with prediction p (B, N), standardised request context z (B, D)
and the centred log predictions v (B, N, V) of the value tasks (order value,
profit: the item features the logs carry):

    logit p' = a(z) + b(z) logit p + sum_v c_v(z) v,   each coefficient linear in z:
    [a, b, c_1..c_V](z) = C [1, z],  C: (2 + V, D + 1).

The identity calibration is C = 0 except b's intercept = 1.
"""

from __future__ import annotations

import dataclasses

import torch

P_MIN = 1e-6
"""Predictions are clamped to [P_MIN, 1 - P_MIN] (logit) and values to >= P_MIN (log)."""


@dataclasses.dataclass(frozen=True)
class PriorCalibration:
    """Fitted recalibration (plain values: safe to ship to rollout actors and to save).

    tasks: indices of the calibrated probability tasks; value_tasks: indices whose log
    prediction is a feature; coef: per calibrated task a (2 + V, D + 1) nested tuple;
    z_mean, z_std: (D,) context standardisation; v_mean: (V,) mean log value prediction.
    """

    tasks: tuple[int, ...]
    value_tasks: tuple[int, ...]
    coef: tuple[tuple[tuple[float, ...], ...], ...]
    z_mean: tuple[float, ...]
    z_std: tuple[float, ...]
    v_mean: tuple[float, ...]


def identity_coef(num_values: int, context_dim: int) -> torch.Tensor:
    """(2 + V, D + 1) coefficients of the identity calibration."""
    c = torch.zeros(2 + num_values, context_dim + 1, dtype=torch.float64)
    c[1, 0] = 1.0
    return c


def calibration_features(
    scores: torch.Tensor, context: torch.Tensor, cal: PriorCalibration
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zf (B, D + 1) = [1, standardised context], v (B, N, V) centred log value predictions)."""
    mean = torch.tensor(cal.z_mean, dtype=scores.dtype, device=scores.device)
    std = torch.tensor(cal.z_std, dtype=scores.dtype, device=scores.device)
    z = (context.to(scores.dtype) - mean) / std
    zf = torch.cat([torch.ones_like(z[:, :1]), z], dim=1)
    v_mean = torch.tensor(cal.v_mean, dtype=scores.dtype, device=scores.device)
    if cal.value_tasks:
        v = torch.log(scores[..., list(cal.value_tasks)].clamp_min(P_MIN)) - v_mean
    else:
        v = scores.new_zeros((*scores.shape[:-1], 0))
    return zf, v


def calibrated_logit(
    p: torch.Tensor, v: torch.Tensor, zf: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """p: (B, N) probabilities; v: (B, N, V); zf: (B, D + 1); coef: (2 + V, D + 1).

    Returns (B, N): a(z) + b(z) logit p + sum_v c_v(z) v (differentiable in coef).
    """
    h = zf @ coef.T  # (B, 2 + V)
    p = p.clamp(P_MIN, 1 - P_MIN)
    out = h[:, :1] + h[:, 1:2] * (torch.log(p) - torch.log1p(-p))
    if v.shape[-1]:
        out = out + (v * h[:, None, 2:]).sum(-1)
    return out


def apply_calibration(
    scores: torch.Tensor, context: torch.Tensor, cal: PriorCalibration
) -> torch.Tensor:
    """scores (B, N, K), context (B, D) -> (B, N, K) with the calibrated tasks replaced by
    sigmoid(calibrated_logit); other tasks unchanged."""
    zf, v = calibration_features(scores, context, cal)
    out = scores.clone()
    for task, coef in zip(cal.tasks, cal.coef):
        c = torch.tensor(coef, dtype=scores.dtype, device=scores.device)
        out[..., task] = torch.sigmoid(calibrated_logit(scores[..., task], v, zf, c))
    return out
