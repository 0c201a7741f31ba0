"""Replay metrics per request and their paired bootstrap statistics, for any logs.

Shared by ``grade-ray evaluate`` (:mod:`grade_ray.jobs.replay`) and the KuaiRand pipeline.
Each metric is sum(num) / sum(den) over requests (:func:`per_request_metrics`);
:func:`arm_table` gives every arm percentile-bootstrap 95% CIs over the same
resampled requests and paired differences against the baseline, with a
Bonferroni-adjusted interval over the arms compared (:func:`paired_diff`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from grade_ray.algos.fusion import fuse_requests
from grade_ray.algos.metrics import ndcg_at_k, request_auc
from grade_ray.config import Config
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.spec import RewardSpec, as_tensor

BASELINE = "best_static"
"""The arm every other arm is compared with."""


def _fused(batch: SessionBatch, weights: np.ndarray, cfg: Config) -> torch.Tensor:
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    return fuse_requests(cfg.policy.fusion, as_tensor(batch.scores), w, cfg.policy.fusion_eps)


def per_request_metrics(
    batch: SessionBatch, meta: SessionMeta, weights: np.ndarray, spec: RewardSpec, cfg: Config
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metric name -> (numerator (B,), denominator (B,)) for one arm's weights (B, K).

    The metric is sum(num) / sum(den) over requests: ``composite`` (= l1 R_post +
    l2 R_prior, the objective best static maximises; R_format left out),
    ``r_post``, ``r_prior`` (den = 1); ``ndcg/<label>`` over requests with a
    positive of that label (den = 1 there); ``gauc/<label>`` (num = AUC * n, den = n
    over requests with both classes).
    """
    fused = _fused(batch, weights, cfg)
    mask, labels = as_tensor(batch.mask), as_tensor(batch.labels)
    ones = np.ones(len(batch))
    post_gain = spec.post_gain(labels, as_tensor(batch.position))
    post = ndcg_at_k(fused, post_gain, mask, spec.k).numpy().astype(np.float64)
    prior = ndcg_at_k(
        fused, spec.prior_gain(as_tensor(batch.scores), as_tensor(batch.context)), mask, spec.k
    ).numpy()
    out = {
        "composite": (spec.l1 * post + spec.l2 * prior.astype(np.float64), ones),
        "r_post": (post, ones),
        "r_prior": (prior.astype(np.float64), ones),
    }
    for j, name in enumerate(meta.label_names):
        gains = labels[..., j].clamp_min(0)
        has_pos = ((gains > 0) & mask).any(-1).numpy().astype(np.float64)
        ndcg = ndcg_at_k(fused, gains, mask, spec.k).numpy().astype(np.float64)
        out[f"ndcg/{name}"] = (ndcg * has_pos, has_pos)
        auc, w = request_auc(fused.numpy(), (labels[..., j] > 0).numpy(), batch.mask)
        out[f"gauc/{name}"] = (np.nan_to_num(auc) * w, w)
    return out


def _ratio(
    num: np.ndarray, den: np.ndarray, idx: np.ndarray, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(estimate, lower, upper) of sum(num)/sum(den); percentile bootstrap over rows idx (S, B),
    two-sided level 1 - alpha."""
    total = den.sum()
    if total <= 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num[idx].sum(1) / den[idx].sum(1)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return float(num.sum() / total), math.nan, math.nan
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(num.sum() / total), float(lo), float(hi)


def paired_diff(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    idx: np.ndarray,
    comparisons: int = 1,
) -> dict[str, Any]:
    """Metric of arm a minus arm b on the same requests (same denominators: they depend on
    the labels only), with a 95% CI and a Bonferroni-adjusted CI over ``comparisons``."""
    num = a[0] - b[0]
    d, lo, hi = _ratio(num, a[1], idx)
    _, alo, ahi = _ratio(num, a[1], idx, alpha=0.05 / max(comparisons, 1))

    def excludes_zero(lo: float, hi: float) -> bool:
        return math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0)

    return {
        "diff": json_float(d),
        "ci_low": json_float(lo),
        "ci_high": json_float(hi),
        "significant": excludes_zero(lo, hi),
        "comparisons": comparisons,
        "adj_ci_low": json_float(alo),
        "adj_ci_high": json_float(ahi),
        "significant_adjusted": excludes_zero(alo, ahi),
    }


def bootstrap_rows(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(S, n) resampled request indices, shared by every arm (paired comparisons)."""
    return np.random.default_rng(seed).integers(0, n, size=(max(n_boot, 1), n))


def json_float(x: float | None) -> float | None:
    """6 digits; None, NaN or inf -> None (null in JSON)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def arm_table(
    per_arm: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    n_boot: int,
    seed: int,
    baseline: str = BASELINE,
) -> dict[str, dict[str, Any]]:
    """Bootstrap CIs (the same resampled requests for every arm) and paired differences.

    Returns arm -> {'metrics': {name: {value, ci_low, ci_high, n}}, 'vs_<baseline>':
    {name: paired_diff(...)}}; the Bonferroni adjustment counts the arms compared with the
    baseline.
    """
    n = len(next(iter(next(iter(per_arm.values())).values()))[0])
    idx = bootstrap_rows(n, n_boot, seed)
    base = per_arm.get(baseline)
    m = max(len(per_arm) - 1, 1)
    out: dict[str, dict[str, Any]] = {}
    for arm, metrics in per_arm.items():
        row: dict[str, Any] = {"metrics": {}}
        for name, (num, den) in metrics.items():
            v, lo, hi = _ratio(num, den, idx)
            row["metrics"][name] = {
                "value": json_float(v),
                "ci_low": json_float(lo),
                "ci_high": json_float(hi),
                "n": int((den > 0).sum()),
            }
        if base is not None and arm != baseline:
            row[f"vs_{baseline}"] = {
                name: paired_diff(metrics[name], base[name], idx, m) for name in metrics
            }
        out[arm] = row
    return out


def grid_rewards(
    batch: SessionBatch, spec: RewardSpec, cfg: Config, grid: np.ndarray, l2: float | None = None
) -> np.ndarray:
    """(B, P) l1*R_post + l2*R_prior per request for each grid vector (P, K)."""
    from grade_ray.jobs.evaluate import ranking_reward

    s = spec if l2 is None else dataclasses.replace(spec, l2=l2)
    return ranking_reward(batch, grid, s, cfg.policy.fusion, cfg.policy.fusion_eps)
