"""Evaluation: offline metrics on held-out logs and, for simulator data, an online A/B test.

Arms are weight functions ``(SessionBatch, truth | None) -> (B, K)``:

- ``uniform``: 1/K for every task;
- ``best_static``: the single weight vector maximising the ranking reward
  (l1*R_post + l2*R_prior) on training logs, searched on a simplex grid —
  what production runs today; the A/B control;
- ``static_truth`` (simulator): the best single vector by the *true* expected
  north-star; the strictest static baseline and the headroom's denominator;
- ``SP`` (Stage 1 policy) and ``GRADE`` (the run's policy) plus any extra
  runs passed as arms;
- ``oracle`` (simulator): each user's segment's true best weights.

Offline: NDCG@k per label and for the composite reward, GAUC per label, with
bootstrap CIs; with baselines, the paired replay (:mod:`grade_ray.jobs.replay`, the
KuaiRand pipeline's analysis on any logs): every arm's paired difference to best_static
with a paired bootstrap CI and a Bonferroni note, a per-segment static where the data
has segments, each learned arm's mean weights as a static arm (``<arm>-mean-static``)
and per-day rows when the held-out logs span several days. Online: the simulator's paired A/B test (CTR, CVR, OPM, GPM,
profit, orders, north-star; lifts over best_static with CIs), the captured
share of personalization headroom, and how close each arm's per-segment mean
weights are to the oracle's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from grade_ray.algos.fusion import fuse_requests, request_weights
from grade_ray.algos.metrics import gauc, ndcg_at_k
from grade_ray.config import Config
from grade_ray.data.abtest import ab_test
from grade_ray.data.oracles import simplex_grid
from grade_ray.data.reading import read_sessions
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.jobs.headroom import (
    SEGMENT_ORACLE,
    STATIC,
    Headroom,
    LogsHeadroom,
    diagnose,
    diagnose_logs,
    headroom,
    headroom_markdown,
    logs_headroom,
    logs_markdown,
    oracle_arms,
)
from grade_ray.jobs.replay import (
    StaticSearch,
    find_segments,
    logs_replay,
    replay_markdown,
    static_arms,
)
from grade_ray.learner.loop import POLICY_FILE, PRETRAIN_CKPT, load_policy
from grade_ray.learner.reward_fit import reward_spec
from grade_ray.runlog import CHECKPOINT_DIR, load_checkpoint
from grade_ray.spec import RewardSpec, as_tensor

log = logging.getLogger(__name__)

WeightFn = Callable[[SessionBatch, object], np.ndarray]


def ranking_reward(
    batch: SessionBatch,
    weights: np.ndarray,
    spec: RewardSpec,
    fusion: str,
    eps: float,
    chunk: int = 256,
    l3: float = 0.0,
) -> np.ndarray:
    """(B, P) l1*R_post + l2*R_prior (+ the gated l3*R_format when ``l3`` > 0) of each
    request under each weight vector (P, K)."""
    w = torch.from_numpy(np.asarray(weights, dtype=np.float32))
    chunks = spec.iter_grid_rewards(batch, w, fusion=fusion, fusion_eps=eps, l3=l3, chunk=chunk)
    return np.concatenate([r.numpy() for r in chunks])


def static_search(cfg: Config, train_path: str) -> StaticSearch:
    """Every simplex-grid vector's ranking reward on (up to ``eval.search_requests``)
    training requests (R_prior calibrated as the run's, from ``cfg.run_dir``, when the
    reward asks for it); ``.best`` is the best static weights."""
    batch, meta, _ = read_sessions(
        train_path, on_error=cfg.data.on_error, max_rows=cfg.eval.search_requests
    )
    spec = reward_spec(cfg, meta, train_path)
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    reward = ranking_reward(batch, grid, spec, cfg.policy.fusion, cfg.policy.fusion_eps)
    search = StaticSearch(batch, meta, grid, reward)
    log.info(
        "best static weights on %d training requests: %s",
        len(batch),
        dict(zip(meta.task_names, search.best.round(3).tolist())),
    )
    return search


def search_best_static(cfg: Config, train_path: str) -> np.ndarray:
    """(K,) grid weights maximising the mean ranking reward on training logs."""
    return static_search(cfg, train_path).best


def static_arm(w: np.ndarray) -> WeightFn:
    return lambda batch, truth: np.broadcast_to(w, (len(batch), len(w))).astype(np.float32)


def policy_arm(path: str | Path) -> WeightFn:
    """The policy's weights (B, K); an item-aware policy's per-candidate weights (B, N, K)."""
    policy, _, state = load_policy(path)

    @torch.no_grad()
    def fn(batch: SessionBatch, truth) -> np.ndarray:
        x = as_tensor(batch.context)
        if getattr(policy, "item_aware", False):
            eps = state["config"]["policy"]["fusion_eps"]
            scores, mask = as_tensor(batch.scores), as_tensor(batch.mask)
            return policy.item_weights(x, scores, mask, eps).numpy()
        return policy.pi(x).numpy()

    return fn


def _bootstrap_ci(x: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def offline_metrics(
    batch: SessionBatch,
    meta: SessionMeta,
    weights: np.ndarray,
    spec: RewardSpec,
    fusion: str,
    eps: float,
    bootstrap: int,
    seed: int,
) -> dict[str, float]:
    """NDCG@k per label (over the requests with a positive of that label, as the replay's
    ``ndcg/<label>``), composite reward (with CI) and GAUC per label for one arm."""
    scores, mask = as_tensor(batch.scores), as_tensor(batch.mask)
    fused = fuse_requests(fusion, scores, torch.from_numpy(np.ascontiguousarray(weights)), eps)
    labels = as_tensor(batch.labels)
    out: dict[str, float] = {}
    for j, name in enumerate(meta.label_names):
        gains = labels[..., j].clamp_min(0)
        has_pos = ((gains > 0) & mask).any(-1)
        ndcg = ndcg_at_k(fused, gains, mask, spec.k)[has_pos]
        out[f"ndcg@{spec.k}/{name}"] = float(ndcg.mean()) if len(ndcg) else float("nan")
        out[f"gauc/{name}"] = float(gauc(fused.numpy(), (labels[..., j] > 0).numpy(), batch.mask))
    post = ndcg_at_k(fused, spec.post_gain(labels, as_tensor(batch.position)), mask, spec.k).numpy()
    prior = ndcg_at_k(
        fused, spec.prior_gain(scores, as_tensor(batch.context)), mask, spec.k
    ).numpy()
    comp = spec.l1 * post + spec.l2 * prior
    out["r_post"] = float(post.mean())
    out["r_prior"] = float(prior.mean())
    out["composite"] = float(comp.mean())
    out["composite_ci_low"], out["composite_ci_high"] = _bootstrap_ci(comp, bootstrap, seed)
    return out


@dataclasses.dataclass
class EvalResult:
    """What ``grade-ray evaluate`` measured (also written to RUN_DIR/eval/eval.json|md).

    headroom: arm -> captured share of the segment oracle's headroom (simulator only);
    oracles: captured attainable headroom, objective and optimisation gaps, per-segment
    north-star; logs: the same question by the training reward on held-out logs (any data);
    warnings: the diagnosis (what limits the policy); replay: the paired replay on the
    held-out logs (:func:`grade_ray.jobs.replay.logs_replay`; with baselines).
    """

    offline: dict[str, dict[str, float]]
    online: list[dict] | None
    headroom: dict[str, float] | None
    recovery: dict[str, float] | None
    markdown: str
    oracles: Headroom | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    logs: LogsHeadroom | None = None
    replay: dict | None = None


def default_arms(
    cfg: Config,
    run_dir: Path,
    train_path: str,
    baselines: bool,
    search: StaticSearch | None = None,
) -> tuple[dict[str, WeightFn], dict[str, list[float]]]:
    """Baseline and policy arms for a run, plus the static weights used (best_static from
    ``search`` when given, else searched here)."""
    from grade_ray.data.reading import read_meta

    meta = read_meta(train_path)
    arms: dict[str, WeightFn] = {}
    statics: dict[str, list[float]] = {}
    if baselines:
        k = meta.num_tasks
        arms["uniform"] = static_arm(np.full(k, 1.0 / k, np.float32))
        if search is None:
            search = static_search(cfg.replace(run_dir=str(run_dir)), train_path)
        best = search.best
        statics["best_static"] = best.tolist()
        arms["best_static"] = static_arm(best)
        sp = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
        if sp.exists():
            arms["SP"] = policy_arm(sp)
    if (run_dir / POLICY_FILE).exists():  # named after the algorithm that trained it
        algo = load_checkpoint(run_dir / POLICY_FILE).get("algo", "GRADE")
        arms[str(algo)] = policy_arm(run_dir / POLICY_FILE)
    return arms, statics


def _check_time_split(train_path: str, eval_path: str) -> None:
    """Logs that record their dates (real-data converters do): held-out days must come
    after the policy's training days and be scored by the same upstream model, else
    :class:`~grade_ray.datasets.kuairand.scoring.LeakageError`."""
    from grade_ray.data.reading import read_meta

    train_meta, eval_meta = read_meta(train_path), read_meta(eval_path)
    if train_meta.source.get("dates") and eval_meta.source.get("dates"):
        from grade_ray.datasets.kuairand.datadir import check_split_dates

        check_split_dates(train_meta, eval_meta)


def run_evaluate(
    cfg: Config,
    run_dir: str | Path,
    eval_path: str | None = None,
    baselines: bool = True,
    extra_arms: dict[str, str] | None = None,
    out_dir: str | Path | None = None,
) -> EvalResult:
    """Evaluate a run's policy (and baselines) offline and, on simulator data, online;
    writes RUN_DIR/eval/eval.json|md (and the same files under ``out_dir`` when given)."""
    from grade_ray.jobs.train import prepare_data, simulator_for

    run_dir = Path(run_dir)
    train_path, default_eval = prepare_data(cfg)
    eval_path = eval_path or default_eval
    if not eval_path:
        raise FileNotFoundError("no held-out data: set data.eval_path or pass --data")
    _check_time_split(train_path, eval_path)
    search = static_search(cfg.replace(run_dir=str(run_dir)), train_path) if baselines else None
    arms, statics = default_arms(cfg, run_dir, train_path, baselines, search)
    # the arm the diagnosis is about: the run's own policy (extra arms, e.g. ablations, come
    # after it), else the first extra arm
    own = [a for a in arms if a not in (*BASELINE_ARMS, "SP")]
    policy = own[-1] if own else next(iter(extra_arms or {}), "")
    arms.update({name: policy_arm(path) for name, path in (extra_arms or {}).items()})
    if not arms:
        raise FileNotFoundError(f"nothing to evaluate: no {POLICY_FILE} in {run_dir}")
    batch, meta, report = read_sessions(eval_path, on_error=cfg.data.on_error)
    spec = reward_spec(cfg.replace(run_dir=str(run_dir)), meta, train_path)
    weights = {name: fn(batch, None) for name, fn in arms.items()}
    offline = {name: _offline(cfg, batch, meta, w, spec) for name, w in weights.items()}
    online = oracles = recovery = logs = None
    sim = simulator_for(cfg)
    if sim is not None:
        online, oracles, recovery = _online(cfg, sim, arms, statics, train_path)
    replay = None
    if baselines:
        logs = logs_headroom(cfg, spec, train_path, batch, weights)
        replay = _replay(cfg, sim, search, batch, meta, spec, arms, weights, statics)
    warnings = diagnose(oracles, weights, policy) + (
        [] if logs is None else diagnose_logs(logs, policy)
    )
    for w in warnings:
        log.warning("%s", w)
    md = _markdown(
        offline, online, oracles, recovery, report.summary(), spec.k, warnings, logs, replay
    )
    headroom_seg = None if oracles is None else oracles.captured_segment
    result = EvalResult(
        offline, online, headroom_seg, recovery, md, oracles, warnings, logs, replay
    )
    for out in (run_dir / "eval", *([Path(out_dir)] if out_dir else [])):
        _write(out, result, statics, report.summary())
    return result


BASELINE_ARMS = ("uniform", "best_static")


def _replay(cfg, sim, search, batch, meta, spec, arms, weights, statics) -> dict:
    """The paired replay: the run's arms, segment_static and every learned arm's mean static."""
    learned = {a: fn for a, fn in arms.items() if a not in BASELINE_ARMS}
    segments = find_segments(cfg.eval.segment_feature, sim, search.batch, search.meta, batch, meta)
    extra, static_weights = static_arms(search, segments, learned, len(batch))
    # the pipeline's order: baselines, segment_static, learned arms, their mean statics
    order = [*BASELINE_ARMS, "segment_static", *learned]
    arm_weights = {a: weights.get(a, extra.get(a)) for a in order if a in weights or a in extra}
    arm_weights.update({a: w for a, w in extra.items() if a not in arm_weights})
    tasks = search.meta.task_names
    base = {"best_static": dict(zip(tasks, np.round(statics["best_static"], 3).tolist()))}
    return logs_replay(cfg, batch, meta, spec, arm_weights, learned, {**base, **static_weights})


def _offline(cfg: Config, batch: SessionBatch, meta: SessionMeta, weights, spec) -> dict:
    e = cfg.eval
    fusion, eps = cfg.policy.fusion, cfg.policy.fusion_eps
    return offline_metrics(batch, meta, weights, spec, fusion, eps, e.bootstrap, e.ab_seed)


def _write(out: Path, result: EvalResult, statics: dict, data_summary: str) -> None:
    """eval.json (every number) and eval.md (the tables) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "offline": result.offline,
        "online": result.online,
        "headroom": result.headroom,
        "oracles": None if result.oracles is None else result.oracles.to_dict(),
        "logs_headroom": None if result.logs is None else result.logs.to_dict(),
        "recovery": result.recovery,
        "replay": result.replay,
        "warnings": result.warnings,
        "static_weights": statics,
        "eval_data": data_summary,
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2, default=float))
    (out / "eval.md").write_text(result.markdown)


def _online(
    cfg: Config, sim, arms: dict[str, WeightFn], statics: dict[str, list[float]], train_path: str
) -> tuple[list[dict], Headroom, dict[str, float]]:
    """Simulated A/B test on fresh users with the oracle arms; headroom, gaps and the
    weights' distance to each segment's oracle."""
    e = cfg.eval
    fusion, eps = cfg.policy.fusion, cfg.policy.fusion_eps
    all_arms = {**arms, **oracle_arms(cfg, sim, train_path)}
    batch, truth = sim.fresh_requests(e.ab_requests, e.ab_seed)
    sc = as_tensor(batch.scores)
    weights = {n: fn(batch, truth) for n, fn in all_arms.items()}
    statics["static_truth"] = weights[STATIC][0].tolist()
    fused = {
        n: fuse_requests(fusion, sc, torch.from_numpy(np.ascontiguousarray(w)), eps).numpy()
        for n, w in weights.items()
    }
    control = "best_static" if "best_static" in fused else next(iter(fused))
    ab = ab_test(sim, batch, truth, fused, control=control, seed=e.ab_seed, bootstrap=e.bootstrap)
    hr = headroom(dict(zip(ab.arms, ab.north_star)), truth.segment, sim.segment_names)
    present = [s for s in range(len(sim.segment_names)) if (truth.segment == s).any()]
    oracle = np.stack([weights[SEGMENT_ORACLE][truth.segment == s][0] for s in present])
    recovery = {}
    for n, w in weights.items():
        w = request_weights(w, batch.mask)
        per_seg = np.stack([w[truth.segment == s].mean(0) for s in present])
        recovery[n] = float(np.abs(per_seg - oracle).sum(1).mean() / 2)  # mean TV distance
    return ab.to_rows(), hr, recovery


def _markdown(
    offline,
    online,
    oracles: Headroom | None,
    recovery,
    data_summary: str,
    k: int,
    warnings,
    logs: LogsHeadroom | None = None,
    replay: dict | None = None,
) -> str:
    lines = [
        f"Held-out logs: {data_summary}",
        "",
        f"| arm | composite (95% CI) | R_post NDCG@{k} | R_prior NDCG@{k} | GAUC (first label) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, m in offline.items():
        first_gauc = next((v for kk, v in m.items() if kk.startswith("gauc/")), float("nan"))
        lines.append(
            f"| {name} | {m['composite']:.4f} [{m['composite_ci_low']:.4f}, "
            f"{m['composite_ci_high']:.4f}] | {m['r_post']:.4f} | {m['r_prior']:.4f} | "
            f"{first_gauc:.4f} |"
        )
    if replay is not None:
        lines += ["", replay_markdown(replay)]
    if online:
        lines += _online_markdown(online, oracles, recovery)
    if logs is not None:
        lines += logs_markdown(logs)
    if warnings:
        lines += ["", "Diagnosis:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines)


def _online_markdown(online, oracles: Headroom | None, recovery) -> list[str]:
    """The simulated A/B table (every metric's lift with its CI) and the headroom tables."""
    metrics = list(dict.fromkeys(r["metric"] for r in online))
    arms = list(dict.fromkeys(r["arm"] for r in online))
    by = {(r["arm"], r["metric"]): r for r in online}
    lines = [
        "",
        "Simulated online A/B test on fresh users (lift over best_static, "
        "95% paired bootstrap CI; * = CI excludes 0):",
        "",
        "| arm | "
        + " | ".join(metrics)
        + " | attainable headroom captured | weight TV to oracle |",
        "|---|" + "---:|" * (len(metrics) + 2),
    ]
    for a in arms:
        cells = []
        for m in metrics:
            r = by[(a, m)]
            star = "*" if r["significant"] else ""
            cells.append(
                f"{r['value']:.4g} ({r['lift']:+.2%}{star} "
                f"[{r['ci_low']:+.2%}, {r['ci_high']:+.2%}])"
            )
        lines.append(
            f"| {a} | " + " | ".join(cells) + f" | {oracles.captured.get(a, float('nan')):.2f} | "
            f"{recovery.get(a, float('nan')):.3f} |"
        )
    lines += headroom_markdown(oracles, arms)
    return lines
