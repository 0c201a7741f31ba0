"""Item-aware fusion policy (``policy.kind: item_aware``): request weights pi(x) plus a
per-request modulation c(x) that adjusts them per candidate by its scores.

Two context networks of the item-agnostic architecture (:class:`FusionPolicy`): one gives the
request's weights pi(x) on the simplex exactly as the item-agnostic policy does, the other
c(x) in R^K (its last layer starts at zero, so a fresh item-aware policy ranks like the
item-agnostic one). Candidate i is fused with w_ik = softmax_k(log pi_k + c_k phi_ik)
(:mod:`grade_ray.algos.modulation`).

``forward(x)`` (what the learners call, DDP-wrapped or not) returns the raw (B, 2K)
[request logits, c]; :meth:`exploration_params` turns it into the joint exploration's
parameters [pi, c, sigma_c] and :meth:`split` into (logits, c) for Stage 1.
"""

from __future__ import annotations

import torch
from torch import nn

from grade_ray.algos.modulation import item_features, item_weights, modulated_fusion
from grade_ray.models.policy import FusionPolicy


class ItemAwarePolicy(nn.Module):
    """pi(x) (B, K) on the simplex and c(x) (B, K); per-item weights from the scores."""

    item_aware = True

    def __init__(
        self,
        context_dim: int,
        num_tasks: int,
        *,
        num_experts: int = 4,
        expert_hidden: int = 64,
        dropout: float = 0.0,
        modulation_sigma: float = 0.1,
        modulation_hidden: int = 32,
    ) -> None:
        super().__init__()
        if modulation_sigma <= 0:
            raise ValueError(f"modulation_sigma must be > 0, got {modulation_sigma}")
        self.context_dim = context_dim
        self.num_tasks = num_tasks
        self.base = FusionPolicy(
            context_dim,
            num_tasks,
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            dropout=dropout,
        )
        # c(x): the same architecture, smaller; its zero-initialised last layer gives c = 0
        self.mod = FusionPolicy(
            context_dim,
            num_tasks,
            num_experts=max(1, num_experts // 2),
            expert_hidden=modulation_hidden,
            dropout=dropout,
        )
        self.register_buffer("modulation_sigma", torch.tensor(float(modulation_sigma)))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.base.set_normalization(mean, std)
        self.mod.set_normalization(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> (B, 2K) = [request logits, modulation c]."""
        return torch.cat([self.base(x), self.mod(x)], -1)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's (B, 2K) -> (request logits (B, K), c (B, K))."""
        return out[..., : self.num_tasks], out[..., self.num_tasks :]

    def exploration_params(self, out: torch.Tensor) -> torch.Tensor:
        """forward's (B, 2K) -> (B, 2K + 1) = [pi, c, sigma_c] (the joint exploration's pi)."""
        logits, c = self.split(out)
        sd = self.modulation_sigma.to(out.dtype).expand(*out.shape[:-1], 1)
        return torch.cat([torch.softmax(logits, -1), c, sd], -1)

    def pi(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> request weights (B, K) on the simplex (before the per-item modulation)."""
        return torch.softmax(self.base(x), dim=-1)

    def modulation(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> c(x) (B, K)."""
        return self.mod(x)

    def fused(
        self,
        x: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        fusion: str,
        eps: float = 1e-6,
    ) -> torch.Tensor:
        """Serving/evaluation: fused scores (B, N) at the mean action (pi(x), c(x))."""
        logits, c = self.split(self(x))
        return modulated_fusion(fusion, scores, mask, torch.softmax(logits, -1), c, eps)

    def item_weights(
        self, x: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
    ) -> torch.Tensor:
        """Per-candidate weights (B, N, K) at the mean action (pi(x), c(x))."""
        logits, c = self.split(self(x))
        return item_weights(torch.softmax(logits, -1), c, item_features(scores, mask, eps))

    def stage1_fused(
        self, out: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, fusion: str, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1 from forward's output: (request logits, pi, fused (B, N)), differentiable."""
        logits, c = self.split(out)
        pi = torch.softmax(logits, -1)
        return logits, pi, modulated_fusion(fusion, scores, mask, pi, c, eps)


def is_item_aware(policy: nn.Module) -> bool:
    """Whether ``policy`` (possibly DDP-wrapped) is an item-aware policy."""
    return bool(getattr(getattr(policy, "module", policy), "item_aware", False))


def refuse_item_aware(policy: nn.Module, what: str) -> None:
    """One clear error where a code path supports only item-agnostic policies."""
    if is_item_aware(policy):
        raise ValueError(
            f"{what} supports only item-agnostic policies (policy.kind=context); this policy "
            "is item-aware (policy.kind=item_aware): its weights depend on each candidate's "
            "scores. Evaluate it with `grade-ray evaluate` / `grade-ray suite`."
        )


def build_item_aware(policy_cfg, context_dim: int, num_tasks: int) -> ItemAwarePolicy:
    """Item-aware policy from a :class:`grade_ray.config.PolicyConfig` (``kind: item_aware``)."""
    return ItemAwarePolicy(
        context_dim,
        num_tasks,
        num_experts=policy_cfg.num_experts,
        expert_hidden=policy_cfg.expert_hidden,
        dropout=policy_cfg.dropout,
        modulation_sigma=policy_cfg.modulation_sigma,
    )
