"""KuaiRand-Pure as this package reads it: licence, the columns read, the label order.

KuaiRand (Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset
with Randomly Exposed Videos", CIKM 2022, https://kuairand.com) is real
Kuaishou short-video feedback, licensed CC BY-SA 4.0. Everything derived from it
(sessions, their metadata and README, results) carries :data:`LICENCE_NOTICE`
and :data:`ATTRIBUTION`.

Label columns (L = 8, in this order): click, long_view, like, follow, comment,
forward, hate (0/1 from the log) and watch_ratio (the log's ``watch_ratio``
column if present, else play_time_ms / duration_ms; clipped to [0, 5]; 0 when
duration_ms <= 0).

:class:`KuaiRandOptions` says how impressions become requests and how features
are encoded; the trained upstream bundle stores it.
"""

from __future__ import annotations

import dataclasses

from grade_ray.config import UserError


class KuaiRandError(UserError, ValueError):
    """KuaiRand input the user can fix (a file, a column, a row, an option or the date
    split); the CLI prints its message on one line."""


LICENCE_NOTICE = (
    "Derived from KuaiRand-Pure (Gao et al., 'KuaiRand: An Unbiased Sequential "
    "Recommendation Dataset with Randomly Exposed Videos', CIKM 2022, https://kuairand.com), "
    "licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). This derived "
    "data is distributed under the same licence. Changes: impressions grouped into requests, "
    "features encoded, upstream-model scores added, bad rows set aside, rows logged twice "
    "dropped."
)
ATTRIBUTION = (
    "Chongming Gao, Shijun Li, Yuan Zhang, Jiawei Chen, Biao Li, Wenqiang Lei, Peng Jiang, "
    "Xiangnan He. KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly "
    "Exposed Videos. CIKM 2022."
)

# label name -> log column (0/1); watch_ratio is derived
BINARY_LABELS = {
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
}
WATCH_RATIO = "watch_ratio"
LABEL_NAMES = (*BINARY_LABELS, WATCH_RATIO)
WATCH_RATIO_MAX = 5.0

LOG_KEYS = ("user_id", "video_id", "date", "hourmin", "time_ms")
LOG_REQUIRED = (*LOG_KEYS, *BINARY_LABELS.values())
LOG_PLAY = ("play_time_ms", "duration_ms")

USER_CATEGORICAL = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    *(f"onehot_feat{i}" for i in range(18)),
)
USER_COUNTS = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
VIDEO_CATEGORICAL = ("video_type", "upload_type", "music_type", "tag")
VIDEO_IDS = ("video_id", "author_id")
VIDEO_DENSE = ("video_duration", "server_width", "server_height", "upload_dt")

GROUP_BY = ("user_day", "session")


@dataclasses.dataclass(frozen=True)
class KuaiRandOptions:
    """How impressions become requests and how features are encoded."""

    group_by: str = "user_day"
    """'user_day' (one request per user and date) or 'session' (split a user-day at time gaps)."""
    session_gap_s: float = 1800.0
    """With group_by='session': a gap longer than this (seconds) starts a new request."""
    min_list_len: int = 2
    """Requests with fewer impressions are not written (their rows are counted)."""
    max_categories: int = 16
    """Context one-hot width per user categorical (most frequent values + '<other>')."""
    max_video_vocab: int = 1000
    """Largest vocabulary of a video categorical (tag, music_type, ...; most frequent kept)."""
    max_id_vocab: int = 200_000
    """Largest user_id / video_id / author_id vocabulary (most frequent kept)."""
    use_id_features: bool = True
    """Give the upstream model user_id, video_id and author_id embeddings."""

    def __post_init__(self) -> None:
        if self.group_by not in GROUP_BY:
            raise KuaiRandError(f"group_by={self.group_by!r}: use one of {list(GROUP_BY)}")
        if self.session_gap_s <= 0:
            raise KuaiRandError(f"session_gap_s must be > 0, got {self.session_gap_s}")
        if self.min_list_len < 1:
            raise KuaiRandError(f"min_list_len must be >= 1, got {self.min_list_len}")
        if self.max_categories < 2 or min(self.max_video_vocab, self.max_id_vocab) < 1:
            raise KuaiRandError(
                "max_categories must be >= 2, max_video_vocab and max_id_vocab >= 1"
            )
