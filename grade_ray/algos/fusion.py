"""Score fusion: s_i(w) = sum_k w_k * phi(p_ik).

Registered forms (``FUSIONS.get(name)``), each ``fn(scores, weights, eps) -> fused``:

- ``linear``:      phi(p) = p
- ``log_product``: phi(p) = log(p + eps), i.e. rank by prod_k (p_k + eps)^{w_k};
  invariant to a per-task positive rescale of the scores.

Shapes: scores (B, N, K) float; weights (B, K) or (B, G, K) on the simplex;
returns (B, N) or (B, G, N). :func:`fuse_items` takes one weight vector per candidate
(item-aware policies): (B, N, K) or (B, G, N, K). Works on torch tensors (use ``torch.from_numpy``
for numpy inputs). Padded candidates get whatever value; mask them downstream.
"""

from __future__ import annotations

import numpy as np
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
    return _combine(scores.clamp_min(0).add_(eps).log_(), weights)  # one buffer, not three


def fuse(name: str, scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Apply the fusion registered as ``name``."""
    return FUSIONS.get(name)(scores, weights, eps)


def task_values(name: str, scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """phi(p) (B, N, K) of the fusion ``name``: every registered fusion is linear in w, so
    phi(p_.k) is the fusion at the unit vector e_k."""
    b, _, k = scores.shape
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device).expand(b, k, k)
    return fuse(name, scores, eye, eps).transpose(1, 2)


def fuse_items(
    name: str, scores: torch.Tensor, item_weights: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """s_i = sum_k w_ik phi(p_ik) with per-candidate weights (item-aware fusion).

    scores (B, N, K); item_weights (B, N, K) -> (B, N) or (B, G, N, K) -> (B, G, N).
    """
    phi = task_values(name, scores, eps)
    w = item_weights.to(phi.dtype)
    if w.dim() == 3:
        return (w * phi).sum(-1)
    if w.dim() == 4:
        return (w * phi.unsqueeze(1)).sum(-1)
    raise ValueError(f"item_weights must be (B, N, K) or (B, G, N, K), got {tuple(w.shape)}")


def fuse_requests(
    name: str, scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """One arm's fused scores (B, N): weights (B, K) per request (:func:`fuse`) or (B, N, K)
    per candidate (an item-aware policy, :func:`fuse_items`)."""
    if weights.dim() == 3:
        return fuse_items(name, scores, weights, eps)
    return fuse(name, scores, weights, eps)


def request_weights(weights, mask):
    """(B, K) view of an arm's weights: as is, or per-candidate (B, N, K) weights averaged
    over the real candidates (mask (B, N)); numpy arrays or tensors."""
    if weights.ndim != 3:
        return weights
    if isinstance(weights, torch.Tensor):
        m = torch.as_tensor(mask).to(weights.dtype).unsqueeze(-1)
        return (weights * m).sum(1) / m.sum(1).clamp_min(1)
    m = mask[..., None].astype(weights.dtype)
    return (weights * m).sum(1) / np.maximum(m.sum(1), 1)
