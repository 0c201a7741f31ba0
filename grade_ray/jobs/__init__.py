"""Jobs: one module per ``grade-ray`` command that trains, evaluates or measures.

``train`` (simulate/pretrain/train in one process), ``train_ray`` (Stage 2 on
Ray Train + rollout actors), ``evaluate`` (offline metrics, simulated A/B test)
with ``headroom`` (oracles, captured headroom, objective and optimisation gaps,
diagnosis) and ``paired`` + ``replay`` (paired bootstrap vs best static, segment and mean
statics, per-day rows; shared with the KuaiRand pipeline), ``compare`` (GRADE and its ablations), ``suite`` (every arm on every
simulator world), ``tune/`` (Ray Tune sweeps), ``report`` (plots) and ``bench/``
(throughput and quality benchmarks). Jobs
build on the core (``algos``, ``models``, ``data``, ``rollout``, ``learner``)
and never import the CLI.
"""
