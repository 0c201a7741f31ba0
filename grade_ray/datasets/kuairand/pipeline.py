"""Real data: GRADE on KuaiRand-Pure logged replay, end to end in one command.

``run_kuairand_pipeline`` (``grade-ray kuairand``)::

    KuaiRand-Pure log + user/video tables (../shared/data/kuairand-pure)
      -> RUN/sessions: upstream MMoE trained on the first days, later days scored,
         grouped into requests; train split = the middle days, eval = the last day(s)
         (reused when RUN/sessions/_CONVERSION.json matches the data and options;
         ``datadir``)
      -> Stage 1 (SP, LambdaLoss) and Stage 2 (GRPO) on the train split, locally;
         the ablations (GRADE-gaussian, -no-prior, -no-format) with the same Stage 1
         (here)
      -> offline replay on the held-out day(s): uniform, best static (grid search on
         the *training* days), a per-segment static, SP, GRADE and the ablations;
         NDCG@k per feedback type, composite, GAUC, bootstrap CIs over requests and
         paired differences against best static (``replay``, ``evidence``; the statistics
         and statics shared with ``grade-ray evaluate``: ``grade_ray.jobs.paired``, ``.replay``)
      -> RUN/results.json, RUN/results.md (tables, data evidence, an interpretation
         computed from the numbers, licence notice; ``results_text``)

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

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grade_ray.config import Config, save_config
from grade_ray.data.reading import read_sessions
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.datasets.kuairand.datadir import ConvertOptions, check_split_dates, convert
from grade_ray.datasets.kuairand.dataset import ATTRIBUTION, LICENCE_NOTICE, KuaiRandError
from grade_ray.datasets.kuairand.replay import evaluate_replay
from grade_ray.datasets.kuairand.results_text import interpret, results_markdown
from grade_ray.spec import RewardSpec

log = logging.getLogger(__name__)

SESSIONS_DIR = "sessions"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
DEFAULT_VARIANTS = ("GRADE-gaussian", "GRADE-no-prior", "GRADE-no-format")
MIN_CONTEXT_STD = 0.1
"""Floor on the policy's context std (rare one-hot columns stay within ~10 sigma)."""
LICENCE = {
    "dataset": "KuaiRand-Pure",
    "licence": "CC BY-SA 4.0",
    "notice": LICENCE_NOTICE,
    "attribution": ATTRIBUTION,
    "url": "https://kuairand.com",
}
"""The licence block of results.json (results.md ends with its notice and attribution)."""


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


def _yardstick(cfg: Config, meta: SessionMeta) -> RewardSpec:
    """The replay's metric: per-request NDCG on logged labels and on the raw predictions,
    whatever normalization or calibration the policy trains with (names checked here,
    before any training)."""
    RewardSpec.from_config(cfg.reward, meta)
    plain = dataclasses.replace(cfg.reward, normalization="request", prior_calibration={})
    return RewardSpec.from_config(plain, meta)


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
        raise KuaiRandError(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "GRADE":
            continue
        if name == "GRADE-no-format" and not format_term_active(cfg.reward):
            out[name] = {"skipped": "identical to GRADE (reward.l3 = 0 or format_kind = none)"}
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


def format_term_active(reward) -> bool:
    """Whether R_format changes GRADE's reward, i.e. the no-format ablation is another run.

    Off only at ``l3 = 0`` or ``format_kind = 'none'`` (R_format = 0). A learned constraint
    needs no rules, and even 'rules' with an empty list still pays the gated bonus
    l3 * 1[base >= tau], which moves the advantages."""
    return reward.l3 != 0 and reward.format_kind != "none"


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Store the block's wall-clock seconds (1 decimal) under ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t0, 1)


def _check_variants(names: Sequence[str]) -> None:
    from grade_ray.jobs.compare import VARIANTS

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise KuaiRandError(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")


def _run_config(cfg: Config, out: Path) -> Config:
    """``cfg`` with the run directory and the converted train / eval splits in it."""
    sessions = out / SESSIONS_DIR
    return cfg.replace(
        run_dir=str(out),
        **{"data.train_path": str(sessions / "train"), "data.eval_path": str(sessions / "eval")},
    )


def _train(
    cfg: Config,
    train: SessionBatch,
    meta: SessionMeta,
    variants: Sequence[str],
    timings: dict[str, float],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Stage 1, GRADE (Stage 2) and the ablations; returns (Stage 1 info, trained variants)."""
    from grade_ray.jobs.train import run_train_local

    with _timed(timings, "stage1_s"):
        stage1 = run_stage1(cfg, train, meta)
    with _timed(timings, "grade_s"):
        run_train_local(cfg)
    with _timed(timings, "variants_s"):
        trained = train_variants(cfg, variants)
    return stage1, trained


def _run_record(
    cfg: Config,
    opts: ConvertOptions,
    report: dict[str, Any],
    reused: bool,
    eval_summary: dict[str, Any],
) -> dict[str, Any]:
    """The run's conversion, eval data, config and licence, as stored in results.json."""
    upstream = report.get("upstream", {})
    return {
        "conversion": {
            "dir": str(Path(cfg.run_dir) / SESSIONS_DIR),
            "reused": reused,
            "options": dataclasses.asdict(opts),
            "rows": report.get("rows", {}),
            "upstream_auc_scored_days": upstream.get("auc_scored_days"),
            "upstream_auc_by_date": upstream.get("auc_by_date"),
        },
        "eval_data": eval_summary,
        "config": cfg.to_dict(),
    }


def _write_results(out: Path, results: dict[str, Any]) -> None:
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=1, default=_json_default))
    (out / RESULTS_MD).write_text(results_markdown(results))


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
    _check_variants(variants)  # before the (minutes of) conversion and training
    t_start = time.perf_counter()
    out = Path(out_dir or cfg.run_dir)
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
    with _timed(timings, "convert_s"):
        report, reused = convert(
            data_dir, out / SESSIONS_DIR, opts, reuse=reuse_conversion, overwrite=True
        )
    cfg = _run_config(cfg, out)
    train, meta, _ = read_sessions(cfg.data.train_path, on_error=cfg.data.on_error)
    ev, eval_meta, eval_read = read_sessions(cfg.data.eval_path, on_error=cfg.data.on_error)
    dates = check_split_dates(meta, eval_meta)
    spec = _yardstick(cfg, meta)
    _clear_run(out)
    stage1, trained = _train(cfg, train, meta, variants, timings)
    with _timed(timings, "evaluate_s"):
        results = evaluate_replay(cfg, train, meta, ev, eval_meta, spec, stage1, trained)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    results["dates"] = dates
    results.update(_run_record(cfg, opts, report, reused, eval_read.summary()))
    results.update(timings=timings, licence=dict(LICENCE))
    results["interpretation"] = interpret(results)
    _write_results(out, results)
    log.info("KuaiRand replay done in %.0fs: %s", timings["total_s"], out / RESULTS_MD)
    return results


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
