"""The simulated world: latent user segments, the user population and the item catalogue.

The only full-size state of the simulator (``MarketplaceSimulator`` in
``grade_ray.data.simulator`` builds them once from its seed and generates
requests from them chunk by chunk). See that module's docstring for the model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from grade_ray.config import SimulatorConfig

NUM_CATEGORIES = 16
ATTRACT_SD = 0.8
"""Std of items' click-bait attractiveness."""


@dataclasses.dataclass(frozen=True)
class SegmentProfile:
    """A latent user segment: intent distribution and how well the upstream model serves it."""

    intent_mean: tuple[float, float, float, float]
    """Mean of (click_bias, buy_bias, price_slope, quality_slope)."""
    intent_std: tuple[float, float, float, float]
    """Individual spread of the intent around the mean."""
    noise: tuple[float, float, float, float]
    """Prediction noise per task (ctr, cvr, gmv, profit), in units of ``prediction_noise``."""
    slope: tuple[float, float]
    """Calibration slope of logit(pCTR), logit(pCVR) at ``miscalibration = 1`` (1 = calibrated)."""
    offset: tuple[float, float]
    """Calibration offset of logit(pCTR), logit(pCVR) at ``miscalibration = 1``."""
    rho: float
    """Share of the user's own price/quality taste (vs the population's) that pCVR misses."""


SEGMENTS: dict[str, SegmentProfile] = {
    # Clicks a lot, rarely buys; pCVR has few positives: noisy, over-confident, over-predicted.
    "browser": SegmentProfile(
        intent_mean=(0.3, -2.6, -0.2, 0.2),
        intent_std=(0.3, 0.4, 0.2, 0.2),
        noise=(1.0, 3.0, 0.3, 0.5),
        slope=(1.0, 2.5),
        offset=(0.0, 1.0),
        rho=0.2,
    ),
    # The majority buyer: what the upstream model is fit to.
    "buyer": SegmentProfile(
        intent_mean=(0.0, 0.7, -0.4, 0.4),
        intent_std=(0.3, 0.4, 0.2, 0.2),
        noise=(1.0, 1.0, 0.3, 0.5),
        slope=(1.0, 1.0),
        offset=(0.0, 0.0),
        rho=0.0,
    ),
    # Converts on expensive, high-quality items; pCVR misses most of that taste.
    "premium": SegmentProfile(
        intent_mean=(-0.2, 0.0, 1.0, 0.8),
        intent_std=(0.3, 0.4, 0.2, 0.2),
        noise=(1.2, 1.5, 0.3, 0.5),
        slope=(1.0, 0.8),
        offset=(0.0, -0.3),
        rho=0.8,
    ),
    # Converts on cheap items, indifferent to quality; pCVR compressed, noisy, misses part of it.
    "bargain": SegmentProfile(
        intent_mean=(0.1, 0.2, -1.6, 0.0),
        intent_std=(0.3, 0.4, 0.2, 0.2),
        noise=(1.0, 2.0, 0.3, 0.5),
        slope=(1.0, 0.6),
        offset=(0.0, 0.3),
        rho=0.4,
    ),
}


@dataclasses.dataclass
class Catalogue:
    """Items, sorted by category. Arrays are (num_items,); category tables (C,)."""

    category: np.ndarray
    logprice: np.ndarray
    """Centred log price (lp); price = 30 * exp(lp)."""
    price: np.ndarray
    quality: np.ndarray
    attract: np.ndarray
    """Click-bait: raises CTR, lowers CVR."""
    margin: np.ndarray
    cat_start: np.ndarray
    cat_size: np.ndarray
    cat_share: np.ndarray
    """Popularity of each category (sums to 1)."""

    @classmethod
    def build(cls, n: int, rng: np.random.Generator) -> Catalogue:
        c = min(NUM_CATEGORIES, n)
        share = 1.0 / np.arange(1, c + 1) ** 0.8
        share /= share.sum()
        size = np.maximum(1, np.floor(share * n).astype(np.int64))
        size[0] += n - size.sum()
        cat = np.repeat(np.arange(c), size)
        lp = rng.normal(0.0, 0.6, c)[cat] + rng.normal(0.0, 0.7, n)
        lp = (lp - lp.mean()).astype(np.float32)
        margin = 0.18 * np.exp(-0.2 * lp + rng.normal(0, 0.3, n))
        return cls(
            category=cat.astype(np.int64),
            logprice=lp,
            price=(30.0 * np.exp(lp)).astype(np.float32),
            quality=(0.4 * lp + 0.9 * rng.normal(0, 1, n)).astype(np.float32),
            attract=rng.normal(0.0, ATTRACT_SD, n).astype(np.float32),
            margin=np.clip(margin, 0.02, 0.6).astype(np.float32),
            cat_start=np.concatenate([[0], np.cumsum(size)[:-1]]),
            cat_size=size,
            cat_share=share,
        )


@dataclasses.dataclass
class Population:
    """Users: (num_users,) segment, (num_users, 4) intent and its standardised noise,
    (num_users, C) category affinity, request-activity CDF; context projections."""

    segment: np.ndarray
    intent: np.ndarray
    intent_noise: np.ndarray
    affinity: np.ndarray
    activity_cdf: np.ndarray
    mean_intent: np.ndarray
    """(4,) population mean intent (what a model fit to everyone learns)."""
    ctx_segment: np.ndarray
    """(S, D) context direction of each segment (last quarter of D is pure noise)."""
    ctx_intent: np.ndarray
    """(4, D) context direction of each standardised intent dimension."""

    @classmethod
    def build(
        cls,
        cfg: SimulatorConfig,
        profiles: list[SegmentProfile],
        n_categories: int,
        rng: np.random.Generator,
    ) -> Population:
        n, s, d = cfg.num_users, len(profiles), cfg.context_dim
        mix = np.asarray(cfg.segment_mix)
        segment = rng.choice(s, size=n, p=mix)
        mu = np.array([p.intent_mean for p in profiles])
        sd = np.array([p.intent_std for p in profiles])
        noise = rng.normal(0.0, 1.0, (n, 4)).astype(np.float32)
        activity = rng.lognormal(0.0, 1.0, n)
        informative = max(1, math.ceil(0.75 * d))
        ctx_seg, ctx_int = np.zeros((s, d)), np.zeros((4, d))
        ctx_seg[:, :informative] = rng.normal(0, 1 / math.sqrt(informative), (s, informative))
        ctx_int[:, :informative] = rng.normal(0, 0.5 / math.sqrt(informative), (4, informative))
        return cls(
            segment=segment,
            intent=(mu[segment] + sd[segment] * noise).astype(np.float32),
            intent_noise=noise,
            affinity=rng.normal(0.0, 1.0, (n, n_categories)).astype(np.float32),
            activity_cdf=np.cumsum(activity) / activity.sum(),
            mean_intent=(mix @ mu).astype(np.float32),
            ctx_segment=ctx_seg,
            ctx_intent=ctx_int,
        )
