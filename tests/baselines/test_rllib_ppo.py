"""RLlib PPO baseline: same reward as GRADE, learns on the smoke logs, saves a FusionPolicy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade_ray.algos.rewards import group_rewards
from grade_ray.baselines.rllib_ppo.env import (
    LoggedRequestEnv,
    LoggedRequestVectorEnv,
    load_requests,
    make_logged_request_env,
)
from grade_ray.baselines.rllib_ppo.training import PPOSettings, bench_rllib_ppo, train_rllib_ppo
from grade_ray.data.reading import read_sessions
from grade_ray.learner.reward_fit import reward_spec
from grade_ray.spec import as_tensor


def _env_config(cfg, train_path, **extra):
    return {"train_path": train_path, "config": cfg.to_dict(), "seed": 3, **extra}


def _direct_reward(cfg, train_path, i: int, weights: torch.Tensor) -> float:
    """group_rewards with G=1 on request i, built from the raw sessions (not the env's cache)."""
    batch, meta, _ = read_sessions(train_path, on_error=cfg.data.on_error)
    spec = reward_spec(cfg, meta, train_path)
    b = batch.take(np.array([i]))
    scores = as_tensor(b.scores)
    out = group_rewards(
        scores,
        weights.reshape(1, 1, -1),
        spec.post_gain(as_tensor(b.labels), as_tensor(b.position)),
        spec.prior_gain(scores, as_tensor(b.context)),
        as_tensor(b.mask),
        fusion=cfg.policy.fusion,
        k=spec.k,
        rules=list(spec.rules),
        l1=spec.l1,
        l2=spec.l2,
        l3=spec.l3,
        tau=spec.tau,
        fusion_eps=cfg.policy.fusion_eps,
        post_scale=spec.post_scale,
        prior_scale=spec.prior_scale,
    )
    return float(out["reward"][0, 0])


def test_env_reward_is_group_rewards(smoke_cfg, smoke_data):
    train_path, _ = smoke_data
    env = LoggedRequestEnv(_env_config(smoke_cfg, train_path))
    batch, meta, _ = read_sessions(train_path)
    assert env.observation_space.shape == (meta.context_dim,)
    assert env.action_space.shape == (meta.num_tasks,)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(6):
        obs, info = env.reset()
        i = info["request"]
        seen.add(i)
        np.testing.assert_array_equal(obs, batch.context[i])  # obs = the request's context
        action = rng.normal(size=meta.num_tasks).astype(np.float32) * 2
        _, reward, terminated, truncated, step_info = env.step(action)
        assert terminated and not truncated  # one-step episodes
        w = torch.softmax(torch.from_numpy(action), dim=-1)
        assert reward == pytest.approx(_direct_reward(smoke_cfg, train_path, i, w), abs=1e-6)
        assert step_info["post"] >= 0.0 and step_info["prior"] >= 0.0  # DCG / a dataset scale
    assert len(seen) == 6  # a shuffled pass: no request repeats before the pass ends
    with pytest.raises(RuntimeError):
        env.step(np.zeros(meta.num_tasks, np.float32))  # episode over: reset first


def test_vector_env_matches_single_env(smoke_cfg, smoke_data):
    train_path, _ = smoke_data
    n = 5
    venv = make_logged_request_env(_env_config(smoke_cfg, train_path, num_envs=n))
    assert isinstance(venv, LoggedRequestVectorEnv)
    single = LoggedRequestEnv(_env_config(smoke_cfg, train_path))
    data = load_requests(train_path, smoke_cfg)
    obs, _ = venv.reset(seed=7)
    idx = venv._current.copy()
    assert len(set(idx.tolist())) == n
    np.testing.assert_array_equal(obs, data.context[idx])
    actions = np.random.default_rng(1).normal(size=(n, data.num_tasks)).astype(np.float32)
    _, rewards, term, trunc, _ = venv.step(actions)
    assert term.all() and not trunc.any()
    for j, i in enumerate(idx):
        single._current = int(i)
        _, r, _, _, _ = single.step(actions[j])
        assert rewards[j] == pytest.approx(r, abs=1e-6)
    # next-step autoreset: the following step starts new episodes (no reward, not done)
    obs2, rewards2, term2, _, _ = venv.step(actions)
    assert not term2.any() and (rewards2 == 0).all()
    np.testing.assert_array_equal(obs2, data.context[venv._current])


def test_refuses_to_overwrite_another_policy(smoke_cfg, smoke_data, tmp_path):
    from grade_ray.data.reading import read_meta
    from grade_ray.learner.loop import new_policy, save_policy

    train_path, _ = smoke_data
    meta = read_meta(train_path)
    save_policy(tmp_path / "policy.pt", new_policy(smoke_cfg, meta, train_path), smoke_cfg, meta)
    with pytest.raises(FileExistsError, match="another policy"):
        train_rllib_ppo(smoke_cfg, steps=10, out_dir=tmp_path, train_path=train_path)


def test_cli_parser_has_baseline():
    from grade_ray.cli import build_parser

    args = build_parser().parse_args(
        ["baseline", "rllib-ppo", "--config", "c.yaml", "--seconds", "5", "--out", "x"]
    )
    assert args.seconds == 5 and args.steps is None and args.out == "x"


@pytest.mark.ray
def test_ppo_learns_and_saves_fusion_policy(ray_session, smoke_cfg, smoke_data, tmp_path):
    from grade_ray.learner.loop import load_policy

    train_path, _ = smoke_data
    run = train_rllib_ppo(
        smoke_cfg, steps=10_000, out_dir=tmp_path, train_path=train_path, eval_requests=0
    )
    assert run.env_steps >= 10_000 and run.samples_per_s > 0
    # the untrained policy network is uniform (zero last layer), so both baselines agree
    assert run.initial_reward["reward"] == pytest.approx(run.uniform_reward["reward"], abs=1e-6)
    # the deterministic policy (softmax of the mean logits) beats uniform weights clearly
    assert run.reward["reward"] > run.uniform_reward["reward"] + 0.02, run.summary()

    policy, meta, state = load_policy(tmp_path / "policy.pt")
    assert state["algo"] == "rllib-ppo" and state["env_steps"] == run.env_steps
    x = torch.from_numpy(load_requests(train_path, smoke_cfg).context[:64])
    torch.testing.assert_close(policy.pi(x), run.policy.pi(x))
    assert (tmp_path / "rllib_ppo.json").exists()
    assert (tmp_path / "rllib_ppo" / "metrics.csv").exists()


@pytest.mark.ray
def test_bench_rllib_ppo(ray_session, smoke_cfg, smoke_data):
    train_path, _ = smoke_data
    out = bench_rllib_ppo(
        smoke_cfg,
        train_path,
        seconds=1.0,
        grade_requests_per_s=1000.0,
        settings=PPOSettings(train_batch=400, minibatch=200, num_epochs=2),
    )
    assert out["rllib_ppo.samples_per_s"] > 0 and out["rllib_ppo.env_steps"] >= 400
    assert out["rllib_ppo.grade_speedup"] == pytest.approx(1000.0 / out["rllib_ppo.samples_per_s"])


def test_rl_module_wraps_fusion_policy(smoke_cfg, smoke_data, tmp_path):
    import dataclasses

    from ray.rllib.core.columns import Columns

    from grade_ray.baselines.rllib_ppo.module import fusion_ppo_module_class
    from grade_ray.data.reading import read_meta
    from grade_ray.learner.loop import new_policy, save_policy
    from grade_ray.models.policy import FusionPolicy

    train_path, _ = smoke_data
    meta = read_meta(train_path)
    init = new_policy(smoke_cfg, meta, train_path)
    torch.nn.init.normal_(init.tower[-1].weight)  # not the uniform start
    save_policy(tmp_path / "init.pt", init, smoke_cfg, meta)
    env = LoggedRequestEnv(_env_config(smoke_cfg, train_path))
    module = fusion_ppo_module_class()(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={
            "policy": dataclasses.asdict(smoke_cfg.policy),
            "init_log_std": -1.0,
            "init_policy": str(tmp_path / "init.pt"),
        },
    )
    assert isinstance(module.pi_net, FusionPolicy)
    x = torch.from_numpy(load_requests(train_path, smoke_cfg).context[:8])
    out = module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]
    k = meta.num_tasks
    torch.testing.assert_close(out[:, :k], init(x).detach())  # mean logits = FusionPolicy
    torch.testing.assert_close(out[:, k:], torch.full((8, k), -1.0))  # log-std
    assert module.compute_values({Columns.OBS: x}).shape == (8,)
