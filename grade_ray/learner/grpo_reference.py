"""Reference only (tests and ``grade-ray bench``; training uses
:class:`grade_ray.learner.grpo.GRPOLearner`): the Stage 2 update as it was computed before
the learner was made faster.

Give it a :class:`grade_ray.models.policy_reference.PerExpertFusionPolicy` (one
``nn.Sequential`` per expert) to time the old path as a whole: the reference policy pi_ref
runs on every minibatch of every epoch, and Adam steps parameter by parameter (torch's
for-loop implementation), and the loss is composed of the exploration's ``log_prob`` and
``kl`` and the policy loss, differentiated by autograd (no fused Dirichlet-GRPO op).
Minibatch order, clipping and metrics are the learner's own, so both compute the same
update up to floating-point rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from grade_ray.learner.grpo import GRPOLearner, GRPOSettings


class ReferenceGRPOLearner(GRPOLearner):
    """:class:`GRPOLearner` with the earlier optimizer and pi_ref run on every minibatch."""

    def __init__(
        self,
        model: nn.Module,
        settings: GRPOSettings,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__(model, settings, device, seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.fused_loss = False  # the loss composed of log_prob, kl and grpo_loss (autograd)

    def _batch_columns(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """None: compute_loss runs the reference policy on each minibatch, as it did."""
        return {}
