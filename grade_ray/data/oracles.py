"""Reference policies that bound what personalization can reach (simulator ground truth).

All of them search one simplex grid of weight vectors (``simplex_grid``) and pick
grid points from a :class:`ValueTable`: the mean value of each grid point over
requests, per true segment. Filled with the *true* expected north-star on fresh
requests it gives

- the best static vector S (one grid point for everyone);
- the segment oracle O_seg (per true segment; information no policy sees);
- the attainable oracle O_ctx (per request, the grid point maximising
  ``sum_s p(s | context) V_s(w)``, with the simulator's exact posterior
  :meth:`MarketplaceSimulator.segment_posterior`): the best a context-only policy
  can do at the level of segments.

Filled with the *training reward* on logged requests instead, the same search
gives the reward oracle O_rew: what a perfect optimiser of that reward would
ship. Under a table's own values, O_ctx <= O_seg (a posterior-weighted choice
cannot beat each segment's own best), with equality when the posterior is one-hot.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.data.sessions import SessionBatch
from grade_ray.data.simulator import TASK_NAMES, MarketplaceSimulator, Truth, exam_prob


def simplex_grid(k: int, step: float) -> np.ndarray:
    """(P, k) float64: every weight vector on the simplex with entries in multiples of ``step``.

    P = C(m + k - 1, k - 1) with m = round(1 / step) (286 for k = 4, step = 0.1).
    """
    m = round(1.0 / step)
    if m < 1 or abs(m * step - 1.0) > 1e-6:
        raise ValueError(f"grid step {step} must divide 1 (e.g. 0.1, 0.2, 0.25)")
    pts = []
    for bars in itertools.combinations(range(m + k - 1), k - 1):
        edges = (-1, *bars, m + k - 1)
        pts.append([edges[j + 1] - edges[j] - 1 for j in range(k)])
    return np.asarray(pts, dtype=np.float64) / m


@dataclasses.dataclass(frozen=True)
class ValueTable:
    """Mean value of each grid weight vector, per segment and overall.

    grid: (P, K) weight vectors; per_segment: (S, P) mean value over the segment's
    requests; overall: (P,) mean over all requests.
    """

    grid: np.ndarray
    per_segment: np.ndarray
    overall: np.ndarray

    @classmethod
    def from_requests(
        cls, grid: np.ndarray, values: np.ndarray, segments: np.ndarray, num_segments: int
    ) -> ValueTable:
        """values: (B, P) value of each request under each grid point; segments: (B,) int.

        A segment without requests gets the overall mean (its oracle is the static vector).
        """
        overall = values.mean(0)
        per_seg = np.stack(
            [
                values[segments == s].mean(0) if (segments == s).any() else overall
                for s in range(num_segments)
            ]
        )
        return cls(np.asarray(grid), per_seg, overall)

    def static_best(self) -> np.ndarray:
        """(K,) the grid point with the highest overall mean."""
        return self.grid[self.overall.argmax()]

    def segment_best(self) -> np.ndarray:
        """(S, K) each segment's best grid point."""
        return self.grid[self.per_segment.argmax(1)]

    def posterior_best(self, posterior: np.ndarray) -> np.ndarray:
        """posterior: (B, S) p(segment | context) -> (B, K) the grid point maximising the
        posterior-weighted value ``sum_s p_s V_s(w)`` of each request."""
        return self.grid[(np.asarray(posterior) @ self.per_segment).argmax(1)]


def grid_north_star(
    sim: MarketplaceSimulator,
    batch: SessionBatch,
    truth: Truth,
    fusion: str,
    weights: np.ndarray,
    chunk: int = 128,
    eps: float = 1e-6,
) -> np.ndarray:
    """(B, P) expected north-star of each request under each weight vector (P, K), fused
    with ``eps`` (``policy.fusion_eps``: the fusion the arms are measured under).

    Vectorised over requests x grid points (fusion by :func:`fuse`, then one
    SIMD argsort per chunk). Exact ties between real candidates (probability
    zero with continuous scores) may break in any order here.
    """
    value = torch.from_numpy(truth.item_value(sim.cfg.north_star).astype(np.float32))
    exam = torch.from_numpy(exam_prob(batch.mask.shape[1]).astype(np.float32))
    w = torch.from_numpy(np.asarray(weights, dtype=np.float32))
    out = []
    for s in range(0, len(batch), chunk):
        sc = torch.from_numpy(batch.scores[s : s + chunk])
        fused = fuse(fusion, sc, w.expand(sc.shape[0], *w.shape), eps).numpy()  # (b, P, N)
        key = np.where(batch.mask[s : s + chunk, None, :], -fused, np.inf)
        order = torch.from_numpy(np.argsort(key, axis=-1))
        v = torch.gather(value[s : s + chunk, None, :].expand(order.shape), -1, order)
        out.append((v @ exam).numpy())
    return np.concatenate(out).astype(np.float64)


def truth_table(
    sim: MarketplaceSimulator,
    fusion: str,
    grid_step: float,
    n_requests: int,
    seed: int,
    eps: float = 1e-6,
) -> ValueTable:
    """True expected north-star of every grid point on ``n_requests`` fresh requests."""
    grid = simplex_grid(len(TASK_NAMES), grid_step)
    batch, truth = sim.fresh_requests(n_requests, seed)
    ns = grid_north_star(sim, batch, truth, fusion, grid, eps=eps)
    return ValueTable.from_requests(grid, ns, truth.segment, len(sim.segment_names))


def headroom(
    sim: MarketplaceSimulator,
    fusion: str = "log_product",
    grid_step: float = 0.1,
    n_requests: int = 5_000,
    seed: int = 0,
    eps: float = 1e-6,
) -> dict:
    """Best static vs the attainable (context-posterior) and segment oracles, searched on
    fresh requests (``seed``) and measured on other fresh requests (``seed + 1``).

    Returns logging/static/attainable/segment-oracle north-star per request, the
    relative gains over static, the weights, and (upper bound) the north-star of
    sorting each request by its true item value.
    """
    table = truth_table(sim, fusion, grid_step, n_requests, seed, eps)
    static, oracle = table.static_best(), table.segment_best()
    batch, truth = sim.fresh_requests(n_requests, seed + 1)
    w_log = np.asarray(sim.cfg.logging_weights) / sum(sim.cfg.logging_weights)
    sc = torch.from_numpy(batch.scores)

    def ns(w: np.ndarray) -> float:
        w = np.ascontiguousarray(w, dtype=np.float32)
        fused = fuse(fusion, sc, torch.from_numpy(w), eps).numpy()
        return float(sim.expected_outcomes(batch, truth, fused)["north_star"].mean())

    value = truth.item_value(sim.cfg.north_star)
    result = {
        "fusion": fusion,
        "grid_step": grid_step,
        "search_requests": n_requests,
        "eval_requests": n_requests,
        "static_weights": static.tolist(),
        "oracle_weights": {s: oracle[i].tolist() for i, s in enumerate(sim.segment_names)},
        "logging_north_star": ns(np.broadcast_to(w_log, (len(batch), 4))),
        "static_north_star": ns(np.broadcast_to(static, (len(batch), 4))),
        "attainable_north_star": ns(table.posterior_best(sim.segment_posterior(batch.context))),
        "oracle_north_star": ns(oracle[truth.segment]),
        "true_value_north_star": float(
            sim.expected_outcomes(batch, truth, value)["north_star"].mean()
        ),
    }
    result["relative_gain"] = result["oracle_north_star"] / result["static_north_star"] - 1
    result["attainable_relative_gain"] = (
        result["attainable_north_star"] / result["static_north_star"] - 1
    )
    return result
