"""Per-request inference latency of the item-agnostic and the item-aware policy, one harness.

    python scripts/item_aware_latency.py [--candidates N] [--repeats R] [--out FILE.json]

What is timed, for each variant and batch size B in (1, 256): the policy's forward on B
contexts and the fusion of its N candidates into fused scores (B, N), single-threaded, no
gradient, as eager PyTorch and as a TorchScript trace of the same function (the form
``grade-ray export`` serves). Item-agnostic: pi = softmax(policy(x)), s = fuse(scores, pi).
Item-aware: pi(x), c(x), per-item weights softmax_k(log pi_k + c_k phi_ik) from the scores'
standardized logs, s_i = sum_k w_ik log(p_ik + eps). Inputs are random (latency does not
depend on the weights' values); sizes follow the simulator's defaults (D = 16 context
features, K = 4 tasks, N = 100 candidates). Reports the median of R timed calls after warm-up
(ms per call and us per request) and the machine's load average, since the numbers move with
what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from grade_ray.algos.fusion import fuse
from grade_ray.models.item_aware import ItemAwarePolicy
from grade_ray.models.policy import FusionPolicy

D, K = 16, 4


class Agnostic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = FusionPolicy(D, K)

    def forward(self, x: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return fuse("log_product", scores, self.policy.pi(x))


class ItemAware(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = ItemAwarePolicy(D, K)

    def forward(self, x: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.policy.fused(x, scores, mask, "log_product")


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


def inputs(b: int, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g)
    scores = torch.rand(b, n, K, generator=g) * torch.tensor([0.2, 0.1, 100.0, 20.0]) + 1e-3
    return x, scores, torch.ones(b, n, dtype=torch.bool)


def median_ms(fn, args, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(max(5, repeats // 10)):
            fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, cls in (("item-agnostic", Agnostic), ("item-aware", ItemAware)):
        model = randomize(cls())
        with torch.no_grad():
            traced = torch.jit.trace(model, inputs(8, args.candidates))
        for b in (1, 256):
            xs = inputs(b, args.candidates)
            with torch.no_grad():
                torch.testing.assert_close(traced(*xs), model(*xs))
            reps = args.repeats if b == 1 else max(20, args.repeats // 5)
            for backend, fn in (("eager", model), ("torchscript", traced)):
                ms = median_ms(fn, xs, reps)
                rows.append(
                    {
                        "variant": name,
                        "backend": backend,
                        "batch": b,
                        "candidates": args.candidates,
                        "median_ms_per_call": round(ms, 4),
                        "us_per_request": round(1e3 * ms / b, 2),
                        "repeats": reps,
                    }
                )
                print(
                    f"{name:14s} {backend:11s} B={b:<4d} N={args.candidates}: "
                    f"{ms:8.3f} ms/call {1e3 * ms / b:9.2f} us/request"
                )
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "loadavg": load, "threads": 1}, f, indent=2)


if __name__ == "__main__":
    main()
