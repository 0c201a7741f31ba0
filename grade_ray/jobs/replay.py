"""Paired replay on held-out logs, for any session data: the table ``grade-ray evaluate`` prints.

On top of the run's arms (uniform, best_static, SP, the policy, extra runs) it adds

- ``segment_static``: per-segment best grid weights searched on the *training* logs, when
  the data has a segment (``eval.segment_feature``: a one-hot context block ``NAME=VALUE``
  such as KuaiRand's ``user_active_degree``; on simulator data, by default, the users'
  known segment);
- ``<arm>-mean-static``: each learned arm's mean weights over the training requests used
  as one static vector for everyone (deployable; the arm minus it is what the per-request
  variation of its weights adds);

and scores every arm on the same per-request metrics (:mod:`grade_ray.jobs.paired`):
marginal 95% CIs and paired differences to best_static over the *same* resampled
requests, with a Bonferroni-adjusted interval over the arms compared; per day when the
held-out requests span several days (``ts``). The KuaiRand pipeline
(:mod:`grade_ray.datasets.kuairand.replay`, ``results_text``) uses the same statics,
statistics and tables.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from grade_ray.algos.fusion import request_weights
from grade_ray.config import Config
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.jobs.paired import (
    BASELINE,
    arm_table,
    bootstrap_rows,
    paired_diff,
    per_request_metrics,
)
from grade_ray.spec import RewardSpec

log = logging.getLogger(__name__)

SEGMENT_STATIC = "segment_static"
MIN_SEGMENT_REQUESTS = 200
"""A segment needs this many training requests to get its own static weights."""
MEAN_STATIC_SUFFIX = "-mean-static"
DAY_S = 86_400
DAY_METRICS = ("composite", "r_post")
"""Metrics of the per-day rows."""
ALPHA = 0.05
VS = f"vs_{BASELINE}"


def mean_static_name(arm: str) -> str:
    """``GRADE`` -> ``GRADE-mean-static``: the arm's mean weights as one static vector."""
    return f"{arm}{MEAN_STATIC_SUFFIX}"


MEAN_STATIC = mean_static_name("GRADE")
"""GRADE's mean weights over the training requests, used as one static vector for everyone:
GRADE minus this arm is what the per-request variation of its weights adds."""


# ---------------------------------------------------------------------------
# Segments and the statics searched on the training logs


def segment_columns(meta: SessionMeta, feature: str) -> list[int]:
    """Indices of the one-hot context block ``feature=VALUE`` (empty if there is none)."""
    return [i for i, c in enumerate(meta.context_names) if c.startswith(f"{feature}=")]


def context_segments(
    batch: SessionBatch, meta: SessionMeta, feature: str
) -> tuple[np.ndarray, list[str]]:
    """(B,) segment index from the one-hot context block of ``feature``, and its names
    (one segment ``all`` when the context has no such block)."""
    cols = segment_columns(meta, feature)
    if not cols:
        return np.zeros(len(batch), dtype=np.int64), ["all"]
    return batch.context[:, cols].argmax(1), [meta.context_names[i] for i in cols]


def segment_static(
    train_segment: np.ndarray, names: Sequence[str], train_grid: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-segment best grid weights fitted on training requests: ((S, K), report).

    ``train_segment``: (B,) segment index of each training request; ``train_grid``: (B, P)
    its reward under each grid vector (P, K). Segments with fewer than
    :data:`MIN_SEGMENT_REQUESTS` training requests use the global best.
    """
    best = int(train_grid.mean(0).argmax())
    table = np.tile(grid[best], (len(names), 1))
    report = {}
    for s, name in enumerate(names):
        sel = train_segment == s
        if sel.sum() >= MIN_SEGMENT_REQUESTS:
            table[s] = grid[int(train_grid[sel].mean(0).argmax())]
        report[name] = {"train_requests": int(sel.sum()), "weights": table[s].round(3).tolist()}
    return table, report


@dataclasses.dataclass
class StaticSearch:
    """The best-static grid search on training logs, kept for the other statics.

    batch: the training requests searched on; grid: (P, K); rewards: (B, P) each request's
    ranking reward under each grid vector; best: (K,) the grid vector of highest mean.
    """

    batch: SessionBatch
    meta: SessionMeta
    grid: np.ndarray
    rewards: np.ndarray

    @property
    def best(self) -> np.ndarray:
        return self.grid[int(self.rewards.mean(0).argmax())]


@dataclasses.dataclass
class Segments:
    """Segment index of every training (search) and held-out request, and their names."""

    source: str
    names: list[str]
    train: np.ndarray
    eval: np.ndarray


def find_segments(
    feature: str, sim, train: SessionBatch, meta: SessionMeta, ev: SessionBatch, ev_meta
) -> Segments | None:
    """The data's segments (``eval.segment_feature``), or None.

    ``auto``: the simulator's user segments (``sim.users.segment[user_id]``) on simulator
    data, else none; ``""``: none; a name: the context block ``NAME=VALUE`` of both splits.
    """
    if feature == "auto":
        if sim is None:
            return None
        seg = np.asarray(sim.users.segment)
        if max(int(train.user_id.max(initial=0)), int(ev.user_id.max(initial=0))) >= len(seg):
            log.warning("user ids outside the simulator's users: no segment_static arm")
            return None
        return Segments(
            "simulator user segment", list(sim.segment_names), seg[train.user_id], seg[ev.user_id]
        )
    if not feature:
        return None
    tr_cols, ev_cols = segment_columns(meta, feature), segment_columns(ev_meta, feature)
    if not tr_cols or [meta.context_names[i] for i in tr_cols] != [
        ev_meta.context_names[i] for i in ev_cols
    ]:
        log.warning(
            "no context block %r=... in both the training and the held-out logs: "
            "no segment_static arm",
            feature,
        )
        return None
    tr, names = context_segments(train, meta, feature)
    ev_seg, _ = context_segments(ev, ev_meta, feature)
    return Segments(f"context {feature}", names, tr, ev_seg)


def static_arms(
    search: StaticSearch,
    segments: Segments | None,
    learned: dict[str, Callable[[SessionBatch, object], np.ndarray]],
    n_eval: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """segment_static and every learned arm's mean static as (n_eval, K) weights, and the
    weights used (for the report)."""
    tasks = search.meta.task_names
    out: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {}
    if segments is not None:
        table, seg_report = segment_static(
            segments.train, segments.names, search.rewards, search.grid
        )
        out[SEGMENT_STATIC] = table[segments.eval].astype(np.float32)
        report[SEGMENT_STATIC] = {"source": segments.source, "segments": seg_report}
    for arm, fn in learned.items():
        w = np.asarray(fn(search.batch, None), dtype=np.float32)
        mean_w = request_weights(w, search.batch.mask).mean(0)
        out[mean_static_name(arm)] = np.broadcast_to(mean_w, (n_eval, len(mean_w))).copy()
        report[mean_static_name(arm)] = dict(zip(tasks, mean_w.round(3).tolist()))
    return out, report


# ---------------------------------------------------------------------------
# The analysis


def day_index(ts: np.ndarray, offset_hours: float = 0.0) -> np.ndarray:
    """(B,) day number (days since 1970-01-01) of each request time, shifted by
    ``offset_hours`` (the logs' time zone)."""
    return (np.asarray(ts, dtype=np.int64) + round(offset_hours * 3600)) // DAY_S


def _day_name(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def per_day(
    per_arm: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    days: np.ndarray,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per day: its requests and :func:`arm_table` of :data:`DAY_METRICS` on them
    (the same paired bootstrap, within the day); [] when all requests share one day."""
    uniq = np.unique(days)
    if len(uniq) < 2:
        return []
    rows = []
    for d in uniq:
        sel = days == d
        sub = {
            arm: {m: (num[sel], den[sel]) for m, (num, den) in metrics.items() if m in DAY_METRICS}
            for arm, metrics in per_arm.items()
        }
        rows.append(
            {"day": _day_name(d), "requests": int(sel.sum()), "arms": arm_table(sub, n_boot, seed)}
        )
    return rows


def logs_replay(
    cfg: Config,
    ev: SessionBatch,
    ev_meta: SessionMeta,
    spec: RewardSpec,
    weights: dict[str, np.ndarray],
    learned: Iterable[str] = (),
    statics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every arm's (B, K) ``weights`` on the held-out requests, paired against best_static.

    ``learned`` names the arms whose ``<arm>-mean-static`` is among ``weights``
    (personalization: the arm minus it, paired); ``statics`` (the weights of the static
    arms) goes into the result as is.
    """
    e = cfg.eval
    per_arm = {a: per_request_metrics(ev, ev_meta, w, spec, cfg) for a, w in weights.items()}
    arms = arm_table(per_arm, e.bootstrap, e.ab_seed)
    idx = bootstrap_rows(len(ev), e.bootstrap, e.ab_seed)
    personalization = {
        a: paired_diff(per_arm[a]["composite"], per_arm[mean_static_name(a)]["composite"], idx)
        for a in learned
        if a in per_arm and mean_static_name(a) in per_arm
    }
    days = day_index(ev.ts, e.day_offset_hours)
    out = {
        "requests": len(ev),
        "k": spec.k,
        "labels": list(ev_meta.label_names),
        "baseline": BASELINE,
        "alpha": ALPHA,
        "comparisons": max(len(weights) - 1, 1),
        "bootstrap": {"resamples": e.bootstrap, "seed": e.ab_seed},
        "arms": arms,
        "personalization": personalization,
        "static_weights": statics or {},
        "day_offset_hours": e.day_offset_hours,
        "days": per_day(per_arm, days, e.bootstrap, e.ab_seed),
    }
    src = ev_meta.source
    if src.get("licence_notice"):
        out["licence"] = {
            k: src[k] for k in ("dataset", "licence", "licence_notice", "attribution") if k in src
        }
    return out


# ---------------------------------------------------------------------------
# Tables (also results.md's, in grade_ray.datasets.kuairand.results_text)

Block = list[str]
"""Lines of one Markdown block (a heading, a paragraph or a table)."""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Block:
    """``| a | b |`` lines: the header (an empty header cell stays one space wide), ``|---|``
    per column, then one line per row."""
    lines = ["|" + "".join(f" {h} |" if h else " |" for h in header)]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(f"{c}" for c in row) + " |" for row in rows]
    return lines


def fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def interval(d: dict[str, Any], adjusted: bool = False) -> str:
    lo, hi = ("adj_ci_low", "adj_ci_high") if adjusted else ("ci_low", "ci_high")
    return f"[{fmt(d[lo], sign=True)}, {fmt(d[hi], sign=True)}]"


def diff_ci(d: dict[str, Any]) -> str:
    return f"{fmt(d['diff'], sign=True)} {interval(d)}"


def cell(m: dict[str, Any]) -> str:
    """A metric with its 95% CI: ``value [low, high]``."""
    if m["value"] is None:
        return "–"
    return f"{m['value']:.4f} [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"


def diff_cell(d: dict[str, Any] | None) -> str:
    """A paired difference, starred (* 95% CI excludes 0, ** also the adjusted one)."""
    if not d or d["diff"] is None:
        return "–"
    star = "*" * (int(d["significant"]) + int(d.get("significant_adjusted", False)))
    return f"{d['diff']:+.4f}{star} [{fmt(d['ci_low'], sign=True)}, {fmt(d['ci_high'], sign=True)}]"


def ranking_table(results: dict) -> Block:
    """Composite, R_post, R_prior per arm, with paired differences to best static."""
    rows = []
    for arm, row in results["arms"].items():
        m, d = row["metrics"], row.get(VS, {})
        rows.append(
            [
                arm,
                cell(m["composite"]),
                diff_cell(d.get("composite")),
                cell(m["r_post"]),
                diff_cell(d.get("r_post")),
                cell(m["r_prior"]),
            ]
        )
    header = ["arm", "composite", "Δ composite", "R_post", "Δ R_post", "R_prior"]
    return markdown_table(header, rows)


def bonferroni_note(results: dict, metric: str = "composite") -> str:
    """Which paired differences still exclude 0 at alpha / m (m = arms compared)."""
    m = results["comparisons"]
    parts = []
    for arm, row in results["arms"].items():
        d = row.get(VS, {}).get(metric)
        if not d or d["diff"] is None:
            continue
        verdict = "excludes 0" if d["significant_adjusted"] else "includes 0"
        parts.append(f"{arm} {interval(d, adjusted=True)} {verdict}")
    return (
        f"Multiple comparisons (Bonferroni over the m = {m} arms compared with {BASELINE}, "
        f"each CI at alpha/m = {ALPHA}/{m} = {ALPHA / m:.4f}; Δ {metric}): "
        + "; ".join(parts)
        + "."
    )


def day_table(results: dict) -> Block:
    """Per day: requests, best_static's composite and every other arm's Δ composite."""
    arms = list(results["arms"])
    header = ["day", "requests", *(f"{a} composite" if a == BASELINE else f"Δ {a}" for a in arms)]
    rows = []
    for day in results["days"]:
        cells = []
        for a in arms:
            row = day["arms"][a]
            cells.append(
                cell(row["metrics"]["composite"])
                if a == BASELINE
                else diff_cell(row[VS]["composite"])
            )
        rows.append([day["day"], day["requests"], *cells])
    return markdown_table(header, rows)


def replay_markdown(results: dict) -> str:
    """The paired replay section of ``grade-ray evaluate``'s output."""
    k, n = results["k"], results["requests"]
    blocks: list[Block] = [
        [
            f"Paired replay on {n} held-out requests (composite = l1·R_post + l2·R_prior, "
            f"NDCG@{k}; 95% bootstrap CIs over requests, {results['bootstrap']['resamples']} "
            f"resamples, the same resampled requests for every arm; Δ = paired difference to "
            f"{BASELINE}, * = its 95% CI excludes 0, ** = also its Bonferroni-adjusted CI):"
        ],
        ranking_table(results),
        [bonferroni_note(results)],
    ]
    pers = results["personalization"]
    if pers:
        blocks.append(
            [
                "Personalization (each learned arm minus its own mean weights over the training "
                "requests used as one static vector, paired): "
                + "; ".join(f"{a} {diff_ci(d)}" for a, d in pers.items())
                + "."
            ]
        )
    statics = results["static_weights"]
    if SEGMENT_STATIC in statics:
        s = statics[SEGMENT_STATIC]
        segs = "; ".join(
            f"{name} {v['weights']} ({v['train_requests']} training requests)"
            for name, v in s["segments"].items()
        )
        blocks.append(
            [
                f"{SEGMENT_STATIC} ({s['source']}; a segment with fewer than "
                f"{MIN_SEGMENT_REQUESTS} training requests keeps best_static): {segs}."
            ]
        )
    if results["days"]:
        blocks += [
            [f"Per day (ts + {results['day_offset_hours']:g} h; paired within the day):"],
            day_table(results),
        ]
    if "licence" in results:
        lic = results["licence"]
        blocks.append([f"{lic['licence_notice']} {lic.get('attribution', '')}".strip()])
    return "\n\n".join("\n".join(b) for b in blocks)
