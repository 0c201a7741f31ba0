"""``grade-ray tune``: hyperparameter sweeps of GRADE training on Ray Tune.

A sweep is a tune YAML (an experiment config plus a ``tune:`` section: the space, the
search, the held-out metric, ASHA) whose trials are GRADE training runs on the
``grade-ray train`` path, each evaluated in the simulated A/B test when it finishes.

- :mod:`.spec`: the tune YAML -> a validated :class:`~.spec.TuneSpec` (every mistake is a
  :class:`~.spec.TuneError` naming the key), and whether its trials fit the cluster;
- :mod:`.trial`: one trial (the Tune trainable): its config, shared data and Stage 1,
  the Ray Train run outside the trial's placement group, its evaluation;
- :mod:`.sweep`: :func:`~.sweep.run_tune`: prepare, run or ``--resume`` Ray Tune;
- :mod:`.results`: one row per trial, ``results.md``/``.csv``, ``sweep_results.json``
  and ``best_config.yaml``;
- :mod:`.command`: the ``grade-ray tune`` subcommand.
"""
