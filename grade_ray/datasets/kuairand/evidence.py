"""What the data allows: list lengths, label sparsity, context, headroom, weight statistics.

In-sample references and descriptions that explain a replay result; none of
them is a deployable arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from grade_ray.config import Config
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.jobs.paired import grid_rewards, json_float
from grade_ray.spec import RewardSpec, as_tensor


def _length_hist(lengths: np.ndarray) -> dict[str, int]:
    bins = [(2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 10**9)]
    out = {"<2": int((lengths < 2).sum())} if (lengths < 2).any() else {}
    for lo, hi in bins:
        key = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f">={lo}")
        out[key] = int(((lengths >= lo) & (lengths <= hi)).sum())
    return out


def split_evidence(batch: SessionBatch, meta: SessionMeta, spec: RewardSpec) -> dict[str, Any]:
    """List lengths, label sparsity and how many requests' NDCG can depend on the order."""
    lengths = batch.mask.sum(1)
    m = batch.mask
    labels = batch.labels
    per_label = {}
    for j, name in enumerate(meta.label_names):
        pos = (labels[..., j] > 0) & m
        per_label[name] = {
            "impression_positive_rate": json_float(float(pos.sum() / m.sum())),
            "requests_with_positive": int(pos.any(1).sum()),
        }
    gain = spec.post_gain(as_tensor(labels), as_tensor(batch.position)).numpy()
    g_real = np.where(m, gain, np.nan)
    any_pos = (np.nan_to_num(g_real) > 0).any(1)
    spread = np.nanmax(g_real, 1) - np.nanmin(g_real, 1)
    users, counts = np.unique(batch.user_id, return_counts=True)
    return {
        "requests": len(batch),
        "impressions": int(m.sum()),
        "users": len(users),
        "users_with_repeat_requests": int((counts > 1).sum()),
        "list_length": {
            "mean": json_float(float(lengths.mean())),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
            "histogram": _length_hist(lengths),
        },
        "labels": per_label,
        "requests_with_positive_post_gain": int(any_pos.sum()),
        "order_sensitive_requests": int((any_pos & (spread > 0)).sum()),
    }


def context_evidence(
    train: SessionBatch, ev: SessionBatch, meta: SessionMeta, inert: Sequence[int]
) -> dict[str, Any]:
    """Context width, columns constant on the training split, distinct contexts, user overlap."""
    inert = list(inert)
    changed = (
        (ev.context[:, inert] != train.context[0, inert]).any(1)
        if inert
        else np.zeros(len(ev), bool)
    )
    distinct = len(np.unique(ev.context, axis=0))
    seen = np.isin(ev.user_id, train.user_id)
    return {
        "context_dim": meta.context_dim,
        "constant_on_train": [meta.context_names[i] for i in inert],
        "eval_requests_with_unseen_value_in_a_constant_column": int(changed.sum()),
        "distinct_eval_contexts": distinct,
        "eval_users_seen_in_train_split": int(len(np.unique(ev.user_id[seen]))),
        "eval_users": int(len(np.unique(ev.user_id))),
    }


def headroom(
    ev: SessionBatch, spec: RewardSpec, cfg: Config, grid: np.ndarray, best: np.ndarray
) -> dict[str, Any]:
    """In-sample references on the eval day (not deployable, upper bounds).

    composite / R_post of: the train-searched best static; the best single grid vector
    chosen on the eval day itself; a per-request grid oracle. Also the share of eval
    requests whose composite changes at all across the grid.
    """
    b = int(np.abs(grid - best).sum(1).argmin())
    out: dict[str, Any] = {"grid_points": len(grid)}
    for name, l2 in (("composite", None), ("r_post", 0.0)):
        r = grid_rewards(ev, spec, cfg, grid, l2)
        if l2 is not None and spec.l1 != 1.0:
            r = r / max(spec.l1, 1e-12)
        e = int(r.mean(0).argmax())
        out[name] = {
            "train_best_static": json_float(float(r[:, b].mean())),
            "eval_tuned_static": json_float(float(r[:, e].mean())),
            "eval_tuned_weights": grid[e].round(3).tolist(),
            "per_request_oracle": json_float(float(r.max(1).mean())),
            "worst_static": json_float(float(r.mean(0).min())),
        }
        if name == "composite":
            out["weight_sensitive_requests"] = int(((r.max(1) - r.min(1)) > 1e-9).sum())
    return out


def weight_stats(weights: np.ndarray, task_names: Sequence[str]) -> dict[str, Any]:
    """Mean / std of an arm's weights across eval requests and the polarized share."""
    return {
        "mean": dict(zip(task_names, weights.mean(0).round(4).tolist())),
        "std": dict(zip(task_names, weights.std(0).round(4).tolist())),
        "spread": json_float(float(weights.std(0).mean())),
        "polarized_frac": json_float(float((weights.max(1) > 0.9).mean())),
    }
