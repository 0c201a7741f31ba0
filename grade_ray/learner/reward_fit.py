"""What the reward learns from the training logs, once per run (``RUN_DIR/reward_fit.pt``).

- ``reward.normalization='dataset'``: the mean IDCG@k of R_post and R_prior gains over
  the training requests (the constants DCG@k is divided by);
- ``reward.prior_calibration``: R_prior's context-aware recalibration;
- ``reward.format_kind='learned'``: the Dirichlet R_format scores against
  (``grade_ray.learner.format_fit``, on the first ``format_fit.MAX_REQUESTS`` requests).

For each calibration mapping ``task: label`` (or ``task: label|given``) the calibration of
``grade_ray.algos.calibration`` is fitted by maximum likelihood on the logged
candidates: P(label) = exam(position) * sigmoid(logit p'), with the examination
propensity of R_post (``reward.propensity``) for unconditional labels, and
P(label | given) = sigmoid(logit p') on the candidates where ``given`` fired
(``cvr: order|click``: conversion among clicked items). Fitted once per run on up
to :data:`MAX_REQUESTS` training requests, saved as ``RUN_DIR/calibration.pt``
and shipped to rollout actors inside the reward spec.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from grade_ray.algos.calibration import (
    PriorCalibration,
    calibrated_logit,
    calibration_features,
    identity_coef,
)
from grade_ray.algos.metrics import ideal_dcg_at_k
from grade_ray.algos.rewards import FittedDirichlet
from grade_ray.config import Config, ConfigError
from grade_ray.data.reading import read_sessions
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.learner import format_fit
from grade_ray.runlog import CheckpointError, load_checkpoint, save_atomic
from grade_ray.spec import RewardFit, RewardSpec, as_tensor

log = logging.getLogger(__name__)

REWARD_FIT_FILE = "reward_fit.pt"
MAX_REQUESTS = 50_000
"""Training requests the fit uses (the first ones, in file order)."""
MAX_ENTRIES = 2_000_000
"""Most candidate entries per task's fit (whole requests, in order)."""
L2 = 1e-3
"""Ridge penalty on the distance from the identity calibration (rare labels stay put)."""


def parse_target(expr: str) -> tuple[str, str | None]:
    """'order|click' -> ('order', 'click'); 'click' -> ('click', None)."""
    label, _, given = (s.strip() for s in expr.partition("|"))
    return label, (given or None)


def _nll(eta: torch.Tensor, y: torch.Tensor, log_exam: torch.Tensor) -> torch.Tensor:
    """Mean -log-likelihood of y ~ Bernoulli(exam * sigmoid(eta)) (all (R,))."""
    log_p = log_exam + torch.nn.functional.logsigmoid(eta)
    log1m_exam = torch.log((-torch.expm1(log_exam)).clamp_min(0.0))  # log(1 - exam), -inf at 1
    log_q = torch.logaddexp(torch.zeros_like(eta), eta + log1m_exam) - torch.nn.functional.softplus(
        eta
    )
    return -(y * log_p + (1 - y) * log_q).mean()


def _fit_task(
    p: torch.Tensor,
    v: torch.Tensor,
    zf: torch.Tensor,
    y: torch.Tensor,
    log_exam: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Coefficients (2 + V, D + 1) maximising the likelihood on the entries ``rows`` (B, N)."""
    ident = identity_coef(v.shape[-1], zf.shape[1] - 1)
    coef = ident.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([coef], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        eta = calibrated_logit(p, v, zf, coef)[rows]
        loss = _nll(eta, y[rows], log_exam[rows]) + L2 * (coef - ident).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return coef.detach()


def _limit(rows: torch.Tensor) -> torch.Tensor:
    """Keep whole requests, in order, until MAX_ENTRIES entries."""
    keep = torch.cumsum(rows.sum(1), 0) <= MAX_ENTRIES
    keep[0] = True
    return rows & keep[:, None]


def fit_prior_calibration(
    cfg: Config, batch: SessionBatch, meta: SessionMeta
) -> PriorCalibration | None:
    """Fit ``reward.prior_calibration`` on logged requests (None when it is empty)."""
    mapping = dict(cfg.reward.prior_calibration)
    if not mapping:
        return None
    spec = RewardSpec.from_config(cfg.reward, meta)  # checks every name
    scores = as_tensor(batch.scores).double()
    context = as_tensor(batch.context).double()
    mask = as_tensor(batch.mask).bool()
    labels = as_tensor(batch.labels).double()
    value_tasks = tuple(i for i, kind in enumerate(meta.task_kinds) if kind == "value")
    z_mean, z_std = context.mean(0), context.std(0)
    z_std = torch.where(z_std > 1e-6, z_std, torch.ones_like(z_std))
    logv = torch.log(scores[..., list(value_tasks)].clamp_min(1e-6))
    v_mean = logv[mask].mean(0) if value_tasks else torch.zeros(0, dtype=torch.float64)
    cal = PriorCalibration(
        tasks=(),
        value_tasks=value_tasks,
        coef=(),
        z_mean=tuple(z_mean.tolist()),
        z_std=tuple(z_std.tolist()),
        v_mean=tuple(v_mean.tolist()),
    )
    zf, v = calibration_features(scores, context, cal)
    log_exam_all = torch.log(spec.examination(as_tensor(batch.position).double(), mask.shape))
    tasks, coefs = [], []
    for task, expr in mapping.items():
        label, given = parse_target(expr)
        k, lab = meta.task_names.index(task), meta.label_names.index(label)
        rows = mask if given is None else mask & (labels[..., meta.label_names.index(given)] > 0)
        rows = _limit(rows)
        log_exam = log_exam_all if given is None else torch.zeros_like(log_exam_all)
        y = (labels[..., lab] > 0).double()
        ident = identity_coef(len(value_tasks), zf.shape[1] - 1)
        coef = _fit_task(scores[..., k], v, zf, y, log_exam, rows)
        before, after = (
            _nll(calibrated_logit(scores[..., k], v, zf, c)[rows], y[rows], log_exam[rows])
            for c in (ident, coef)
        )
        log.info(
            "prior calibration %s ~ %s on %d entries: log-loss %.5f -> %.5f",
            task,
            expr,
            int(rows.sum()),
            float(before),
            float(after),
        )
        tasks.append(k)
        coefs.append(tuple(tuple(r) for r in coef.tolist()))
    return PriorCalibration(
        tuple(tasks), value_tasks, tuple(coefs), cal.z_mean, cal.z_std, cal.v_mean
    )


def fit_reward(cfg: Config, train_path: str | Path, meta: SessionMeta) -> RewardFit:
    """Everything ``cfg.reward`` needs from the training logs (an empty fit when nothing)."""
    spec = RewardSpec.from_config(cfg.reward, meta)  # checks every name
    if not spec.needs_fit:
        return RewardFit()
    batch, _, _ = read_sessions(train_path, on_error=cfg.data.on_error, max_rows=MAX_REQUESTS)
    cal = fit_prior_calibration(cfg, batch, meta)
    fit = RewardFit(calibration=cal)
    if cfg.reward.normalization == "dataset":
        fit = _fit_scales(cfg, batch, meta, fit)
    if cfg.reward.format_kind == "learned":
        spec = RewardSpec.from_config(cfg.reward, meta, fit)
        head = batch.slice(0, min(len(batch), format_fit.MAX_REQUESTS))
        fitted = format_fit.fit_format(spec, head, cfg.policy.fusion, cfg.policy.fusion_eps)
        fit = dataclasses.replace(fit, format=fitted)
    return fit


def _fit_scales(cfg: Config, batch: SessionBatch, meta: SessionMeta, fit: RewardFit) -> RewardFit:
    """``fit`` with the mean IDCG@k of R_post and R_prior gains over ``batch``."""
    spec = RewardSpec.from_config(cfg.reward, meta, fit)
    mask = as_tensor(batch.mask).bool()
    post = spec.post_gain(as_tensor(batch.labels), as_tensor(batch.position))
    prior = spec.prior_gain(as_tensor(batch.scores), as_tensor(batch.context))
    scales = [
        float(ideal_dcg_at_k(torch.where(mask, g, 0.0), mask, spec.k).mean()) for g in (post, prior)
    ]
    for name, s in zip(("R_post", "R_prior"), scales):
        if not s > 0:
            raise ConfigError(
                f"reward.normalization='dataset': {name} has no positive gain in the first "
                f"{len(batch)} training requests; use reward.normalization=request"
            )
    log.info("reward scales (mean IDCG@%d): R_post %.4g, R_prior %.4g", spec.k, *scales)
    return dataclasses.replace(fit, post_scale=scales[0], prior_scale=scales[1])


def _cal_state(cal: PriorCalibration | None) -> dict | None:
    if cal is None:
        return None
    return {
        "tasks": list(cal.tasks),
        "value_tasks": list(cal.value_tasks),
        "coef": torch.tensor(cal.coef, dtype=torch.float64),
        "z_mean": torch.tensor(cal.z_mean, dtype=torch.float64),
        "z_std": torch.tensor(cal.z_std, dtype=torch.float64),
        "v_mean": torch.tensor(cal.v_mean, dtype=torch.float64),
    }


def _cal_from_state(c: dict | None) -> PriorCalibration | None:
    if c is None:
        return None
    return PriorCalibration(
        tuple(int(t) for t in c["tasks"]),
        tuple(int(t) for t in c["value_tasks"]),
        tuple(tuple(tuple(r) for r in m) for m in c["coef"].tolist()),
        tuple(c["z_mean"].tolist()),
        tuple(c["z_std"].tolist()),
        tuple(c["v_mean"].tolist()),
    )


def _format_for(cfg: Config) -> list | None:
    """What a learned format fit depends on besides the reward config (the fusion)."""
    if cfg.reward.format_kind != "learned":
        return None
    return [cfg.policy.fusion, cfg.policy.fusion_eps]


def _format_state(f: FittedDirichlet | None) -> dict | None:
    if f is None:
        return None
    return {
        "alpha": torch.tensor(f.alpha, dtype=torch.float64),
        "ref_logpdf": torch.tensor(f.ref_logpdf, dtype=torch.float64),
    }


def _format_from_state(f: dict | None) -> FittedDirichlet | None:
    if f is None:
        return None
    return FittedDirichlet(tuple(f["alpha"].tolist()), tuple(f["ref_logpdf"].tolist()))


def save_reward_fit(path: str | Path, fit: RewardFit, cfg: Config) -> None:
    """Write the fit with the reward config it was made for (safe to load)."""
    state = {
        "reward": cfg.to_dict()["reward"],
        "calibration": _cal_state(fit.calibration),
        "post_scale": fit.post_scale,
        "prior_scale": fit.prior_scale,
        "format": _format_state(fit.format),
        "format_for": _format_for(cfg),
    }
    save_atomic(path, state)


def load_reward_fit(path: str | Path, cfg: Config) -> RewardFit:
    """The fit saved at ``path``; raises ConfigError if it was made for another reward config."""
    state = load_checkpoint(path)
    if state["reward"] != cfg.to_dict()["reward"] or state["format_for"] != _format_for(cfg):
        raise ConfigError(f"{path} was fitted for another reward config; delete it to refit")
    return RewardFit(
        _cal_from_state(state["calibration"]),
        state["post_scale"],
        state["prior_scale"],
        _format_from_state(state["format"]),
    )


def run_reward_fit(cfg: Config, train_path: str | Path, meta: SessionMeta) -> RewardFit:
    """RUN_DIR/reward_fit.pt if it matches the reward config, else fitted and saved."""
    path = Path(cfg.run_dir) / REWARD_FIT_FILE
    if path.exists():
        try:
            return load_reward_fit(path, cfg)
        except ConfigError:
            log.info("refitting %s: the reward config changed", path)
        except CheckpointError as e:  # damaged: it is a cache of a deterministic fit
            log.warning("refitting %s: %s", path, e)
    fit = fit_reward(cfg, train_path, meta)
    save_reward_fit(path, fit, cfg)
    return fit


def reward_spec(cfg: Config, meta: SessionMeta, train_path: str | Path) -> RewardSpec:
    """The run's full reward: names resolved, what it fits on the logs loaded or fitted."""
    return RewardSpec.from_config(cfg.reward, meta, run_reward_fit(cfg, train_path, meta))
