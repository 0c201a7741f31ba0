"""``grade-ray bench``: ``throughput`` (kernel, rollout actors, learner, weight sync,
memory, serving, simulator, the N-worker projection) and ``quality`` (GRADE,
its ablations and RLlib PPO at equal samples and equal wall time); ``table`` renders
both pages' Markdown tables from rows of cells."""
