"""Real data: GRADE on KuaiRand-Pure logged replay, end to end in one command.

``run_kuairand_pipeline`` (``grade-ray kuairand``)::

    KuaiRand-Pure log + user/video tables (../shared/data/kuairand-pure)
      -> RUN/sessions: upstream MMoE trained on the first days, later days scored,
         grouped into requests; train split = the middle days, eval = the last day(s)
         (reused when RUN/sessions/_CONVERSION.json matches the data and options)
      -> Stage 1 (SP, LambdaLoss) and Stage 2 (GRPO) on the train split, locally;
         the ablations (GRADE-gaussian, -no-prior, -no-format) with the same Stage 1
      -> offline replay on the held-out day(s): uniform, best static (grid search on
         the *training* days), a per-segment static, SP, GRADE and the ablations;
         NDCG@k per feedback type, composite, GAUC, bootstrap CIs over requests and
         paired differences against best static
      -> RUN/results.json, RUN/results.md (tables, data evidence, an interpretation
         computed from the numbers, licence notice)

KuaiRand (Gao et al., CIKM 2022, https://kuairand.com) is licensed CC BY-SA 4.0;
everything written here is derived from it and carries the notice and attribution
(:data:`grade_ray.datasets.kuairand.dataset.LICENCE_NOTICE`).

A trained policy can be evaluated on further days: convert them with the saved
upstream model (:func:`grade_ray.datasets.kuairand.convert.convert_more`, or
``grade-ray data kuairand-more``), then ``grade-ray evaluate RUN --data DIR
--config configs/kuairand.yaml``.

Policy input standardisation: the policy standardises its context with the
training split's mean and std (std floored at 1e-6). A context column that is
constant on the training days (the eval day's day-of-week one-hot, a category
that only shows up later) would then be scaled by 1e6 on held-out requests and
saturate the policy. Stage 1 is therefore run here with a guarded
standardisation (``learner.loop.fit_normalization``): columns constant on the
training split are made inert (std 1e6) and other stds are floored at
:data:`MIN_CONTEXT_STD`. The buffers travel
inside the saved policy, so every later use (Stage 2, evaluate, export) sees them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.algos.metrics import ndcg_at_k, request_auc
from grade_ray.config import Config, save_config
from grade_ray.data.oracles import simplex_grid
from grade_ray.data.schema import SessionBatch, SessionMeta, read_sessions
from grade_ray.datasets.kuairand.convert import convert_kuairand, convert_more
from grade_ray.datasets.kuairand.dataset import ATTRIBUTION, GROUP_BY, LICENCE_NOTICE
from grade_ray.datasets.kuairand.scoring import LeakageError
from grade_ray.spec import RewardSpec, as_tensor

log = logging.getLogger(__name__)

SESSIONS_DIR = "sessions"
STAMP_FILE = "_CONVERSION.json"
STAMP_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
DEFAULT_VARIANTS = ("GRADE-gaussian", "GRADE-no-prior", "GRADE-no-format")
SEGMENT_FEATURE = "user_active_degree"
MIN_SEGMENT_REQUESTS = 200
"""A segment needs this many training requests to get its own static weights."""
MIN_CONTEXT_STD = 0.1
"""Floor on the policy's context std (rare one-hot columns stay within ~10 sigma)."""
BASELINE = "best_static"
MEAN_STATIC = "GRADE-mean-static"
"""GRADE's mean weights over the training requests, used as one static vector for everyone:
GRADE minus this arm is what the per-request variation of its weights adds."""
# Training artifacts of a previous pipeline run, cleared before retraining.
_RUN_ARTIFACTS = (
    "policy.pt",
    "checkpoints",
    "variants",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "summary.json",
    "eval",
    "config.yaml",
    "rejects.parquet",
    RESULTS_JSON,
    RESULTS_MD,
)


# ---------------------------------------------------------------------------
# Locating and converting the data


def default_data_dir() -> Path:
    """``../shared/data/kuairand-pure`` relative to the repository root."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "kuairand-pure"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The KuaiRand directory to read; a clear FileNotFoundError when it is missing."""
    d = Path(data_dir) if data_dir else default_data_dir()
    if not d.is_dir():
        hint = "" if data_dir else " (the default, ../shared/data/kuairand-pure from the repo)"
        raise FileNotFoundError(
            f"KuaiRand-Pure data directory not found: {d}{hint}; pass --data-dir DIR holding "
            "the log (log*.parquet or log*.csv), user_features and video features files"
        )
    return d


def find_kuairand_files(data_dir: str | Path) -> dict[str, Any]:
    """{'log': [paths], 'users': path, 'videos': path} in a KuaiRand(-Pure) directory.

    Logs: every ``log*.parquet`` (else every ``log*.csv*``). Users:
    ``user_features*.parquet`` / ``.csv``. Videos: the basic table
    ``video_features_basic*.csv`` if present, else ``item_features.parquet`` (the
    converter reads its basic columns only; the statistic columns leak the future).
    """
    d = resolve_data_dir(data_dir)

    def first(*patterns: str) -> Path | None:
        for pat in patterns:
            hits = sorted(d.glob(pat))
            if hits:
                return hits[0]
        return None

    logs = sorted(d.glob("log*.parquet")) or sorted(d.glob("log*.csv*"))
    users = first("user_features*.parquet", "user_features*.csv*")
    videos = first(
        "video_features_basic*.csv*", "video_features_basic*.parquet", "item_features*.parquet"
    )
    missing = [
        what
        for what, v in (("log*.parquet|csv", logs), ("user_features", users), ("videos", videos))
        if not v
    ]
    if missing:
        raise FileNotFoundError(
            f"{d}: no {', '.join(missing)} file(s); present: {sorted(p.name for p in d.iterdir())}"
        )
    return {"log": logs, "users": users, "videos": videos}


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """How the KuaiRand log is split and grouped (see :func:`convert_kuairand`)."""

    upstream_train_days: int = 3
    eval_days: int = 1
    group_by: str = "user_day"
    session_gap_s: float = 1800.0
    min_list_len: int = 2
    seed: int = 0
    upstream_epochs: int = 2


def _stamp(files: dict[str, Any], opts: ConvertOptions) -> dict[str, Any]:
    paths = [*files["log"], files["users"], files["videos"]]
    return {
        "version": STAMP_VERSION,
        "files": {p.name: p.stat().st_size for p in paths},
        "options": dataclasses.asdict(opts),
    }


def convert(
    data_dir: str | Path | None,
    out: str | Path,
    opts: ConvertOptions = ConvertOptions(),
    *,
    reuse: bool = True,
    overwrite: bool = False,
    write_rejects: bool = False,
) -> tuple[dict[str, Any], bool]:
    """KuaiRand directory -> ``out/{train,eval,upstream}``; returns (report, reused).

    With ``reuse``, an existing conversion whose ``_CONVERSION.json`` stamp names
    the same files (and sizes) and options is kept. Other existing sessions in
    ``out`` are replaced only with ``overwrite`` (else FileExistsError).
    """
    files = find_kuairand_files(data_dir)
    out = Path(out)
    stamp = _stamp(files, opts)
    stamp_path, report_path = out / STAMP_FILE, out / "upstream_report.json"
    if (
        reuse
        and stamp_path.exists()
        and report_path.exists()
        and json.loads(stamp_path.read_text()) == stamp
        and all(any((out / s).glob("*.parquet")) for s in ("train", "eval"))
    ):
        log.info("reusing the KuaiRand conversion in %s (stamp matches)", out)
        return json.loads(report_path.read_text()), True
    if not overwrite and any(any((out / s).glob("*.parquet")) for s in ("train", "eval")):
        raise FileExistsError(
            f"{out} holds sessions from another conversion (no matching {STAMP_FILE}); "
            "pass --overwrite to replace them"
        )
    stamp_path.unlink(missing_ok=True)
    report = convert_kuairand(
        [str(p) for p in files["log"]],
        files["users"],
        files["videos"],
        out,
        upstream_train_days=opts.upstream_train_days,
        eval_days=opts.eval_days,
        group_by=opts.group_by,
        session_gap_s=opts.session_gap_s,
        min_list_len=opts.min_list_len,
        seed=opts.seed,
        epochs=opts.upstream_epochs,
        write_rejects=write_rejects,
        overwrite=True,
    )
    stamp_path.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    return report, False


def check_split_dates(train_meta: SessionMeta, eval_meta: SessionMeta) -> dict[str, list[int]]:
    """Dates of the upstream model, the policy's training split and the eval split.

    Raises :class:`grade_ray.datasets.kuairand.scoring.LeakageError` unless
    upstream dates < train dates < eval dates.
    """
    up = [int(d) for d in train_meta.source.get("upstream_train_dates", [])]
    train = [int(d) for d in train_meta.source.get("dates", [])]
    ev = [int(d) for d in eval_meta.source.get("dates", [])]
    if not train or not ev:
        raise LeakageError("session metadata lacks dates; cannot check the time split")
    if (up and max(up) >= min(train)) or max(train) >= min(ev):
        raise LeakageError(
            f"time split violated: upstream {up}, policy training {train}, eval {ev} "
            "(each must end before the next begins)"
        )
    if eval_meta.source.get("upstream_train_dates", up) != up:
        raise LeakageError("train and eval sessions were scored by different upstream models")
    return {"upstream_train": up, "policy_train": train, "eval": ev}


# ---------------------------------------------------------------------------
# Training


def _clear_run(out: Path) -> None:
    """Remove a previous run's training artifacts (never the sessions)."""
    for name in _RUN_ARTIFACTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_stage1(cfg: Config, train: SessionBatch, meta: SessionMeta) -> dict[str, Any]:
    """Stage 1 with a guarded standardisation -> RUN/checkpoints/pretrain.pt (+ policy.pt).

    ``run_train_local`` then loads this checkpoint as its Stage 1 result.
    """
    from grade_ray.learner.loop import (
        POLICY_FILE,
        PRETRAIN_CKPT,
        fit_normalization,
        new_policy,
        pretrain,
        save_policy,
    )
    from grade_ray.runlog import CHECKPOINT_DIR, MetricsLogger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    policy = new_policy(cfg, meta, cfg.data.train_path)
    # re-fit on the whole training split with a floor (rare one-hot columns)
    norm = fit_normalization(policy, [train.context], min_std=MIN_CONTEXT_STD)
    if norm["inert"]:
        log.info(
            "context columns constant on the training split (made inert): %s",
            [meta.context_names[i] for i in norm["inert"]],
        )
    logger = MetricsLogger(run_dir)
    last = pretrain(cfg, policy, meta, cfg.data.train_path, logger) if cfg.pretrain.epochs else {}
    logger.close()
    save_policy(run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt", policy, cfg, meta)
    save_policy(run_dir / POLICY_FILE, policy, cfg, meta, {"stage": 1})
    return {"last_epoch": last, **norm}


def train_variants(cfg: Config, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Train ablations under RUN/variants/NAME from RUN's Stage 1 checkpoint.

    Returns name -> {'path': policy file} or {'skipped': reason}.
    """
    from grade_ray.jobs.compare import VARIANTS, variant_config
    from grade_ray.jobs.train import run_train_local
    from grade_ray.learner.loop import POLICY_FILE

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "GRADE":
            continue
        if name == "GRADE-no-format" and (cfg.reward.l3 == 0 or not cfg.reward.format_rules):
            out[name] = {"skipped": "identical to GRADE (no format rules or reward.l3 = 0)"}
            continue
        vcfg = variant_config(cfg, name)  # RUN's Stage 1 copied in, RUN's decoded cache
        log.info("training variant %s in %s", name, vcfg.run_dir)
        t0 = time.perf_counter()
        run_train_local(vcfg)
        out[name] = {
            "path": str(Path(vcfg.run_dir) / POLICY_FILE),
            "overrides": VARIANTS[name],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


# ---------------------------------------------------------------------------
# Metrics with bootstrap CIs


def _fused(batch: SessionBatch, weights: np.ndarray, cfg: Config) -> torch.Tensor:
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    return fuse(cfg.policy.fusion, as_tensor(batch.scores), w, cfg.policy.fusion_eps)


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
    prior = ndcg_at_k(fused, spec.prior_gain(as_tensor(batch.scores)), mask, spec.k).numpy()
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
        "diff": _clean(d),
        "ci_low": _clean(lo),
        "ci_high": _clean(hi),
        "significant": excludes_zero(lo, hi),
        "comparisons": comparisons,
        "adj_ci_low": _clean(alo),
        "adj_ci_high": _clean(ahi),
        "significant_adjusted": excludes_zero(alo, ahi),
    }


def bootstrap_rows(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(S, n) resampled request indices, shared by every arm (paired comparisons)."""
    return np.random.default_rng(seed).integers(0, n, size=(max(n_boot, 1), n))


def _clean(x: float) -> float | None:
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
                "value": _clean(v),
                "ci_low": _clean(lo),
                "ci_high": _clean(hi),
                "n": int((den > 0).sum()),
            }
        if base is not None and arm != baseline:
            row[f"vs_{baseline}"] = {
                name: paired_diff(metrics[name], base[name], idx, m) for name in metrics
            }
        out[arm] = row
    return out


# ---------------------------------------------------------------------------
# Arms, evidence and headroom


def grid_rewards(
    batch: SessionBatch, spec: RewardSpec, cfg: Config, grid: np.ndarray, l2: float | None = None
) -> np.ndarray:
    """(B, P) l1*R_post + l2*R_prior per request for each grid vector (P, K)."""
    from grade_ray.jobs.evaluate import ranking_reward

    s = spec if l2 is None else dataclasses.replace(spec, l2=l2)
    return ranking_reward(batch, grid, s, cfg.policy.fusion, cfg.policy.fusion_eps)


def _segments(batch: SessionBatch, meta: SessionMeta, feature: str) -> tuple[np.ndarray, list]:
    """(B,) segment index from the one-hot context block of ``feature``, and its names."""
    cols = [i for i, c in enumerate(meta.context_names) if c.startswith(f"{feature}=")]
    if not cols:
        return np.zeros(len(batch), dtype=np.int64), ["all"]
    return batch.context[:, cols].argmax(1), [meta.context_names[i] for i in cols]


def segment_static(
    train: SessionBatch,
    meta: SessionMeta,
    train_grid: np.ndarray,
    grid: np.ndarray,
    feature: str = SEGMENT_FEATURE,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-segment best grid weights fitted on training requests: ((S, K), report).

    Segments with fewer than :data:`MIN_SEGMENT_REQUESTS` training requests use the
    global best.
    """
    seg, names = _segments(train, meta, feature)
    best = int(train_grid.mean(0).argmax())
    table = np.tile(grid[best], (len(names), 1))
    report = {}
    for s, name in enumerate(names):
        sel = seg == s
        if sel.sum() >= MIN_SEGMENT_REQUESTS:
            table[s] = grid[int(train_grid[sel].mean(0).argmax())]
        report[name] = {"train_requests": int(sel.sum()), "weights": table[s].round(3).tolist()}
    return table, report


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
            "impression_positive_rate": _clean(float(pos.sum() / m.sum())),
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
            "mean": _clean(float(lengths.mean())),
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
            "train_best_static": _clean(float(r[:, b].mean())),
            "eval_tuned_static": _clean(float(r[:, e].mean())),
            "eval_tuned_weights": grid[e].round(3).tolist(),
            "per_request_oracle": _clean(float(r.max(1).mean())),
            "worst_static": _clean(float(r.mean(0).min())),
        }
        if name == "composite":
            out["weight_sensitive_requests"] = int(((r.max(1) - r.min(1)) > 1e-9).sum())
    return out


def weight_stats(weights: np.ndarray, task_names: Sequence[str]) -> dict[str, Any]:
    """Mean / std of an arm's weights across eval requests and the polarized share."""
    return {
        "mean": dict(zip(task_names, weights.mean(0).round(4).tolist())),
        "std": dict(zip(task_names, weights.std(0).round(4).tolist())),
        "spread": _clean(float(weights.std(0).mean())),
        "polarized_frac": _clean(float((weights.max(1) > 0.9).mean())),
    }


# ---------------------------------------------------------------------------
# The pipeline


def run_kuairand_pipeline(
    cfg: Config,
    data_dir: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    upstream_train_days: int = 3,
    eval_days: int = 1,
    group_by: str = "user_day",
    session_gap_s: float = 1800.0,
    min_list_len: int = 2,
    upstream_epochs: int = 2,
    upstream_seed: int = 0,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    reuse_conversion: bool = True,
) -> dict[str, Any]:
    """Convert (or reuse), train GRADE (+ ablations), evaluate on held-out days, report.

    ``out_dir`` (default ``cfg.run_dir``) becomes the run directory: sessions under
    ``OUT/sessions``, GRADE's policy at ``OUT/policy.pt``, Stage 1 at
    ``OUT/checkpoints/pretrain.pt``, ablations under ``OUT/variants``, results in
    ``OUT/results.{json,md}``. The upstream model's seed is ``upstream_seed`` (not
    ``cfg.seed``), so policy seeds can be varied on one conversion. Returns the results dict.
    """
    from grade_ray.jobs.compare import VARIANTS

    unknown = [n for n in variants if n not in VARIANTS]
    if unknown:  # before the (minutes of) conversion and training
        raise ValueError(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    t_start = time.perf_counter()
    out = Path(out_dir or cfg.run_dir)
    sessions = out / SESSIONS_DIR
    opts = ConvertOptions(
        upstream_train_days,
        eval_days,
        group_by,
        session_gap_s,
        min_list_len,
        upstream_seed,
        upstream_epochs,
    )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report, reused = convert(data_dir, sessions, opts, reuse=reuse_conversion, overwrite=True)
    timings["convert_s"] = round(time.perf_counter() - t0, 1)
    cfg = cfg.replace(
        run_dir=str(out),
        **{"data.train_path": str(sessions / "train"), "data.eval_path": str(sessions / "eval")},
    )
    train, meta, _ = read_sessions(cfg.data.train_path, on_error=cfg.data.on_error)
    ev, eval_meta, eval_read = read_sessions(cfg.data.eval_path, on_error=cfg.data.on_error)
    dates = check_split_dates(meta, eval_meta)
    spec = RewardSpec.from_config(cfg.reward, meta)  # names checked before training

    _clear_run(out)
    t0 = time.perf_counter()
    stage1 = run_stage1(cfg, train, meta)
    timings["stage1_s"] = round(time.perf_counter() - t0, 1)
    from grade_ray.jobs.train import run_train_local

    t0 = time.perf_counter()
    run_train_local(cfg)
    timings["grade_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    trained = train_variants(cfg, variants)
    timings["variants_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    results = evaluate_replay(cfg, train, meta, ev, eval_meta, spec, stage1, trained)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    results.update(
        {
            "dates": dates,
            "conversion": {
                "dir": str(sessions),
                "reused": reused,
                "options": dataclasses.asdict(opts),
                "rows": report.get("rows", {}),
                "upstream_auc_scored_days": report.get("upstream", {}).get("auc_scored_days"),
                "upstream_auc_by_date": report.get("upstream", {}).get("auc_by_date"),
            },
            "eval_data": eval_read.summary(),
            "config": cfg.to_dict(),
            "timings": timings,
            "licence": {
                "dataset": "KuaiRand-Pure",
                "licence": "CC BY-SA 4.0",
                "notice": LICENCE_NOTICE,
                "attribution": ATTRIBUTION,
                "url": "https://kuairand.com",
            },
        }
    )
    results["interpretation"] = interpret(results)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=1, default=_json_default))
    (out / RESULTS_MD).write_text(results_markdown(results))
    log.info("KuaiRand replay done in %.0fs: %s", timings["total_s"], out / RESULTS_MD)
    return results


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


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
    from grade_ray.jobs.evaluate import default_arms, policy_arm

    run_dir = Path(cfg.run_dir)
    arms, statics = default_arms(cfg, run_dir, cfg.data.train_path, baselines=True)
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    train_grid = grid_rewards(train, spec, cfg, grid)
    seg_table, seg_report = segment_static(train, meta, train_grid, grid)
    eval_seg, _ = _segments(ev, eval_meta, SEGMENT_FEATURE)
    weights = {
        "uniform": arms["uniform"](ev, None),
        BASELINE: arms[BASELINE](ev, None),
        "segment_static": seg_table[eval_seg].astype(np.float32),
    }
    for name in ("SP", "GRADE"):
        if name in arms:
            weights[name] = arms[name](ev, None)
    for name, v in variants.items():
        if "path" in v:
            weights[name] = policy_arm(v["path"])(ev, None)
    train_weights = {a: arms[a](train, None) for a in ("SP", "GRADE") if a in arms}
    if "GRADE" in train_weights:  # deployable: GRADE's mean weights over *training* requests
        mean_w = train_weights["GRADE"].mean(0).astype(np.float32)
        weights[MEAN_STATIC] = np.broadcast_to(mean_w, (len(ev), len(mean_w))).copy()
    per_arm = {a: per_request_metrics(ev, meta, w, spec, cfg) for a, w in weights.items()}
    table = arm_table(per_arm, cfg.eval.bootstrap, cfg.eval.ab_seed)
    personalization = {}
    if MEAN_STATIC in per_arm:
        idx = bootstrap_rows(len(ev), cfg.eval.bootstrap, cfg.eval.ab_seed)
        personalization = {
            name: paired_diff(per_arm["GRADE"][name], per_arm[MEAN_STATIC][name], idx)
            for name in ("composite", "r_post")
        }
    return {
        "k": spec.k,
        "labels": list(meta.label_names),
        "tasks": list(meta.task_names),
        "arms": table,
        "weights": {a: weight_stats(w, meta.task_names) for a, w in weights.items()},
        "weights_on_train": {a: weight_stats(w, meta.task_names) for a, w in train_weights.items()},
        "static_weights": {
            **{k: dict(zip(meta.task_names, np.round(v, 3).tolist())) for k, v in statics.items()},
            "segment_static": seg_report,
        },
        "variants": variants,
        "personalization": personalization,
        "stage1": {
            "last_epoch": stage1["last_epoch"],
            "inert_context_columns": [meta.context_names[i] for i in stage1["inert"]],
            "floored_context_columns": stage1["floored"],
        },
        "evidence": {
            "train": split_evidence(train, meta, spec),
            "eval": split_evidence(ev, eval_meta, spec),
            "context": context_evidence(train, ev, meta, stage1["inert"]),
        },
        "headroom": headroom(ev, spec, cfg, grid, np.asarray(statics[BASELINE])),
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.eval.ab_seed},
    }


# ---------------------------------------------------------------------------
# Reporting


def _m(results: dict, arm: str, metric: str) -> dict[str, Any]:
    return results["arms"][arm]["metrics"][metric]


def _verdict(results: dict, arm: str, metric: str = "composite") -> str:
    """'higher' / 'lower' / 'indistinguishable' vs best static (paired 95% CI)."""
    d = results["arms"][arm].get(f"vs_{BASELINE}", {}).get(metric)
    if not d or d["diff"] is None:
        return "n/a"
    if not d["significant"]:
        return "indistinguishable"
    return "higher" if d["diff"] > 0 else "lower"


def _overlap(results: dict, a: str, b: str, metric: str = "composite") -> bool:
    x, y = _m(results, a, metric), _m(results, b, metric)
    if None in (x["ci_low"], x["ci_high"], y["ci_low"], y["ci_high"]):
        return True
    return not (x["ci_low"] > y["ci_high"] or y["ci_low"] > x["ci_high"])


def _fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _interval(d: dict[str, Any], adjusted: bool = False) -> str:
    lo, hi = ("adj_ci_low", "adj_ci_high") if adjusted else ("ci_low", "ci_high")
    return f"[{_fmt(d[lo], sign=True)}, {_fmt(d[hi], sign=True)}]"


def _ci(d: dict[str, Any]) -> str:
    return f"{_fmt(d['diff'], sign=True)} {_interval(d)}"


def _grade_sentence(results: dict) -> tuple[str, bool]:
    """The GRADE vs best static sentence and whether GRADE is ahead after adjustment."""
    arms = results["arms"]
    g, b = _m(results, "GRADE", "composite"), _m(results, BASELINE, "composite")
    d = arms["GRADE"][f"vs_{BASELINE}"]["composite"]
    dp = arms["GRADE"][f"vs_{BASELINE}"]["r_post"]
    verdict = _verdict(results, "GRADE")
    ahead = verdict == "higher" and d["significant_adjusted"]
    if verdict == "higher" and not d["significant_adjusted"]:
        word = "is ahead of, at the 95% level only,"
    else:
        word = {
            "higher": "beats",
            "lower": "is worse than",
            "indistinguishable": "does not beat",
        }.get(verdict, "cannot be compared with")
    overlap = "overlap" if _overlap(results, "GRADE", BASELINE) else "do not overlap"
    text = (
        f"On {results['evidence']['eval']['requests']} held-out requests "
        f"({', '.join(map(str, results['dates']['eval']))}), GRADE {word} the best static "
        f"weights searched on the training days: composite {_fmt(g['value'])} vs "
        f"{_fmt(b['value'])}, paired difference {_ci(d)} (R_post NDCG@{results['k']}: {_ci(dp)})"
        f"; with a Bonferroni correction for the {d['comparisons']} arms compared with best "
        f"static the interval is {_interval(d, adjusted=True)}"
        f", and the two arms' marginal 95% CIs {overlap}."
    )
    return text, ahead


def interpret(results: dict) -> str:
    """An honest paragraph computed from the numbers."""
    arms = results["arms"]
    ev = results["evidence"]["eval"]
    ctx = results["evidence"]["context"]
    hr = results["headroom"]
    n = ev["requests"]
    parts = []
    ahead = False
    if "GRADE" in arms:
        text, ahead = _grade_sentence(results)
        parts.append(text)
    others = [
        f"{arm} {_fmt(arms[arm][f'vs_{BASELINE}']['composite']['diff'], sign=True)} "
        f"({_verdict(results, arm)})"
        for arm in arms
        if arm not in ("GRADE", BASELINE)
    ]
    if others:
        parts.append(
            "Other arms vs best static (composite, paired 95%): " + "; ".join(others) + "."
        )
    pers = results.get("personalization", {}).get("composite")
    pers_gain = bool(pers and pers["significant"] and pers["diff"] > 0)
    if pers:
        what = (
            "adds a measurable gain"
            if pers_gain
            else ("costs" if pers["significant"] else "adds nothing measurable")
        )
        gw = results["weights"]["GRADE"]
        parts.append(
            f"Personalization itself: GRADE minus its own mean weights (over the training "
            f"requests) used as one static vector for everyone is {_ci(pers)}, so the "
            f"per-request variation of its weights (mean std {gw['spread']:.3f} across eval "
            f"requests, {gw['polarized_frac']:.0%} of them polarized) {what}."
        )
    c = hr["composite"]
    gap_static = (c["eval_tuned_static"] or 0) - (c["train_best_static"] or 0)
    gap_oracle = (c["per_request_oracle"] or 0) - (c["train_best_static"] or 0)
    spread = (c["train_best_static"] or 0) - (c["worst_static"] or 0)
    bm = _m(results, BASELINE, "composite")
    width = (bm["ci_high"] or 0) - (bm["ci_low"] or 0)
    head = "The measurable headroom is small" if gap_static < width else "There is some headroom"
    with_pos = ev["requests_with_positive_post_gain"]
    labels = ev["labels"]
    parts.append(
        f"{head}: re-tuning one static vector on the eval day itself (in-sample) would add "
        f"{gap_static:+.4f} composite (the best static arm's 95% CI is {width:.4f} wide), the "
        f"whole range from the worst to the best static grid vector is {spread:.4f}, and even "
        f"an unattainable per-request oracle over the grid adds {gap_oracle:+.4f}. Only "
        f"{hr['weight_sensitive_requests']} of {n} eval requests "
        f"({hr['weight_sensitive_requests'] / max(n, 1):.0%}) change their reward at all across "
        f"the grid: lists are short (mean {ev['list_length']['mean']:.2f} items, "
        f"{ev['list_length']['histogram'].get('2', 0)} requests with 2), {n - with_pos} "
        f"requests ({1 - with_pos / max(n, 1):.0%}) have no positive-gain feedback, and the "
        f"rare labels are very sparse (like on "
        f"{labels.get('like', {}).get('requests_with_positive', 0)} requests, follow on "
        f"{labels.get('follow', {}).get('requests_with_positive', 0)})."
    )
    seg_v = _verdict(results, "segment_static") if "segment_static" in arms else "n/a"
    lead = (
        "The context carries some usable signal for the weights"
        if pers_gain or seg_v == "higher"
        else "There is little evidence that the context carries usable signal for the weights"
    )
    parts.append(
        f"{lead}: it is {ctx['context_dim']} features of static user attributes plus hour, "
        f"day of week and list length; {ctx['eval_users_seen_in_train_split']} of "
        f"{ctx['eval_users']} eval users appear in the policy's training split and only "
        f"{results['evidence']['train']['users_with_repeat_requests']} training users have more "
        f"than one request; a per-{SEGMENT_FEATURE} static baseline is {seg_v} vs the global "
        "static."
    )
    if "GRADE" not in arms:
        pass
    elif not ahead and not pers_gain:
        parts.append(
            "So this slice does not show a benefit of personalized fusion: it is too small, "
            "its lists too short and its feedback too sparse to measure one, which says little "
            "about larger logs with longer candidate lists."
        )
    elif not pers_gain:
        parts.append(
            "What GRADE gains over best static here comes from a better global trade-off (its "
            "mean weights), not from personalization."
        )
    else:
        parts.append(
            "Personalization is measurable on this slice, but small against its bootstrap "
            "uncertainty; confirm it on further days (convert_more + grade-ray evaluate)."
        )
    return " ".join(parts)


def _cell(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return "–"
    return f"{m['value']:.4f} [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


def _diff_cell(d: dict[str, Any] | None) -> str:
    if not d or d["diff"] is None:
        return "–"
    star = "*" * (int(d["significant"]) + int(d.get("significant_adjusted", False)))
    return (
        f"{d['diff']:+.4f}{star} [{_fmt(d['ci_low'], sign=True)}, {_fmt(d['ci_high'], sign=True)}]"
    )


def results_markdown(results: dict) -> str:
    """results.md: tables, weights, data evidence, interpretation, licence."""
    k, arms, labels = results["k"], results["arms"], results["labels"]
    lic = results["licence"]
    dates = results["dates"]
    ev = results["evidence"]
    lines = [
        "# GRADE on KuaiRand-Pure: logged replay",
        "",
        f"Upstream MMoE trained on {dates['upstream_train']}; policy trained on "
        f"{dates['policy_train']}; evaluated on {dates['eval']} ({ev['eval']['requests']} "
        f"requests). 95% bootstrap CIs over requests ({results['bootstrap']['resamples']} "
        "resamples, the same resamples for every arm); Δ = paired difference to best_static "
        "(* = its 95% CI excludes 0, ** = also its Bonferroni-adjusted CI over the arms "
        "compared).",
        "",
        "## Ranking quality",
        "",
        f"Composite = l1·R_post + l2·R_prior (NDCG@{k}; the objective best_static maximises, "
        "R_format left out). R_post = NDCG@k with the configured gains over the observed labels.",
        "",
        "| arm | composite | Δ composite | R_post | Δ R_post | R_prior |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in arms.items():
        m, d = row["metrics"], row.get(f"vs_{BASELINE}", {})
        lines.append(
            f"| {arm} | {_cell(m['composite'])} | {_diff_cell(d.get('composite'))} | "
            f"{_cell(m['r_post'])} | {_diff_cell(d.get('r_post'))} | {_cell(m['r_prior'])} |"
        )
    n_pos = {lab: arms[next(iter(arms))]["metrics"][f"ndcg/{lab}"]["n"] for lab in labels}
    lines += [
        "",
        f"## NDCG@{k} per feedback type",
        "",
        "Over the requests with at least one positive of that label (n below); for hate, "
        "lower is better.",
        "",
        "| arm | " + " | ".join(f"{lab} (n={n_pos[lab]})" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for arm, row in arms.items():
        cells = [_cell(row["metrics"][f"ndcg/{lab}"]) for lab in labels]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired Δ NDCG vs best_static:",
        "",
        "| arm | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for arm, row in arms.items():
        if f"vs_{BASELINE}" in row:
            cells = [_diff_cell(row[f"vs_{BASELINE}"].get(f"ndcg/{lab}")) for lab in labels]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    n_gauc = {lab: arms[next(iter(arms))]["metrics"][f"gauc/{lab}"]["n"] for lab in labels}
    lines += [
        "",
        "## GAUC per feedback type",
        "",
        "Per-request AUC of the fused score, weighted by list length, over requests with both "
        "classes (n below).",
        "",
        "| arm | " + " | ".join(f"{lab} (n={n_gauc[lab]})" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for arm, row in arms.items():
        cells = [_cell(row["metrics"][f"gauc/{lab}"]) for lab in labels]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    tasks = results["tasks"]
    lines += [
        "",
        "## Fusion weights on the eval requests",
        "",
        "| arm | " + " | ".join(f"mean w_{t}" for t in tasks) + " | spread (mean std) | "
        "share with max w > 0.9 |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for arm, w in results["weights"].items():
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{w['mean'][t]:.3f}" for t in tasks)
            + f" | {_fmt(w['spread'], 3)} | {_fmt(w['polarized_frac'], 3)} |"
        )
    skipped = {n: v["skipped"] for n, v in results["variants"].items() if "skipped" in v}
    if skipped:
        lines += ["", "Skipped ablations: " + "; ".join(f"{n}: {r}" for n, r in skipped.items())]
    hr = results["headroom"]
    lines += [
        "",
        "## Headroom (in-sample references on the eval day, not deployable)",
        "",
        "| | composite | R_post |",
        "|---|---|---|",
    ]
    for key, label in (
        ("worst_static", "worst static grid vector"),
        ("train_best_static", "best static searched on training days"),
        ("eval_tuned_static", "best static tuned on the eval day"),
        ("per_request_oracle", "per-request oracle over the grid"),
    ):
        lines.append(f"| {label} | {_fmt(hr['composite'][key])} | {_fmt(hr['r_post'][key])} |")
    lines += [
        "",
        f"Requests whose composite changes at all across the {hr['grid_points']}-point grid: "
        f"{hr['weight_sensitive_requests']} of {ev['eval']['requests']}.",
        "",
        "## Data evidence",
        "",
        "| | train split | eval split |",
        "|---|---|---|",
    ]
    tr, te = ev["train"], ev["eval"]
    rows = [
        ("requests", tr["requests"], te["requests"]),
        ("impressions", tr["impressions"], te["impressions"]),
        ("users", tr["users"], te["users"]),
        (
            "users with > 1 request",
            tr["users_with_repeat_requests"],
            te["users_with_repeat_requests"],
        ),
        (
            "mean list length",
            _fmt(tr["list_length"]["mean"], 2),
            _fmt(te["list_length"]["mean"], 2),
        ),
        ("median / max list length", _mm(tr), _mm(te)),
        ("list length histogram", _hist(tr), _hist(te)),
        (
            "requests with any positive gain",
            tr["requests_with_positive_post_gain"],
            te["requests_with_positive_post_gain"],
        ),
        (
            "order-sensitive requests (gains not all equal)",
            tr["order_sensitive_requests"],
            te["order_sensitive_requests"],
        ),
    ]
    for lab in labels:
        a, b = tr["labels"][lab], te["labels"][lab]
        rows.append(
            (
                f"{lab}: impression rate / requests with a positive",
                f"{_fmt(a['impression_positive_rate'])} / {a['requests_with_positive']}",
                f"{_fmt(b['impression_positive_rate'])} / {b['requests_with_positive']}",
            )
        )
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    ctx = ev["context"]
    auc = results["conversion"].get("upstream_auc_scored_days") or {}
    lines += [
        "",
        f"Context: {ctx['context_dim']} features, {ctx['distinct_eval_contexts']} distinct "
        f"vectors among the eval requests; {ctx['eval_users_seen_in_train_split']} of "
        f"{ctx['eval_users']} eval users appear in the policy's training split. Columns constant "
        f"on the training split (made inert in the policy): {_names(ctx['constant_on_train'])} "
        f"({ctx['eval_requests_with_unseen_value_in_a_constant_column']} eval requests take "
        "another value there).",
        "",
        "Upstream MMoE AUC on the scored days: "
        + (", ".join(f"{t} {v}" for t, v in auc.items()) or "n/a")
        + ".",
        "",
        "## What this shows",
        "",
        results["interpretation"],
        "",
        "## Licence and attribution",
        "",
        lic["notice"],
        "",
        f"Please cite: {lic['attribution']}",
        "",
    ]
    return "\n".join(lines)


def _names(names: Sequence[str], most: int = 8) -> str:
    if not names:
        return "none"
    dow = [n for n in names if n.startswith("dow=")]
    shown = (dow + [n for n in names if n not in dow])[:most]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{len(names)}: {', '.join(shown)}{more}"


def _mm(s: dict) -> str:
    return f"{s['list_length']['median']:g} / {s['list_length']['max']}"


def _hist(s: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in s["list_length"]["histogram"].items() if v)


# ---------------------------------------------------------------------------
# Command line


def _convert_opts(args: argparse.Namespace, seed: int = 0) -> ConvertOptions:
    return ConvertOptions(
        upstream_train_days=args.upstream_train_days,
        eval_days=args.eval_days,
        group_by=args.group_by,
        session_gap_s=args.session_gap_s,
        min_list_len=args.min_list_len,
        seed=seed,
        upstream_epochs=args.upstream_epochs,
    )


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="KuaiRand(-Pure) directory (default ../shared/data/kuairand-pure from the repo)",
    )
    p.add_argument(
        "--upstream-train-days",
        type=int,
        default=3,
        help="first N dates train the upstream model (default 3)",
    )
    p.add_argument("--eval-days", type=int, default=1, help="last N dates held out (default 1)")
    p.add_argument("--group-by", choices=GROUP_BY, default="user_day")
    p.add_argument(
        "--session-gap-s",
        type=float,
        default=1800.0,
        help="with --group-by session: a gap longer than this starts a new request",
    )
    p.add_argument("--min-list-len", type=int, default=2, help="shorter requests are not written")
    p.add_argument("--upstream-epochs", type=int, default=2, help="upstream MMoE epochs")


def cmd_data_kuairand(args: argparse.Namespace) -> int:
    report, reused = convert(
        args.data_dir,
        args.out,
        _convert_opts(args, args.seed),
        reuse=not args.overwrite,
        overwrite=args.overwrite,
        write_rejects=args.write_rejects,
    )
    note = " (reused: stamp matches)" if reused else ""
    print(f"KuaiRand sessions in {args.out}{note}")
    for split, s in report["splits"].items():
        print(
            f"  {split}: dates {s.get('dates')}, {s['requests']} requests, "
            f"{s['impressions']} impressions, mean list length {s.get('mean_list_len')}"
        )
    print(f"  upstream AUC (scored days): {report['upstream'].get('auc_scored_days')}")
    print(f"  licence: {LICENCE_NOTICE}")
    return 0


def cmd_data_kuairand_more(args: argparse.Namespace) -> int:
    files = find_kuairand_files(args.data_dir)
    logs = args.log or [str(p) for p in files["log"]]
    report = convert_more(
        logs,
        args.model,
        args.out,
        user_path=files["users"],
        video_path=files["videos"],
        dates=args.dates,
        overwrite=args.overwrite,
    )
    s = report["splits"]["more"]
    print(
        f"{args.out}: dates {s.get('dates')}, {s['requests']} requests; evaluate a trained "
        f"policy with: grade-ray evaluate RUN --data {args.out} --config configs/kuairand.yaml"
    )
    return 0


def cmd_kuairand(args: argparse.Namespace) -> int:
    from grade_ray.options import config_from_args

    cfg = config_from_args(args)
    variants = [] if args.variants == ["none"] else (args.variants or list(DEFAULT_VARIANTS))
    results = run_kuairand_pipeline(
        cfg,
        args.data_dir,
        out_dir=args.out or cfg.run_dir,
        upstream_train_days=args.upstream_train_days,
        eval_days=args.eval_days,
        group_by=args.group_by,
        session_gap_s=args.session_gap_s,
        min_list_len=args.min_list_len,
        upstream_epochs=args.upstream_epochs,
        upstream_seed=args.upstream_seed,
        variants=variants,
        reuse_conversion=not args.reconvert,
    )
    print(results_markdown(results))
    return 0


def add_parser(sub) -> None:
    """``grade-ray data kuairand|kuairand-more`` and ``grade-ray kuairand``."""
    from grade_ray.options import add_common_args

    p = sub.add_parser("data", help="convert real logs into logged-session Parquet")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser(
        "kuairand",
        help="KuaiRand-Pure -> sessions (upstream model on the first days, train/eval splits)",
    )
    _split_args(c)
    c.add_argument("--out", required=True, help="output directory (train/, eval/, upstream/)")
    c.add_argument("--seed", type=int, default=0, help="upstream model seed")
    c.add_argument("--write-rejects", action="store_true", help="write bad rows to rejects.parquet")
    c.add_argument("--overwrite", action="store_true", help="reconvert even if the stamp matches")
    c.set_defaults(fn=cmd_data_kuairand)
    m = dsub.add_parser(
        "kuairand-more",
        help="score further KuaiRand days with a saved upstream model (for grade-ray evaluate)",
    )
    m.add_argument("--model", required=True, help="conversion dir (or its upstream/) to reuse")
    m.add_argument("--out", required=True, help="output directory for the sessions")
    m.add_argument("--data-dir", help="directory with the user and video tables (and logs)")
    m.add_argument("--log", nargs="+", help="log file(s) (default: the data dir's logs)")
    m.add_argument("--dates", nargs="+", type=int, help="only these yyyymmdd dates")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_data_kuairand_more)

    k = sub.add_parser(
        "kuairand",
        help="real-data replay: convert KuaiRand-Pure, train GRADE + ablations, evaluate",
    )
    add_common_args(k)
    _split_args(k)
    k.add_argument("--out", help="run directory (default run_dir from the config)")
    k.add_argument(
        "--variants",
        nargs="+",
        help=f"ablations to train too (default {' '.join(DEFAULT_VARIANTS)}; 'none' for none)",
    )
    k.add_argument("--upstream-seed", type=int, default=0, help="upstream model seed")
    k.add_argument("--reconvert", action="store_true", help="ignore an existing conversion")
    k.set_defaults(fn=cmd_kuairand)
