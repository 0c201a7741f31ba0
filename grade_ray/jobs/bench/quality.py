"""Quality benchmark: GRADE vs its ablations and RLlib PPO at equal samples and equal time.

One call of :func:`bench_quality` (part of ``grade-ray bench``):

1. Simulates the logs and trains Stage 1 (SP) once in ``out_dir`` (the layout of
   ``grade-ray compare``: ``out_dir/data``, ``out_dir/checkpoints/pretrain.pt``,
   ``out_dir/variants/NAME``).
2. Trains GRADE and its ablations (:data:`grade_ray.jobs.compare.VARIANTS`: GRADE-gaussian,
   GRADE-no-prior, GRADE-no-format) from that Stage 1 on the same logged requests, in this
   process (``run_train_local``), so every variant sees the same requests (equal sample
   budget; reward evaluations = requests x G).
3. Trains RLlib PPO (critic + GAE, :func:`~grade_ray.baselines.rllib_ppo.training.train_rllib_ppo`)
   twice from the same Stage-1 policy: with as many env steps (= logged requests) as GRADE
   saw (``RLlib-PPO@samples``) and for as many seconds as GRADE's Stage 2 took
   (``RLlib-PPO@time``).
4. Evaluates every arm in ONE paired simulated A/B test (:func:`~grade_ray.jobs.evaluate.run_evaluate`
   with ``extra_arms``; uniform, best_static and SP come from its default baselines), so the
   lifts over best_static and their 95% paired bootstrap CIs are comparable across arms.

Training time: for GRADE, the sum of its rounds' ``perf/round_s`` (rollout + update, i.e. the
Stage-2 loop without the per-round held-out probe and checkpoint); for PPO, its
``train_seconds`` (``algo.train()`` calls, without building the algorithm). The equal-time PPO
run gets GRADE's Stage-2 seconds; it stops after the first PPO iteration that reaches them.
``wall_s`` is the whole training call (data plan, probes, checkpoints, PPO build included).
Seconds are only comparable on a quiet machine: the results record the 1-minute load average
at the start and end (``quality.setup.load_avg_1m_*``).

Time to 95% of GRADE's final north-star, on the gain scale over uniform: the first training
time t at which an arm's held-out north-star satisfies
``ns(t) - ns_uniform >= 0.95 * (ns_GRADE_final - ns_uniform)``; ``None`` when never reached
within the arm's budget (and for every arm when GRADE's final gain over uniform is <= 0).
Uniform is far below every trained arm (about -24% vs best static), so the shared Stage-1
start can already be past that target (the SP policy captures most of the gain over
uniform); ``time_to_95pct_over_sp_s`` therefore also reports the same rule with the Stage-1
start's north-star as the base: ``ns(t) - ns_SP >= 0.95 * (ns_GRADE_final - ns_SP)``.
All arms are measured on the same held-out requests with the simulator's expected outcomes:
the training loop's :class:`~grade_ray.learner.loop.Probe` (``eval/north_star``, 2,000 fresh
requests, seed ``eval.ab_seed + 1``). GRADE variants log it after every round (time = the
cumulative round seconds). For PPO the policy network is snapshotted after every PPO
iteration (``train_rllib_ppo``'s ``on_iteration``; in memory; time = that iteration's
``seconds``) and the snapshots are scored by the same Probe afterwards. t = 0 is the shared
Stage-1 policy.

Modes (:func:`quality_config`), both on the default simulator (N = 100 candidates, K = 4
tasks, G = 20): ``quick`` = 20k training requests, Stage 1 one epoch, 4 rounds x 2 passes
(40k requests per arm), 5k-request A/B test, 100 bootstrap resamples (2-4 minutes on 2
cores; PPO's 40k env steps take most of it; 3.75 min measured with another job loading the
machine). Full = the README's ``grade-ray compare``
setting: 100k training requests, ``grpo.rounds=8 grpo.data_passes=2`` (200k requests per
arm), 20k-request A/B test, 200 resamples (~10-15 minutes, mostly PPO's 200k env steps at
~650/s; GRADE trains at several thousand requests/s in one process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from grade_ray.config import Config, load_config
from grade_ray.jobs.bench.table import md_table

log = logging.getLogger(__name__)

FRACTION = 0.95
"""Time-to-target: this fraction of GRADE's final north-star gain over uniform."""
GRADE = "GRADE"
PPO = "RLlib-PPO"
PPO_SAMPLES = "RLlib-PPO@samples"
"""Evaluation arm / directory name of PPO at GRADE's sample budget."""
PPO_TIME = "RLlib-PPO@time"
"""Evaluation arm / directory name of PPO at GRADE's Stage-2 wall time."""
BASELINES = ("uniform", "best_static", "SP")
AB_KEYS = ("north_star", "ctr", "cvr", "opm", "gpm", "profit_pm", "orders")
"""Metrics of the simulated A/B test reported per arm (see ``simulator.AB_METRICS``)."""
TABLE_METRICS = ("ctr", "cvr", "opm", "gpm")
PROBE_KEY = "eval/north_star"

QUICK_OVERRIDES: dict[str, Any] = {
    "simulator.num_requests": 20_000,
    "simulator.num_eval_requests": 2_000,
    "simulator.rows_per_shard": 10_000,
    "pretrain.epochs": 1,
    "grpo.rounds": 4,
    "grpo.data_passes": 2,
    "eval.ab_requests": 5_000,
    "eval.search_requests": 2_000,
    "eval.bootstrap": 100,
}
FULL_OVERRIDES: dict[str, Any] = {
    "grpo.rounds": 8,
    "grpo.data_passes": 2,
}


def quality_config(quick: bool, run_dir: str | Path, base: Config | None = None) -> Config:
    """The benchmark's settings (:data:`QUICK_OVERRIDES` / :data:`FULL_OVERRIDES`) on top of
    ``base`` (default: every key at its default, i.e. configs/base.yaml)."""
    cfg = base or load_config([])
    return cfg.replace(run_dir=str(run_dir), **(QUICK_OVERRIDES if quick else FULL_OVERRIDES))


# ---------------------------------------------------------------------------
# Time to reach a fraction of GRADE's final gain


def time_to_fraction(
    curve: list[tuple[float, float]],
    ns_base: float,
    ns_final: float,
    fraction: float = FRACTION,
) -> float | None:
    """First time t of ``curve`` [(t, north-star), ...] with
    ``ns(t) - ns_base >= fraction * (ns_final - ns_base)``; None if never, or if the
    reference gain ``ns_final - ns_base`` is not positive (the target is then undefined).
    ``ns_base``: uniform's north-star (the headline definition) or the Stage-1 start's."""
    gain = ns_final - ns_base
    if not math.isfinite(gain) or gain <= 0:
        return None
    target = fraction * gain
    for t, ns in sorted(curve, key=lambda p: p[0]):
        if math.isfinite(ns) and ns - ns_base >= target:
            return float(t)
    return None


# ---------------------------------------------------------------------------
# Trained arms


@dataclasses.dataclass
class TrainedArm:
    """One trained arm: its policy, budget used and held-out north-star over training time."""

    name: str
    policy: Path
    train_s: float
    """Stage-2 training seconds (GRADE: sum of round seconds; PPO: ``train_seconds``)."""
    wall_s: float
    """The whole training call, setup and per-round probes/checkpoints included."""
    requests: int
    """Logged requests (GRADE rollouts / PPO env steps) used for training."""
    reward_evals: int
    """Reward evaluations: requests x G for GRADE, env steps for PPO."""
    curve: list[tuple[float, float]]
    """(training seconds, held-out probe north-star), starting at (0, Stage 1)."""


def _probe(cfg: Config, train_path: str, eval_path: str):
    """The training loop's held-out probe for this config (simulator data only)."""
    from grade_ray.data.reading import read_meta
    from grade_ray.jobs.train import simulator_for
    from grade_ray.learner.loop import Probe

    sim = simulator_for(cfg)
    if sim is None:
        raise ValueError("the quality benchmark needs simulator data (data.train_path unset)")
    return Probe(cfg, read_meta(train_path), eval_path, sim)


def _uniform_north_star(cfg: Config, probe) -> float:
    """Probe north-star of uniform weights: a freshly built policy outputs uniform weights
    (its last layer starts at zero), so the probe scores it exactly like a trained one."""
    from grade_ray.models.policy import build_policy

    meta = probe.meta
    return float(probe(build_policy(cfg.policy, meta.context_dim, meta.num_tasks))[PROBE_KEY])


def train_grade_variant(cfg: Config, name: str, ns_start: float) -> TrainedArm:
    """Train one :data:`~grade_ray.jobs.compare.VARIANTS` entry under RUN_DIR/variants/NAME from
    RUN_DIR's Stage 1 and data (the ``grade-ray compare`` layout), in this process."""
    from grade_ray.jobs.compare import variant_config
    from grade_ray.jobs.train import run_train_local
    from grade_ray.learner.loop import POLICY_FILE
    from grade_ray.runlog import read_metrics

    vcfg = variant_config(cfg, name, fresh=True)  # stale rounds would mix into metrics.jsonl
    vdir = Path(vcfg.run_dir)
    log.info("quality bench: training %s in %s", name, vdir)
    t0 = time.perf_counter()
    run_train_local(vcfg)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(vdir) if r.get("stage") == 2]
    t, curve = 0.0, [(0.0, ns_start)]
    for r in rows:
        t += float(r["perf/round_s"])
        curve.append((t, float(r.get(PROBE_KEY, float("nan")))))
    requests = int(sum(r["rollout/requests"] for r in rows))
    return TrainedArm(
        name=name,
        policy=vdir / POLICY_FILE,
        train_s=t,
        wall_s=wall,
        requests=requests,
        reward_evals=requests * vcfg.exploration.group_size,
        curve=curve,
    )


def train_ppo_arm(
    cfg: Config,
    name: str,
    probe,
    ns_start: float,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    settings=None,
    train_path: str | None = None,
) -> TrainedArm:
    """RLlib PPO from RUN_DIR's Stage 1 into RUN_DIR/variants/NAME, with its probe curve."""
    from grade_ray.baselines.rllib_ppo.training import train_rllib_ppo
    from grade_ray.learner.loop import PRETRAIN_CKPT
    from grade_ray.runlog import CHECKPOINT_DIR

    run_dir = Path(cfg.run_dir)
    out = run_dir / "variants" / name
    if out.exists():
        shutil.rmtree(out)
    log.info("quality bench: training %s (steps=%s, seconds=%s) in %s", name, steps, seconds, out)
    snapshots: list = []  # the policy after each PPO iteration, scored after training
    t0 = time.perf_counter()
    run = train_rllib_ppo(
        cfg,
        steps=steps,
        seconds=seconds,
        settings=settings,
        out_dir=out,
        train_path=train_path,
        init_policy=run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt",
        on_iteration=lambda policy, _metrics: snapshots.append(policy),
    )
    wall = time.perf_counter() - t0
    if len(snapshots) != len(run.history):
        raise RuntimeError(
            f"PPO snapshots ({len(snapshots)}) do not match its iterations ({len(run.history)})"
        )
    curve = [(0.0, ns_start)] + [
        (float(h["seconds"]), float(probe(p)[PROBE_KEY])) for h, p in zip(run.history, snapshots)
    ]
    return TrainedArm(
        name=name,
        policy=run.path,
        train_s=run.train_seconds,
        wall_s=wall,
        requests=run.env_steps,
        reward_evals=run.env_steps,
        curve=curve,
    )


# ---------------------------------------------------------------------------
# The benchmark


def _arm_rows(online: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in online:
        out.setdefault(r["arm"], {})[r["metric"]] = r
    return out


def _ab_keys(prefix: str, rows: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in AB_KEYS:
        r = rows[m]
        out[f"{prefix}.{m}"] = r["value"]
        out[f"{prefix}.{m}_lift_pct"] = 100 * r["lift"]
        out[f"{prefix}.{m}_lift_pct_ci_low"] = 100 * r["ci_low"]
        out[f"{prefix}.{m}_lift_pct_ci_high"] = 100 * r["ci_high"]
    return out


def bench_quality(
    cfg: Config | None,
    out_dir: str | Path,
    *,
    quick: bool,
    ppo_settings=None,
    address: str | None = None,
) -> dict[str, Any]:
    """Train every arm, evaluate all in one paired A/B test; flat ``quality.*`` results.

    ``cfg=None`` uses :func:`quality_config` (``quick``); a given ``cfg`` is used as is
    (``quick`` is then only recorded). ``run_dir`` is set to ``out_dir``. Needs simulator
    data. Starts an embedded local Ray (2 CPUs) for PPO unless Ray is up or ``address`` is
    given. Writes ``out_dir/quality.json``, ``out_dir/quality.md`` and the evaluation's
    ``out_dir/eval/eval.{json,md}``.
    """
    from grade_ray.jobs.evaluate import run_evaluate

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    out_dir = Path(out_dir)
    cfg = quality_config(quick, out_dir) if cfg is None else cfg.replace(run_dir=str(out_dir))
    start = _shared_start(cfg, out_dir)
    trained = _train_arms(cfg, start, ppo_settings, address)

    t_eval = time.perf_counter()
    result = run_evaluate(cfg, out_dir, extra_arms={n: str(a.policy) for n, a in trained.items()})
    eval_s = time.perf_counter() - t_eval
    if not result.online:
        raise RuntimeError("the evaluation ran no simulated A/B test")

    res = _results(cfg, quick, start, trained, result)
    res["quality.eval_s"] = eval_s
    # wall-time arms are only comparable on a quiet machine: record how busy it was
    res["quality.setup.load_avg_1m_start"] = load_start
    res["quality.setup.load_avg_1m_end"] = os.getloadavg()[0]
    res["quality.setup.cpus"] = os.cpu_count()
    res["quality.total_s"] = time.perf_counter() - t_start
    md = quality_markdown(res)
    (out_dir / "quality.json").write_text(json.dumps(res, indent=2, default=float))
    (out_dir / "quality.md").write_text(md + "\n")
    log.info("quality bench done in %.0fs:\n%s", res["quality.total_s"], md)
    return res


@dataclasses.dataclass
class SharedStart:
    """Where every trained arm starts: the shared data and Stage 1, scored by the probe."""

    train_path: str
    probe: Any
    """The training loop's held-out :class:`~grade_ray.learner.loop.Probe`."""
    ns_sp: float
    """Probe north-star of the shared Stage-1 policy (t = 0 of every curve)."""
    ns_uniform: float
    """Probe north-star of uniform weights."""


def _shared_start(cfg: Config, out_dir: Path) -> SharedStart:
    """Simulate the logs, build the probe (before training: fail fast on real data) and
    train Stage 1 once for every arm."""
    from grade_ray.jobs.train import prepare_data, run_pretrain
    from grade_ray.learner.loop import PRETRAIN_CKPT, load_policy
    from grade_ray.runlog import CHECKPOINT_DIR

    train_path, eval_path = prepare_data(cfg)
    probe = _probe(cfg, train_path, eval_path)
    run_pretrain(cfg)
    sp_policy, _, _ = load_policy(out_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt")
    return SharedStart(
        train_path=train_path,
        probe=probe,
        ns_sp=float(probe(sp_policy)[PROBE_KEY]),
        ns_uniform=_uniform_north_star(cfg, probe),
    )


def _train_arms(
    cfg: Config, start: SharedStart, ppo_settings, address: str | None
) -> dict[str, TrainedArm]:
    """GRADE and its ablations in this process, then PPO at GRADE's samples and seconds."""
    from grade_ray.jobs.compare import VARIANTS
    from grade_ray.raysession import init_ray

    trained = {name: train_grade_variant(cfg, name, start.ns_sp) for name in VARIANTS}
    grade = trained[GRADE]
    init_ray(address, num_cpus=None if address else 2)
    trained[PPO_SAMPLES] = train_ppo_arm(
        cfg, PPO_SAMPLES, start.probe, start.ns_sp,
        steps=grade.requests, settings=ppo_settings, train_path=start.train_path,
    )  # fmt: skip
    trained[PPO_TIME] = train_ppo_arm(
        cfg, PPO_TIME, start.probe, start.ns_sp,
        seconds=grade.train_s, settings=ppo_settings, train_path=start.train_path,
    )  # fmt: skip
    return trained


def _arm_groups() -> list[tuple[str, str, str]]:
    """(group, label, evaluation arm) of every arm in the results, in order."""
    from grade_ray.jobs.compare import VARIANTS

    groups = [("baseline", a, a) for a in BASELINES]
    groups += [("equal_budget", n, n) for n in VARIANTS]
    groups += [("equal_budget", PPO, PPO_SAMPLES), ("equal_time", GRADE, GRADE)]
    groups += [("equal_time", PPO, PPO_TIME)]
    return groups


def _results(
    cfg: Config, quick: bool, start: SharedStart, trained: dict[str, TrainedArm], evaluation
) -> dict[str, Any]:
    """The flat results: setup, probe north-stars, each arm's A/B figures (and budget and
    time to 95% when trained), then each trained arm's time to 95% and curve."""
    ns_final = trained[GRADE].curve[-1][1]
    ns_uniform, ns_sp = start.ns_uniform, start.ns_sp
    res: dict[str, Any] = {
        "quality.setup.quick": quick,
        "quality.setup.config_hash": cfg.hash(),
        "quality.setup.train_requests": cfg.simulator.num_requests,
        "quality.setup.candidates": cfg.simulator.num_candidates,
        "quality.setup.group_size": cfg.exploration.group_size,
        "quality.setup.rounds": cfg.grpo.rounds,
        "quality.setup.data_passes": cfg.grpo.data_passes,
        "quality.setup.ab_requests": cfg.eval.ab_requests,
        "quality.setup.bootstrap": cfg.eval.bootstrap,
        "quality.setup.probe_requests": len(start.probe.batch),
        "quality.setup.fraction": FRACTION,
        "quality.setup.torch_threads": torch.get_num_threads(),
        "quality.probe.north_star_uniform": ns_uniform,
        "quality.probe.north_star_sp": ns_sp,
        "quality.probe.north_star_grade_final": ns_final,
        "quality.probe.target_north_star": ns_uniform + FRACTION * (ns_final - ns_uniform),
        "quality.probe.target_north_star_over_sp": ns_sp + FRACTION * (ns_final - ns_sp),
    }
    rows = _arm_rows(evaluation.online)
    headroom = evaluation.headroom or {}
    attainable = evaluation.oracles.captured if evaluation.oracles else {}
    for group, label, arm in _arm_groups():
        prefix = f"quality.{group}.{label}"
        res.update(_ab_keys(prefix, rows[arm]))
        res[f"{prefix}.headroom_captured"] = headroom.get(arm, float("nan"))
        res[f"{prefix}.attainable_headroom_captured"] = attainable.get(arm, float("nan"))
        if arm in trained:
            res.update(_budget_keys(prefix, trained[arm], start, ns_final))
    for arm, a in trained.items():
        res[f"quality.time_to_95pct_s.{arm}"] = time_to_fraction(a.curve, ns_uniform, ns_final)
        res[f"quality.time_to_95pct_over_sp_s.{arm}"] = time_to_fraction(a.curve, ns_sp, ns_final)
        res[f"quality.curves.{arm}"] = [[t, ns] for t, ns in a.curve]
    return res


def _budget_keys(prefix: str, a: TrainedArm, start: SharedStart, ns_final: float) -> dict[str, Any]:
    """A trained arm's budget used and its time to 95% (over uniform and over SP)."""
    return {
        f"{prefix}.train_s": a.train_s,
        f"{prefix}.wall_s": a.wall_s,
        f"{prefix}.requests": a.requests,
        f"{prefix}.reward_evals": a.reward_evals,
        f"{prefix}.time_to_95pct_s": time_to_fraction(a.curve, start.ns_uniform, ns_final),
        f"{prefix}.time_to_95pct_over_sp_s": time_to_fraction(a.curve, start.ns_sp, ns_final),
    }


# ---------------------------------------------------------------------------
# Markdown


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.2f}%"


def _sig(lo: float, hi: float) -> str:
    return "*" if lo > 0 or hi < 0 else ""


def _seconds(x: float | None) -> str:
    return "never" if x is None else f"{x:,.1f}"


QUALITY_COLUMNS = (
    "arm",
    "budget",
    "requests (reward evals)",
    "north-star/request",
    "lift vs best static [95% CI]",
    "attainable headroom captured",
    *(m.upper() for m in TABLE_METRICS),
    "train seconds",
    "time to 95% (over uniform / over SP)",
)
QUALITY_ALIGN = "llrrlr" + "r" * len(TABLE_METRICS) + "rr"
# (results group, arm key, row label, budget) of the table's rows, in order
TABLE_ROWS = (
    *[("baseline", a, a, "—") for a in BASELINES],
    ("equal_budget", GRADE, GRADE, "reference"),
    *[
        ("equal_budget", n, n, "equal samples")
        for n in ("GRADE-gaussian", "GRADE-no-prior", "GRADE-no-format")
    ],
    ("equal_budget", PPO, f"{PPO} (equal samples)", "equal samples"),
    ("equal_time", PPO, f"{PPO} (equal time)", "equal time"),
)


def quality_markdown(results: dict[str, Any]) -> str:
    """The quality table from :func:`bench_quality`'s flat results (rows whose keys exist)."""
    table = md_table(QUALITY_COLUMNS, QUALITY_ALIGN, quality_rows(results))
    notes = quality_notes(results)
    return "\n".join([table] + ([""] + notes if notes else []))


def quality_rows(results: dict[str, Any]) -> list[list[str]]:
    """The table's cells, one row per arm in :data:`TABLE_ROWS` that has results."""
    rows = []
    for group, key, label, budget in TABLE_ROWS:
        p = f"quality.{group}.{key}"
        if f"{p}.north_star" in results:
            ns = f"{results[f'{p}.north_star']:.4f}"
            lifts = ["control"] + ["—"] * len(TABLE_METRICS)
            if key != "best_static":
                lifts = _lift_cells(results, p)
            captured = results.get(f"{p}.attainable_headroom_captured", float("nan"))
            req, train, t95 = _budget_cells(results, p)
            rows.append(
                [label, budget, req, ns, lifts[0], f"{captured:.2f}", *lifts[1:], train, t95]
            )
    return rows


def _lift_cells(results: dict[str, Any], p: str) -> list[str]:
    """North-star lift with its CI, then each table metric's lift (* = CI excludes 0)."""

    def lift(m: str) -> str:
        lo, hi = results[f"{p}.{m}_lift_pct_ci_low"], results[f"{p}.{m}_lift_pct_ci_high"]
        return _pct(results[f"{p}.{m}_lift_pct"]) + _sig(lo, hi)

    lo, hi = results[f"{p}.north_star_lift_pct_ci_low"], results[f"{p}.north_star_lift_pct_ci_high"]
    return [f"{lift('north_star')} [{_pct(lo)}, {_pct(hi)}]"] + [lift(m) for m in TABLE_METRICS]


def _budget_cells(results: dict[str, Any], p: str) -> tuple[str, str, str]:
    """Requests (reward evals), train seconds, time to 95%: "—" for untrained arms."""
    if f"{p}.requests" not in results:
        return "—", "—", "—"
    req = f"{results[f'{p}.requests']:,} ({results[f'{p}.reward_evals']:,})"
    t95 = _seconds(results[f"{p}.time_to_95pct_s"])
    if f"{p}.time_to_95pct_over_sp_s" in results:
        t95 += " / " + _seconds(results[f"{p}.time_to_95pct_over_sp_s"])
    return req, _seconds(results[f"{p}.train_s"]), t95


def quality_notes(results: dict[str, Any]) -> list[str]:
    """The paragraphs under the table: how time to 95% and the lifts were measured."""
    notes = []
    if "quality.probe.north_star_uniform" in results:
        notes.append(
            f"Time to 95%: first training second at which an arm's held-out north-star gain "
            f"over uniform (over the shared Stage-1 start) reaches 95% of GRADE's final gain; "
            f"probe north-star: uniform {results['quality.probe.north_star_uniform']:.4f}, "
            f"Stage 1 {results['quality.probe.north_star_sp']:.4f}, GRADE final "
            f"{results['quality.probe.north_star_grade_final']:.4f}, targets "
            f"{results['quality.probe.target_north_star']:.4f} / "
            f"{results.get('quality.probe.target_north_star_over_sp', float('nan')):.4f}; "
            "0.0 = the Stage-1 start already reaches it, never = not within the arm's budget."
        )
    if "quality.setup.ab_requests" in results:
        notes.append(
            f"Lifts: paired simulated A/B test on {results['quality.setup.ab_requests']:,} "
            f"fresh requests (expected outcomes), control best_static, 95% paired bootstrap CI "
            f"({results['quality.setup.bootstrap']} resamples); * = CI excludes 0."
        )
    return notes
