"""``grade-ray bench``: throughput, scaling, weight sync and memory, measured in one run.

Shapes follow the paper's setting: G=20 samples per request, N=100
candidates, K=4 tasks, NDCG@10, the full composite reward, 1024 requests per
rollout call. Times are medians over repeats; ratios are measured side by
side in the same run (the machine is shared and noisy).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from grade_ray import keys
from grade_ray.config import Config, UserError, load_config
from grade_ray.jobs.bench.table import md_table

log = logging.getLogger(__name__)


def bench_config(run_dir: str, requests: int) -> Config:
    return load_config(
        [],
        [
            f"run_dir={run_dir}",
            f"simulator.num_requests={requests}",
            "simulator.num_eval_requests=1000",
            # 8 shards: each rollout lane cycles through several, so every timed pass re-reads
            f"simulator.rows_per_shard={max(requests // 8, 1)}",
            "exploration.group_size=20",
            "reward.k=10",
            "rollout.batch_size=1024",
            "rollout.num_cpus_per_worker=1",
            "learner.num_cpus_per_worker=0.1",
        ],
    )


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_rollout(cfg: Config, train_path: str, repeats: int) -> dict[str, float]:
    """Rollout throughput through Ray with 1 and 2 actors, and the weight-sync time.

    Actors read what training reads: the plan's decoded cache when ``data.cache`` is on
    (the default); ``rollout.decoded_cache`` is the share of their file reads that came
    from it. The 1- and 2-worker runs alternate, repeat by repeat, on one pool of two
    actors. ``rollout.requests_per_s_per_worker_parquet`` is one actor decoding the
    Parquet shards itself (``data.cache=false``), measured after.
    """
    from grade_ray.data.plan import DataPlan
    from grade_ray.jobs.train import decode_cache_dir
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.rollout.actor import RayRollout

    t0 = time.perf_counter()
    plan = DataPlan.build(
        train_path, rounds=1, batch_size=cfg.rollout.batch_size, cache_dir=decode_cache_dir(cfg)
    )
    plan_s = time.perf_counter() - t0
    tasks = [t for t in plan.rounds[0] if len(t) == cfg.rollout.batch_size]
    meta = plan.meta
    policy = new_policy(cfg, meta, train_path)
    spec = rollout_spec(cfg, meta, train_path)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    out: dict[str, float] = {"plan.build_requests_per_s": plan.num_requests / plan_s}
    one, two = _schedule(tasks, 1, out), _schedule(tasks, 2, out)

    # One pool of 2 actors measures both: 1 worker = all tasks to actor 0 (actor 1 idle),
    # 2 workers = each its lane; the two alternate, so load on the shared machine hits both.
    pool = RayRollout(cfg.replace(**{"rollout.num_workers": 2}), meta, spec, cache=plan.cache)
    pool.set_weights(state, 0)
    rate1, rate2 = _pool_rates(pool, one, two, repeats)
    out.update(_sync_times(pool, state))
    out["rollout.decoded_cache"] = _cached_share(pool)
    pool.close()

    # the same single worker decoding Parquet itself (data.cache=false)
    solo = RayRollout(cfg.replace(**{"rollout.num_workers": 1}), meta, spec, cache={})
    solo.set_weights(state, 0)
    solo.collect(solo.submit(one[:1], 10.0, 0, [0]))

    def run_parquet() -> None:
        solo.collect(solo.submit(one, 10.0, 0, list(range(len(one)))))

    rate_parquet = sum(len(t) for t in one) / _median_time(run_parquet, repeats)
    solo.close()
    out["rollout.requests_per_s_per_worker"] = rate1
    out["rollout.requests_per_s_2_workers"] = rate2
    out["rollout.scaling_2_workers"] = rate2 / rate1
    out["rollout.requests_per_s_per_worker_parquet"] = rate_parquet
    return out


def _schedule(tasks: list, n: int, out: dict[str, float]) -> list:
    """The order one step submits ``tasks`` to ``n`` actors, as in training: actor j runs
    lane j (a contiguous run of the round's tasks), so each shard is read by one actor;
    task i of a submit goes to actor i mod n. Records the files each actor reads."""
    from grade_ray.data.plan import lanes

    dealt = lanes(tasks, n)
    steps = min(len(lane) for lane in dealt)
    out[f"rollout.files_per_actor_{n}_workers"] = max(
        len({t.file for t in lane[:steps]}) for lane in dealt
    )
    return [lane[s] for s in range(steps) for lane in dealt]


def _pool_rates(pool, one: list, two: list, repeats: int) -> tuple[float, float]:
    """Requests/s of 1 worker (every task to actor 0) and of 2 workers, alternating."""
    import ray

    def run1() -> None:
        ray.get(pool.actors[0].run.remote(one, pool._weights, 0, 10.0, list(range(len(one)))))

    def run2() -> None:
        pool.collect(pool.submit(two, 10.0, 0, list(range(len(two)))))

    pool.collect(pool.submit(two[:2], 10.0, 0, [0, 1]))  # warm-up (imports, first reads)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for n, fn in ((1, run1), (2, run2)):
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    rate1 = sum(len(t) for t in one) / statistics.median(times[1])
    rate2 = sum(len(t) for t in two) / statistics.median(times[2])
    return rate1, rate2


def _sync_times(pool, state: dict) -> dict[str, float]:
    """An actor round trip, and a weight broadcast that actor 0 has picked up (ms)."""
    import ray

    def sync() -> None:
        pool.set_weights(state, pool._version + 1)
        ray.get(pool.actors[0].run.remote([], pool._weights, pool._version, 10.0, []))

    return {
        "sync.actor_roundtrip_ms": 1000
        * _median_time(lambda: ray.get(pool.actors[0].info.remote()), 5),
        "sync.weights_ms": 1000 * _median_time(sync, 9),
    }


def _cached_share(pool) -> float:
    """Share of the actors' file reads served by the decoded cache (a cache they cannot
    see, e.g. on other nodes, is skipped)."""
    reads = [i["file_reads"] for i in pool.infos()]
    cached_reads = sum(r["cache"] for r in reads)
    return cached_reads / max(cached_reads + sum(r["parquet"] for r in reads), 1)


def bench_kernel(
    cfg: Config, train_path: str, repeats: int, minibatch_sizes: tuple[int, ...] = ()
) -> dict[str, float]:
    """In-process rollout math (no Ray), shard decode and the learner update
    (:func:`bench_learner`, also at each of ``minibatch_sizes``), one thread."""
    import pyarrow.parquet as pq

    from grade_ray.data.plan import ROLLOUT_COLUMNS, DataPlan, TaskReader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        plan = DataPlan.build(
            train_path, rounds=1, batch_size=cfg.rollout.batch_size, cache_dir=tmp
        )
        first = plan.rounds[0][0]
        reader = TaskReader(plan.meta)
        batch = reader.load(first)  # decodes the file once; steady state is a gather
        dt_read = _median_time(lambda: reader.load(first), repeats)

        def decode() -> None:  # what an actor does for each new shard: columns, one thread
            TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, use_threads=False).load(first)

        def mapped() -> None:  # the same from the plan's decoded cache (memory-mapped)
            TaskReader(plan.meta, columns=ROLLOUT_COLUMNS, cache=plan.cache).load(first)

        dt_decode = _median_time(decode, repeats)
        dt_mapped = _median_time(mapped, repeats)
    shard_rows = pq.ParquetFile(first.file).metadata.num_rows
    policy, worker = _rollout_worker(cfg, plan.meta, train_path)
    dt = _median_time(lambda: worker.rollout(batch, 10.0), repeats)
    rb = worker.rollout(batch, 10.0)
    return {
        "kernel.rollout_requests_per_s": len(batch) / dt,
        "kernel.read_requests_per_s": len(batch) / dt_read,
        "kernel.decode_requests_per_s": shard_rows / dt_decode,
        "kernel.cached_read_requests_per_s": shard_rows / dt_mapped,
        **bench_learner(cfg, rb, policy, repeats, minibatch_sizes),
    }


def _rollout_worker(cfg: Config, meta, train_path: str):
    """Training's initial policy and an in-process rollout worker holding it."""
    from grade_ray.learner.loop import new_policy, rollout_spec
    from grade_ray.rollout.worker import RolloutWorker

    policy = new_policy(cfg, meta, train_path)
    worker = RolloutWorker(policy, rollout_spec(cfg, meta, train_path))
    worker.set_weights(policy.state_dict(), 0)
    return policy, worker


LEARNER_MINIBATCHES = (256, 1024)
"""Minibatch sizes the full run times the learner at besides ``grpo.minibatch_size``."""


def bench_learner(
    cfg: Config,
    batch: dict,
    policy: torch.nn.Module,
    repeats: int,
    minibatch_sizes: tuple[int, ...] = (),
) -> dict[str, float]:
    """The Stage 2 update, one thread, on one rollout batch from the same starting weights:
    :meth:`GRPOLearner.update` (stacked-expert policy, reference policy once per batch,
    fused Adam) and the earlier path kept as a reference
    (:class:`~grade_ray.learner.grpo_reference.ReferenceGRPOLearner` on the per-expert
    :class:`~grade_ray.models.policy_reference.PerExpertFusionPolicy`), alternating repeat
    by repeat. Keys: ``learner.requests_per_s`` / ``learner.samples_per_s`` (training's
    path), ``learner.reference_requests_per_s``, ``learner.speedup`` (their ratio);
    ``learner.weights_max_abs_diff`` between the two after one update from the same state
    (``learner.update_max_abs``: the largest change of a weight in it, for scale). At
    each of ``minibatch_sizes`` besides ``grpo.minibatch_size``:
    ``learner.mb{M}.requests_per_s``, ``.reference_requests_per_s`` and ``.speedup``.
    """
    import copy

    from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
    from grade_ray.learner.grpo_reference import ReferenceGRPOLearner
    from grade_ray.models.policy_reference import per_expert_copy, stacked_to_per_expert

    torch.set_num_threads(1)
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    def pair(minibatch_size: int) -> tuple[GRPOLearner, GRPOLearner]:
        settings = GRPOSettings.from_config(cfg.replace(**{"grpo.minibatch_size": minibatch_size}))
        new = copy.deepcopy(policy)
        new.load_state_dict(state)
        return GRPOLearner(new, settings), ReferenceGRPOLearner(per_expert_copy(new), settings)

    requests = len(batch[keys.CONTEXT])
    out: dict[str, float] = {}
    default = cfg.grpo.minibatch_size
    for m in sorted({default, *minibatch_sizes}):
        learners = dict(zip(("new", "reference"), pair(m), strict=True))
        for learner in learners.values():
            learner.update(batch)  # warm-up; from the same state: the equality check below
        if m == default:
            got = stacked_to_per_expert(learners["new"].module.state_dict())
            want = learners["reference"].module.state_dict()
            out["learner.weights_max_abs_diff"] = max(
                float((got[k] - v).abs().max()) for k, v in want.items()
            )
            out["learner.update_max_abs"] = max(
                float((v - state[k]).abs().max())
                for k, v in learners["new"].module.state_dict().items()
            )
        times: dict[str, list[float]] = {name: [] for name in learners}
        for _ in range(repeats):
            for name, learner in learners.items():
                t0 = time.perf_counter()
                learner.update(batch)
                times[name].append(time.perf_counter() - t0)
        rate = {name: requests / statistics.median(t) for name, t in times.items()}
        prefix = "learner" if m == default else f"learner.mb{m}"
        out[f"{prefix}.requests_per_s"] = rate["new"]
        out[f"{prefix}.reference_requests_per_s"] = rate["reference"]
        out[f"{prefix}.speedup"] = rate["new"] / rate["reference"]
        if m == default:
            samples = requests * cfg.exploration.group_size * cfg.grpo.epochs_per_batch
            out["learner.samples_per_s"] = samples * rate["new"] / requests
    return out


STAGE1_BATCHES = (256, 1024)
"""Batch sizes the full run times Stage 1 at besides ``pretrain.batch_size``."""


def bench_stage1(
    cfg: Config, train_path: str, repeats: int, batch_sizes: tuple[int, ...] = ()
) -> dict[str, float]:
    """Stage 1's kernel, one thread: requests/s of the pretraining loss plus its backward
    (policy forward, softmax, fusion, standardisation, LambdaLoss@k, logit hinge: what
    :meth:`SupervisedLearner.step` computes, without the optimizer step) by training's path
    (:func:`lambda_loss`, only the pairs that can carry weight; key suffix ``_topk``) and by
    the path before issue 17 kept as a reference (suffix ``_dense``: all (B, N, N) pairs,
    :func:`lambda_loss_dense_reference`, through the per-expert
    :class:`~grade_ray.models.policy_reference.PerExpertFusionPolicy` with the same weights),
    alternating repeat by repeat on the same batch, each timed run after an untimed one of
    the same path (the dense path's freed ~20 MB buffers leave the allocator cold, which
    training's steady state never sees). At ``pretrain.batch_size`` and each of
    ``batch_sizes``: ``stage1.b{B}.requests_per_s_topk`` / ``_dense`` and
    ``stage1.b{B}.topk_speedup``. On the ``pretrain.batch_size`` batch, the two kernels on
    training's policy: ``stage1.loss_abs_diff``, ``stage1.grad_max_abs_diff`` (over every
    trained parameter) and ``stage1.grad_max_abs`` for scale.
    """
    from grade_ray.algos.losses import lambda_loss, lambda_loss_dense_reference
    from grade_ray.data.reading import read_sessions
    from grade_ray.learner.loop import new_policy
    from grade_ray.learner.supervised import SupervisedLearner, SupervisedSettings
    from grade_ray.models.policy_reference import per_expert_copy
    from grade_ray.spec import RewardSpec

    torch.set_num_threads(1)
    sizes = sorted({cfg.pretrain.batch_size, *batch_sizes})
    batch, meta, _ = read_sessions(train_path, on_error=cfg.data.on_error, max_rows=sizes[-1])
    if len(batch) < sizes[-1]:
        raise ValueError(f"Stage 1 bench needs {sizes[-1]} requests, {train_path} has {len(batch)}")
    policy = new_policy(cfg, meta, train_path)
    old = per_expert_copy(policy)
    settings, reward = SupervisedSettings.from_config(cfg), RewardSpec.from_config(cfg.reward, meta)
    learner = SupervisedLearner(policy, settings, reward)
    paths = {
        "topk": (learner, lambda_loss),
        "dense": (SupervisedLearner(old, settings, reward), lambda_loss_dense_reference),
    }

    def loss_and_grad(sub, learner, kernel) -> tuple[float, torch.Tensor]:
        learner.optimizer.zero_grad(set_to_none=True)
        loss = learner.loss(sub, kernel).loss
        loss.backward()
        params = [p for group in learner.optimizer.param_groups for p in group["params"]]
        grad = torch.cat(
            [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params]
        )
        return float(loss.detach()), grad

    out: dict[str, float] = {}
    for b in sizes:
        sub = batch.slice(0, b)
        for path in paths.values():
            loss_and_grad(sub, *path)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                loss_and_grad(sub, *path)  # untimed: see above
                t0 = time.perf_counter()
                loss_and_grad(sub, *path)
                times[name].append(time.perf_counter() - t0)
        rate = {name: b / statistics.median(t) for name, t in times.items()}
        out[f"stage1.b{b}.requests_per_s_topk"] = rate["topk"]
        out[f"stage1.b{b}.requests_per_s_dense"] = rate["dense"]
        out[f"stage1.b{b}.topk_speedup"] = rate["topk"] / rate["dense"]
    sub = batch.slice(0, cfg.pretrain.batch_size)
    (loss_t, grad_t), (loss_d, grad_d) = (
        loss_and_grad(sub, learner, k) for k in (lambda_loss, lambda_loss_dense_reference)
    )
    for path_learner, _ in paths.values():
        path_learner.optimizer.zero_grad(set_to_none=True)
    out["stage1.loss_abs_diff"] = abs(loss_t - loss_d)
    out["stage1.grad_max_abs_diff"] = float((grad_t - grad_d).abs().max())
    out["stage1.grad_max_abs"] = float(grad_d.abs().max())
    return out


def bench_stage1_epoch(cfg: Config, train_path: str, root: Path) -> dict[str, float]:
    """Whole Stage 1 epochs, one worker, one thread: ``stage1.requests_per_s`` in this
    process (``grade-ray pretrain`` / ``train --local``) and ``stage1.ray_train_requests_per_s``
    in a Ray Train worker (``grade-ray train``: the same steps, reading the plan's decoded
    cache), each over one epoch of every training request (reading, LambdaLoss, backward,
    Adam; the epoch's checkpoint not included). ``stage1.ray_train_wall_s``: the Ray Train
    job from submit to its end (worker-group start, plan, the epoch, checkpoint), which a
    short run pays on top. Needs a connected Ray.
    """
    from grade_ray.jobs.train import run_pretrain
    from grade_ray.jobs.train_ray import run_pretrain_ray
    from grade_ray.learner.stage1 import STAGE1_REQUESTS_PER_S
    from grade_ray.runlog import read_metrics

    one = cfg.replace(
        **{"pretrain.epochs": 1, "learner.num_workers": 1, "data.train_path": train_path}
    )

    def epoch_rate(run_dir: Path) -> float:
        rows = [r for r in read_metrics(run_dir) if r.get("stage") == 1]
        return float(rows[-1][STAGE1_REQUESTS_PER_S])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pretrain(one.replace(run_dir=str(root / "stage1_local")))
    finally:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_pretrain_ray(one.replace(run_dir=str(root / "stage1_ray")))
    wall = time.perf_counter() - t0
    return {
        "stage1.requests_per_s": epoch_rate(root / "stage1_local"),
        "stage1.ray_train_requests_per_s": epoch_rate(root / "stage1_ray"),
        "stage1.ray_train_wall_s": wall,
    }


def _peak_rss_of_run(run_dir: Path, requests: int) -> float:
    """Peak RSS (MiB) of a local training run in a fresh process."""
    code = (
        "import sys\n"
        "from grade_ray.jobs.bench.throughput import bench_config\n"
        "from grade_ray.jobs.train import run_train_local\n"
        # shards of a fixed size: streaming memory is bounded by one shard, not the data
        f"cfg = bench_config({str(run_dir)!r}, {requests}).replace(**{{'pretrain.epochs': 1,"
        " 'grpo.rounds': 1, 'exploration.group_size': 8, 'simulator.rows_per_shard': 8192})\n"
        "run_train_local(cfg)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork/exec from the parent
        "print(next(int(line.split()[1]) for line in open('/proc/self/status')"
        " if line.startswith('VmHWM')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"memory benchmark run failed:\n{res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def bench_memory(root: Path, small: int) -> dict[str, float]:
    """Peak RSS of training on `small` and 10x `small` requests (streaming: ratio ~1)."""
    a = _peak_rss_of_run(root / "mem_small", small)
    b = _peak_rss_of_run(root / "mem_large", 10 * small)
    return {
        "memory.peak_rss_mb_small": a,
        "memory.peak_rss_mb_10x": b,
        "memory.peak_rss_ratio_10x": b / a,
        "memory.requests_small": float(small),
    }


def bench_simulator(root: Path, requests: int) -> dict[str, float]:
    from grade_ray.data.simulator import generation_benchmark

    r = generation_benchmark(requests, root / "simgen")
    return {f"simulator.{k}": float(v) for k, v in r.items() if isinstance(v, (int, float))}


def bench_serving(cfg: Config, train_path: str, root: Path) -> dict[str, float]:
    """p50/p99 latency of the exported policy (TorchScript, eager, and onnxruntime when the
    onnx extra is installed), one CPU thread."""
    from grade_ray.data.reading import read_meta
    from grade_ray.learner.loop import POLICY_FILE, new_policy, save_policy
    from grade_ray.serving.export import export_policy, missing_onnx_packages
    from grade_ray.serving.service import serving_latency

    meta = read_meta(train_path)
    run = root / "serving_run"
    save_policy(run / POLICY_FILE, new_policy(cfg, meta, train_path), cfg, meta)
    export_policy(run, run / "export", onnx=not missing_onnx_packages())
    return serving_latency(run / "export", threads=1)


PARTS = ("throughput", "quality", "stage1", "learner")


def run_bench(
    quick: bool = False,
    out: str | None = None,
    address: str | None = None,
    parts: tuple[str, ...] = PARTS,
) -> dict[str, Any]:
    """Benchmarks; writes JSON (and a Markdown table beside it) when ``out`` is given.

    ``parts``: "throughput" (rollout, learner, Stage 1 kernel and whole epochs locally and
    on Ray Train, sync, RLlib PPO steps/s,
    simulator, memory, serving, Ray Serve over HTTP when installed), "stage1" (the Stage 1
    kernel alone, :func:`bench_stage1`) and "learner" (the Stage 2 update alone,
    :func:`bench_learner`; both included in "throughput") and/or "quality"
    (:func:`grade_ray.jobs.bench.quality.bench_quality`: the arms' lifts at equal samples
    and equal time; its run directory is OUT's folder/quality, or a temporary one without
    ``out``).
    """
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"bench parts must be a non-empty subset of {PARTS}, got {parts}")
    if out:
        _check_out(Path(out))  # before minutes of measuring, not after
    results: dict[str, Any] = {}
    if "throughput" in parts:
        results.update(_throughput(quick, address))
    else:
        if "stage1" in parts:
            results.update(_stage1_only(quick))
        if "learner" in parts:
            results.update(_learner_only(quick))
    if "quality" in parts:
        from grade_ray.jobs.bench.quality import bench_quality

        with tempfile.TemporaryDirectory() as tmp:
            qdir = Path(out).parent / "quality" if out else Path(tmp) / "quality"
            results.update(bench_quality(None, qdir, quick=quick, address=address))
    results["host.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(results, indent=2, default=float))
        p.with_suffix(".md").write_text(markdown_table(results))
    return results


def _check_out(p: Path) -> None:
    """``--out FILE.json`` must be writable, and its Markdown sibling another file."""
    if p.suffix == ".md":
        raise UserError(f"--out {p}: give the JSON file (the Markdown table goes beside it)")
    if p.is_dir():
        raise UserError(f"--out {p} is a directory; give a file such as {p / 'bench.json'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {p}: cannot create its directory ({e.strerror})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"--out {p}: not writable")


def _throughput(quick: bool, address: str | None) -> dict[str, Any]:
    from grade_ray.jobs.train import prepare_data
    from grade_ray.raysession import init_ray

    repeats = 3 if quick else 7
    requests = 8192 if quick else 32768
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = bench_config(str(root / "run"), requests)
        results: dict[str, Any] = {"setup": _setup(cfg, quick)}
        train_path, _ = prepare_data(cfg)
        results.update(bench_kernel(cfg, train_path, repeats, () if quick else LEARNER_MINIBATCHES))
        results.update(bench_stage1(cfg, train_path, repeats, () if quick else STAGE1_BATCHES))
        results.update(bench_serving(cfg, train_path, root))
        init_ray(address, num_cpus=None if address else 2)
        results.update(bench_rollout(cfg, train_path, repeats))
        from grade_ray.jobs.bench.training import bench_training

        results.update(bench_training(cfg, train_path, (1, 2), 1 if quick else 3))
        results.update(bench_stage1_epoch(cfg, train_path, root))
        from grade_ray.baselines.rllib_ppo.training import bench_rllib_ppo

        results.update(
            bench_rllib_ppo(
                cfg,
                train_path,
                seconds=20.0 if quick else 60.0,
                grade_requests_per_s=results["rollout.requests_per_s_per_worker"],
            )
        )
        from grade_ray.jobs.bench.serve_load import bench_serve

        results.update(bench_serve(root / "serving_run" / "export"))  # with grade_ray[serve]
        results.update(bench_simulator(root, 20_000 if quick else 200_000))
        results.update(bench_memory(root, 2_000 if quick else 10_000))
    results.update(scaling_projection(results))
    return results


def _setup(cfg: Config, quick: bool) -> dict[str, Any]:
    return {
        "group_size": 20,
        "candidates": 100,
        "tasks": 4,
        "ndcg_k": 10,
        "batch_requests": 1024,
        "stage1_batch_requests": cfg.pretrain.batch_size,
        "quick": quick,
        "torch_threads_per_actor": 1,
    }


def _stage1_only(quick: bool) -> dict[str, Any]:
    """The Stage 1 kernel part alone, on freshly simulated requests (no Ray)."""
    from grade_ray.jobs.train import prepare_data

    sizes = () if quick else STAGE1_BATCHES
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(str(Path(tmp) / "run"), 4096)  # >= every batch timed
        train_path, _ = prepare_data(cfg)
        return {
            "setup": _setup(cfg, quick),
            **bench_stage1(cfg, train_path, 3 if quick else 7, sizes),
        }


def learner_batch(requests: int = 4096) -> tuple[Config, torch.nn.Module, dict]:
    """(the bench's config, training's initial policy, one rollout batch of it) on freshly
    simulated requests, in process (no Ray), one torch thread: what the learner is timed on.
    The config's run directory is temporary and gone on return."""
    from grade_ray.data.plan import DataPlan, TaskReader
    from grade_ray.jobs.train import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(str(Path(tmp) / "run"), requests)
        train_path, _ = prepare_data(cfg)
        plan = DataPlan.build(train_path, rounds=1, batch_size=cfg.rollout.batch_size)
        torch.set_num_threads(1)
        policy, worker = _rollout_worker(cfg, plan.meta, train_path)
        return cfg, policy, worker.rollout(TaskReader(plan.meta).load(plan.rounds[0][0]), 10.0)


def _learner_only(quick: bool) -> dict[str, Any]:
    """The learner part alone (:func:`bench_learner`, training's path against the earlier
    one), on :func:`learner_batch`."""
    cfg, policy, batch = learner_batch()
    return {
        "setup": _setup(cfg, quick),
        **bench_learner(
            cfg, batch, policy, 3 if quick else 7, () if quick else LEARNER_MINIBATCHES
        ),
    }


PROJECTION_WORKERS = (1, 2, 4, 8, 16, 32, 64)


def scaling_projection(
    results: dict[str, Any], workers: tuple[int, ...] = PROJECTION_WORKERS, batch: int = 1024
) -> dict[str, float]:
    """Requests/s of N rollout workers (one CPU each) projected from this run's measurements.

    A step sends one ``batch``-request task to each of N actors, then updates the learner
    once on the N tasks' samples and broadcasts the new weights:

    - rollout pool alone: ``N * batch / (t_task + t_call)``, t_task = batch / (measured
      per-worker rate), t_call = the actor round trip (the driver's per-call overhead);
    - on-policy training (``rollout.max_staleness=0``): each step also waits for the update
      (``N * batch / learner rate``) and the weight broadcast (``sync.weights_ms``):
      ``N * batch / (t_task + t_call + t_sync + N * batch / L)``; the single learner bounds
      it at L requests/s however many workers run;
    - pipelined (``rollout.max_staleness=1``): the next step's rollouts overlap the update,
      ``N * batch / max(t_task + t_call + t_sync, N * batch / L)``.

    L is ``learner.requests_per_s`` of one learner worker (one CPU thread); DDP learner
    workers (``learner.num_workers``) raise it roughly in proportion, less the all-reduce.
    """
    r1 = float(results["rollout.requests_per_s_per_worker"])
    learner = float(results["learner.requests_per_s"])
    t_task = batch / r1
    t_call = float(results["sync.actor_roundtrip_ms"]) / 1000
    t_sync = float(results["sync.weights_ms"]) / 1000
    out: dict[str, float] = {}
    for n in workers:
        t_update = n * batch / learner
        out[f"projection.rollout_only.{n}"] = n * batch / (t_task + t_call)
        out[f"projection.on_policy.{n}"] = n * batch / (t_task + t_call + t_sync + t_update)
        out[f"projection.pipelined.{n}"] = n * batch / max(t_task + t_call + t_sync, t_update)
    return out


PROJECTION_COLUMNS = (
    "rollout workers",
    "rollout pool alone",
    "on-policy training",
    "pipelined (staleness 1)",
)


def projection_markdown(results: dict[str, Any]) -> str:
    """The projection as a table (rows: N workers)."""
    ns = sorted({int(k.rsplit(".", 1)[1]) for k in results if k.startswith("projection.")})
    if not ns:
        return ""
    kinds = ("rollout_only", "on_policy", "pipelined")
    rows = [[str(n), *(f"{results[f'projection.{m}.{n}']:,.0f}" for m in kinds)] for n in ns]
    return md_table(PROJECTION_COLUMNS, "rrrr", rows)


def _fmt(v: float | int) -> str:
    """Thousands separators and 3 decimals; tiny non-zero floats (differences) as 1.2e-08."""
    if not isinstance(v, float):
        return f"{v}"
    return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:,.3f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Throughput/memory figures as a metric | value table, then the quality table if run."""
    rows = [
        [f"`{k}`", _fmt(v)]
        for k, v in results.items()
        if not k.startswith(("quality.", "projection.", "training."))
        and not isinstance(v, bool)
        and isinstance(v, (int, float))
    ]
    lines = [md_table(("metric", "value"), "lr", rows)]
    if any(k.startswith("training.") for k in results):
        from grade_ray.jobs.bench.training import training_markdown

        lines += ["", "Measured training requests/s for N rollout workers:", ""]
        lines.append(training_markdown(results))
    if any(k.startswith("projection.") for k in results):
        lines += ["", "Projected requests/s for N workers:", "", projection_markdown(results)]
    if any(k.startswith("quality.") for k in results):
        from grade_ray.jobs.bench.quality import quality_markdown

        lines += ["", quality_markdown(results)]
    return "\n".join(lines)
