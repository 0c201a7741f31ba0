"""Vocabularies fitted on the upstream training days; the policy context and the upstream inputs.

Context (fixed length D, float32; names in the metadata): per user-table
categorical (user_active_degree, is_* flags, onehot_feat0..17) a one-hot over
the values seen on the training days (at most ``max_categories`` - 1 most
frequent, plus ``<other>`` for the rest, unseen values and nothing else;
missing is its own value); log1p of the four count columns (the ``*_range``
columns are bucketings of those counts and are left out); then request-time
features: sin/cos of the hour of the first impression, day of week one-hot,
log1p(list length).

Upstream inputs per impression: the same user categoricals as embeddings, the
log1p counts, sin/cos hour, and only *basic* video features (video_type,
upload_type, music_type, first tag, optionally video_id and author_id
embeddings; log duration, log aspect ratio, days since upload, with missing
flags). Day of week is not an upstream input: the scored days are weekdays the
model never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from grade_ray.datasets.kuairand.dataset import (
    USER_CATEGORICAL,
    USER_COUNTS,
    VIDEO_CATEGORICAL,
    VIDEO_IDS,
    KuaiRandOptions,
)
from grade_ray.datasets.kuairand.grouping import Requests
from grade_ray.datasets.kuairand.raw import Impressions, UserTable, VideoTable

ID_FEATURES = ("user_id", *VIDEO_IDS)
OTHER = "<other>"
DOW = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _fit_vocab(values: np.ndarray, max_size: int) -> list[str]:
    """Most frequent values (ties by value), at most ``max_size``."""
    if values.size == 0:
        return []
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    order = np.lexsort((uniq, -counts))[:max_size]
    return [str(v) for v in uniq[order]]


def _encode(values: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    """(M,) strings -> (M,) int64 codes: 1 + index in vocab, 0 = not in vocab."""
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    return np.array([lookup.get(v, 0) for v in uniq], dtype=np.int64)[inv.reshape(-1)]


@dataclasses.dataclass
class KuaiRandEncoder:
    """Vocabularies fitted on the upstream training days; turns tables into features."""

    user_vocab: dict[str, list[str]]
    """User categorical -> values (context one-hot slot i+1; slot 0 = '<other>')."""
    video_vocab: dict[str, list[str]]
    """Video categorical -> values (upstream embedding index i+1; 0 = unknown)."""
    id_vocab: dict[str, list[str]]
    """user_id / video_id / author_id -> ids seen on the training days (empty: no id features)."""
    train_dates: list[int]
    """Dates (yyyymmdd) the vocabularies and the upstream model were fitted on."""

    @classmethod
    def fit(
        cls, users: UserTable, videos: VideoTable, train: Impressions, opts: KuaiRandOptions
    ) -> KuaiRandEncoder:
        """Fit on training-day impressions only. train: impressions of the training dates."""
        rows = np.unique(train.user_row)  # each training-day user counted once
        user_vocab = {
            c: _fit_vocab(users.cats[c][rows], opts.max_categories - 1) for c in USER_CATEGORICAL
        }
        video_vocab = {
            c: _fit_vocab(videos.cats[c][train.video_row], opts.max_video_vocab)
            for c in VIDEO_CATEGORICAL
        }
        id_vocab = {}
        if opts.use_id_features:
            id_vocab["user_id"] = _fit_vocab(
                users.cats["user_id"][train.user_row], opts.max_id_vocab
            )
            for c in VIDEO_IDS:
                id_vocab[c] = _fit_vocab(videos.cats[c][train.video_row], opts.max_id_vocab)
        dates = sorted(int(d) for d in np.unique(train.date))
        return cls(user_vocab, video_vocab, id_vocab, dates)

    # -- context (policy input) ------------------------------------------------
    def context_names(self) -> list[str]:
        names = []
        for c in USER_CATEGORICAL:
            names += [f"{c}={OTHER}"] + [f"{c}={v}" for v in self.user_vocab[c]]
        names += [f"log1p_{c}" for c in USER_COUNTS]
        names += ["hour_sin", "hour_cos", *(f"dow={d}" for d in DOW), "log1p_list_len"]
        return names

    def user_context(self, users: UserTable) -> np.ndarray:
        """(U, Du) float32: one-hot user categoricals then log1p counts."""
        blocks = []
        for c in USER_CATEGORICAL:
            codes = _encode(users.cats[c], self.user_vocab[c])
            blocks.append(np.eye(len(self.user_vocab[c]) + 1, dtype=np.float32)[codes])
        blocks.append(_log1p_counts(users))
        return np.concatenate(blocks, axis=1)

    def request_context(self, user_ctx: np.ndarray, req: Requests) -> np.ndarray:
        """(R, D) float32 = [user_ctx[user_row], hour sin/cos, dow one-hot, log1p(list len)].

        user_ctx: (U, Du) from :meth:`user_context`; hour and day are the first impression's.
        """
        dow = np.eye(7, dtype=np.float32)[(req.day + 3) % 7]  # 1970-01-01 was a Thursday
        parts = [user_ctx[req.user_row], _hour_features(req.hour), dow]
        parts.append(np.log1p(req.lengths)[:, None].astype(np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32)

    # -- upstream inputs -------------------------------------------------------
    def embedding_names(self) -> list[str]:
        """Names of the upstream ``cats`` columns after the USER_CATEGORICAL ones, in order."""
        return [*VIDEO_CATEGORICAL, *(c for c in ID_FEATURES if c in self.id_vocab)]

    def upstream_inputs(
        self, users: UserTable, videos: VideoTable, imp: Impressions
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Per impression: dense (M, F) float32, cats (M, C) int64, cat_sizes (C,).

        cats columns: USER_CATEGORICAL, then :meth:`embedding_names`; index 0 = unknown.
        dense: log1p user counts (4), hour sin/cos (2), then (value, missing flag) for
        log1p duration in s, log aspect ratio and log1p days since upload (6).
        """
        cats, sizes = [], []
        for c in USER_CATEGORICAL:
            cats.append(_encode(users.cats[c], self.user_vocab[c])[imp.user_row])
            sizes.append(len(self.user_vocab[c]) + 1)
        for c in self.embedding_names():  # fixed order (JSON round trips sort dict keys)
            vocab = self.video_vocab[c] if c in self.video_vocab else self.id_vocab[c]
            table, row = (users, imp.user_row) if c == "user_id" else (videos, imp.video_row)
            cats.append(_encode(table.cats[c], vocab)[row])
            sizes.append(len(vocab) + 1)
        v = {k: a[imp.video_row] for k, a in videos.dense.items()}
        age = imp.day - v["upload_day"]
        aspect = np.log(v["height"] / v["width"])
        dense = [_log1p_counts(users)[imp.user_row], _hour_features(imp.hour)]
        for x in (np.log1p(v["duration_ms"] / 1000.0), aspect, np.log1p(np.maximum(age, 0))):
            ok = np.isfinite(x)
            dense.append(np.stack([np.where(ok, x, 0.0), (~ok).astype(np.float64)], 1))
        return np.concatenate(dense, 1).astype(np.float32), np.stack(cats, 1), sizes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KuaiRandEncoder:
        return cls(**d)


def _log1p_counts(users: UserTable) -> np.ndarray:
    """(U, 4) float32 log1p of the (non-negative) count columns."""
    return np.stack([np.log1p(np.maximum(users.counts[c], 0)) for c in USER_COUNTS], 1).astype(
        np.float32
    )


def _hour_features(hour: np.ndarray) -> np.ndarray:
    """(M,) hour 0..23 -> (M, 2) float32 [sin, cos] of the hour angle."""
    a = 2 * np.pi * hour.astype(np.float64) / 24.0
    return np.stack([np.sin(a), np.cos(a)], 1).astype(np.float32)
