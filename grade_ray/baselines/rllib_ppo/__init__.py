"""RLlib PPO (with a critic) as a peer baseline for GRADE, on the same logs and reward.

The problem is a one-step RL environment: each episode is one logged training request,
the action is K logits, the fusion weights are their softmax and the reward is GRADE's
composite reward of re-ranking that request. RLlib (new API stack, torch) trains PPO on it
with its value function (GAE); the policy network is GRADE's own FusionPolicy, so the
result is saved as an ordinary ``policy.pt`` and evaluated exactly like GRADE. No
distillation step.

What differs from GRADE by construction: one sampled action per request (no group of G,
no group-relative advantage; the critic is the baseline), Gaussian noise on logits instead
of a Dirichlet on the simplex, and RLlib's sampling/learning machinery per env step.

- :mod:`.env`: the logged-request gymnasium env (single and vectorised) and the reward on
  logged requests;
- :mod:`.module`: the RLModule (FusionPolicy as the Gaussian mean, a separate value MLP);
- :mod:`.training`: the PPO config, the train loop and the saved policy
  (:func:`~.training.train_rllib_ppo`) and the throughput benchmark
  (:func:`~.training.bench_rllib_ppo`);
- :mod:`.command`: ``grade-ray baseline rllib-ppo``.
"""
