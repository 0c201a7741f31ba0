"""The upstream bundle (MMoE + vocabularies + options): train, save, load, score later days.

Scoring refuses any date the model was trained on, or an earlier one
(:class:`LeakageError`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grade_ray.datasets.kuairand.dataset import (
    ATTRIBUTION,
    BINARY_LABELS,
    LABEL_NAMES,
    LICENCE_NOTICE,
    KuaiRandError,
    KuaiRandOptions,
)
from grade_ray.datasets.kuairand.features import KuaiRandEncoder
from grade_ray.datasets.kuairand.raw import Impressions, UserTable, VideoTable
from grade_ray.datasets.kuairand.upstream import (
    UpstreamConfig,
    binary_auc,
    fit_mmoe,
    load_mmoe,
    predict_proba,
    save_mmoe,
)

log = logging.getLogger(__name__)

MODEL_DIR = "upstream"
WEIGHTS_FILE = "weights.pt"
BUNDLE_FILE = "upstream.json"
BUNDLE_VERSION = 1


class LeakageError(KuaiRandError):
    """Asked to score a day the upstream model was trained on (or an earlier one)."""


def check_no_leakage(dates: np.ndarray, train_dates: Sequence[int]) -> None:
    """Raise LeakageError unless every date to score is after the last training date."""
    if not len(train_dates) or not len(dates):
        return
    boundary = max(int(d) for d in train_dates)
    bad = np.unique(np.asarray(dates)[np.asarray(dates) <= boundary])
    if bad.size:
        raise LeakageError(
            f"refusing to score dates {bad.tolist()}: the upstream model was trained on "
            f"{list(train_dates)}; only dates after {boundary} can be scored (filter them with dates=)"
        )


@dataclasses.dataclass
class UpstreamBundle:
    """A trained upstream model with everything needed to score new logs."""

    model: Any
    cfg: UpstreamConfig
    encoder: KuaiRandEncoder
    options: KuaiRandOptions
    architecture: dict[str, Any]

    def score(self, users: UserTable, videos: VideoTable, imp: Impressions) -> np.ndarray:
        """(M, K) float32 probabilities; raises LeakageError for any training (or earlier) date."""
        check_no_leakage(imp.date, self.encoder.train_dates)
        out = np.empty((len(imp), len(self.cfg.tasks)), dtype=np.float32)
        step = 200_000
        for s in range(0, len(imp), step):
            dense, cats, _ = self.encoder.upstream_inputs(
                users, videos, imp.take(np.arange(s, min(s + step, len(imp))))
            )
            out[s : s + step] = predict_proba(self.model, dense, cats)
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/upstream/{weights.pt, upstream.json}``; returns that directory."""
        d = Path(out_dir) / MODEL_DIR
        d.mkdir(parents=True, exist_ok=True)
        save_mmoe(self.model, d / WEIGHTS_FILE)
        bundle = {
            "format_version": BUNDLE_VERSION,
            "architecture": self.architecture,
            "encoder": self.encoder.to_dict(),
            "options": dataclasses.asdict(self.options),
            "label_names": list(LABEL_NAMES),
            # the vocabularies are KuaiRand's user, video and author ids
            "licence_notice": LICENCE_NOTICE,
            "attribution": ATTRIBUTION,
        }
        (d / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1, sort_keys=True))
        return d


def load_upstream(model_dir: str | Path) -> UpstreamBundle:
    """Load a bundle saved by :meth:`UpstreamBundle.save` (``model_dir`` = convert out_dir or its upstream/)."""
    d = Path(model_dir)
    if not (d / BUNDLE_FILE).exists():
        d = d / MODEL_DIR
    if not (d / BUNDLE_FILE).exists():
        raise FileNotFoundError(f"no {BUNDLE_FILE} in {model_dir} or {model_dir}/{MODEL_DIR}")
    meta = json.loads((d / BUNDLE_FILE).read_text())
    if meta.get("format_version") != BUNDLE_VERSION:
        raise KuaiRandError(
            f"{d / BUNDLE_FILE}: format_version {meta.get('format_version')}, expected {BUNDLE_VERSION}"
        )
    model, cfg = load_mmoe(d / WEIGHTS_FILE, meta["architecture"])
    return UpstreamBundle(
        model,
        cfg,
        KuaiRandEncoder.from_dict(meta["encoder"]),
        KuaiRandOptions(**meta["options"]),
        meta["architecture"],
    )


def train_upstream(
    users: UserTable,
    videos: VideoTable,
    train: Impressions,
    cfg: UpstreamConfig,
    opts: KuaiRandOptions,
) -> tuple[UpstreamBundle, dict[str, Any]]:
    """Fit vocabularies and the MMoE on training-day impressions. Returns (bundle, history)."""
    unknown = [t for t in cfg.tasks if t not in BINARY_LABELS]
    if unknown:
        raise KuaiRandError(
            f"unknown upstream task(s) {unknown}; choose from {list(BINARY_LABELS)}"
        )
    encoder = KuaiRandEncoder.fit(users, videos, train, opts)
    dense, cats, sizes = encoder.upstream_inputs(users, videos, train)
    y = train.labels[:, [LABEL_NAMES.index(t) for t in cfg.tasks]]
    for t, n in zip(cfg.tasks, y.sum(axis=0)):
        if n < 50:
            log.warning("upstream task %r has only %d positives on the training days", t, int(n))
    model, history = fit_mmoe(dense, cats, y, sizes, cfg)
    history["train_auc"] = {
        t: binary_auc(y[:, k], predict_proba(model, dense, cats)[:, k])
        for k, t in enumerate(cfg.tasks)
    }
    return UpstreamBundle(model, cfg, encoder, opts, model.architecture(cfg)), history


def task_aucs(imp: Impressions, probs: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """Per-task ROC AUC of probs (M, K) against the impressions' labels."""
    return {
        t: rounded(binary_auc(imp.labels[:, LABEL_NAMES.index(t)], probs[:, k]))
        for k, t in enumerate(tasks)
    }


def rounded(x: float) -> float | None:
    """5 digits; NaN -> None (null in JSON)."""
    return None if x != x else round(float(x), 5)  # NaN -> null in JSON
