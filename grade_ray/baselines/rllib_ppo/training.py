"""Training the RLlib PPO baseline: the PPO config, the train loop and the saved policy.

:func:`build_ppo_config` sets up RLlib (new API stack, torch) to train PPO with its value
function (``use_critic``, GAE) on the logged-request env (:mod:`.env`) with the
:mod:`.module` RLModule. :func:`train_rllib_ppo` runs it for a budget of env steps or
seconds and saves the policy network as an ordinary FusionPolicy checkpoint
(``policy.pt``) that ``grade-ray evaluate`` and ``run_evaluate(..., extra_arms=...)``
evaluate exactly like GRADE; :func:`bench_rllib_ppo` measures env steps per second of PPO
training, end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade_ray.algos.rewards import REWARD
from grade_ray.baselines.rllib_ppo.env import ENV_ID, load_requests, make_logged_request_env
from grade_ray.baselines.rllib_ppo.module import fusion_ppo_module_class
from grade_ray.config import Config
from grade_ray.data.reading import read_meta
from grade_ray.learner.reward_fit import run_reward_fit
from grade_ray.models.policy import FusionPolicy

log = logging.getLogger(__name__)

ALGO = "rllib-ppo"
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
# Building and running PPO


def _norm_stats(cfg: Config, train_path: str, init_policy: str | None) -> tuple[list, list]:
    """Context mean/std: from the init checkpoint, else fitted like GRADE's ``new_policy``."""
    if init_policy:
        from grade_ray.learner.loop import load_policy

        p, _, _ = load_policy(init_policy)
    else:
        from grade_ray.data.reading import read_meta
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
    module = RLModuleSpec(
        module_class=fusion_ppo_module_class(),
        model_config=_model_config(cfg, s, *_norm_stats(cfg, train_path, init), init),
    )
    return (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .framework("torch")
        .environment(
            ENV_ID,
            env_config=_env_config(cfg, train_path, s),
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
        .training(**_ppo_training(s))
        .rl_module(rl_module_spec=module)
        .debugging(seed=cfg.seed, log_level="WARN")
        .reporting(metrics_num_episodes_for_smoothing=s.train_batch)
    )


def _env_config(cfg: Config, train_path: str, s: PPOSettings) -> dict[str, Any]:
    """What every copy of the env reads (see :class:`~.env.LoggedRequestEnv`)."""
    return {
        "train_path": train_path,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "max_requests": s.max_requests,
    }


def _model_config(
    cfg: Config, s: PPOSettings, x_mean: list, x_std: list, init_policy: str | None
) -> dict[str, Any]:
    """The RLModule's ``model_config`` (see :func:`~.module.fusion_ppo_module_class`)."""
    return {
        "policy": dataclasses.asdict(cfg.policy),
        "x_mean": x_mean,
        "x_std": x_std,
        "init_log_std": s.init_log_std,
        "vf_hidden": s.vf_hidden,
        "init_policy": init_policy,
    }


def _ppo_training(s: PPOSettings) -> dict[str, Any]:
    """``PPOConfig.training`` arguments: critic + GAE over one-step episodes, PPO's clip,
    RLlib's adaptive KL penalty (off when ``kl_coeff`` is 0) and global-norm clipping."""
    return {
        "use_critic": True,
        "use_gae": True,
        "gamma": 0.99,
        "lambda_": 1.0,
        "lr": s.lr,
        "train_batch_size_per_learner": s.train_batch,
        "minibatch_size": s.minibatch,
        "num_epochs": s.num_epochs,
        "clip_param": s.clip_param,
        "entropy_coeff": s.entropy_coeff,
        "vf_loss_coeff": s.vf_loss_coeff,
        "vf_clip_param": 10.0,
        "use_kl_loss": s.kl_coeff > 0,
        "kl_coeff": s.kl_coeff,
        "grad_clip": s.grad_clip,
        "grad_clip_by": "global_norm",
    }


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
    build_seconds: float
    reward: dict[str, float]
    """Deterministic policy (softmax of the mean logits) on training requests."""
    initial_reward: dict[str, float]
    """The initial policy, same requests."""
    uniform_reward: dict[str, float]
    """Uniform weights, same requests."""
    history: list[dict[str, float]]
    """Each PPO iteration's metrics (``env_steps`` and ``seconds`` so far); at least one."""

    @property
    def env_steps(self) -> int:
        return int(self.history[-1]["env_steps"])

    @property
    def iterations(self) -> int:
        return len(self.history)

    @property
    def train_seconds(self) -> float:
        """Seconds in ``algo.train()`` (building the algorithm and callbacks not counted)."""
        return self.history[-1]["seconds"]

    @property
    def samples_per_s(self) -> float:
        return self.env_steps / max(self.train_seconds, 1e-9)

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
    from grade_ray.learner.loop import POLICY_FILE
    from grade_ray.runlog import MetricsLogger

    if steps is None and seconds is None:
        raise ValueError("give a budget: steps (env steps) and/or seconds")
    s = settings or PPOSettings()
    out = Path(out_dir or cfg.run_dir)
    policy_path = out / POLICY_FILE
    _check_overwrite(policy_path, overwrite)
    train_path = _train_path(cfg, train_path)
    run_reward_fit(cfg, train_path, read_meta(train_path))  # for the env workers to load
    data = load_requests(train_path, cfg, s.max_requests)

    with _torch_threads(s.torch_threads):
        algo, build_s = _timed_build(build_ppo_config(cfg, train_path, s, init_policy))
        logger = MetricsLogger(out / METRICS_SUBDIR, tensorboard=False)
        try:
            initial_reward = data.mean_rewards(trained_policy(algo).pi, eval_requests)
            history = _iterate(algo, logger, steps, seconds, on_iteration)
            policy, log_std = trained_policy(algo), _learned_log_std(algo)
        finally:
            logger.close()
            _stop_algo(algo)

    run = PPORun(
        path=policy_path,
        policy=policy,
        build_seconds=build_s,
        reward=data.mean_rewards(policy.pi, eval_requests),
        initial_reward=initial_reward,
        uniform_reward=data.mean_rewards(_uniform_weights(data.num_tasks), eval_requests),
        history=history,
    )
    _save_run(run, cfg, data.meta, s, log_std, out)
    return run


def _train_path(cfg: Config, train_path: str | Path | None) -> str:
    """The given training sessions, else the run's (simulated if need be)."""
    if train_path is None:
        from grade_ray.jobs.train import prepare_data

        train_path, _ = prepare_data(cfg)
    return str(train_path)


def _timed_build(config) -> tuple[Any, float]:
    """The algorithm built from ``config`` and the seconds that took."""
    t0 = time.perf_counter()
    algo = _build_algo(config)
    build_s = time.perf_counter() - t0
    log.info("rllib-ppo: algorithm built in %.1fs", build_s)
    return algo, build_s


def _iterate(
    algo,
    logger,
    steps: int | None,
    seconds: float | None,
    on_iteration: Callable[[FusionPolicy, dict[str, float]], None] | None,
) -> list[dict[str, float]]:
    """PPO iterations until ``steps`` env steps or ``seconds`` of training (at least one).

    Returns each iteration's metrics, with ``env_steps`` and ``seconds`` so far and
    ``samples_per_s``; the time spent in ``on_iteration`` does not count as training time.
    """
    history: list[dict[str, float]] = []
    t_callbacks = 0.0
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
        if on_iteration is not None:
            t_cb = time.perf_counter()
            on_iteration(trained_policy(algo), dict(m))
            t_callbacks += time.perf_counter() - t_cb
        _log_iteration(len(history), m)
        if (steps is not None and env_steps >= steps) or (
            seconds is not None and t_train >= seconds
        ):
            return history


def _log_iteration(i: int, m: dict[str, float]) -> None:
    log.info(
        "rllib-ppo iter %d: %d env steps (%.0f/s) reward %.4f vf_loss %.4f entropy %.3f kl %.4f",
        i,
        m["env_steps"],
        m["samples_per_s"],
        m["episode_reward"],
        m["vf_loss"],
        m["entropy"],
        m["kl"],
    )


def _uniform_weights(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``context (B, D) -> (B, K)`` uniform fusion weights 1/K."""
    return lambda x: torch.full((len(x), k), 1.0 / k)


def _save_run(
    run: PPORun, cfg: Config, meta, s: PPOSettings, log_std: list[float], out: Path
) -> None:
    """``policy.pt`` (a FusionPolicy checkpoint tagged ``algo=rllib-ppo``) and the summary."""
    from grade_ray.learner.loop import save_policy

    extra = {
        "algo": ALGO,
        "stage": "rllib-ppo",
        "env_steps": run.env_steps,
        "log_std": log_std,
        "ppo_settings": dataclasses.asdict(s),
    }
    save_policy(run.path, run.policy, cfg, meta, extra)
    (out / SUMMARY_FILE).write_text(json.dumps(run.summary(), indent=2, default=float))
    log.info(
        "rllib-ppo: %d env steps in %.1fs (%.0f/s); training-request reward %.4f "
        "(initial %.4f, uniform %.4f); policy -> %s",
        run.env_steps,
        run.train_seconds,
        run.samples_per_s,
        run.reward[REWARD],
        run.initial_reward[REWARD],
        run.uniform_reward[REWARD],
        run.path,
    )


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
