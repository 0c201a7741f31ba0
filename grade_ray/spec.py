"""Config names resolved against a data file's metadata.

:class:`RewardSpec` turns the reward config's label/task *names* into the
index tuples the pure math in ``grade_ray.algos`` takes, checking every name
against the data's :class:`~grade_ray.data.schema.SessionMeta`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from grade_ray.algos.metrics import label_gains, product_gains
from grade_ray.algos.rewards import group_rewards
from grade_ray.config import ConfigError, RewardConfig
from grade_ray.data.schema import SessionMeta


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Reward settings with names resolved to indices (plain values; safe to ship to actors)."""

    k: int
    post_coef: tuple[float, ...]  # (L,) gain per label
    prior_terms: tuple[tuple[tuple[int, ...], float], ...]  # ((task idx...), coef)
    rules: tuple[tuple[int, int], ...]  # (a, b): reward w_a >= w_b
    l1: float
    l2: float
    l3: float
    tau: float
    propensity: tuple[str, float, float, float] = ("none", 1.0, 1.0, 1.0)
    """(kind, scale, power, min) of the logged-position examination model."""

    @classmethod
    def from_config(cls, cfg: RewardConfig, meta: SessionMeta) -> RewardSpec:
        coef = [0.0] * meta.num_labels
        for name, g in cfg.post_gains.items():
            if name not in meta.label_names:
                raise ConfigError(
                    f"reward.post_gains names label {name!r}; labels in this data: "
                    f"{list(meta.label_names)}"
                )
            coef[meta.label_names.index(name)] = float(g)
        terms = []
        for term, c in cfg.prior_gains.items():
            idx = []
            for name in term.split("*"):
                name = name.strip()
                if name not in meta.task_names:
                    raise ConfigError(
                        f"reward.prior_gains term {term!r} names task {name!r}; tasks in this "
                        f"data: {list(meta.task_names)}"
                    )
                idx.append(meta.task_names.index(name))
            terms.append((tuple(idx), float(c)))
        rules = []
        for rule in cfg.format_rules:
            a, b = (r.strip() for r in rule.split(">="))
            for name in (a, b):
                if name not in meta.task_names:
                    raise ConfigError(
                        f"reward.format_rules entry {rule!r} names task {name!r}; tasks in this "
                        f"data: {list(meta.task_names)}"
                    )
            rules.append((meta.task_names.index(a), meta.task_names.index(b)))
        return cls(
            k=cfg.k,
            post_coef=tuple(coef),
            prior_terms=tuple(terms),
            rules=tuple(rules),
            l1=cfg.l1,
            l2=cfg.l2,
            l3=cfg.l3,
            tau=cfg.tau,
            propensity=(
                cfg.propensity,
                cfg.propensity_scale,
                cfg.propensity_power,
                cfg.propensity_min,
            ),
        )

    def post_gain(self, labels: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B, N, L), logged rank position (B, N) -> R_post gains (B, N) >= 0.

        gain = max(sum_l c_l * label_l, 0), divided by the examination propensity
        exam(position) when ``reward.propensity='inverse'`` (inverse propensity scoring:
        feedback on items the logging policy ranked low counts for more).
        """
        coef = torch.tensor(self.post_coef, dtype=labels.dtype)
        gain = label_gains(labels, coef).clamp_min(0)
        kind, scale, power, floor = self.propensity
        if kind == "inverse" and position is not None:
            exam = (1.0 + position.to(gain.dtype) / scale).pow(-power).clamp_min(floor)
            gain = gain / exam
        return gain

    def prior_gain(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, N, K) -> R_prior gains (B, N) >= 0."""
        return product_gains(scores, list(self.prior_terms)).clamp_min(0)

    def group_rewards(
        self,
        scores: torch.Tensor,
        weights: torch.Tensor,
        post_gain: torch.Tensor,
        prior_gain: torch.Tensor,
        mask: torch.Tensor,
        *,
        fusion: str,
        fusion_eps: float,
        l3: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """:func:`grade_ray.algos.rewards.group_rewards` with this spec's k, rules, l1, l2,
        l3 and tau; ``l3`` overrides the format weight (0 scores the ranking alone)."""
        return group_rewards(
            scores,
            weights,
            post_gain,
            prior_gain,
            mask,
            fusion=fusion,
            k=self.k,
            rules=list(self.rules),
            l1=self.l1,
            l2=self.l2,
            l3=self.l3 if l3 is None else l3,
            tau=self.tau,
            fusion_eps=fusion_eps,
        )


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch where possible (read-only arrays are copied)."""
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)
