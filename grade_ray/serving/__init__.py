"""Serving a trained policy: ``export`` (TorchScript [+ ONNX] + metadata + a manifest hashing
every file), ``service`` (:class:`FusionService`: a checked export behind validated weights,
fusion and ranking in bounded chunks; latency measurement), ``infer`` (``grade-ray
infer``: batch scoring of session files, with reject accounting), ``serve`` (``grade-ray
serve``: the export as a Ray Serve HTTP application, with FusionService's checks)."""
