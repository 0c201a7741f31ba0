"""Reference only (tests and ``grade-ray bench``; training uses
:class:`grade_ray.models.policy.FusionPolicy`): the fusion policy as it was computed before
its experts were stacked, one ``nn.Sequential`` per expert.

Same architecture, initialisation (RNG order) and math as :class:`FusionPolicy`; its
state dict has the earlier per-expert keys (``experts.{i}.0.weight``, ...), which
:class:`FusionPolicy` loads (and vice versa with :func:`stacked_to_per_expert`).
"""

from __future__ import annotations

import torch
from torch import nn


class PerExpertFusionPolicy(nn.Module):
    """Shared experts -> softmax gate mixture -> tower; x (B, D) -> logits (B, K)."""

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
        nn.init.zeros_(self.tower[-1].weight)
        nn.init.zeros_(self.tower[-1].bias)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.x_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.x_mean) / self.x_std
        experts = torch.stack([e(z) for e in self.experts], dim=1)  # (B, E, H)
        gate = torch.softmax(self.gate(z), dim=-1)  # (B, E)
        mixed = torch.einsum("be,beh->bh", gate, experts)
        return self.tower(mixed)

    def pi(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=-1)


def stacked_to_per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`FusionPolicy` state dict -> the per-expert keys of
    :class:`PerExpertFusionPolicy` (copies; other keys unchanged)."""
    out = {k: v for k, v in state.items() if not k.startswith("expert_")}
    for i in range(state["expert_w1"].shape[0]):
        out[f"experts.{i}.0.weight"] = state["expert_w1"][i].clone()
        out[f"experts.{i}.0.bias"] = state["expert_b1"][i].clone()
        out[f"experts.{i}.3.weight"] = state["expert_w2"][i].clone()
        out[f"experts.{i}.3.bias"] = state["expert_b2"][i].clone()
    return out


def per_expert_copy(policy: nn.Module) -> PerExpertFusionPolicy:
    """A :class:`PerExpertFusionPolicy` holding a stacked :class:`FusionPolicy`'s weights
    (its sizes and dropout read off the policy): the same function, computed the earlier
    way."""
    w1 = policy.expert_w1
    old = PerExpertFusionPolicy(
        policy.context_dim,
        policy.num_tasks,
        num_experts=w1.shape[0],
        expert_hidden=w1.shape[1],
        dropout=policy.expert_dropout.p,
    )
    old.load_state_dict(stacked_to_per_expert(policy.state_dict()))
    return old
