"""RLlib PPO (with a critic) as a peer baseline for GRADE, on the same logs and reward.

The problem as a one-step RL environment (:class:`LoggedRequestEnv`): each episode is one
logged training request. The observation is the request's context (D floats; the policy
network standardises it with the same fitted mean/std as GRADE's policy), the action is K
real-valued logits, the fusion weights are ``softmax(action)`` and the reward is GRADE's
composite reward (:func:`grade_ray.algos.rewards.group_rewards` with G=1 and the run's
:class:`~grade_ray.spec.RewardSpec`) of re-ranking that request's candidates. The episode
then ends. Requests are served in a shuffled order, cycling over the training sessions.

RLlib (new API stack, torch) trains PPO on it with its value function (``use_critic``,
GAE). The RLModule (:class:`FusionPPOModule`) has GRADE's own
:class:`~grade_ray.models.policy.FusionPolicy` as its policy network (the mean of a diagonal
Gaussian over the logits, plus a learnable state-independent log-std) and a separate value
MLP, so the trained policy is saved as an ordinary FusionPolicy checkpoint (``policy.pt``,
``softmax`` of the mean logits = the deterministic action) that ``grade-ray evaluate`` and
``run_evaluate(..., extra_arms=...)`` evaluate exactly like GRADE. No distillation step.

What differs from GRADE by construction: one sampled action per request (no group of G,
no group-relative advantage; the critic is the baseline), Gaussian noise on logits instead
of a Dirichlet on the simplex, and RLlib's sampling/learning machinery per env step.

Entry points: :func:`train_rllib_ppo` (``grade-ray baseline rllib-ppo``) and
:func:`bench_rllib_ppo` (env steps per second of PPO training, end to end).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from grade_ray.algos.rewards import FORMAT, POST, PRIOR, REWARD
from grade_ray.config import Config, PolicyConfig, from_dict
from grade_ray.data.schema import SessionBatch, SessionMeta, read_sessions
from grade_ray.models.policy import FusionPolicy, build_policy
from grade_ray.spec import RewardSpec, as_tensor

log = logging.getLogger(__name__)

ALGO = "rllib-ppo"
ENV_ID = "grade-ray-logged-request"
"""Name the env creator is registered under with RLlib."""
LOGIT_BOUND = 20.0
"""Bounds of the action Box (logits); softmax is shift-invariant and the policy never gets near."""
METRICS_SUBDIR = "rllib_ppo"
"""Under the output dir: RLlib PPO's metrics (kept apart from a GRADE run's metrics)."""
SUMMARY_FILE = "rllib_ppo.json"


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """RLlib PPO hyper-parameters for the one-step fusion environment."""

    train_batch: int = 2000
    """Env steps (requests) sampled per PPO iteration."""
    minibatch: int = 250
    """Minibatch size of the PPO update."""
    num_epochs: int = 6
    """Passes over each iteration's batch."""
    lr: float = 1e-3
    """Adam learning rate (policy, log-std and value function)."""
    clip_param: float = 0.2
    """PPO ratio clip."""
    entropy_coeff: float = 0.0
    """Entropy bonus."""
    vf_loss_coeff: float = 1.0
    """Weight of the value-function loss."""
    kl_coeff: float = 0.2
    """Initial coefficient of RLlib's adaptive KL penalty (0 turns it off)."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    init_log_std: float = -0.5
    """Initial log-std of the Gaussian over logits (learnable; -0.5 -> std 0.61)."""
    vf_hidden: int = 64
    """Width of the two hidden layers of the value MLP."""
    num_env_runners: int = 0
    """Remote RLlib EnvRunner actors (0 = sample in the driver process)."""
    num_envs_per_env_runner: int = 16
    """Vectorised copies of the env per EnvRunner."""
    max_requests: int = 0
    """Training requests the env cycles over (0 = all of them)."""
    torch_threads: int = 1
    """torch intra-op threads while PPO runs (restored after; 0 = leave as is). One thread is
    much faster for these small networks on a shared machine, and matches GRADE's rollout
    actors."""

    def __post_init__(self) -> None:
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0")
        if self.train_batch < 1 or self.minibatch < 1 or self.num_epochs < 1:
            raise ValueError("train_batch, minibatch and num_epochs must be >= 1")
        if self.minibatch > self.train_batch:
            raise ValueError(
                f"minibatch={self.minibatch} must be <= train_batch={self.train_batch}"
            )
        if self.num_env_runners < 0 or self.num_envs_per_env_runner < 1:
            raise ValueError("num_env_runners must be >= 0 and num_envs_per_env_runner >= 1")


# ---------------------------------------------------------------------------
# The reward on logged requests (shared by the env, evaluation and tests)


class LoggedRequests:
    """Logged requests with the reward's inputs precomputed (gains, mask as torch tensors).

    ``rewards(idx, weights)`` is GRADE's composite reward of fusion ``weights`` (B, K) on
    requests ``idx`` (B,): :func:`group_rewards` with G=1 and the run's RewardSpec.
    """

    def __init__(self, batch: SessionBatch, meta: SessionMeta, cfg: Config) -> None:
        self.meta = meta
        self.spec = RewardSpec.from_config(cfg.reward, meta)
        self.fusion = cfg.policy.fusion
        self.fusion_eps = cfg.policy.fusion_eps
        self.context = np.ascontiguousarray(batch.context, dtype=np.float32)
        self.scores = as_tensor(batch.scores)
        self.post = self.spec.post_gain(as_tensor(batch.labels), as_tensor(batch.position))
        self.prior = self.spec.prior_gain(self.scores)
        self.mask = as_tensor(batch.mask)
        self.length = batch.mask.sum(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return int(self.context.shape[0])

    @property
    def context_dim(self) -> int:
        return int(self.context.shape[1])

    @property
    def num_tasks(self) -> int:
        return int(self.scores.shape[-1])

    def _reward(self, scores, weights, post, prior, mask) -> dict[str, torch.Tensor]:
        out = self.spec.group_rewards(
            scores,
            weights[:, None, :].to(scores.dtype),
            post,
            prior,
            mask,
            fusion=self.fusion,
            fusion_eps=self.fusion_eps,
        )
        return {k: v[:, 0] for k, v in out.items()}

    def rewards(self, idx: np.ndarray, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Requests ``idx`` (B,), weights (B, K) on the simplex -> reward parts, each (B,)."""
        i = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self._reward(self.scores[i], weights, self.post[i], self.prior[i], self.mask[i])

    def reward_one(self, i: int, weights: torch.Tensor) -> dict[str, float]:
        """One request (the env's hot path: slices, trimmed to its real candidates)."""
        n = max(int(self.length[i]), 1)
        out = self._reward(
            self.scores[i : i + 1, :n],
            weights.reshape(1, -1),
            self.post[i : i + 1, :n],
            self.prior[i : i + 1, :n],
            self.mask[i : i + 1, :n],
        )
        return {k: float(v[0]) for k, v in out.items()}

    @torch.no_grad()
    def mean_rewards(
        self, weights_fn, max_requests: int = 0, batch_size: int = 4096
    ) -> dict[str, float]:
        """Mean reward parts of ``weights_fn(context (B, D) tensor) -> (B, K)`` over the
        first ``max_requests`` requests (0 = all)."""
        n = len(self) if max_requests <= 0 else min(max_requests, len(self))
        sums = dict.fromkeys((REWARD, POST, PRIOR, FORMAT), 0.0)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            w = weights_fn(torch.from_numpy(self.context[idx]))
            for k, v in self.rewards(idx, w).items():
                sums[k] += float(v.sum())
        return {k: v / max(n, 1) for k, v in sums.items()}


@functools.lru_cache(maxsize=2)
def _load_cached(train_path: str, config_json: str, max_requests: int) -> LoggedRequests:
    cfg = from_dict(Config, json.loads(config_json))
    batch, meta, report = read_sessions(
        train_path, on_error=cfg.data.on_error, max_rows=max_requests or None
    )
    log.info(
        "rllib-ppo env data: %d requests from %s (%s)", len(batch), train_path, report.summary()
    )
    return LoggedRequests(batch, meta, cfg)


def load_requests(train_path: str | Path, cfg: Config, max_requests: int = 0) -> LoggedRequests:
    """The training requests (cached per process: vectorised envs share one copy)."""
    return _load_cached(
        str(train_path), json.dumps(cfg.to_dict(), sort_keys=True), int(max_requests)
    )


# ---------------------------------------------------------------------------
# The environment


class _RequestStream:
    """Requests in a shuffled order, reshuffled after each pass (seeded)."""

    def __init__(self, n: int, seed_parts: list[int]) -> None:
        self.n, self.seed_parts = n, list(seed_parts)
        self.reseed(None)

    def reseed(self, seed: int | None) -> None:
        parts = self.seed_parts + ([] if seed is None else [int(seed)])
        self.rng = np.random.default_rng(parts)
        self.order = self.rng.permutation(self.n)
        self.pos = 0

    def take(self, m: int) -> np.ndarray:
        out = np.empty(m, dtype=np.int64)
        got = 0
        while got < m:
            if self.pos >= self.n:
                self.order = self.rng.permutation(self.n)
                self.pos = 0
            k = min(m - got, self.n - self.pos)
            out[got : got + k] = self.order[self.pos : self.pos + k]
            got, self.pos = got + k, self.pos + k
        return out


def _env_setup(env_config) -> tuple[LoggedRequests, list[int]]:
    c = dict(env_config or {})
    for key in ("train_path", "config"):
        if key not in c:
            raise ValueError(f"the logged-request env needs env_config[{key!r}]")
    cfg = from_dict(Config, c["config"])
    data = load_requests(c["train_path"], cfg, int(c.get("max_requests", 0)))
    seed_parts = [
        int(c.get("seed", cfg.seed)),
        int(getattr(env_config, "worker_index", 0)),
        int(getattr(env_config, "vector_index", 0)),
    ]
    return data, seed_parts


def _spaces(data: LoggedRequests) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    obs = gym.spaces.Box(-np.inf, np.inf, (data.context_dim,), np.float32)
    act = gym.spaces.Box(-LOGIT_BOUND, LOGIT_BOUND, (data.num_tasks,), np.float32)
    return obs, act


def logits_to_weights(logits) -> torch.Tensor:
    """Env action (logits, (..., K)) -> fusion weights on the simplex: softmax(clip(logits))."""
    t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return torch.softmax(t.clamp(-LOGIT_BOUND, LOGIT_BOUND), dim=-1)


class LoggedRequestEnv(gym.Env):
    """One logged request per step: obs = context (D,), action = logits (K,), reward = the
    composite reward of ``softmax(action)``; every episode is one step long.

    ``env_config``: ``train_path`` (session file/dir), ``config`` (a :class:`Config` as a
    dict), ``seed`` (int), optional ``max_requests`` (0 = all). Requests are served in a
    shuffled order that is reshuffled after each pass; the order depends on the seed, the
    RLlib worker/vector index and the seed given to ``reset``. ``info`` carries the request
    index and the reward's parts (post, prior, format).
    """

    metadata: dict[str, Any] = {}

    def __init__(self, env_config: dict | None = None) -> None:
        self.data, seed_parts = _env_setup(env_config)
        self.observation_space, self.action_space = _spaces(self.data)
        self._stream = _RequestStream(len(self.data), seed_parts)
        self._current: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._stream.reseed(seed)
        self._current = int(self._stream.take(1)[0])
        return self.data.context[self._current], {"request": self._current}

    def step(self, action):
        if self._current is None:
            raise RuntimeError("LoggedRequestEnv.step() called before reset()")
        i, self._current = self._current, None
        parts = self.data.reward_one(i, logits_to_weights(action))
        info = {"request": i, POST: parts[POST], PRIOR: parts[PRIOR], FORMAT: parts[FORMAT]}
        return self.data.context[i], parts[REWARD], True, False, info


class LoggedRequestVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` copies of :class:`LoggedRequestEnv` stepped together: the rewards of all
    copies come from one batched :func:`group_rewards` call (same reward, same data).

    Gymnasium's next-step autoreset (what RLlib's EnvRunner expects): a copy whose episode
    ended is reset by the following ``step`` call (its action ignored, reward 0). All copies
    draw distinct requests from one shuffled stream. ``env_config`` as for
    :class:`LoggedRequestEnv` plus ``num_envs``.
    """

    metadata: dict[str, Any] = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, env_config: dict | None = None) -> None:
        self.data, seed_parts = _env_setup(env_config)
        self.num_envs = int(dict(env_config or {}).get("num_envs", 1))
        self.single_observation_space, self.single_action_space = _spaces(self.data)
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, self.num_envs
        )
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self._stream = _RequestStream(len(self.data), seed_parts)
        self._current = np.full(self.num_envs, -1, dtype=np.int64)
        self._needs_reset = np.ones(self.num_envs, dtype=bool)

    def reset(self, *, seed=None, options: dict | None = None):
        if seed is not None:
            self._stream.reseed(int(seed[0]) if isinstance(seed, (list, tuple)) else int(seed))
        self._current = self._stream.take(self.num_envs)
        self._needs_reset[:] = False
        return self.data.context[self._current].copy(), {}

    def step(self, actions):
        n = self.num_envs
        actions = np.asarray(actions, dtype=np.float32).reshape(n, -1)
        obs = np.empty((n, self.data.context_dim), dtype=np.float32)
        rewards = np.zeros(n, dtype=np.float32)
        act = ~self._needs_reset
        if act.any():
            idx = self._current[act]
            parts = self.data.rewards(idx, logits_to_weights(actions[act]))
            rewards[act] = parts[REWARD].numpy()
            obs[act] = self.data.context[idx]
        reset = self._needs_reset
        if reset.any():
            new = self._stream.take(int(reset.sum()))
            self._current[reset] = new
            obs[reset] = self.data.context[new]
        terminated = act.copy()
        self._needs_reset = terminated.copy()
        return obs, rewards, terminated, np.zeros(n, dtype=bool), {}


def make_logged_request_env(env_config: dict | None = None):
    """RLlib env creator: the vector env when RLlib asks for ``num_envs`` copies
    (``gym_env_vectorize_mode='vector_entry_point'``), else one :class:`LoggedRequestEnv`."""
    if env_config is not None and "num_envs" in env_config:
        return LoggedRequestVectorEnv(env_config)
    return LoggedRequestEnv(env_config)


# ---------------------------------------------------------------------------
# The RLModule: GRADE's FusionPolicy as the Gaussian mean, a separate value MLP


def _module_classes():
    """Build the RLModule class lazily (importing RLlib is slow)."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule

    class FusionPPOModule(TorchRLModule, ValueFunctionAPI):
        """pi: N(FusionPolicy(x), diag(exp(log_std))^2) over logits; V: MLP on standardised x.

        ``model_config``: ``policy`` (a PolicyConfig dict), ``x_mean``/``x_std`` (context
        standardisation), ``init_log_std``, ``vf_hidden``, optional ``init_policy`` (a
        FusionPolicy checkpoint whose weights the policy network starts from).
        """

        def setup(self) -> None:
            mc = dict(self.model_config or {})
            d = int(self.observation_space.shape[0])
            k = int(self.action_space.shape[0])
            self.pi_net = build_policy(from_dict(PolicyConfig, mc.get("policy", {})), d, k)
            if mc.get("x_mean") is not None:
                self.pi_net.set_normalization(
                    torch.tensor(mc["x_mean"], dtype=torch.float32),
                    torch.tensor(mc["x_std"], dtype=torch.float32),
                )
            if mc.get("init_policy"):
                from grade_ray.learner.loop import load_policy

                init, _, _ = load_policy(mc["init_policy"])
                self.pi_net.load_state_dict(init.state_dict())
            self.log_std = nn.Parameter(torch.full((k,), float(mc.get("init_log_std", -0.5))))
            h = int(mc.get("vf_hidden", 64))
            self.vf_net = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)
            )

        def _forward(self, batch, **kwargs):
            logits = self.pi_net(batch[Columns.OBS])
            log_std = self.log_std.expand_as(logits)
            return {Columns.ACTION_DIST_INPUTS: torch.cat([logits, log_std], dim=-1)}

        def compute_values(self, batch, embeddings=None):
            p = self.pi_net
            z = (batch[Columns.OBS] - p.x_mean) / p.x_std
            return self.vf_net(z).squeeze(-1)

    return FusionPPOModule


@functools.cache
def fusion_ppo_module_class():
    """The :class:`FusionPPOModule` RLModule class (RLlib imported on first use)."""
    return _module_classes()


# ---------------------------------------------------------------------------
# Building and running PPO


def _norm_stats(cfg: Config, train_path: str, init_policy: str | None) -> tuple[list, list]:
    """Context mean/std: from the init checkpoint, else fitted like GRADE's ``new_policy``."""
    if init_policy:
        from grade_ray.learner.loop import load_policy

        p, _, _ = load_policy(init_policy)
    else:
        from grade_ray.data.schema import read_meta
        from grade_ray.learner.loop import new_policy

        p = new_policy(cfg, read_meta(train_path), train_path)
    return p.x_mean.tolist(), p.x_std.tolist()


def build_ppo_config(
    cfg: Config,
    train_path: str | Path,
    settings: PPOSettings | None = None,
    init_policy: str | Path | None = None,
):
    """An RLlib ``PPOConfig`` (new API stack, torch, critic + GAE) for the fusion env."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    register_env(ENV_ID, make_logged_request_env)
    s = settings or PPOSettings()
    train_path = str(train_path)
    init = str(init_policy) if init_policy else None
    x_mean, x_std = _norm_stats(cfg, train_path, init)
    env_config = {
        "train_path": train_path,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "max_requests": s.max_requests,
    }
    model_config = {
        "policy": dataclasses.asdict(cfg.policy),
        "x_mean": x_mean,
        "x_std": x_std,
        "init_log_std": s.init_log_std,
        "vf_hidden": s.vf_hidden,
        "init_policy": init,
    }
    return (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .framework("torch")
        .environment(
            ENV_ID,
            env_config=env_config,
            normalize_actions=False,
            clip_actions=False,
        )
        .env_runners(
            num_env_runners=s.num_env_runners,
            num_envs_per_env_runner=s.num_envs_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point",
            num_cpus_per_env_runner=1,
            batch_mode="truncate_episodes",
            rollout_fragment_length="auto",
        )
        .learners(num_learners=0)
        .training(
            use_critic=True,
            use_gae=True,
            gamma=0.99,
            lambda_=1.0,
            lr=s.lr,
            train_batch_size_per_learner=s.train_batch,
            minibatch_size=s.minibatch,
            num_epochs=s.num_epochs,
            clip_param=s.clip_param,
            entropy_coeff=s.entropy_coeff,
            vf_loss_coeff=s.vf_loss_coeff,
            vf_clip_param=10.0,
            use_kl_loss=s.kl_coeff > 0,
            kl_coeff=s.kl_coeff,
            grad_clip=s.grad_clip,
            grad_clip_by="global_norm",
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=fusion_ppo_module_class(), model_config=model_config
            )
        )
        .debugging(seed=cfg.seed, log_level="WARN")
        .reporting(metrics_num_episodes_for_smoothing=s.train_batch)
    )


def _nested(d: dict, *path: str, default: float = float("nan")) -> float:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    try:
        return float(d)
    except (TypeError, ValueError):
        return default


def _iteration_metrics(result: dict) -> dict[str, float]:
    lr = (result.get("learners") or {}).get("default_policy", {})
    return {
        "env_steps": _nested(result, "env_runners", "num_env_steps_sampled_lifetime", default=0),
        "episode_reward": _nested(result, "env_runners", "episode_return_mean"),
        "policy_loss": _nested(lr, "policy_loss"),
        "vf_loss": _nested(lr, "vf_loss"),
        "vf_explained_var": _nested(lr, "vf_explained_var"),
        "entropy": _nested(lr, "entropy"),
        "kl": _nested(lr, "mean_kl_loss"),
    }


def trained_policy(algo) -> FusionPolicy:
    """A detached copy of the algorithm's current policy network (a plain FusionPolicy)."""
    import copy

    module = algo.get_module()
    return copy.deepcopy(module.pi_net).cpu().eval()


def _learned_log_std(algo) -> list[float]:
    return algo.get_module().log_std.detach().cpu().tolist()


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with ``n`` torch threads (0 = unchanged), restoring the previous setting."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_algo(config):
    """``config.build_algo()``; see :func:`_stop_algo`."""
    return config.build_algo()


def _stop_algo(algo) -> None:
    """Stop the algorithm and remove the empty result dir RLlib's Trainable made for it
    (under ~/ray_results; nothing is written there without Tune)."""
    logdir = getattr(algo, "logdir", None)
    algo.stop()
    if logdir:
        with contextlib.suppress(OSError):
            Path(logdir).rmdir()  # only if empty


@dataclasses.dataclass
class PPORun:
    """What :func:`train_rllib_ppo` did."""

    path: Path
    policy: FusionPolicy
    env_steps: int
    iterations: int
    train_seconds: float
    build_seconds: float
    samples_per_s: float
    reward: dict[str, float]
    """Deterministic policy (softmax of the mean logits) on training requests."""
    initial_reward: dict[str, float]
    """The initial policy, same requests."""
    uniform_reward: dict[str, float]
    """Uniform weights, same requests."""
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return {
            "algo": ALGO,
            "policy": str(self.path),
            "env_steps": self.env_steps,
            "iterations": self.iterations,
            "train_seconds": self.train_seconds,
            "build_seconds": self.build_seconds,
            "samples_per_s": self.samples_per_s,
            "reward": self.reward,
            "initial_reward": self.initial_reward,
            "uniform_reward": self.uniform_reward,
        }


def _check_overwrite(path: Path, overwrite: bool) -> None:
    if not path.exists() or overwrite:
        return
    from grade_ray.runlog import load_checkpoint

    try:
        algo = load_checkpoint(path).get("algo")
    except Exception:  # noqa: BLE001 - an unreadable file is not ours either
        algo = None
    if algo != ALGO:
        raise FileExistsError(
            f"{path} holds another policy (algo={algo!r}); pass --out DIR (another directory) "
            "or --overwrite"
        )


def train_rllib_ppo(
    cfg: Config,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    settings: PPOSettings | None = None,
    out_dir: str | Path | None = None,
    train_path: str | Path | None = None,
    init_policy: str | Path | None = None,
    eval_requests: int = 5000,
    overwrite: bool = False,
    on_iteration: Callable[[FusionPolicy, dict[str, float]], None] | None = None,
) -> PPORun:
    """Train RLlib PPO (critic + GAE) on the run's training sessions; save ``policy.pt``.

    Budget: ``steps`` env steps (= requests) and/or ``seconds`` of training wall time
    (whichever ends first; at least one PPO iteration). ``out_dir`` defaults to
    ``cfg.run_dir``; an existing ``policy.pt`` written by something else is not
    overwritten unless ``overwrite``. ``init_policy``: start the policy network from this
    FusionPolicy checkpoint (e.g. the run's Stage-1 ``checkpoints/pretrain.pt``).
    Needs Ray initialised (the CLI calls ``init_ray``). Writes ``policy.pt`` (FusionPolicy),
    ``rllib_ppo.json`` (summary) and ``rllib_ppo/metrics.{csv,jsonl}``. ``on_iteration``
    (optional) is called after every PPO iteration with a copy of the policy network and that
    iteration's metrics (``seconds`` and ``env_steps`` so far), e.g. to score learning curves.
    """
    from grade_ray.learner.loop import POLICY_FILE, save_policy
    from grade_ray.runlog import MetricsLogger

    if steps is None and seconds is None:
        raise ValueError("give a budget: steps (env steps) and/or seconds")
    s = settings or PPOSettings()
    out = Path(out_dir or cfg.run_dir)
    policy_path = out / POLICY_FILE
    _check_overwrite(policy_path, overwrite)
    if train_path is None:
        from grade_ray.jobs.train import prepare_data

        train_path, _ = prepare_data(cfg)
    train_path = str(train_path)
    data = load_requests(train_path, cfg, s.max_requests)

    with _torch_threads(s.torch_threads):
        t0 = time.perf_counter()
        algo = _build_algo(build_ppo_config(cfg, train_path, s, init_policy))
        build_s = time.perf_counter() - t0
        log.info("rllib-ppo: algorithm built in %.1fs", build_s)
        logger = MetricsLogger(out / METRICS_SUBDIR, tensorboard=False)
        try:
            initial = trained_policy(algo)
            initial_reward = data.mean_rewards(initial.pi, eval_requests)
            history: list[dict[str, float]] = []
            env_steps, t_train, t_callbacks = 0, 0.0, 0.0
            t_start = time.perf_counter()
            while True:
                result = algo.train()
                t_train = time.perf_counter() - t_start - t_callbacks
                m = _iteration_metrics(result)
                env_steps = int(m["env_steps"])
                m["samples_per_s"] = env_steps / max(t_train, 1e-9)
                m["seconds"] = t_train
                history.append(m)
                logger.log(len(history), {f"rllib_ppo/{k}": v for k, v in m.items()})
                if on_iteration is not None:  # its time does not count as training time
                    t_cb = time.perf_counter()
                    on_iteration(trained_policy(algo), dict(m))
                    t_callbacks += time.perf_counter() - t_cb
                log.info(
                    "rllib-ppo iter %d: %d env steps (%.0f/s) reward %.4f vf_loss %.4f "
                    "entropy %.3f kl %.4f",
                    len(history),
                    env_steps,
                    m["samples_per_s"],
                    m["episode_reward"],
                    m["vf_loss"],
                    m["entropy"],
                    m["kl"],
                )
                if (steps is not None and env_steps >= steps) or (
                    seconds is not None and t_train >= seconds
                ):
                    break
            policy = trained_policy(algo)
            log_std = _learned_log_std(algo)
        finally:
            logger.close()
            _stop_algo(algo)

    run = PPORun(
        path=policy_path,
        policy=policy,
        env_steps=env_steps,
        iterations=len(history),
        train_seconds=t_train,
        build_seconds=build_s,
        samples_per_s=env_steps / max(t_train, 1e-9),
        reward=data.mean_rewards(policy.pi, eval_requests),
        initial_reward=initial_reward,
        uniform_reward=data.mean_rewards(
            lambda x: torch.full((len(x), data.num_tasks), 1.0 / data.num_tasks),
            eval_requests,
        ),
        history=history,
    )
    save_policy(
        policy_path,
        policy,
        cfg,
        data.meta,
        {
            "algo": ALGO,
            "stage": "rllib-ppo",
            "env_steps": env_steps,
            "log_std": log_std,
            "ppo_settings": dataclasses.asdict(s),
        },
    )
    (out / SUMMARY_FILE).write_text(json.dumps(run.summary(), indent=2, default=float))
    log.info(
        "rllib-ppo: %d env steps in %.1fs (%.0f/s); training-request reward %.4f "
        "(initial %.4f, uniform %.4f); policy -> %s",
        env_steps,
        t_train,
        run.samples_per_s,
        run.reward[REWARD],
        run.initial_reward[REWARD],
        run.uniform_reward[REWARD],
        policy_path,
    )
    return run


def bench_rllib_ppo(
    cfg: Config,
    train_path: str | Path,
    seconds: float,
    grade_requests_per_s: float | None = None,
    settings: PPOSettings | None = None,
) -> dict[str, float]:
    """Env steps per second of RLlib PPO training (sample + update + weight sync), end to end.

    One warm-up iteration is not timed; then PPO iterations run until ``seconds`` have
    passed (at least one). Also reports RLlib's sampling-only rate
    (``rllib_ppo.sampling_steps_per_s``, EnvRunner time per iteration from RLlib's smoothed
    timers) and the share of time in the learner update. ``grade_requests_per_s`` (GRADE's rollout requests/s, optional)
    adds ``rllib_ppo.grade_speedup`` = that / RLlib env steps/s. Needs Ray initialised.
    """
    s = settings or PPOSettings()
    load_requests(train_path, cfg, s.max_requests)  # read the data before timing
    with _torch_threads(s.torch_threads):
        t0 = time.perf_counter()
        algo = _build_algo(build_ppo_config(cfg, train_path, s))
        build_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            first = int(_iteration_metrics(algo.train())["env_steps"])
            warm_s = time.perf_counter() - t0
            iters, steps, sample_s, learn_s = 0, first, [], []
            t0 = time.perf_counter()
            while True:
                result = algo.train()
                steps = int(_iteration_metrics(result)["env_steps"])
                sample_s.append(_nested(result, "timers", "env_runner_sampling_timer"))
                learn_s.append(_nested(result, "timers", "learner_update_timer"))
                iters += 1
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
        finally:
            _stop_algo(algo)
    rate = (steps - first) / max(dt, 1e-9)
    per_iter = (steps - first) / max(iters, 1)
    out = {
        "rllib_ppo.samples_per_s": rate,
        "rllib_ppo.env_steps": float(steps - first),
        "rllib_ppo.seconds": dt,
        "rllib_ppo.iterations": float(iters),
        "rllib_ppo.build_s": build_s,
        "rllib_ppo.first_iteration_s": warm_s,
        # RLlib's own (smoothed) timers: sampling alone, and the share spent in the update
        "rllib_ppo.sampling_steps_per_s": per_iter / max(float(np.nanmean(sample_s)), 1e-9),
        "rllib_ppo.learner_share": float(
            np.nanmean(learn_s) / max(np.nanmean(sample_s) + np.nanmean(learn_s), 1e-9)
        ),
        "rllib_ppo.train_batch": float(s.train_batch),
        "rllib_ppo.num_epochs": float(s.num_epochs),
    }
    if grade_requests_per_s is not None:
        out["rllib_ppo.grade_speedup"] = grade_requests_per_s / max(rate, 1e-9)
    log.info("rllib-ppo bench: %.0f env steps/s over %.1fs (%d iterations)", rate, dt, iters)
    return out


# ---------------------------------------------------------------------------
# CLI: grade-ray baseline rllib-ppo


def cmd_rllib_ppo(args: argparse.Namespace) -> int:
    from grade_ray.options import config_from_args
    from grade_ray.raysession import init_ray

    cfg = config_from_args(args)
    settings = PPOSettings(
        train_batch=args.train_batch,
        minibatch=min(args.minibatch, args.train_batch),
        num_epochs=args.epochs,
        lr=args.lr,
        num_env_runners=args.env_runners,
        num_envs_per_env_runner=args.envs_per_runner,
        max_requests=args.max_requests,
    )
    steps, seconds = args.steps, args.seconds
    if steps is None and seconds is None:
        steps = DEFAULT_STEPS
    init_ray(args.address)
    try:
        run = train_rllib_ppo(
            cfg,
            steps=steps,
            seconds=seconds,
            settings=settings,
            out_dir=args.out,
            init_policy=args.init_policy,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"grade-ray: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run.summary(), indent=2, default=float))
    print(f"policy: {run.path}  (evaluate: grade-ray evaluate {run.path.parent} --config ...)")
    return 0


DEFAULT_STEPS = 100_000


def add_parser(subparsers) -> None:
    """Add ``grade-ray baseline rllib-ppo``."""
    from grade_ray.options import add_common_args

    p = subparsers.add_parser(
        "baseline", help="train a peer baseline on the same logs and reward as GRADE"
    )
    sub = p.add_subparsers(dest="baseline", required=True)
    q = sub.add_parser(
        "rllib-ppo",
        help="RLlib PPO with a critic (GAE) on a one-step env; writes policy.pt",
        description=(
            "Train RLlib PPO (new API stack, value function + GAE) on a one-step env that "
            "serves one logged training request per step, with GRADE's composite reward and "
            "GRADE's policy network. Writes OUT/policy.pt (a FusionPolicy: evaluate it with "
            "`grade-ray evaluate OUT --config ...`), OUT/rllib_ppo.json and "
            "OUT/rllib_ppo/metrics.csv."
        ),
    )
    add_common_args(q, ray=True)
    budget = q.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps", type=int, help=f"env steps (requests) to train on (default {DEFAULT_STEPS})"
    )
    budget.add_argument("--seconds", type=float, help="training wall-clock seconds")
    q.add_argument("--out", help="output directory (default run_dir)")
    q.add_argument(
        "--init-policy",
        help="start from this FusionPolicy checkpoint (e.g. RUN_DIR/checkpoints/pretrain.pt)",
    )
    d = PPOSettings()
    q.add_argument("--train-batch", type=int, default=d.train_batch, help="env steps/iteration")
    q.add_argument("--minibatch", type=int, default=d.minibatch)
    q.add_argument("--epochs", type=int, default=d.num_epochs, help="passes per batch")
    q.add_argument("--lr", type=float, default=d.lr)
    q.add_argument("--env-runners", type=int, default=d.num_env_runners)
    q.add_argument("--envs-per-runner", type=int, default=d.num_envs_per_env_runner)
    q.add_argument(
        "--max-requests", type=int, default=0, help="training requests to cycle over (0 = all)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace another algo's policy.pt")
    q.set_defaults(fn=cmd_rllib_ppo)
