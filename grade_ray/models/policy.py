"""The fusion policy pi_theta(x): an MMoE-like network from context to the simplex.

Item-agnostic: it sees only the request's context features x (B, D) and
outputs one weight per upstream task, pi (B, K), rows summing to 1.
Context standardisation (mean/std fitted on training logs) lives in buffers,
so an exported policy carries its own preprocessing.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _init_linear(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """In place, what ``nn.Linear.reset_parameters`` draws (same calls, same RNG order)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0
    nn.init.uniform_(bias, -bound, bound)


_LEGACY_EXPERT_LAYERS = {
    "expert_w1": (0, "weight"),
    "expert_b1": (0, "bias"),
    "expert_w2": (3, "weight"),
    "expert_b2": (3, "bias"),
}


def _stack_legacy_experts(state_dict: dict, prefix: str) -> None:
    """In place: the per-expert keys of earlier versions (``experts.{i}.0.weight`` ... of an
    ``nn.ModuleList`` of ``nn.Sequential``; layers 0 and 3 are the Linear ones) -> the
    stacked ``expert_w1``, ``expert_b1``, ``expert_w2``, ``expert_b2``. A state dict
    without them is left alone."""
    if f"{prefix}experts.0.0.weight" not in state_dict:
        return
    n = 0
    while f"{prefix}experts.{n}.0.weight" in state_dict:
        n += 1
    for name, (layer, kind) in _LEGACY_EXPERT_LAYERS.items():
        keys = [f"{prefix}experts.{i}.{layer}.{kind}" for i in range(n)]
        if all(k in state_dict for k in keys):  # else load_state_dict names what is missing
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


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
        # The E experts' layers as stacked parameters, so that a forward is one batched
        # matmul per layer for all E experts instead of 2E small Linear calls (per-op
        # overhead dominated at the learner's 512-request minibatches).
        # Expert i is Linear(D, H) -> ReLU -> Dropout -> Linear(H, H) -> ReLU with weights
        # expert_w1[i] (H, D), expert_b1[i] (H,), expert_w2[i] (H, H), expert_b2[i] (H,).
        # State dicts of the earlier per-expert layout (experts.{i}.0.weight, ...) load into
        # it (see _load_from_state_dict).
        self.expert_w1 = nn.Parameter(torch.empty(num_experts, expert_hidden, context_dim))
        self.expert_b1 = nn.Parameter(torch.empty(num_experts, expert_hidden))
        self.expert_w2 = nn.Parameter(torch.empty(num_experts, expert_hidden, expert_hidden))
        self.expert_b2 = nn.Parameter(torch.empty(num_experts, expert_hidden))
        self.expert_dropout = nn.Dropout(dropout)
        with torch.no_grad():  # nn.Linear's initialisation, expert by expert, in its RNG order
            for i in range(num_experts):
                _init_linear(self.expert_w1[i], self.expert_b1[i])
                _init_linear(self.expert_w2[i], self.expert_b2[i])
        self.gate = nn.Linear(context_dim, num_experts)
        self.tower = nn.Sequential(
            nn.Linear(expert_hidden, expert_hidden), nn.ReLU(), nn.Linear(expert_hidden, num_tasks)
        )
        # Start at the uniform policy: the last layer outputs zeros.
        nn.init.zeros_(self.tower[-1].weight)
        nn.init.zeros_(self.tower[-1].bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        _stack_legacy_experts(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the context standardisation (std floored at 1e-6)."""
        self.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.x_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) -> logits (B, K)."""
        z = (x - self.x_mean) / self.x_std
        # (E, B, H) throughout: expert i's layers on slice i, all E in one batched matmul
        # per layer (E small matmuls of the same shapes as E separate nn.Linear calls).
        # ReLUs in place: the matmuls' backward needs their inputs, not their outputs.
        z_e = z.expand(self.expert_w1.shape[0], -1, -1)  # (E, B, D), no copy
        first = torch.baddbmm(self.expert_b1.unsqueeze(1), z_e, self.expert_w1.transpose(1, 2))
        first = self.expert_dropout(first.relu_())
        experts = torch.baddbmm(
            self.expert_b2.unsqueeze(1), first, self.expert_w2.transpose(1, 2)
        ).relu_()
        gate = torch.softmax(self.gate(z), dim=-1)  # (B, E)
        # the gate mixture as a broadcast product (a (B, 1, E) x (B, E, H) bmm is B tiny
        # matmuls, several times slower on CPU)
        mixed = (experts * gate.t().unsqueeze(-1)).sum(0)  # (B, H)
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
