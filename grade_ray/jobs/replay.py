"""The paired replay's statics and tables, for any session data.

Moved down from the KuaiRand pipeline so that ``grade-ray evaluate`` can give the same
analysis on any logs: the per-segment static searched on the training logs
(:func:`segment_static`), the name of a learned arm's mean static, and the Markdown
ranking table with paired differences to best_static (:func:`ranking_table`). The
statistics are :mod:`grade_ray.jobs.paired`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.jobs.paired import BASELINE

log = logging.getLogger(__name__)

SEGMENT_STATIC = "segment_static"
MIN_SEGMENT_REQUESTS = 200
"""A segment needs this many training requests to get its own static weights."""
MEAN_STATIC_SUFFIX = "-mean-static"
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
