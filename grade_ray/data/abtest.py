"""The simulator's paired online A/B test: arms ranked on the same fresh requests.

Every arm (name -> fused scores (B, N)) ranks the same requests; outcomes are
the simulator's *expected* feedback given each ranking (no click/order sampling
noise), lifts are relative to a control arm, and 95% confidence intervals come
from one paired bootstrap over requests (the same resample for every arm).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from grade_ray.data.sessions import SessionBatch
from grade_ray.data.simulator import OUTCOME_KEYS, MarketplaceSimulator, Truth

AB_METRICS = ("ctr", "cvr", "opm", "gpm", "profit_pm", "orders", "north_star")


@dataclasses.dataclass
class ABReport:
    """A paired A/B test. Arrays are (A, M): arms x :data:`AB_METRICS`.

    ``value`` and the lifts use *expected* outcomes given the shown requests
    (Rao-Blackwellised: no click/order sampling noise); ``ci_low``/``ci_high``
    are a 95% paired bootstrap over requests of the relative lift over the
    control. ``sampled_value``/``sampled_lift`` use sampled feedback with common
    random numbers across arms, as a realism check. Metrics: ctr =
    clicks/impressions, cvr = orders/clicks, opm/gpm/profit_pm per 1000
    impressions, orders and north_star per request.
    """

    arms: tuple[str, ...]
    control: str
    value: np.ndarray
    lift: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    sampled_value: np.ndarray
    sampled_lift: np.ndarray
    num_requests: int
    bootstrap: int
    north_star: np.ndarray
    """(A, B) expected north-star of each request under each arm (per-segment breakdowns)."""
    metrics: tuple[str, ...] = AB_METRICS

    def row(self, arm: str, metric: str) -> dict:
        """One arm's result on one metric."""
        a, m = self.arms.index(arm), self.metrics.index(metric)
        return {
            "arm": arm,
            "metric": metric,
            "value": float(self.value[a, m]),
            "lift": float(self.lift[a, m]),
            "ci_low": float(self.ci_low[a, m]),
            "ci_high": float(self.ci_high[a, m]),
            "significant": bool(self.ci_low[a, m] > 0 or self.ci_high[a, m] < 0),
            "sampled_value": float(self.sampled_value[a, m]),
            "sampled_lift": float(self.sampled_lift[a, m]),
        }

    def to_rows(self) -> list[dict]:
        return [self.row(a, m) for a in self.arms for m in self.metrics]

    def to_markdown(self) -> str:
        lines = [
            f"A/B test: {self.num_requests} requests, control `{self.control}`, "
            f"95% paired bootstrap CI ({self.bootstrap} resamples) on expected outcomes",
            "",
            "| arm | metric | value | lift | 95% CI | sampled value |",
            "|---|---|---:|---:|---|---:|",
        ]
        for r in self.to_rows():
            ci = "" if r["arm"] == self.control else f"[{r['ci_low']:+.2%}, {r['ci_high']:+.2%}]"
            star = "*" if r["significant"] else ""
            lines.append(
                f"| {r['arm']} | {r['metric']} | {r['value']:.5g} | {r['lift']:+.2%}{star} | "
                f"{ci} | {r['sampled_value']:.5g} |"
            )
        return "\n".join(lines)


def _metrics(sums: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """sums (..., 6) over :data:`OUTCOME_KEYS` -> (..., 7) :data:`AB_METRICS`."""
    imp, clicks, orders, gmv, profit, ns = np.moveaxis(sums, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = [
            clicks / imp,
            orders / clicks,
            1000 * orders / imp,
            1000 * gmv / imp,
            1000 * profit / imp,
            orders / n,
            ns / n,
        ]
    return np.stack(out, axis=-1)


def ab_test(
    sim: MarketplaceSimulator,
    batch: SessionBatch,
    truth: Truth,
    arms: dict[str, np.ndarray],
    control: str,
    seed: int,
    bootstrap: int = 200,
) -> ABReport:
    """Paired A/B test of arms (name -> fused scores (B, N)) on the same requests.

    Point estimates and CIs use expected outcomes; the bootstrap resamples
    requests (the same resample for every arm).
    """
    if control not in arms:
        raise ValueError(f"control {control!r} is not an arm; arms: {list(arms)}")
    names = tuple(arms)
    exp = np.stack(
        [_outcome_matrix(sim.expected_outcomes(batch, truth, arms[a])) for a in names]
    )  # (A, B, 6)
    smp = np.stack(
        [_outcome_matrix(sim.sample_outcomes(batch, truth, arms[a], seed)) for a in names]
    )
    b, c = len(batch), names.index(control)
    value = _metrics(exp.sum(1), b)
    sampled = _metrics(smp.sum(1), b)
    rng = np.random.default_rng(np.random.SeedSequence([sim.cfg.seed, 5, seed]))
    counts = np.stack([np.bincount(rng.integers(0, b, b), minlength=b) for _ in range(bootstrap)])
    boot = _metrics(np.einsum("rb,abq->raq", counts.astype(np.float64), exp), b)  # (R, A, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_lift = boot / boot[:, c : c + 1] - 1
        lift, s_lift = value / value[c] - 1, sampled / sampled[c] - 1
    lo, hi = np.nanpercentile(boot_lift, [2.5, 97.5], axis=0)
    return ABReport(
        arms=names,
        control=control,
        value=value,
        lift=lift,
        ci_low=lo,
        ci_high=hi,
        sampled_value=sampled,
        sampled_lift=s_lift,
        num_requests=b,
        bootstrap=bootstrap,
        north_star=exp[..., OUTCOME_KEYS.index("north_star")],
    )


def _outcome_matrix(out: dict[str, np.ndarray]) -> np.ndarray:
    """Outcome dict -> (B, 6) in :data:`OUTCOME_KEYS` order."""
    return np.stack([out[k] for k in OUTCOME_KEYS], -1)
