"""Jobs: one module per ``grade-ray`` command that trains, evaluates or measures.

``train`` (simulate/pretrain/train in one process), ``train_ray`` (Stage 2 on
Ray Train + rollout actors), ``evaluate`` (offline metrics, simulated A/B test,
oracles), ``compare`` (GRADE and its ablations), ``tune`` (Ray Tune sweeps),
``report`` (plots) and ``bench/`` (throughput and quality benchmarks). Jobs
build on the core (``algos``, ``models``, ``data``, ``rollout``, ``learner``)
and never import the CLI.
"""
