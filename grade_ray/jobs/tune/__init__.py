"""``grade-ray tune``: hyperparameter sweeps of GRADE training on Ray Tune."""
