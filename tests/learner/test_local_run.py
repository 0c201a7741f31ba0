"""End to end without Ray: train --local, resume, determinism, evaluate, compare, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from grade_ray import keys
from grade_ray.cli import main
from grade_ray.jobs.train import run_train_local
from grade_ray.learner.loop import GRPOTrainer
from grade_ray.runlog import load_checkpoint, read_metrics

# metrics that measure the wall clock, not the training
VOLATILE = (
    "time",
    "step",
    keys.PERF_ROUND_S,
    keys.PERF_REQUESTS_PER_S,
    keys.PERF_STAGE1_REQUESTS_PER_S,
    keys.PRETRAIN_WORKER_PID,
)


def stage2(run_dir) -> list[dict]:
    """Stage-2 metric rows of a run without wall-clock values."""
    return [
        {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_metrics(run_dir)
        if r.get("stage") == 2
    ]


def assert_same_policy(a_dir, b_dir) -> None:
    a = load_checkpoint(Path(a_dir) / "policy.pt")["state_dict"]
    b = load_checkpoint(Path(b_dir) / "policy.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def fresh_run_cfg(base, run_dir: Path, data_dir: Path):
    run_dir.mkdir(parents=True)
    (run_dir / "data").symlink_to(data_dir)  # reuse the session's simulated data
    return base.replace(run_dir=str(run_dir))


@pytest.fixture(scope="module")
def local_run(smoke_cfg, smoke_data, tmp_path_factory):
    cfg = fresh_run_cfg(
        smoke_cfg, tmp_path_factory.mktemp("local") / "run", Path(smoke_data[0]).parent
    )
    run_train_local(cfg)
    return cfg


def test_run_dir_contents_and_diagnostics(local_run):
    run = Path(local_run.run_dir)
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "policy.pt", "summary.json"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").glob("round-*.pt")) == [
        "round-0000.pt",
        "round-0001.pt",
    ]
    rows = [r for r in read_metrics(run) if r.get("stage") == 2]
    assert len(rows) == 2
    for key in (
        keys.ROLLOUT_R_POST,
        keys.ROLLOUT_R_PRIOR,
        keys.ROLLOUT_R_FORMAT,
        keys.LEARNER_KL,
        keys.LEARNER_CLIP_FRAC,
        keys.ROLLOUT_ZERO_VAR_FRAC,
        keys.POLICY_ENTROPY,
        keys.POLICY_POLARIZED,
        keys.POLICY_SPREAD,
        "eval/north_star",
        "segment/bargain/w_cvr",
    ):
        assert key in rows[-1], key
    assert rows[0][keys.ROLLOUT_ALPHA_HAT] < rows[1][keys.ROLLOUT_ALPHA_HAT]
    for r in rows:  # every request of a round is used once
        assert r[keys.ROLLOUT_REQUESTS] == r["rollout/unique_requests"] == 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["rows_used"] == local_run.simulator.num_requests


def test_training_is_deterministic_given_the_seed(local_run, smoke_data, tmp_path):
    """A second run with the same config and seed gives identical per-round metrics and
    bit-identical final weights."""
    again = fresh_run_cfg(local_run, tmp_path / "again", Path(smoke_data[0]).parent)
    run_train_local(again)
    a, b = stage2(local_run.run_dir), stage2(again.run_dir)
    assert [r[keys.ROUND] for r in a] == [0, 1]
    assert a == b
    assert_same_policy(local_run.run_dir, again.run_dir)


def test_stopped_run_resumes_to_the_uninterrupted_result(
    local_run, smoke_data, tmp_path, monkeypatch
):
    """Stop after round 0 (injected failure), then `train --resume`: the metrics of every
    round and the final weights equal the uninterrupted run's exactly."""
    cfg = fresh_run_cfg(local_run, tmp_path / "stopped", Path(smoke_data[0]).parent)
    init = GRPOTrainer.__init__

    def stop_after_round_0(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.fail_at_round = 0

    monkeypatch.setattr(GRPOTrainer, "__init__", stop_after_round_0)
    with pytest.raises(RuntimeError, match="injected failure after round 0"):
        run_train_local(cfg)
    monkeypatch.undo()
    assert [r[keys.ROUND] for r in stage2(cfg.run_dir)] == [0]
    assert not (Path(cfg.run_dir) / "policy.pt").exists()

    run_train_local(cfg, resume=True)
    resumed, full = stage2(cfg.run_dir), stage2(local_run.run_dir)
    assert [r[keys.ROUND] for r in resumed] == [0, 1]  # round 0 not redone
    assert resumed == full
    assert_same_policy(cfg.run_dir, local_run.run_dir)
    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert summary["rounds"] == 2


def test_resume_at_round_boundary_runs_the_rest(local_run, tmp_path):
    run = tmp_path / "resume"
    shutil.copytree(local_run.run_dir, run, symlinks=True)
    (run / "checkpoints" / "round-0001.pt").unlink()
    (run / "metrics.jsonl").write_text("")
    cfg = local_run.replace(run_dir=str(run))
    run_train_local(cfg, resume=True)
    rows = stage2(run)
    # round 1 ran again (the same as the first time); round 0's row, lost from the metrics
    # file, is written back from the checkpoint: each round is in the metrics exactly once
    assert [r[keys.ROUND] for r in rows] == [0, 1]
    assert rows == stage2(local_run.run_dir)
    assert_same_policy(run, local_run.run_dir)


@pytest.fixture(scope="module")
def evaluated(local_run):
    from grade_ray.jobs.evaluate import run_evaluate

    # an extra arm after the run's own (as compare's ablations are): the Stage 1 policy again
    sp = Path(local_run.run_dir) / "checkpoints" / "pretrain.pt"
    return run_evaluate(local_run, local_run.run_dir, extra_arms={"SP-again": str(sp)})


def test_evaluate_all_arms(local_run, evaluated):
    res = evaluated
    assert set(res.offline) == {"uniform", "best_static", "SP", "GRADE", "SP-again"}
    # the diagnosis is about the run's own policy, not the last arm evaluated
    assert not any("SP-again" in w for w in res.warnings), res.warnings
    arms = {r["arm"] for r in res.online}
    assert {"GRADE", "SP", "best_static", "static_truth", "oracle"} <= arms
    ns = {r["arm"]: r["value"] for r in res.online if r["metric"] == "north_star"}
    # the oracle (each segment's true best weights) beats the best static weights, which
    # beat uniform weights; headroom is each arm's share of that gap
    assert ns["oracle"] > ns["static_truth"] > ns["uniform"]
    for arm, v in ns.items():
        want = (v - ns["static_truth"]) / (ns["oracle"] - ns["static_truth"])
        assert res.headroom[arm] == pytest.approx(want, rel=1e-9, abs=1e-12), arm
    assert res.recovery["oracle"] == pytest.approx(0.0, abs=1e-6)
    assert "north_star" in res.markdown
    assert (Path(local_run.run_dir) / "eval" / "eval.json").exists()
    # without ground truth: every arm scored by the training reward on the held-out logs
    logs = res.logs
    assert {"GRADE", "SP", "reward_static", "cluster_oracle", "cluster_oracle_half"} <= set(
        logs.reward
    )
    if logs.reward["cluster_oracle"] > logs.reward["reward_static"]:
        assert logs.captured["reward_static"] == 0.0
        assert logs.captured["cluster_oracle"] == pytest.approx(1.0)
    assert np.isfinite(logs.data_gain) and logs.data_gain_ci >= 0
    assert "By the training reward on held-out logs" in res.markdown


def test_evaluate_scores_the_runs_policy(local_run, smoke_data, evaluated):
    """The GRADE arm is the trained policy's weights: its offline R_post (IPS gains at the
    logged rank) and its online north-star equal an independent computation."""
    from grade_ray.algos.fusion import fuse
    from grade_ray.algos.metrics import ndcg_at_k
    from grade_ray.data.reading import read_sessions
    from grade_ray.jobs.train import simulator_for
    from grade_ray.learner.loop import load_policy

    cfg = local_run
    policy, meta, _ = load_policy(Path(cfg.run_dir) / "policy.pt")
    batch, _, _ = read_sessions(smoke_data[1])
    with torch.no_grad():
        w = policy.pi(torch.from_numpy(batch.context))
    assert float((w - 0.25).abs().max()) > 1e-3  # trained: not uniform
    fused = fuse(cfg.policy.fusion, torch.from_numpy(batch.scores), w, cfg.policy.fusion_eps)
    r = cfg.reward
    coef = np.array([r.post_gains.get(n, 0.0) for n in meta.label_names])
    exam = np.maximum(
        (1.0 + batch.position / r.propensity_scale) ** -r.propensity_power, r.propensity_min
    )
    gain = np.maximum(batch.labels.astype(np.float64) @ coef, 0) / exam
    post = ndcg_at_k(
        fused, torch.from_numpy(gain.astype(np.float32)), torch.from_numpy(batch.mask), r.k
    )
    got = evaluated.offline["GRADE"]
    assert got["r_post"] == pytest.approx(float(post.mean()), rel=1e-5)
    for j, name in enumerate(meta.label_names):  # per label: over requests with a positive
        g = torch.from_numpy(np.maximum(batch.labels[..., j], 0))
        pos = (g > 0).numpy().any(-1)
        per = ndcg_at_k(fused, g, torch.from_numpy(batch.mask), r.k).numpy()[pos]
        assert got[f"ndcg@{r.k}/{name}"] == pytest.approx(float(per.mean()), rel=1e-5), name
        replay = evaluated.replay["arms"]["GRADE"]["metrics"][f"ndcg/{name}"]["value"]
        assert replay == pytest.approx(got[f"ndcg@{r.k}/{name}"], rel=1e-4), name
    assert got["r_post"] != pytest.approx(evaluated.offline["uniform"]["r_post"], rel=1e-6)

    sim = simulator_for(cfg)
    fresh, truth = sim.fresh_requests(cfg.eval.ab_requests, cfg.eval.ab_seed)
    with torch.no_grad():
        wf = policy.pi(torch.from_numpy(fresh.context))
    ff = fuse(cfg.policy.fusion, torch.from_numpy(fresh.scores), wf, cfg.policy.fusion_eps)
    want = sim.expected_outcomes(fresh, truth, ff.numpy())["north_star"].mean()
    ns = {r["arm"]: r["value"] for r in evaluated.online if r["metric"] == "north_star"}
    assert ns["GRADE"] == pytest.approx(float(want), rel=1e-6)


def test_best_static_weights_beat_every_grid_point(local_run, smoke_data):
    import itertools

    from grade_ray.data.reading import read_sessions
    from grade_ray.jobs.evaluate import ranking_reward, search_best_static
    from grade_ray.learner.reward_fit import reward_spec

    cfg = local_run
    best = search_best_static(cfg, smoke_data[0])
    batch, meta, _ = read_sessions(smoke_data[0], max_rows=cfg.eval.search_requests)
    spec = reward_spec(cfg, meta, smoke_data[0])
    m = round(1 / cfg.eval.static_grid_step)  # every point with coordinates in steps of 1/m
    grid = (
        np.array(
            [c for c in itertools.product(range(m + 1), repeat=meta.num_tasks) if sum(c) == m],
            np.float32,
        )
        / m
    )
    mean = ranking_reward(batch, grid, spec, cfg.policy.fusion, cfg.policy.fusion_eps).mean(0)
    got = ranking_reward(
        batch, best[None].astype(np.float32), spec, cfg.policy.fusion, cfg.policy.fusion_eps
    ).mean()
    assert got == pytest.approx(mean.max(), rel=1e-6)
    assert got > mean.mean()


def test_cli_errors_are_clear(capsys):
    assert main(["train", "--local", "--set", "grpo.nope=1"]) == 2
    assert "valid keys here" in capsys.readouterr().err
