"""Serving a trained policy: ``export`` (TorchScript + metadata), ``service``
(:class:`FusionService`: validated weights, fusion and ranking; batch ``infer``;
latency measurement)."""
