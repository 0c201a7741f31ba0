"""The problem as a one-step gymnasium environment over logged requests.

Each episode is one logged training request: the observation is its context (D floats),
the action K real-valued logits, the fusion weights ``softmax(action)`` and the reward
GRADE's composite reward (:meth:`~grade_ray.spec.RewardSpec.group_rewards` with G=1 and the
run's :class:`~grade_ray.spec.RewardSpec`) of re-ranking that request's candidates. The
episode then ends. Requests are served in a shuffled order, cycling over the sessions.

:class:`LoggedRequests` holds the reward's inputs (also used to score a policy on the
training requests); :class:`LoggedRequestEnv` is one env, :class:`LoggedRequestVectorEnv`
steps ``num_envs`` copies with one batched reward call; :func:`make_logged_request_env` is
the creator registered with RLlib under :data:`ENV_ID`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from grade_ray.algos.rewards import FORMAT, POST, PRIOR, REWARD
from grade_ray.config import Config, from_dict
from grade_ray.data.reading import read_sessions
from grade_ray.data.sessions import SessionBatch, SessionMeta
from grade_ray.learner.reward_fit import run_reward_fit
from grade_ray.spec import RewardFit, RewardSpec, as_tensor

log = logging.getLogger(__name__)

ENV_ID = "grade-ray-logged-request"
"""Name the env creator is registered under with RLlib."""
LOGIT_BOUND = 20.0
"""Bounds of the action Box (logits); softmax is shift-invariant and the policy never gets near."""


# ---------------------------------------------------------------------------
# The reward on logged requests (shared by the env, evaluation and tests)


class LoggedRequests:
    """Logged requests with the reward's inputs precomputed (gains, mask as torch tensors).

    ``rewards(idx, weights)`` is GRADE's composite reward of fusion ``weights`` (B, K) on
    requests ``idx`` (B,): :func:`group_rewards` with G=1 and the run's RewardSpec.
    """

    def __init__(
        self, batch: SessionBatch, meta: SessionMeta, cfg: Config, fit: RewardFit | None = None
    ) -> None:
        self.meta = meta
        self.spec = RewardSpec.from_config(cfg.reward, meta, fit)
        self.fusion = cfg.policy.fusion
        self.fusion_eps = cfg.policy.fusion_eps
        self.context = np.ascontiguousarray(batch.context, dtype=np.float32)
        self.scores = as_tensor(batch.scores)
        self.post = self.spec.post_gain(as_tensor(batch.labels), as_tensor(batch.position))
        self.prior = self.spec.prior_gain(self.scores, as_tensor(batch.context))
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
    # what the reward fits on the logs: fitted by the driver into RUN_DIR, loaded here
    return LoggedRequests(batch, meta, cfg, run_reward_fit(cfg, train_path, meta))


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
