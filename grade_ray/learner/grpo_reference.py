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

import numpy as np
import torch
from torch import nn

from grade_ray import keys
from grade_ray.learner.grpo import (
    _TRAIN_COLUMNS,
    GRPOLearner,
    GRPOSettings,
    _synced_minibatches,
    check_finite,
)
from grade_ray.spec import as_tensor


class ReferenceGRPOLearner(GRPOLearner):
    """:class:`GRPOLearner` with the earlier update loop and optimizer."""

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

    def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        check_finite(batch)
        s = self.settings
        alpha_hat = float(batch[keys.ALPHA_HAT])
        tensors = {c: as_tensor(np.asarray(batch[c])).to(self.device) for c in _TRAIN_COLUMNS}
        n = tensors[keys.CONTEXT].shape[0]
        n_mb = _synced_minibatches(n, s.minibatch_size)
        self.model.eval()
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(s.epochs_per_batch):
            order = torch.randperm(n, generator=self.generator).repeat(
                -(-n_mb * s.minibatch_size // n)
            )
            size = -(-n // n_mb) if n_mb else 0
            for j in range(n_mb):
                idx = order[j * size : (j + 1) * size].to(self.device)
                # no REF_PI column: compute_loss runs the reference on each minibatch
                stats = self._step({c: t[idx] for c, t in tensors.items()}, alpha_hat)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                steps += 1
        self.version += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}
