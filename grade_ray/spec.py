"""Config names resolved against a data file's metadata.

:class:`RewardSpec` turns the reward config's label/task *names* into the
index tuples the pure math in ``grade_ray.algos`` takes, checking every name
against the data's :class:`~grade_ray.data.sessions.SessionMeta`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from grade_ray.algos.calibration import PriorCalibration, apply_calibration
from grade_ray.algos.metrics import label_gains, product_gains
from grade_ray.algos.rewards import FittedDirichlet, group_rewards
from grade_ray.config import ConfigError, RewardConfig
from grade_ray.data.sessions import SessionMeta


@dataclasses.dataclass(frozen=True)
class RewardFit:
    """What the reward learns from the training logs, once per run (``learner.reward_fit``).

    calibration: R_prior's recalibration (``reward.prior_calibration``); post_scale,
    prior_scale: mean IDCG@k of R_post / R_prior gains over training requests, the constant
    that divides DCG@k with ``reward.normalization='dataset'``; format: the Dirichlet R_format
    scores against with ``reward.format_kind='learned'``.
    """

    calibration: PriorCalibration | None = None
    post_scale: float | None = None
    prior_scale: float | None = None
    format: FittedDirichlet | None = None


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
    calibrate: tuple[tuple[str, str], ...] = ()
    """``reward.prior_calibration`` (task, target) pairs; R_prior needs ``calibration`` then."""
    normalization: str = "request"
    """``reward.normalization``: 'request' (NDCG) or 'dataset' (DCG / the fitted scales)."""
    calibration: PriorCalibration | None = None
    post_scale: float | None = None
    prior_scale: float | None = None
    format_kind: str = "rules"
    """``reward.format_kind``: 'rules', 'learned' (scores against ``fitted_format``) or 'none'."""
    fitted_format: FittedDirichlet | None = None

    @classmethod
    def from_config(
        cls, cfg: RewardConfig, meta: SessionMeta, fit: RewardFit | None = None
    ) -> RewardSpec:
        """Names resolved against ``meta``; ``fit`` carries what was learned from the logs
        (needed when the config asks for a calibration or dataset normalization)."""
        fit = fit or RewardFit()
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
        for rule in cfg.format_rules if cfg.format_kind == "rules" else ():
            a, b = (r.strip() for r in rule.split(">="))
            for name in (a, b):
                if name not in meta.task_names:
                    raise ConfigError(
                        f"reward.format_rules entry {rule!r} names task {name!r}; tasks in this "
                        f"data: {list(meta.task_names)}"
                    )
            rules.append((meta.task_names.index(a), meta.task_names.index(b)))
        _check_calibration(cfg, meta)
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
            calibrate=tuple(cfg.prior_calibration.items()),
            normalization=cfg.normalization,
            calibration=fit.calibration if cfg.prior_calibration else None,
            post_scale=fit.post_scale if cfg.normalization == "dataset" else None,
            prior_scale=fit.prior_scale if cfg.normalization == "dataset" else None,
            format_kind=cfg.format_kind,
            fitted_format=fit.format if cfg.format_kind == "learned" else None,
        )

    @property
    def needs_fit(self) -> bool:
        """True when this reward depends on statistics fitted on the training logs."""
        return (
            bool(self.calibrate) or self.normalization == "dataset" or self.format_kind == "learned"
        )

    def examination(self, position: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """Examination propensity (B, N) of each logged rank: (1 + r / scale) ** -power floored
        at min with ``reward.propensity='inverse'``, else (or without positions) ones."""
        kind, scale, power, floor = self.propensity
        if kind != "inverse" or position is None:
            return torch.ones(shape, dtype=torch.float64 if position is None else position.dtype)
        return (1.0 + position / scale).pow(-power).clamp_min(floor)

    def post_gain(self, labels: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B, N, L), logged rank position (B, N) -> R_post gains (B, N) >= 0.

        gain = max(sum_l c_l * label_l, 0), divided by the examination propensity
        exam(position) when ``reward.propensity='inverse'`` (inverse propensity scoring:
        feedback on items the logging policy ranked low counts for more).
        """
        coef = torch.tensor(self.post_coef, dtype=labels.dtype)
        gain = label_gains(labels, coef).clamp_min(0)
        if self.propensity[0] == "inverse" and position is not None:
            gain = gain / self.examination(position.to(gain.dtype), gain.shape)
        return gain

    def prior_gain(self, scores: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """scores (B, N, K), context (B, D) -> R_prior gains (B, N) >= 0.

        With ``reward.prior_calibration`` the probability predictions are recalibrated per
        context first (the context is required then)."""
        if self.calibrate:
            if self.calibration is None:
                raise ConfigError(
                    "reward.prior_calibration is set but no calibration was fitted for this "
                    "reward (training fits it into RUN_DIR/reward_fit.pt)"
                )
            if context is None:
                raise ValueError("a calibrated R_prior needs the requests' context")
            scores = apply_calibration(scores, context, self.calibration)
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
        item_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:func:`grade_ray.algos.rewards.group_rewards` with this spec's k, rules, l1, l2,
        l3, tau and normalization; ``l3`` overrides the format weight (0: the ranking alone)."""
        if self.normalization == "dataset" and not (self.post_scale and self.prior_scale):
            raise ConfigError(
                "reward.normalization='dataset' needs the scales fitted on the training logs "
                "(training fits them into RUN_DIR/reward_fit.pt)"
            )
        l3 = self.l3 if l3 is None else l3
        kind = self.format_kind
        if kind == "learned" and self.fitted_format is None:
            if l3 != 0:
                raise ConfigError(
                    "reward.format_kind='learned' needs the Dirichlet fitted on the training "
                    "logs (training fits it into RUN_DIR/reward_fit.pt)"
                )
            kind = "none"  # the ranking alone (l3 = 0, e.g. a yardstick): no fit needed
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
            l3=l3,
            tau=self.tau,
            fusion_eps=fusion_eps,
            post_scale=self.post_scale,
            prior_scale=self.prior_scale,
            format_kind=kind,
            fitted=self.fitted_format,
            item_weights=item_weights,
        )

    def iter_grid_rewards(
        self,
        batch,
        weights: torch.Tensor,
        *,
        fusion: str,
        fusion_eps: float,
        l3: float = 0.0,
        chunk: int = 256,
    ):
        """Yield (b, P) composite rewards of ``chunk`` requests of ``batch`` (a
        :class:`grade_ray.data.sessions.SessionBatch`) at a time, each under every weight
        vector of ``weights`` (P, K), with ``l3`` as :meth:`group_rewards` takes it."""
        for s in range(0, len(batch), chunk):
            b = batch.slice(s, min(s + chunk, len(batch)))
            scores = as_tensor(b.scores)
            yield self.group_rewards(
                scores,
                weights.expand(len(b), *weights.shape),
                self.post_gain(as_tensor(b.labels), as_tensor(b.position)),
                self.prior_gain(scores, as_tensor(b.context)),
                as_tensor(b.mask),
                fusion=fusion,
                fusion_eps=fusion_eps,
                l3=l3,
            )["reward"]


def _check_calibration(cfg: RewardConfig, meta: SessionMeta) -> None:
    """Every ``reward.prior_calibration`` entry names a probability task and logged labels."""
    for task, target in cfg.prior_calibration.items():
        if task not in meta.task_names or meta.task_kinds[meta.task_names.index(task)] != "prob":
            probs = [n for n, k in zip(meta.task_names, meta.task_kinds) if k == "prob"]
            raise ConfigError(
                f"reward.prior_calibration names task {task!r}; probability tasks in this data: "
                f"{probs}"
            )
        for label in target.split("|"):
            if label.strip() not in meta.label_names:
                raise ConfigError(
                    f"reward.prior_calibration.{task} names label {label.strip()!r}; labels in "
                    f"this data: {list(meta.label_names)}"
                )


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch where possible (read-only arrays are copied)."""
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)
