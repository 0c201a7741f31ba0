"""The RLModule: GRADE's :class:`~grade_ray.models.policy.FusionPolicy` as the policy network.

pi is a diagonal Gaussian over the K logits whose mean is ``FusionPolicy(x)`` and whose
log-std is a learnable state-independent vector; V is a separate MLP on the standardised
context. Since the policy network is a plain FusionPolicy, the trained policy is saved and
evaluated exactly like GRADE's (``softmax`` of the mean logits = the deterministic action).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from grade_ray.config import PolicyConfig, from_dict
from grade_ray.models.item_aware import refuse_item_aware
from grade_ray.models.policy import build_policy


def _module_classes():
    """Build the RLModule class lazily (importing RLlib is slow)."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule

    class FusionPPOModule(TorchRLModule, ValueFunctionAPI):
        """pi: N(FusionPolicy(x), diag(exp(log_std))^2) over logits; V: MLP on standardised x.

        ``model_config``: ``policy`` (a PolicyConfig dict), ``x_mean``/``x_std`` (context
        standardisation), ``init_log_std``, ``vf_hidden``, optional ``init_policy`` (a
        FusionPolicy checkpoint whose weights the policy network starts from).
        """

        def setup(self) -> None:
            mc = dict(self.model_config or {})
            d = int(self.observation_space.shape[0])
            k = int(self.action_space.shape[0])
            self.pi_net = build_policy(from_dict(PolicyConfig, mc.get("policy", {})), d, k)
            refuse_item_aware(self.pi_net, "the RLlib PPO baseline")
            if mc.get("x_mean") is not None:
                self.pi_net.set_normalization(
                    torch.tensor(mc["x_mean"], dtype=torch.float32),
                    torch.tensor(mc["x_std"], dtype=torch.float32),
                )
            if mc.get("init_policy"):
                from grade_ray.learner.loop import load_policy

                init, _, _ = load_policy(mc["init_policy"])
                self.pi_net.load_state_dict(init.state_dict())
            self.log_std = nn.Parameter(torch.full((k,), float(mc.get("init_log_std", -0.5))))
            h = int(mc.get("vf_hidden", 64))
            self.vf_net = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)
            )

        def _forward(self, batch, **kwargs):
            logits = self.pi_net(batch[Columns.OBS])
            log_std = self.log_std.expand_as(logits)
            return {Columns.ACTION_DIST_INPUTS: torch.cat([logits, log_std], dim=-1)}

        def compute_values(self, batch, embeddings=None):
            p = self.pi_net
            z = (batch[Columns.OBS] - p.x_mean) / p.x_std
            return self.vf_net(z).squeeze(-1)

    return FusionPPOModule


@functools.cache
def fusion_ppo_module_class():
    """The :class:`FusionPPOModule` RLModule class (RLlib imported on first use)."""
    return _module_classes()
