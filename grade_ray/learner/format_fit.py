"""The learned format constraint (``reward.format_kind='learned'``), fitted once per run.

Instead of hand-written weight-hierarchy rules, R_format scores how typical a weight vector
is of the weights that rank the training logs well:

1. on up to :data:`MAX_REQUESTS` training requests, score every point of a simplex grid
   (``grade_ray.data.oracles.simplex_grid``, step from :func:`format_grid_step`) by the
   reward's ranking part l1 * R_post + l2 * R_prior (no format term);
2. each request whose reward varies over the grid spreads one unit of mass uniformly over its
   best grid points (ties are common: sparse feedback leaves many weights ranking the same);
   requests the grid cannot tell apart carry no information and are skipped;
3. a Dirichlet Dir(alpha_fit) is fitted to that mass by moment matching (:func:`fit_dirichlet`);
4. the constraint is Dir(1 + alpha_fit): the same pseudo-counts on a flat prior, whose single
   mode is the fitted mean. A raw fit with some alpha_k < 1 (usual: optima are dispersed)
   has its density peak at w_k = 0, so scoring by it would reward switching tasks off, the
   polarization R_format is meant to prevent;
5. R_format(w) = the share of that Dirichlet's mass whose density is at most w's
   (``grade_ray.algos.rewards.learned_format_reward``), looked up in the sorted log-densities
   of :data:`REFERENCE_DRAWS` reference draws: in [0, 1] like the rules' share.

The result travels in ``RewardFit.format`` (``RUN_DIR/reward_fit.pt``, see reward_fit.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from grade_ray.algos.exploration import log_standard_gamma
from grade_ray.algos.rewards import FittedDirichlet, dirichlet_log_density
from grade_ray.config import ConfigError
from grade_ray.data.oracles import simplex_grid
from grade_ray.data.sessions import SessionBatch
from grade_ray.spec import RewardSpec

log = logging.getLogger(__name__)

MAX_REQUESTS = 10_000
"""Training requests the fit scores on the grid (the first ones, in file order)."""
MAX_GRID = 2_000
"""Most grid points: the finest step of :data:`GRID_STEPS` whose grid stays within this."""
GRID_STEPS = (0.1, 0.125, 0.2, 0.25, 0.5, 1.0)
TIE_TOL = 1e-6
"""Grid points within this (relative) of a request's best reward are all its best."""
MAX_CONCENTRATION = 1_000.0
"""Cap on sum(alpha_fit) (all good weights identical would make it infinite)."""
MIN_ALPHA = 1e-2
"""Floor on each alpha_fit_k (a task no request's best weights use)."""
REFERENCE_DRAWS = 4_096
CHUNK = 128


def format_grid_step(k: int) -> float:
    """The finest step in GRID_STEPS whose K-task simplex grid has at most MAX_GRID points."""
    for step in GRID_STEPS:
        m = round(1 / step)
        if math.comb(m + k - 1, k - 1) <= MAX_GRID:
            return step
    return GRID_STEPS[-1]


def fit_dirichlet(points: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Moment-matched Dirichlet of weighted points on the simplex.

    points: (n, K) >= 0, rows summing to 1; mass: (n,) >= 0 (default ones). With m the
    weighted mean and v_k the weighted variance of w_k, sum_k v_k = (1 - sum_k m_k^2) / (a0 + 1)
    for Dir(a0 * m), so a0 = (1 - sum m^2) / sum v - 1 (capped at MAX_CONCENTRATION) and
    alpha = a0 * m, each floored at MIN_ALPHA. Returns (K,) float64. Moments, not maximum
    likelihood: grid points have exact zeros, where log w (the MLE's statistic) is -inf.
    """
    x = points.double()
    c = torch.ones(len(x), dtype=torch.float64) if mass is None else mass.double()
    c = c / c.sum()
    m = (c[:, None] * x).sum(0)
    v = (c[:, None] * (x - m) ** 2).sum(0).sum()
    a0 = (1 - (m**2).sum()) / v - 1 if v > 0 else torch.tensor(MAX_CONCENTRATION)
    a0 = a0.clamp(min=MIN_ALPHA * x.shape[1], max=MAX_CONCENTRATION)
    return (a0 * m).clamp_min(MIN_ALPHA)


def constraint(alpha_fit: torch.Tensor, seed: int = 0) -> FittedDirichlet:
    """Dir(1 + alpha_fit) (mode = the fit's mean) with its sorted reference log-densities."""
    alpha = 1.0 + alpha_fit.double()
    gen = torch.Generator().manual_seed(seed)
    log_gam = log_standard_gamma(alpha.expand(REFERENCE_DRAWS, -1).contiguous(), gen)
    draws = torch.softmax(log_gam, -1)
    ref = dirichlet_log_density(draws, alpha).sort().values
    return FittedDirichlet(tuple(alpha.tolist()), tuple(ref.tolist()))


def best_grid_mass(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """values: (B, P) reward of each request at each grid point -> ((P,) mass, informative B).

    Each request whose values vary gives 1 / |best| to each of its best grid points."""
    top = values.max(1, keepdim=True).values
    low = values.min(1, keepdim=True).values
    tol = TIE_TOL * top.abs().clamp_min(1.0)
    informative = (top - low > tol).squeeze(1)
    best = (values >= top - tol) & informative[:, None]
    share = best.double() / best.sum(1, keepdim=True).clamp_min(1)
    return share.sum(0), int(informative.sum())


def fit_format(
    spec: RewardSpec, batch: SessionBatch, fusion: str, fusion_eps: float
) -> FittedDirichlet:
    """The learned format constraint for ``spec``'s ranking reward on ``batch`` (see the
    module docstring). ``spec`` must carry the calibration and scales fitted on the logs."""
    k = batch.scores.shape[-1]
    step = format_grid_step(k)
    grid = torch.from_numpy(simplex_grid(k, step).astype(np.float32))
    base = dataclasses.replace(spec, format_kind="none", fitted_format=None)
    mass = torch.zeros(len(grid), dtype=torch.float64)
    informative = 0
    for r in base.iter_grid_rewards(
        batch, grid, fusion=fusion, fusion_eps=fusion_eps, l3=0.0, chunk=CHUNK
    ):
        m, n = best_grid_mass(r.double())
        mass += m
        informative += n
    if informative == 0:
        raise ConfigError(
            f"reward.format_kind='learned': none of the first {len(batch)} training requests "
            "ranks differently anywhere on the weight grid, so there is nothing to learn the "
            "format from; use reward.format_kind=rules or none"
        )
    alpha_fit = fit_dirichlet(grid.double(), mass)
    fitted = constraint(alpha_fit)
    log.info(
        "learned format: %d of %d requests informative (grid step %g, %d points); "
        "Dirichlet fit alpha %s, its mean (the constraint's mode) %s",
        informative,
        len(batch),
        step,
        len(grid),
        np.round(alpha_fit.numpy(), 3).tolist(),
        np.round((alpha_fit / alpha_fit.sum()).numpy(), 3).tolist(),
    )
    return fitted
