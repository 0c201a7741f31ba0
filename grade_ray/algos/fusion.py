"""Score fusion: s_i(w) = sum_k w_k * phi(p_ik).

Registered forms (``FUSIONS.get(name)``), each ``fn(scores, weights, eps) -> fused``:

- ``linear``:      phi(p) = p
- ``log_product``: phi(p) = log(p + eps), i.e. rank by prod_k (p_k + eps)^{w_k};
  invariant to a per-task positive rescale of the scores.

Shapes: scores (B, N, K) float; weights (B, K) or (B, G, K) on the simplex;
returns (B, N) or (B, G, N). Works on torch tensors (use ``torch.from_numpy``
for numpy inputs). Padded candidates get whatever value; mask them downstream.
"""

from __future__ import annotations

import torch

from grade_ray.algos.registry import Registry

FUSIONS: Registry = Registry("fusion")


def _combine(phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(phi.dtype)
    if w.dim() == 2:  # (B, K) -> (B, N)
        return torch.bmm(phi, w.unsqueeze(-1)).squeeze(-1)
    if w.dim() == 3:  # (B, G, K) -> (B, G, N); bmm is ~3x faster than einsum on CPU
        return torch.bmm(w, phi.transpose(1, 2))
    raise ValueError(f"weights must be (B, K) or (B, G, K), got shape {tuple(weights.shape)}")


@FUSIONS.register("linear")
def linear(scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """s = sum_k w_k p_k. scores (B, N, K); weights (B, K) | (B, G, K)."""
    return _combine(scores, weights)


@FUSIONS.register("log_product")
def log_product(scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """s = sum_k w_k log(p_k + eps). scores (B, N, K) >= 0; weights (B, K) | (B, G, K)."""
    return _combine(torch.log(scores.clamp_min(0) + eps), weights)


def fuse(name: str, scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Apply the fusion registered as ``name``."""
    return FUSIONS.get(name)(scores, weights, eps)
