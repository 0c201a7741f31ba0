"""RLlib PPO (with a critic) as a peer baseline for GRADE, on the same logs and reward."""
