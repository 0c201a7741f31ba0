"""Running on a Ray cluster: job submission and status (``grade-ray submit`` / ``jobs``).

The cluster manifests themselves (ray up YAML, KubeRay, Dockerfile) live in the
repository's top-level ``cluster/`` folder.
"""
