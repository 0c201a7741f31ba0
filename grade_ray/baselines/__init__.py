"""Peer baselines trained on the same logs and the same reward as GRADE.

- :mod:`grade_ray.baselines.rllib_ppo`: RLlib PPO with a value function (critic + GAE) on a
  one-step environment serving one logged request per step (``env``), with GRADE's
  :class:`~grade_ray.models.policy.FusionPolicy` inside the RLModule (``module``), so the
  result is evaluated exactly like GRADE; ``training`` runs it, ``command`` is its
  subcommand (``grade-ray baseline rllib-ppo``).
"""
