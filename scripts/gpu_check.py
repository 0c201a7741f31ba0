"""GPU check of the learner path (``learner.use_gpu=true``); run it on a machine with CUDA.

    python scripts/gpu_check.py [OUT_DIR]        # default runs/gpu_check

What it checks, each step printed and written to OUT_DIR/gpu_check.json:

1. ``topk_indices`` / ``group_rewards`` on CUDA tensors equal the CPU results (ties,
   padding and NaN included): the GPU ranking path is the int64-key ``torch.topk``.
2. One :class:`GRPOLearner` on CPU and one on CUDA, from the same weights and seed, take the
   same rollout batches: losses and weights agree (float32 tolerance).
3. Learner throughput, CPU (one thread) against CUDA, on the benchmark's shapes.
4. ``run_train_ray`` with ``learner.use_gpu=true`` on the smoke config (Ray Train puts the
   learner on the GPU, rollout actors stay on CPUs), next to the same run with
   ``use_gpu=false``: both finish and their per-round metrics are close.

Exit status 0 only if every check passes. ``GPU_CHECK_DEVICE=cpu`` runs steps 1-3 against
the CPU and step 4 without a GPU (a dry run of the script itself, e.g. in CI).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def _check(ok: bool, what: str, results: dict) -> None:
    results.setdefault("checks", {})[what] = bool(ok)
    print(("PASS " if ok else "FAIL ") + what, flush=True)


def kernels(results: dict) -> None:
    from grade_ray.algos.metrics import topk_indices
    from grade_ray.algos.rewards import group_rewards

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(512, 20, 100, generator=g)
    scores[:, :, 5] = scores[:, :, 6]  # ties
    scores[0, 0, 3] = math.nan
    scores[1, 1, 7] = -0.0
    mask = torch.rand(512, 100, generator=g) > 0.1
    a = topk_indices(scores, mask, 10)
    b = topk_indices(scores.to(DEVICE), mask.to(DEVICE), 10).cpu()
    _check(torch.equal(a, b), "topk_indices: CUDA == CPU", results)
    s = torch.rand(256, 100, 4, generator=g)
    w = torch.distributions.Dirichlet(torch.ones(4)).sample((256, 20))
    gains = torch.rand(256, 100, generator=g)
    kw = dict(fusion="log_product", k=10, rules=[(0, 2)], l1=1.0, l2=0.5, l3=0.1, tau=0.2)
    rc = group_rewards(s, w, gains, gains.sqrt(), mask[:256], **kw)
    dev = [t.to(DEVICE) for t in (s, w, gains, gains.sqrt(), mask[:256])]
    rg = group_rewards(*dev, **kw)
    diff = max(float((rc[k] - rg[k].cpu()).abs().max()) for k in rc)
    results["group_rewards_max_abs_diff"] = diff
    _check(diff < 1e-5, f"group_rewards: CUDA == CPU (max abs diff {diff:.2e})", results)


def learner(results: dict, out: Path) -> None:
    from grade_ray.data.plan import DataPlan, TaskReader
    from grade_ray.jobs.bench.throughput import bench_config
    from grade_ray.jobs.train import prepare_data
    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.rollout.worker import RolloutWorker

    cfg = bench_config(str(out / "bench_data"), 16384)
    train_path, _ = prepare_data(cfg)
    plan = DataPlan.build(train_path, rounds=1, batch_size=4096)
    policy = new_policy(cfg, plan.meta, train_path)
    worker = RolloutWorker(copy.deepcopy(policy), rollout_spec(cfg, plan.meta, train_path))
    worker.set_weights(policy.state_dict(), 0)
    reader = TaskReader(plan.meta)
    batches = [worker.rollout(reader.load(t), 10.0) for t in plan.rounds[0][:3]]

    settings = GRPOSettings.from_config(cfg)
    cpu = GRPOLearner(copy.deepcopy(policy), settings, "cpu", seed=1)
    gpu = GRPOLearner(copy.deepcopy(policy).to(DEVICE), settings, DEVICE, seed=1)
    worst = 0.0
    for batch in batches[:2]:
        sc, sg = cpu.update(batch), gpu.update(batch)
        worst = max(worst, max(abs(sc[k] - sg[k]) / max(abs(sc[k]), 1e-3) for k in sc))
    wdiff = max(
        float((a - b).abs().max())
        for a, b in zip(cpu.policy_state().values(), gpu.policy_state().values())
    )
    results["learner_stats_max_rel_diff"] = worst
    results["learner_weights_max_abs_diff"] = wdiff
    _check(worst < 1e-2 and wdiff < 1e-3, "GRPOLearner: CUDA == CPU after 2 updates", results)

    def rate(lrn: GRPOLearner, repeats: int = 5) -> float:
        batch = batches[2]
        lrn.update(batch)  # warm-up
        if lrn.device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lrn.update(batch)
            if lrn.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        samples = len(batch["request_id"]) * cfg.exploration.group_size * settings.epochs_per_batch
        return samples / float(np.median(times))

    torch.set_num_threads(1)
    results["learner.samples_per_s_cpu_1thread"] = rate(cpu)
    results["learner.samples_per_s_cuda"] = rate(gpu)
    results["learner.cuda_speedup"] = (
        results["learner.samples_per_s_cuda"] / results["learner.samples_per_s_cpu_1thread"]
    )
    print(
        f"learner samples/s: CPU 1 thread {results['learner.samples_per_s_cpu_1thread']:,.0f}, "
        f"CUDA {results['learner.samples_per_s_cuda']:,.0f}",
        flush=True,
    )


def ray_train(results: dict, out: Path) -> None:
    import ray

    from grade_ray.config import load_config
    from grade_ray.jobs.train_ray import run_train_ray
    from grade_ray.runlog import read_metrics

    gpus = 1 if DEVICE == "cuda" else 0
    ray.init(num_cpus=8, num_gpus=gpus, include_dashboard=False)
    runs = {}
    for use_gpu in (bool(gpus), False):
        cfg = load_config(
            ["configs/smoke.yaml"],
            [
                f"run_dir={out / ('ray_gpu' if use_gpu else 'ray_cpu')}",
                f"learner.use_gpu={use_gpu}",
            ],
        )
        t0 = time.perf_counter()
        policy = run_train_ray(cfg)
        results[f"ray_train.seconds_use_gpu_{use_gpu}"] = time.perf_counter() - t0
        runs[use_gpu] = [m for m in read_metrics(Path(cfg.run_dir)) if m.get("stage") == 2]
        if not gpus:  # dry run: one CPU run stands for both
            runs[True] = runs[False]
            _check(policy.exists(), f"run_train_ray(use_gpu=False) wrote {policy.name}", results)
            break
        _check(policy.exists(), f"run_train_ray(use_gpu={use_gpu}) wrote {policy.name}", results)
    a, b = runs[True], runs[False]
    keys = ["rollout/reward", "learner/loss", "learner/kl", "eval/north_star"]
    rel = {
        k: max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-3) for x, y in zip(a, b))
        for k in keys
        if all(k in m for m in a + b)
    }
    results["ray_train.gpu_vs_cpu_rel_diff"] = rel
    results["ray_train.rounds"] = [len(a), len(b)]
    _check(len(a) == len(b) > 0, "use_gpu run has as many rounds as the CPU run", results)
    _check(
        len(rel) == len(keys) and all(v < 0.05 for v in rel.values()),
        f"per-round metrics GPU vs CPU: {rel}",
        results,
    )


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", flush=True)
        return 2
    results["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)"
    print(f"torch {torch.__version__} on {results['device']}", flush=True)
    try:
        for step in (kernels, lambda r: learner(r, out), lambda r: ray_train(r, out)):
            step(results)
    finally:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
