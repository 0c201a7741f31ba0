"""Configuration: frozen dataclasses <-> YAML, with dotted command-line overrides.

``load_config(["configs/smoke.yaml"], ["exploration.group_size=10"])`` starts from
the dataclass defaults, merges each YAML file in order (a file may name a
``base:`` file it extends, relative to itself), then the overrides. Unknown
keys raise an error listing the valid ones. Cross-field checks live in each
section's ``__post_init__`` and say how to fix the value.

This module is longer than the ~600 lines we aim for on purpose: it is the one place
that lists every key with its default, type and docstring (``configs/base.yaml``
mirrors it section by section), and splitting the sections over files would
scatter that reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """Base of the errors whose message is written for the user: what is wrong, where (file,
    row, column or config key) and how to fix it. Raised where the problem is found and
    caught once, in the CLI's ``main``, which prints the message on one line."""


def error_brief(e: BaseException) -> str:
    """First line of an exception's message (at most 200 characters; the exception's type
    when it has none), for one-line user errors."""
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__) or type(e).__name__


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """The built-in marketplace simulator (``grade-ray simulate``)."""

    seed: int = 0
    """Master seed: same seed, same users, items, requests and feedback."""
    num_requests: int = 100_000
    """Logged requests to generate for training."""
    num_eval_requests: int = 20_000
    """Held-out logged requests (later days, same users) for offline evaluation."""
    num_users: int = 20_000
    """Distinct users; each request picks one."""
    num_items: int = 50_000
    """Size of the item catalogue."""
    num_candidates: int = 100
    """Candidates per request (the longest list)."""
    min_candidates: int = 100
    """Shortest candidate list; < num_candidates gives variable-length requests."""
    context_dim: int = 16
    """Observed context features per request (reveal the user's segment only partly)."""
    segment_names: tuple[str, ...] = ("browser", "buyer", "premium", "bargain")
    """Latent user segments."""
    segment_mix: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    """Probability of each segment in the user population (sums to 1)."""
    context_signal: float = 1.5
    """How strongly context features reveal segment and intent (0 = not at all)."""
    prediction_noise: float = 0.25
    """Base noise (log scale) of the upstream model's predictions (times a segment/task factor)."""
    miscalibration: float = 1.0
    """Scale of the upstream model's segment- and task-specific errors: logit calibration slope
    and offset, and the share of users' own price/quality taste pCVR misses (0 = calibrated)."""
    logging_weights: tuple[float, ...] = (0.5, 0.3, 0.1, 0.1)
    """Static production log-product weights of the logging policy (pctr, pcvr, pgmv, pprofit)."""
    logging_noise: float = 0.05
    """Std of the per-request noise added to the logging weights before renormalising."""
    num_days: int = 7
    """Days the training logs span (request ``ts`` grows with the request index)."""
    rows_per_shard: int = 50_000
    """Rows per Parquet shard; bounds generator memory."""
    north_star: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"click": 1.0, "order": 10.0}
    )
    """North-star business value as gains over labels (same gains as the default R_post)."""

    def __post_init__(self) -> None:
        _check(self.num_requests > 0, "simulator.num_requests must be > 0")
        _check(self.num_eval_requests > 0, "simulator.num_eval_requests must be > 0")
        _check(
            self.num_users > 0 and self.num_items > 0, "simulator.num_users/num_items must be > 0"
        )
        _check(
            1 <= self.min_candidates <= self.num_candidates,
            f"simulator.min_candidates={self.min_candidates} must be in "
            f"[1, num_candidates={self.num_candidates}]",
        )
        _check(
            self.num_items >= self.num_candidates, "simulator.num_items must be >= num_candidates"
        )
        _check(
            len(self.segment_mix) == len(self.segment_names),
            f"simulator.segment_mix needs one probability per segment {self.segment_names}",
        )
        _check(
            abs(sum(self.segment_mix) - 1.0) < 1e-6 and min(self.segment_mix) >= 0,
            f"simulator.segment_mix={self.segment_mix} must be >= 0 and sum to 1",
        )
        _check(
            len(self.logging_weights) == 4
            and min(self.logging_weights) >= 0
            and sum(self.logging_weights) > 0,
            "simulator.logging_weights needs 4 non-negative weights (pctr, pcvr, pgmv, pprofit), "
            "not all zero",
        )
        _check(self.context_dim >= 1, "simulator.context_dim must be >= 1")
        _check(
            min(self.context_signal, self.prediction_noise, self.miscalibration, self.logging_noise)
            >= 0,
            "simulator.context_signal/prediction_noise/miscalibration/logging_noise must be >= 0",
        )
        _check(bool(self.north_star), "simulator.north_star is empty: give gains over labels")
        _check(self.rows_per_shard > 0, "simulator.rows_per_shard must be > 0")
        _check(self.num_days >= 1, "simulator.num_days must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where logged sessions come from and how bad rows are handled."""

    train_path: str = ""
    """Training sessions (file or directory); empty = simulate into RUN_DIR/data/train."""
    eval_path: str = ""
    """Held-out sessions; empty = simulate into RUN_DIR/data/eval."""
    on_error: str = "raise"
    """Bad rows: ``raise`` (stop with file/row/column) or ``reject`` (set aside, counted)."""
    batch_size: int = 2048
    """Rows per read batch."""
    cache: bool = True
    """Write the training rows, decoded, once per run (Arrow IPC) for rollout workers to
    memory-map instead of decoding Parquet every round (see ``data.plan.DecodedCache``)."""
    cache_dir: str = ""
    """Where that cache goes; empty = RUN_DIR/decoded. Set a shared folder to reuse it
    across runs and sweep trials (it is keyed by each file's path, size and mtime)."""
    max_candidates: int = 1000
    """Longest candidate list a request may have; longer ones are bad rows (an error, or
    rejected with ``on_error=reject``). Bounds the memory one request can take."""

    def __post_init__(self) -> None:
        _check(
            self.on_error in ("raise", "reject"),
            f"data.on_error={self.on_error!r}: use 'raise' or 'reject'",
        )
        _check(self.batch_size > 0, "data.batch_size must be > 0")
        _check(self.max_candidates >= 1, "data.max_candidates must be >= 1")


FORMAT_KINDS = ("rules", "learned", "none")
"""``reward.format_kind`` values (the R_format variants of ``grade_ray.algos.rewards.FORMATS``)."""
FUSION_FORMS = ("linear", "log_product")
"""``policy.fusion`` values (``grade_ray.algos.fusion.FUSIONS``)."""
EXPLORATION_KINDS = ("dirichlet", "gaussian")
"""``exploration.kind`` values (``grade_ray.algos.exploration.EXPLORATIONS``)."""
ALPHA_SCHEDULES = ("cosine", "linear", "constant")
"""``exploration.schedule`` values (``grade_ray.algos.exploration.SCHEDULES``)."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """R = l1 * R_post + l2 * R_prior + l3 * R_format (format gated on l1*R_post + l2*R_prior >= tau)."""

    k: int = 10
    """NDCG cut-off."""
    post_gains: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"click": 1.0, "order": 10.0}
    )
    """R_post gain per observed label (label name -> gain), e.g. order > click."""
    prior_gains: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"ctr": 1.0, "ctr*cvr": 10.0}
    )
    """R_prior gain: products of predicted tasks ('ctr*cvr') -> coefficient."""
    normalization: str = "dataset"
    """How R_post and R_prior scale DCG@k: 'request' (NDCG: each request's own ideal DCG, the
    paper) or 'dataset' (one constant, the mean ideal DCG over the training logs: requests
    weigh by the value of their feedback, as in a summed business metric)."""
    prior_calibration: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"ctr": "click", "cvr": "order|click"}
    )
    """Recalibrate R_prior's probability predictions on the logged labels, per context: task ->
    label it predicts, 'label|given' for a conditional rate (e.g. {ctr: click, cvr:
    'order|click'}); empty = R_prior uses the raw predictions (see learner/reward_fit.py)."""
    format_kind: str = "rules"
    """What R_format scores: 'rules' (the share of ``format_rules`` satisfied), 'learned' (how
    typical w is of a Dirichlet fitted to the weights that rank the training logs best; see
    learner/format_fit.py) or 'none' (R_format = 0: no format term)."""
    format_rules: tuple[str, ...] = ("ctr>=gmv", "ctr>=profit")
    """Weight-hierarchy rules 'a>=b' over task names (format_kind='rules'); R_format = share
    satisfied."""
    propensity: str = "inverse"
    """Position-bias correction of R_post gains: 'none' or 'inverse' (IPS: gain / exam(rank))."""
    propensity_scale: float = 5.0
    """'inverse': exam(r) = (1 + r / scale) ** -power for logged rank r (0-based)."""
    propensity_power: float = 1.0
    """'inverse': exponent of the examination curve."""
    propensity_min: float = 0.05
    """'inverse': exam(r) is floored here (caps IPS weights at 1/propensity_min)."""
    l1: float = 1.0
    """Weight of R_post."""
    l2: float = 0.3
    """Weight of R_prior."""
    l3: float = 0.05
    """Weight of R_format."""
    tau: float = 0.4
    """Gate: R_format counts only when l1*R_post + l2*R_prior >= tau."""

    def __post_init__(self) -> None:
        _check(self.k >= 1, "reward.k must be >= 1")
        _check(min(self.l1, self.l2, self.l3) >= 0, "reward.l1/l2/l3 must be >= 0")
        _check(self.l1 + self.l2 > 0, "reward.l1 + reward.l2 must be > 0 (no ranking signal)")
        _check(
            bool(self.post_gains) or self.l1 == 0,
            "reward.post_gains is empty: give label gains or set reward.l1=0",
        )
        _check(
            bool(self.prior_gains) or self.l2 == 0,
            "reward.prior_gains is empty: give task gains or set reward.l2=0",
        )
        _check(
            self.propensity in ("none", "inverse"),
            f"reward.propensity={self.propensity!r}: use 'none' or 'inverse'",
        )
        _check(
            self.propensity_scale > 0
            and self.propensity_power >= 0
            and 0 < self.propensity_min <= 1,
            "reward.propensity_scale must be > 0, propensity_power >= 0, propensity_min in (0, 1]",
        )
        _check(self.tau >= 0, "reward.tau must be >= 0")
        _check(
            self.normalization in ("request", "dataset"),
            f"reward.normalization={self.normalization!r}: use 'request' or 'dataset'",
        )
        for task, target in self.prior_calibration.items():
            parts = target.split("|")
            _check(
                1 <= len(parts) <= 2 and all(s.strip() for s in parts),
                f"reward.prior_calibration.{task}={target!r}: use a label name, or "
                "'label|given' for a rate among candidates where 'given' fired",
            )
        _check(
            self.format_kind in FORMAT_KINDS,
            f"reward.format_kind={self.format_kind!r}: use one of {list(FORMAT_KINDS)}",
        )
        for rule in self.format_rules:
            _check(
                len(rule.split(">=")) == 2 and all(rule.split(">=")),
                f"reward.format_rules entry {rule!r} must look like 'cvr>=ctr'",
            )


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The MMoE-like policy network pi_theta(x) on the simplex."""

    fusion: str = "log_product"
    """Fusion form: 'linear' or 'log_product'."""
    fusion_eps: float = 1e-6
    """eps in log(p + eps)."""
    num_experts: int = 4
    """Shared experts."""
    expert_hidden: int = 64
    """Hidden width of each expert MLP."""
    dropout: float = 0.0
    """Dropout in experts."""
    kind: str = "context"
    """'context': one weight vector per request from its context (item-agnostic, GRADE);
    'item_aware': plus a per-request modulation c(x) that adjusts the weights per candidate by
    its standardized log-scores (grade_ray.models.item_aware)."""
    modulation_sigma: float = 0.1
    """item_aware only: std of Stage 2's Gaussian exploration of the modulation c (0.1 beat
    0.3 on the default, miscalibrated and weak_context worlds: more noise on c drowns the
    request weights' signal in the group rewards)."""

    def __post_init__(self) -> None:
        _check(
            self.num_experts >= 1 and self.expert_hidden >= 1,
            "policy.num_experts and policy.expert_hidden must be >= 1",
        )
        _check(
            self.kind in ("context", "item_aware"),
            f"policy.kind must be 'context' or 'item_aware', got {self.kind!r}",
        )
        _check(
            self.fusion in FUSION_FORMS,
            f"policy.fusion={self.fusion!r}: use one of {list(FUSION_FORMS)}",
        )
        _check(self.modulation_sigma > 0, "policy.modulation_sigma must be > 0")
        _check(0 <= self.dropout < 1, "policy.dropout must be in [0, 1)")
        _check(self.fusion_eps > 0, "policy.fusion_eps must be > 0 (log(p + eps) at p = 0)")


@dataclasses.dataclass(frozen=True)
class ExplorationConfig:
    """How Stage 2 samples G weight vectors per request around pi_old."""

    kind: str = "dirichlet"
    """'dirichlet' (alpha = alpha_hat_t * pi) or 'gaussian' (noise on logits)."""
    group_size: int = 20
    """G: weight vectors sampled per request."""
    alpha_start: float = 5.0
    """alpha_hat at the start of training (small = explore)."""
    alpha_end: float = 15.0
    """alpha_hat at the end of training (large = exploit)."""
    schedule: str = "cosine"
    """alpha_hat schedule over training progress: 'cosine', 'linear' or 'constant'."""
    alpha_floor: float = 0.05
    """Per-component floor on the Dirichlet concentration (keeps log-probs finite)."""
    sigma: float = 0.5
    """Std of the logit noise for 'gaussian' exploration."""

    def __post_init__(self) -> None:
        _check(
            self.group_size >= 2, "exploration.group_size must be >= 2 (advantages need a group)"
        )
        _check(self.alpha_start > 0 and self.alpha_end > 0, "exploration.alpha_* must be > 0")
        _check(self.alpha_floor > 0, "exploration.alpha_floor must be > 0")
        _check(
            self.kind in EXPLORATION_KINDS,
            f"exploration.kind={self.kind!r}: use one of {list(EXPLORATION_KINDS)}",
        )
        _check(
            self.schedule in ALPHA_SCHEDULES,
            f"exploration.schedule={self.schedule!r}: use one of {list(ALPHA_SCHEDULES)}",
        )
        _check(self.sigma > 0, "exploration.sigma must be > 0")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Stage 1: supervised learning-to-rank (LambdaLoss) on logged feedback."""

    epochs: int = 2
    """Passes over the training logs (0 skips Stage 1)."""
    lr: float = 3e-3
    """Adam learning rate."""
    batch_size: int = 512
    """Requests per gradient step."""
    temperature: float = 1.0
    """Scale of fused scores inside LambdaLoss."""
    logit_bound: float = 8.0
    """Largest spread of the policy's logits (max - min over tasks) Stage 1 may reach before a
    quadratic penalty (0 = off): keeps the softmax out of saturation at one task, where Stage
    2 has no gradient (8 allows weight ratios up to e^8 ~ 3000)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "pretrain.epochs must be >= 0 (0 skips Stage 1)")
        _check(self.lr > 0, f"pretrain.lr={self.lr} must be > 0 (e.g. 3e-3)")
        _check(self.batch_size >= 1, "pretrain.batch_size must be >= 1")
        _check(self.temperature > 0, "pretrain.temperature must be > 0")
        _check(self.logit_bound >= 0, "pretrain.logit_bound must be >= 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Stage 2: critic-free group-relative policy optimisation."""

    rounds: int = 4
    """Training rounds (reference policy re-synced at the start of each)."""
    data_passes: int = 1
    """Passes over the training logs; the logs are cut into rounds/data_passes time windows."""
    requests_per_round: int = 0
    """Cap on requests per round (0 = the whole time window)."""
    lr: float = 1e-3
    """Adam learning rate."""
    clip_eps: float = 0.2
    """PPO-style ratio clip epsilon."""
    beta: float = 0.01
    """Weight of KL(pi_theta || pi_ref)."""
    kl_estimator: str = "exact"
    """'exact' (closed-form for the exploration distribution) or 'k3' (sample estimator)."""
    advantage: str = "batch"
    """Group advantage scaling: 'std' ((R-mean)/std per group), 'batch' ((R-mean) over one std
    for the whole rollout batch: requests keep their reward scale), 'mean' (R-mean) or 'none'."""
    epochs_per_batch: int = 2
    """Gradient passes over each rollout batch (ratios move away from 1 after the first)."""
    minibatch_size: int = 512
    """Requests per gradient step."""
    grad_clip: float = 1.0
    """Max global gradient norm."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "grpo.rounds must be >= 1")
        _check(self.lr > 0, f"grpo.lr={self.lr} must be > 0 (e.g. 1e-3)")
        _check(self.requests_per_round >= 0, "grpo.requests_per_round must be >= 0 (0 = all)")
        _check(self.grad_clip > 0, "grpo.grad_clip must be > 0")
        _check(
            self.data_passes >= 1 and self.rounds % self.data_passes == 0,
            f"grpo.rounds={self.rounds} must be a multiple of grpo.data_passes={self.data_passes}",
        )
        _check(0 < self.clip_eps < 1, "grpo.clip_eps must be in (0, 1)")
        _check(self.beta >= 0, "grpo.beta must be >= 0")
        _check(self.kl_estimator in ("exact", "k3"), "grpo.kl_estimator: use 'exact' or 'k3'")
        _check(
            self.advantage in ("std", "batch", "mean", "none"),
            "grpo.advantage: use 'std', 'batch', 'mean' or 'none'",
        )
        _check(
            self.epochs_per_batch >= 1 and self.minibatch_size >= 1,
            "grpo.epochs_per_batch and grpo.minibatch_size must be >= 1",
        )


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Ray rollout actors."""

    num_workers: int = 2
    """Rollout actors."""
    num_cpus_per_worker: float = 0.5
    """CPUs each actor reserves (fractional allowed; leave a CPU for data tasks)."""
    batch_size: int = 1024
    """Requests per actor call."""
    max_staleness: int = 0
    """Max policy versions a rollout may lag the learner (0 = strictly on-policy)."""
    resource: str = "rollout"
    """Custom resource actors request when the cluster offers it (empty = never)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "rollout.num_workers must be >= 1")
        _check(self.num_cpus_per_worker > 0, "rollout.num_cpus_per_worker must be > 0")
        _check(self.batch_size >= 1, "rollout.batch_size must be >= 1")
        _check(self.max_staleness >= 0, "rollout.max_staleness must be >= 0")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Ray Train learner."""

    num_workers: int = 1
    """Ray Train workers (DDP when > 1)."""
    use_gpu: bool = False
    """Put each learner worker on a GPU."""
    num_cpus_per_worker: float = 0.5
    """CPUs each learner worker reserves."""
    max_failures: int = 2
    """Restarts from the last checkpoint after a worker failure."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "learner.num_workers must be >= 1")
        _check(self.num_cpus_per_worker > 0, "learner.num_cpus_per_worker must be > 0")
        _check(self.max_failures >= 0, "learner.max_failures must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Offline evaluation and the simulated online A/B test."""

    ab_requests: int = 20_000
    """Fresh simulated requests per A/B test."""
    ab_seed: int = 10_007
    """Seed of the A/B test's fresh users and feedback (same for every arm: paired design)."""
    bootstrap: int = 200
    """Bootstrap resamples for confidence intervals."""
    static_grid_step: float = 0.1
    """Simplex grid step for the best-static-weights search."""
    search_requests: int = 5_000
    """Training requests used to search the best static weights (and, on simulator data, the
    fresh requests the true-north-star oracles are searched on)."""
    oracle_requests: int = 20_000
    """Simulator data: logged training requests on which the reward oracle (the grid weights
    that maximise the training reward per segment) is searched."""
    segment_feature: str = "auto"
    """Segments of the ``segment_static`` arm (per-segment best static weights searched on the
    training logs): a one-hot context block ``NAME=VALUE`` named NAME (KuaiRand:
    ``user_active_degree``); ``auto``: the users' known segment on simulator data, none
    otherwise; ``""``: no segment_static arm."""
    day_offset_hours: float = 0.0
    """Hours added to ``ts`` (seconds since epoch, UTC) before cutting the per-day rows: the
    logs' time zone (KuaiRand: 8)."""

    def __post_init__(self) -> None:
        _check(
            min(self.ab_requests, self.bootstrap, self.search_requests, self.oracle_requests) >= 1,
            "eval.ab_requests/bootstrap/search_requests/oracle_requests must be >= 1",
        )
        _check(
            0 < self.static_grid_step <= 1,
            f"eval.static_grid_step={self.static_grid_step} must be in (0, 1] (e.g. 0.1)",
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment."""

    run_dir: str = "runs/default"
    """Where metrics, checkpoints, plots and generated data go."""
    seed: int = 0
    """Seed for model init and sampling."""
    simulator: SimulatorConfig = dataclasses.field(default_factory=SimulatorConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    exploration: ExplorationConfig = dataclasses.field(default_factory=ExplorationConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(
            bool(self.data.train_path) or self.simulator.num_candidates <= self.data.max_candidates,
            f"simulator.num_candidates={self.simulator.num_candidates} exceeds "
            f"data.max_candidates={self.data.max_candidates}: every simulated request would "
            "be a bad row when read; raise data.max_candidates too",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def hash(self) -> str:
        """Short stable hash of the whole config (for exports and run ids)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **overrides: Any) -> Config:
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"grpo.rounds": 2})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return from_dict(Config, d)


# ---------------------------------------------------------------------------
# dict / YAML conversion


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(inner, v, f"{where}[]") for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        _k, inner = typing.get_args(tp)
        return {str(k): _coerce(inner, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) dict; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + str(u) for u in unknown]}; valid keys here: {names}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def merge_dicts(base: dict, over: dict) -> dict:
    """Config mapping ``over`` laid on ``base`` (nested sections merged key by key)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge_dicts(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _LEAF_DICTS
            else v
        )
    return out


# dict-valued fields are replaced whole, not merged key by key
_LEAF_DICTS = {"north_star", "post_gains", "prior_gains", "prior_calibration"}


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set ``section.key`` in a config mapping; unknown sections and keys raise ConfigError."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"unknown config section {key!r}; top-level keys: {sorted(d)}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
    old = node[parts[-1]]
    if isinstance(old, dict) and isinstance(value, dict) and parts[-1] not in _LEAF_DICTS:
        # 'grpo={rounds: 3}' sets those keys of the section, like a config file would
        _check_keys(value, old, "--set", f"{key}.")
        value = merge_dicts(old, value)
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML would keep
    the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config YAML (safe_load), with its ``base:`` chain resolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _chain:
        loop = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: the base: chain loops ({loop}); remove one base: line")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base: must name a YAML file, got {base!r}")
        data = merge_dicts(read_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return " ".join(line.strip() for line in lines[:3]) if lines else type(e).__name__


def _check_keys(
    data: dict[str, Any], known: dict[str, Any], path: str | Path, at: str = ""
) -> None:
    """Raise ConfigError naming ``path`` for a key of ``data`` that ``known`` lacks."""
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(
            f"{path}: unknown config key(s) {[at + str(k) for k in unknown]}; valid keys here: "
            f"{sorted(known)}"
        )
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(known[k], dict) and k not in _LEAF_DICTS:
            _check_keys(v, known[k], path, f"{at}{k}.")


def parse_override(text: str) -> tuple[str, Any]:
    """'grpo.lr=3e-4' -> ('grpo.lr', 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_first_line(e)})"
        ) from None


def load_config(
    paths: list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- each YAML file in order <- ``section.key=value`` overrides."""
    d = to_dict(Config())
    for p in paths or []:
        data = read_yaml(p)
        _check_keys(data, d, p)
        d = merge_dicts(d, data)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(d, key, value)
    return from_dict(Config, d)


STAGE1_KEYS = (
    "seed",
    "simulator",
    "data",
    "policy",
    "pretrain",
    "reward.k",
    "reward.post_gains",
    "reward.propensity",
    "reward.propensity_scale",
    "reward.propensity_power",
    "reward.propensity_min",
)
"""Config keys and sections (dotted prefixes) Stage 1's result depends on: its data, the
policy, its own settings and the R_post gains LambdaLoss ranks by."""
RESULT_FREE_KEYS = (
    "run_dir",
    "eval",
    "data.eval_path",
    "data.cache",
    "data.cache_dir",
    "simulator.num_eval_requests",
    "learner.max_failures",
    "learner.num_cpus_per_worker",
    "learner.use_gpu",
    "rollout.num_workers",
    "rollout.num_cpus_per_worker",
    "rollout.resource",
)
"""Keys free to differ between a run's checkpoints and a resume: where it runs, what it is
evaluated on, how failures are retried, and the rollout pool's width (scaling out a
running job: the rounds still to run are dealt over the new pool)."""


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flat_settings(d: dict[str, Any], at: str = "") -> dict[str, Any]:
    """A ``to_dict()`` config as ``{dotted setting: value}`` (dict-valued settings such as
    ``reward.post_gains`` are one setting; tuples become lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in _LEAF_DICTS:
            out.update(flat_settings(v, f"{at}{k}."))
        else:
            out[f"{at}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def stage1_key(key: str) -> bool:
    """Whether changing dotted ``key`` changes Stage 1's result."""
    return _under(key, STAGE1_KEYS) and not _under(key, RESULT_FREE_KEYS)


def stage1_settings(d: dict[str, Any]) -> dict[str, Any]:
    """The flat ``key: value`` settings of a ``to_dict()`` config that Stage 1 depends on."""
    return {k: v for k, v in flat_settings(d).items() if stage1_key(k)}


def config_changes(
    saved: dict[str, Any], now: dict[str, Any], within: tuple[str, ...] | None = None
) -> list[str]:
    """``'key: saved -> now'`` for each setting that differs between two ``to_dict()``
    configs and changes what training computes (not :data:`RESULT_FREE_KEYS`), limited to
    the keys under ``within`` when given (e.g. :data:`STAGE1_KEYS`)."""
    a, b = flat_settings(saved), flat_settings(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if _under(key, RESULT_FREE_KEYS) or (within is not None and not _under(key, within)):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
