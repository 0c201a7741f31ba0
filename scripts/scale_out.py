"""Scaling measured on the machine it runs on: rollout workers, learner devices, DDP.

    python scripts/scale_out.py [--workers 1 2 4 8 12] [--requests N] [--out DIR]

One command on any machine with many cores (and a GPU if present). It measures, and
writes to OUT/scale_out.json and OUT/scale_out.md (default ``runs/scale_out``):

1. Rollout pool alone, on-policy training and pipelined training (staleness 1) in
   requests/s at each number of rollout workers (:mod:`grade_ray.jobs.bench.training`:
   real GRPO rounds, one learner thread, median of ``--repeats`` timed rounds).
2. Stage 1 (the pretraining step's loss and backward, :func:`bench_stage1`'s top-k
   kernel) and the Stage 2 learner update in requests/s: CPU with one thread, CPU with
   every core, and CUDA when present.
3. DDP: ``grade-ray train`` on Ray with ``learner.num_workers`` 1 and 2 (each learner
   worker with its own rollout actors), median round requests/s of each.

Ray starts locally with every core of the machine unless ``--address`` names a cluster.
The table names the machine (cores, GPU) it was measured on. ``--skip-ddp`` and
``--skip-devices`` leave parts out (e.g. a quick look on a laptop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    """The machine in words: cores, memory, GPU."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores, {mem:.0f} GiB, {gpu} ({platform.machine()})"


def _median_rate(fn, n_items: int, repeats: int) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n_items / statistics.median(times)


def devices() -> list[tuple[str, str, int]]:
    """(label, torch device, threads) to time the learners on."""
    import torch

    out = [("cpu, 1 thread", "cpu", 1), (f"cpu, {os.cpu_count()} threads", "cpu", 0)]
    if torch.cuda.is_available():
        out.append(("cuda", "cuda", 1))
    return out


def bench_devices(cfg, train_path: str, repeats: int) -> dict[str, float]:
    """Stage 1 step and Stage 2 learner update, requests/s, per device in :func:`devices`."""
    import torch

    from grade_ray.data.plan import DataPlan, TaskReader
    from grade_ray.data.reading import read_sessions
    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.learner.supervised import SupervisedLearner, SupervisedSettings
    from grade_ray.rollout.worker import RolloutWorker
    from grade_ray.spec import RewardSpec

    threads = torch.get_num_threads()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = DataPlan.build(
            train_path, rounds=1, batch_size=cfg.rollout.batch_size, cache_dir=tmp
        )
        rollout_batch_in = TaskReader(plan.meta).load(plan.rounds[0][0])
    policy = new_policy(cfg, plan.meta, train_path)
    worker = RolloutWorker(policy, rollout_spec(cfg, plan.meta, train_path))
    worker.set_weights(policy.state_dict(), 0)
    rollout_batch = worker.rollout(rollout_batch_in, 10.0)
    stage1_batch, meta, _ = read_sessions(train_path, max_rows=cfg.pretrain.batch_size)
    for label, device, n_threads in devices():
        torch.set_num_threads(n_threads or os.cpu_count() or 1)
        learner = GRPOLearner(
            new_policy(cfg, meta, train_path).to(device), GRPOSettings.from_config(cfg), device
        )
        out[f"learner.{label}"] = _median_rate(
            lambda learner=learner: learner.update(rollout_batch), len(rollout_batch_in), repeats
        )
        sup = SupervisedLearner(
            new_policy(cfg, meta, train_path).to(device),
            SupervisedSettings.from_config(cfg),
            RewardSpec.from_config(cfg.reward, meta),
            device,
        )
        out[f"stage1.{label}"] = _median_rate(
            lambda sup=sup: sup.step(stage1_batch), len(stage1_batch), repeats
        )
    torch.set_num_threads(threads)
    return out


def bench_ddp(requests: int, out_dir: Path) -> dict[str, float]:
    """Median round requests/s of ``grade-ray train`` on Ray, learner.num_workers 1 and 2.

    Each learner worker drives one rollout actor; at 2 learner workers the two actors
    share what the cluster's CPUs allow (a CPU each when there are enough)."""
    import ray

    from grade_ray.jobs.bench.throughput import bench_config
    from grade_ray.jobs.train_ray import run_train_ray
    from grade_ray.runlog import read_metrics

    cpus = float(ray.cluster_resources().get("CPU", 1))
    actor_cpus = min(1.0, (cpus - 0.5 - 2 * 0.1) / 2)
    out: dict[str, float] = {}
    for n in (1, 2):
        run = out_dir / f"ddp{n}"
        cfg = bench_config(str(run), requests).replace(
            **{
                "learner.num_workers": n,
                "learner.num_cpus_per_worker": 0.1,
                "rollout.num_workers": 1,
                "rollout.num_cpus_per_worker": actor_cpus,
                "grpo.rounds": 3,
                "pretrain.epochs": 0,
            }
        )
        run_train_ray(cfg)
        # rank 0 logs its own share; the ranks take equal shares of every round
        rates = [n * r["perf/requests_per_s"] for r in read_metrics(run) if r.get("stage") == 2]
        out[f"ddp.learner_workers_{n}"] = statistics.median(rates[1:] or rates)
    return out


def markdown(res: dict) -> str:
    from grade_ray.jobs.bench.table import md_table
    from grade_ray.jobs.bench.training import training_markdown

    lines = [f"Measured on: {res['machine']}.", "", training_markdown(res)]
    dev = [k for k in res if k.startswith(("learner.", "stage1."))]
    if dev:
        rows = [[f"`{k}`", f"{res[k]:,.0f}"] for k in dev]
        lines += ["", md_table(("requests/s", "value"), "lr", rows)]
    ddp = [k for k in res if k.startswith("ddp.")]
    if ddp:
        rows = [[k.rsplit("_", 1)[1], f"{res[k]:,.0f}"] for k in ddp]
        lines += ["", md_table(("learner workers (DDP)", "round requests/s"), "rr", rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--requests", type=int, default=0, help="default: 8 tasks per worker")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/scale_out")
    ap.add_argument("--address", default=None)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--skip-devices", action="store_true")
    args = ap.parse_args(argv)
    if min(args.workers) < 1:
        print("scale_out: --workers must be >= 1", file=sys.stderr)
        return 2
    import torch

    from grade_ray.jobs.bench.throughput import bench_config
    from grade_ray.jobs.bench.training import bench_training
    from grade_ray.jobs.train import prepare_data
    from grade_ray.raysession import init_ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    res: dict = {"machine": machine(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(str(Path(tmp) / "run"), 1024)
        requests = args.requests or 8 * max(args.workers) * cfg.rollout.batch_size
        cfg = bench_config(str(Path(tmp) / "run"), requests)
        train_path, _ = prepare_data(cfg)
        if not args.skip_devices:
            res.update(bench_devices(cfg, train_path, args.repeats))
        init_ray(args.address)
        res.update(bench_training(cfg, train_path, tuple(args.workers), args.repeats))
        if not args.skip_ddp:
            res.update(bench_ddp(min(requests, 65536), Path(tmp)))
    (out / "scale_out.json").write_text(json.dumps(res, indent=2))
    (out / "scale_out.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
