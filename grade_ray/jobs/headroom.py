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
from grade_ray.data.schema import read_sessions
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
    return truth_table(sim, cfg.policy.fusion, e.static_grid_step, e.search_requests, e.ab_seed + 7)


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
