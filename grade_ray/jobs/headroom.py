"""Where personalization headroom goes: oracles, captured headroom, and the two gaps.

On simulator data every arm is judged by its true expected north-star per request
against the best static vector S and three oracles (``grade_ray.data.oracles``):
the segment oracle O_seg (true segment, unattainable), the attainable oracle O_ctx
(the best weights under p(segment | context)) and the reward oracle O_rew (the same
search maximising the *training reward* on logged requests). For a policy P:

    captured (attainable)  = (P - S) / (O_ctx - S)
    captured (segment)     = (P - S) / (O_seg - S)
    objective gap          = (O_ctx - O_rew) / (O_ctx - S)   what the reward loses
    optimisation gap       = (O_rew - P) / (O_ctx - S)       what training loses

so captured + optimisation gap + objective gap = 1. :func:`diagnose` turns them
into warnings that say which side limits a run.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from grade_ray.config import Config
from grade_ray.data.oracles import ValueTable, simplex_grid, truth_table
from grade_ray.data.reading import read_sessions
from grade_ray.data.simulator import MarketplaceSimulator
from grade_ray.learner.reward_fit import reward_spec

log = logging.getLogger(__name__)

STATIC = "static_truth"
SEGMENT_ORACLE = "oracle"
CONTEXT_ORACLE = "oracle_ctx"
REWARD_ORACLE = "reward_oracle"
ORACLE_ARMS = (STATIC, CONTEXT_ORACLE, SEGMENT_ORACLE, REWARD_ORACLE)

OBJECTIVE_GAP_WARN = 0.5
"""Warn that the reward limits a run when its optimum misses this share of the headroom."""
OPTIMISATION_GAP_WARN = 0.5
"""Warn that training limits a run when it misses this share of what its reward reaches."""
MIN_HEADROOM = 0.002
"""Below this relative gap O_ctx / S - 1 there is no attainable headroom to judge."""


def reward_table(cfg: Config, sim: MarketplaceSimulator, train_path: str) -> ValueTable:
    """Mean *training reward* (the composite GRADE optimises, R_format gate included) of
    every grid point per true segment, on up to ``eval.oracle_requests`` logged requests."""
    from grade_ray.jobs.evaluate import ranking_reward

    batch, meta, _ = read_sessions(
        train_path, on_error=cfg.data.on_error, max_rows=cfg.eval.oracle_requests
    )
    spec = reward_spec(cfg, meta, train_path)
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    values = ranking_reward(batch, grid, spec, cfg.policy.fusion, cfg.policy.fusion_eps, l3=spec.l3)
    segments = sim.users.segment[batch.user_id]
    return ValueTable.from_requests(grid, values, segments, len(sim.segment_names))


def posterior_arm(sim: MarketplaceSimulator, table: ValueTable):
    """Weight function ``(batch, truth) -> (B, K)``: per request the table's best grid point
    under p(segment | context) (O_ctx for the truth table, O_rew for a reward table)."""

    def fn(batch, truth) -> np.ndarray:
        return table.posterior_best(sim.segment_posterior(batch.context)).astype(np.float32)

    return fn


def truth_oracle_arms(sim: MarketplaceSimulator, table: ValueTable) -> dict:
    """Weight functions of S, O_ctx and O_seg from a truth table."""
    static, per_seg = table.static_best(), table.segment_best()
    return {
        STATIC: lambda batch, truth: np.broadcast_to(static, (len(batch), len(static))).astype(
            np.float32
        ),
        CONTEXT_ORACLE: posterior_arm(sim, table),
        SEGMENT_ORACLE: lambda batch, truth: per_seg[truth.segment].astype(np.float32),
    }


def world_truth_table(cfg: Config, sim: MarketplaceSimulator) -> ValueTable:
    """The truth table of ``cfg``'s world, searched on its own fresh requests (seed
    ``eval.ab_seed + 7``, never the A/B test's)."""
    e = cfg.eval
    return truth_table(
        sim,
        cfg.policy.fusion,
        e.static_grid_step,
        e.search_requests,
        e.ab_seed + 7,
        cfg.policy.fusion_eps,
    )


def oracle_arms(cfg: Config, sim: MarketplaceSimulator, train_path: str) -> dict:
    """Weight functions ``(batch, truth) -> (B, K)`` of S, O_ctx, O_seg and O_rew."""
    arms = truth_oracle_arms(sim, world_truth_table(cfg, sim))
    arms[REWARD_ORACLE] = posterior_arm(sim, reward_table(cfg, sim, train_path))
    return arms


@dataclasses.dataclass
class Headroom:
    """Per-arm captured headroom and gaps, the reward's objective gap, per-segment values.

    captured / captured_segment / optimisation_gap: arm -> share (NaN without headroom);
    objective_gap: one number for the run's reward; per_segment: arm -> segment ->
    mean expected north-star per request.
    """

    captured: dict[str, float]
    captured_segment: dict[str, float]
    optimisation_gap: dict[str, float]
    objective_gap: float
    relative_headroom: float
    per_segment: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def headroom(
    north_star: dict[str, np.ndarray], segments: np.ndarray, segment_names: tuple[str, ...]
) -> Headroom:
    """north_star: arm -> (B,) expected north-star per request (the oracle arms included);
    segments: (B,) true segment of each request."""
    ns = {a: float(np.mean(v)) for a, v in north_star.items()}
    s, o_ctx, o_seg = ns[STATIC], ns[CONTEXT_ORACLE], ns[SEGMENT_ORACLE]
    gap = o_ctx - s
    ok = gap > MIN_HEADROOM * abs(s)

    def share(x: float, denom: float) -> float:
        return x / denom if denom > MIN_HEADROOM * abs(s) else float("nan")

    per_segment = {
        a: {
            name: float(v[segments == i].mean())
            for i, name in enumerate(segment_names)
            if (segments == i).any()
        }
        for a, v in north_star.items()
    }
    return Headroom(
        captured={a: share(v - s, gap) for a, v in ns.items()},
        captured_segment={a: share(v - s, o_seg - s) for a, v in ns.items()},
        optimisation_gap={a: share(ns[REWARD_ORACLE] - v, gap) for a, v in ns.items()},
        objective_gap=share(o_ctx - ns[REWARD_ORACLE], gap) if ok else float("nan"),
        relative_headroom=gap / s if s else float("nan"),
        per_segment=per_segment,
    )


def same_weights(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> bool:
    """True when two arms put (numerically) the same weights on every request."""
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) < tol


def diagnose(
    h: Headroom | None, weights: dict[str, np.ndarray], policy: str = "GRADE"
) -> list[str]:
    """Warnings that say what limits ``policy``: its reward, its training, or nothing moved.

    weights: arm -> (B, K) weights on the held-out requests (to flag a policy equal to SP).
    """
    out = []
    if policy in weights and "SP" in weights and same_weights(weights[policy], weights["SP"]):
        out.append(
            f"{policy} equals SP: Stage 2 did not move the Stage 1 policy (look for zero "
            "learner/grad_norm and a fully polarized policy in metrics.csv; lower "
            "pretrain.epochs or raise pretrain.min_entropy)"
        )
    if h is None or policy not in h.captured or np.isnan(h.objective_gap):
        if h is not None and np.isnan(h.objective_gap):
            out.append(
                f"no attainable headroom: the context-posterior oracle is within "
                f"{h.relative_headroom:+.2%} of the best static weights"
            )
        return out
    cap, opt, obj = h.captured[policy], h.optimisation_gap[policy], h.objective_gap
    if obj > OBJECTIVE_GAP_WARN:
        out.append(
            f"the reward, not training, limits you: a perfect optimiser of the training reward "
            f"(reward_oracle) captures only {1 - obj:.2f} of the attainable headroom "
            f"({policy}: {cap:.2f}); change the reward (reward.post_gains / prior_gains, "
            "reward.l2, reward.prior_calibration) rather than training longer"
        )
    if opt > OPTIMISATION_GAP_WARN:
        out.append(
            f"training, not the reward, limits you: {policy} captures {cap:.2f} of the "
            f"attainable headroom where its reward's optimum captures {1 - obj:.2f}; more data, "
            "rounds (grpo.rounds, grpo.data_passes) or policy capacity should help"
        )
    return out


def headroom_markdown(h: Headroom, arms: list[str]) -> list[str]:
    """Table of captured headroom and gaps per arm, then north-star per segment."""
    lines = [
        "",
        "Headroom (S = static_truth, O_ctx = oracle_ctx: the best weights under p(segment | "
        "context), O_seg = oracle: per true segment, O_rew = reward_oracle: the same search "
        "on the training reward). Attainable headroom O_ctx / S - 1 = "
        f"{h.relative_headroom:+.2%}; objective gap (O_ctx - O_rew) / (O_ctx - S) = "
        f"{h.objective_gap:.2f}.",
        "",
        "| arm | captured (P - S) / (O_ctx - S) | vs segment oracle | optimisation gap "
        "(O_rew - P) / (O_ctx - S) |",
        "|---|---:|---:|---:|",
    ]
    for a in arms:
        lines.append(
            f"| {a} | {h.captured[a]:.2f} | {h.captured_segment[a]:.2f} | "
            f"{h.optimisation_gap[a]:.2f} |"
        )
    segs = list(next(iter(h.per_segment.values())))
    lines += [
        "",
        "Expected north-star per request by true segment:",
        "",
        "| arm | " + " | ".join(segs) + " |",
        "|---|" + "---:|" * len(segs),
    ]
    for a in arms:
        cells = [f"{h.per_segment[a].get(s, float('nan')):.4f}" for s in segs]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------
# Without ground truth: the same questions, measured by the training reward on held-out logs

CONTEXT_CLUSTERS = 8
"""Context clusters of the logs' reward oracle (k-means on standardised context)."""
CLUSTER_ORACLE = "cluster_oracle"
REWARD_STATIC = "reward_static"
LOGS_CAPTURE_WARN = 0.5
"""Warn that training limits a run below this share of the cluster oracle's reward gain."""


def context_clusters(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """(k, D) k-means centroids of contexts x (B, D) (already standardised); k-means++ start."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[0])
    c = np.stack(centres)
    for _ in range(iters):
        lab = assign_clusters(x, c)
        c = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
    return c


def assign_clusters(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(B,) index of the nearest centroid of each row of x (B, D)."""
    return ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)


@dataclasses.dataclass
class LogsHeadroom:
    """Headroom by the training reward on held-out logs (no ground truth needed).

    reward: arm -> mean training reward per held-out request (with ``reward_static`` = the reward's
    best static grid point, ``cluster_oracle`` = the best grid point per context cluster
    fitted on the training logs, ``cluster_oracle_half`` = the same on half of them);
    captured: arm -> (R_arm - R_static) / (R_cluster_oracle - R_static); data_gain: the
    oracle's held-out reward from half to all the training logs, with its 95% half-width.
    """

    reward: dict[str, float]
    captured: dict[str, float]
    data_gain: float
    data_gain_ci: float
    clusters: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _request_reward(batch, weights: np.ndarray, spec, cfg: Config) -> np.ndarray:
    """(B,) the training reward of each request ranked with its own weights (B, K)."""
    import torch

    from grade_ray.algos.fusion import request_weights
    from grade_ray.spec import as_tensor

    out = []
    for s in range(0, len(batch), 512):
        b = batch.slice(s, min(s + 512, len(batch)))
        scores = as_tensor(b.scores)
        w = torch.from_numpy(np.ascontiguousarray(weights[s : s + len(b)], dtype=np.float32))
        items = w[:, None] if w.dim() == 3 else None  # an item-aware arm's (B, N, K)
        r = spec.group_rewards(
            scores,
            request_weights(w, as_tensor(b.mask))[:, None, :],
            spec.post_gain(as_tensor(b.labels), as_tensor(b.position)),
            spec.prior_gain(scores, as_tensor(b.context)),
            as_tensor(b.mask),
            fusion=cfg.policy.fusion,
            fusion_eps=cfg.policy.fusion_eps,
            item_weights=items,
        )
        out.append(r["reward"][:, 0].numpy().astype(np.float64))
    return np.concatenate(out)


def logs_headroom(
    cfg: Config, spec, train_path: str, held_out, weights: dict[str, np.ndarray]
) -> LogsHeadroom:
    """The reward oracle without ground truth: per context cluster of the training logs, the
    grid weights with the best training reward; every arm scored by that reward on the
    held-out requests ``held_out`` (weights: arm -> (B, K) on them)."""
    from grade_ray.jobs.evaluate import ranking_reward

    train, meta, _ = read_sessions(
        train_path, on_error=cfg.data.on_error, max_rows=cfg.eval.oracle_requests
    )
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    values = ranking_reward(train, grid, spec, cfg.policy.fusion, cfg.policy.fusion_eps, l3=spec.l3)
    mean, std = train.context.mean(0), train.context.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    z_train, z_eval = (train.context - mean) / std, (held_out.context - mean) / std
    centres = context_clusters(z_train, CONTEXT_CLUSTERS, seed=cfg.seed)
    lab_train, lab_eval = assign_clusters(z_train, centres), assign_clusters(z_eval, centres)
    half = len(train) // 2
    full = ValueTable.from_requests(grid, values, lab_train, len(centres))
    halved = ValueTable.from_requests(grid, values[:half], lab_train[:half], len(centres))
    arms = {
        **weights,
        REWARD_STATIC: np.broadcast_to(full.static_best(), (len(held_out), meta.num_tasks)),
        CLUSTER_ORACLE: full.segment_best()[lab_eval],
        f"{CLUSTER_ORACLE}_half": halved.segment_best()[lab_eval],
    }
    per_request = {a: _request_reward(held_out, w, spec, cfg) for a, w in arms.items()}
    reward = {a: float(r.mean()) for a, r in per_request.items()}
    gap = reward[CLUSTER_ORACLE] - reward[REWARD_STATIC]
    diff = per_request[CLUSTER_ORACLE] - per_request[f"{CLUSTER_ORACLE}_half"]
    return LogsHeadroom(
        reward=reward,
        captured={
            a: (r - reward[REWARD_STATIC]) / gap if gap > 0 else float("nan")
            for a, r in reward.items()
        },
        data_gain=float(diff.mean()),
        data_gain_ci=float(1.96 * diff.std() / np.sqrt(len(diff))),
        clusters=len(centres),
    )


def diagnose_logs(h: LogsHeadroom, policy: str) -> list[str]:
    """What limits ``policy``, judged by the training reward on held-out logs."""
    out = []
    gap = h.reward[CLUSTER_ORACLE] - h.reward[REWARD_STATIC]
    if not gap > 0:
        out.append(
            f"by the training reward, weights per context cluster ({h.clusters} clusters) do no "
            "better than one static vector on held-out logs: the context (or the reward) offers "
            "no personalization the reward can see"
        )
    elif policy in h.captured and h.captured[policy] < LOGS_CAPTURE_WARN:
        out.append(
            f"by the training reward on held-out logs {policy} reaches {h.captured[policy]:.2f} of "
            f"what weights per context cluster reach: more training (grpo.rounds, "
            "grpo.data_passes) or policy capacity should help"
        )
    if h.data_gain > h.data_gain_ci:
        out.append(
            f"the reward's own optimum still improves with data (half -> all the training logs: "
            f"{h.data_gain:+.4f} +/- {h.data_gain_ci:.4f} held-out reward): more logs should help"
        )
    return out


def logs_markdown(h: LogsHeadroom) -> list[str]:
    """Held-out training reward per arm and its share of the cluster oracle's gain."""
    lines = [
        "",
        f"By the training reward on held-out logs (no ground truth): reward_static = the reward's best "
        f"static weights, cluster_oracle = its best weights per context cluster "
        f"({h.clusters} k-means clusters of the training contexts); half -> all training logs "
        f"moves the cluster oracle by {h.data_gain:+.4f} (95% +/- {h.data_gain_ci:.4f}).",
        "",
        "| arm | held-out training reward | share of the cluster oracle's gain |",
        "|---|---:|---:|",
    ]
    for a, r in h.reward.items():
        share = h.captured[a]
        # no share when the cluster oracle gains nothing over the static (the diagnosis says so)
        lines.append(
            f"| {a} | {r:.4f} | {share:.2f} |" if np.isfinite(share) else f"| {a} | {r:.4f} | — |"
        )
    return lines
