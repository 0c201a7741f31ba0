"""Valid impressions -> requests: one per user and date, or user sessions split at time gaps."""

from __future__ import annotations

import dataclasses

import numpy as np

from grade_ray.datasets.kuairand.dataset import GROUP_BY, KuaiRandError
from grade_ray.datasets.kuairand.raw import Impressions


@dataclasses.dataclass
class Requests:
    """Impressions grouped into requests.

    order: (M',) indices into the impressions, request by request, each in time
    order; offsets: (R+1,) request r owns order[offsets[r]:offsets[r+1]];
    request_id, user_id, date, ts (seconds), hour: (R,) int64.
    """

    order: np.ndarray
    offsets: np.ndarray
    request_id: np.ndarray
    user_id: np.ndarray
    date: np.ndarray
    day: np.ndarray
    ts: np.ndarray
    hour: np.ndarray
    user_row: np.ndarray
    """(R,) row of the request's user in the :class:`UserTable`."""

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def group_requests(
    imp: Impressions, group_by: str = "user_day", session_gap_s: float = 1800.0
) -> Requests:
    """Group impressions by (user, date) and, for 'session', at gaps > session_gap_s.

    Within a request impressions are ordered by time_ms (ties: log order). A
    session never crosses a date boundary. request_id = date * 10**11 +
    user_id * 10**4 + (index of the session within its user-day).
    """
    if group_by not in GROUP_BY:
        raise KuaiRandError(f"group_by={group_by!r}: use one of {list(GROUP_BY)}")
    m = len(imp)
    order = np.lexsort((imp.src, imp.time_ms, imp.date, imp.user_id))
    u, d, t = imp.user_id[order], imp.date[order], imp.time_ms[order]
    day_start = np.ones(m, dtype=bool)
    day_start[1:] = (u[1:] != u[:-1]) | (d[1:] != d[:-1])
    new = day_start.copy()
    if group_by == "session":
        new[1:] |= (t[1:] - t[:-1]) > session_gap_s * 1000.0
    starts = np.flatnonzero(new)
    r = np.arange(len(starts))
    first_of_day = np.maximum.accumulate(np.where(day_start[starts], r, 0)) if len(r) else r
    session = r - first_of_day
    if len(r) and (u.max() >= 10**7 or session.max() >= 10**4 or d.max() >= 9 * 10**7):
        raise KuaiRandError(
            "user_id >= 1e7 or > 1e4 sessions per user-day: request ids would collide"
        )
    return Requests(
        order=order,
        offsets=np.append(starts, m).astype(np.int64),
        request_id=d[starts] * 10**11 + u[starts] * 10**4 + session,
        user_id=u[starts],
        date=d[starts],
        day=imp.day[order][starts],
        ts=t[starts] // 1000,
        hour=imp.hour[order][starts],
        user_row=imp.user_row[order][starts],
    )


def select_requests(req: Requests, keep: np.ndarray) -> Requests:
    """Requests where keep (R,) bool is True, sorted by (ts, request_id)."""
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((req.request_id[idx], req.ts[idx]))]
    lengths = req.lengths[idx]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = req.offsets[idx]
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    order = req.order[np.repeat(starts, lengths) + within]
    names = ("request_id", "user_id", "date", "day", "ts", "hour", "user_row")
    fields = {f: getattr(req, f)[idx] for f in names}
    return Requests(order=order, offsets=offsets, **fields)
