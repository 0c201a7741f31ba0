"""The fusion policy pi_theta(x): an MMoE-like network from context to the simplex.

Item-agnostic: it sees only the request's context features x (B, D) and
outputs one weight per upstream task, pi (B, K), rows summing to 1.
Context standardisation (mean/std fitted on training logs) lives in buffers,
so an exported policy carries its own preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn


class FusionPolicy(nn.Module):
    """Shared experts -> softmax gate mixture -> tower -> K-way softmax.

    x: (B, D) float32 -> logits (B, K); ``pi(x)`` = softmax(logits).
    """

    def __init__(
        self,
        context_dim: int,
        num_tasks: int,
        *,
        num_experts: int = 4,
        expert_hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.num_tasks = num_tasks
        self.register_buffer("x_mean", torch.zeros(context_dim))
        self.register_buffer("x_std", torch.ones(context_dim))
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(context_dim, expert_hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(expert_hidden, expert_hidden),
                nn.ReLU(),
            )
            for _ in range(num_experts)
        )
        self.gate = nn.Linear(context_dim, num_experts)
        self.tower = nn.Sequential(
            nn.Linear(expert_hidden, expert_hidden), nn.ReLU(), nn.Linear(expert_hidden, num_tasks)
        )
        # Start at the uniform policy: the last layer outputs zeros.
        nn.init.zeros_(self.tower[-1].weight)
        nn.init.zeros_(self.tower[-1].bias)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the context standardisation (std floored at 1e-6)."""
        self.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.x_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) -> logits (B, K)."""
        z = (x - self.x_mean) / self.x_std
        experts = torch.stack([e(z) for e in self.experts], dim=1)  # (B, E, H)
        gate = torch.softmax(self.gate(z), dim=-1)  # (B, E)
        mixed = torch.einsum("be,beh->bh", gate, experts)
        return self.tower(mixed)

    def pi(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) -> weights (B, K) on the simplex."""
        return torch.softmax(self.forward(x), dim=-1)


def build_policy(policy_cfg, context_dim: int, num_tasks: int) -> FusionPolicy:
    """Policy from a :class:`grade_ray.config.PolicyConfig`."""
    if getattr(policy_cfg, "kind", "context") == "item_aware":
        from grade_ray.models.item_aware import build_item_aware

        return build_item_aware(policy_cfg, context_dim, num_tasks)
    return FusionPolicy(
        context_dim,
        num_tasks,
        num_experts=policy_cfg.num_experts,
        expert_hidden=policy_cfg.expert_hidden,
        dropout=policy_cfg.dropout,
    )
