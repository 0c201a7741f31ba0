"""Offline replay on the held-out requests: every arm's weights, metrics, CIs and evidence.

Arms: uniform, best static (grid search on the *training* days), a
per-segment static, SP, GRADE, the trained ablations and GRADE's mean weights
as one static vector (:data:`MEAN_STATIC`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grade_ray.config import Config
from grade_ray.data.oracles import simplex_grid
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.datasets.kuairand.evidence import (
    context_evidence,
    headroom,
    split_evidence,
    weight_stats,
)
from grade_ray.jobs.paired import (
    BASELINE,
    arm_table,
    bootstrap_rows,
    grid_rewards,
    paired_diff,
    per_request_metrics,
)
from grade_ray.jobs.replay import MEAN_STATIC, context_segments, segment_static
from grade_ray.spec import RewardSpec

SEGMENT_FEATURE = "user_active_degree"
"""User categorical whose one-hot context block defines the per-segment static arm's segments."""


def _eval_weights(
    arms: dict[str, Any],
    ev: SessionBatch,
    segment_weights: np.ndarray,
    variants: dict[str, dict[str, Any]],
) -> dict[str, np.ndarray]:
    """Arm name -> (B, K) weights on the eval requests, in the order of the results tables."""
    from grade_ray.jobs.evaluate import policy_arm

    weights = {
        "uniform": arms["uniform"](ev, None),
        BASELINE: arms[BASELINE](ev, None),
        "segment_static": segment_weights,
    }
    for name in ("SP", "GRADE"):
        if name in arms:
            weights[name] = arms[name](ev, None)
    for name, v in variants.items():
        if "path" in v:
            weights[name] = policy_arm(v["path"])(ev, None)
    return weights


def _personalization(
    per_arm: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], n: int, cfg: Config
) -> dict[str, Any]:
    """GRADE minus :data:`MEAN_STATIC` (composite, r_post), paired; {} without that arm."""
    if MEAN_STATIC not in per_arm:
        return {}
    idx = bootstrap_rows(n, cfg.eval.bootstrap, cfg.eval.ab_seed)
    return {
        name: paired_diff(per_arm["GRADE"][name], per_arm[MEAN_STATIC][name], idx)
        for name in ("composite", "r_post")
    }


def _evidence(
    train: SessionBatch,
    meta: SessionMeta,
    ev: SessionBatch,
    eval_meta: SessionMeta,
    spec: RewardSpec,
    inert: list[int],
) -> dict[str, Any]:
    return {
        "train": split_evidence(train, meta, spec),
        "eval": split_evidence(ev, eval_meta, spec),
        "context": context_evidence(train, ev, meta, inert),
    }


def evaluate_replay(
    cfg: Config,
    train: SessionBatch,
    meta: SessionMeta,
    ev: SessionBatch,
    eval_meta: SessionMeta,
    spec: RewardSpec,
    stage1: dict[str, Any],
    variants: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """All arms on the held-out requests, with CIs, weight statistics and the evidence."""
    from grade_ray.jobs.evaluate import default_arms

    arms, statics = default_arms(cfg, Path(cfg.run_dir), cfg.data.train_path, baselines=True)
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    train_seg, names = context_segments(train, meta, SEGMENT_FEATURE)
    seg_table, seg_report = segment_static(
        train_seg, names, grid_rewards(train, spec, cfg, grid), grid
    )
    eval_seg, _ = context_segments(ev, eval_meta, SEGMENT_FEATURE)
    weights = _eval_weights(arms, ev, seg_table[eval_seg].astype(np.float32), variants)
    train_weights = {a: arms[a](train, None) for a in ("SP", "GRADE") if a in arms}
    if "GRADE" in train_weights:  # deployable: GRADE's mean weights over *training* requests
        mean_w = train_weights["GRADE"].mean(0).astype(np.float32)
        weights[MEAN_STATIC] = np.broadcast_to(mean_w, (len(ev), len(mean_w))).copy()
    per_arm = {a: per_request_metrics(ev, meta, w, spec, cfg) for a, w in weights.items()}
    tasks = meta.task_names
    return {
        "k": spec.k,
        "labels": list(meta.label_names),
        "tasks": list(tasks),
        "arms": arm_table(per_arm, cfg.eval.bootstrap, cfg.eval.ab_seed),
        "weights": {a: weight_stats(w, tasks) for a, w in weights.items()},
        "weights_on_train": {a: weight_stats(w, tasks) for a, w in train_weights.items()},
        "static_weights": {
            **{k: dict(zip(tasks, np.round(v, 3).tolist())) for k, v in statics.items()},
            "segment_static": seg_report,
        },
        "variants": variants,
        "personalization": _personalization(per_arm, len(ev), cfg),
        "stage1": {
            "last_epoch": stage1["last_epoch"],
            "inert_context_columns": [meta.context_names[i] for i in stage1["inert"]],
            "floored_context_columns": stage1["floored"],
        },
        "evidence": _evidence(train, meta, ev, eval_meta, spec, stage1["inert"]),
        "headroom": headroom(ev, spec, cfg, grid, np.asarray(statics[BASELINE])),
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.eval.ab_seed},
    }
