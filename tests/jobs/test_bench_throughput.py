"""``grade-ray bench``: the rollout benchmark's dispatch and the Markdown output."""

from __future__ import annotations

import pytest

from grade_ray.jobs.bench.table import md_table
from grade_ray.jobs.bench.throughput import (
    bench_config,
    bench_kernel,
    bench_rollout,
    bench_stage1,
    bench_stage1_epoch,
    markdown_table,
    run_bench,
    scaling_projection,
)


def test_bench_parts_are_checked():
    with pytest.raises(ValueError, match="subset"):
        run_bench(parts=("speed",))
    with pytest.raises(ValueError, match="subset"):
        run_bench(parts=())


def test_markdown_table_adds_the_quality_table_when_present():
    md = markdown_table({"rollout.requests_per_s_per_worker": 1234.5, "setup": {"g": 20}})
    assert "`rollout.requests_per_s_per_worker` | 1,234.500" in md and "north-star" not in md
    q = {"quality.setup.ab_requests": 5000, "quality.setup.bootstrap": 100}
    md = markdown_table({**q, "learner.samples_per_s": 2.0})
    assert "| arm | budget |" in md and "5,000 fresh requests" in md
    assert "quality.setup" not in md  # quality figures go to their own table


@pytest.mark.ray
def test_bench_rollout_runs_each_lane_on_its_own_actor(ray_session, tmp_path):
    cfg = bench_config(str(tmp_path / "run"), 2048).replace(
        **{"rollout.batch_size": 256, "rollout.num_cpus_per_worker": 0.5}
    )
    from grade_ray.jobs.train import prepare_data

    train_path, _ = prepare_data(cfg)
    out = bench_rollout(cfg, train_path, 1)
    for key in (
        "rollout.requests_per_s_per_worker",
        "rollout.requests_per_s_2_workers",
        "rollout.scaling_2_workers",
        "sync.weights_ms",
    ):
        assert out[key] > 0, key
    # 2048 requests / 256 per task = 8 tasks over 8 shards: each actor decodes its own 4
    assert out["rollout.files_per_actor_2_workers"] == 4


def test_bench_stage1_times_both_kernels_and_they_agree(tmp_path):
    cfg = bench_config(str(tmp_path / "run"), 256).replace(**{"pretrain.batch_size": 64})
    from grade_ray.jobs.train import prepare_data

    train_path, _ = prepare_data(cfg)
    out = bench_stage1(cfg, train_path, 1, batch_sizes=(32,))
    for b in (32, 64):
        for key in ("requests_per_s_topk", "requests_per_s_dense", "topk_speedup"):
            assert out[f"stage1.b{b}.{key}"] > 0, (b, key)
    assert out["stage1.grad_max_abs"] > 0
    assert out["stage1.loss_abs_diff"] <= 1e-6 and out["stage1.grad_max_abs_diff"] <= 1e-6
    md = markdown_table(out)
    assert "`stage1.b64.requests_per_s_topk` |" in md


@pytest.mark.ray
@pytest.mark.slow  # a Ray Train job: ~40 s here
def test_bench_stage1_epoch_reports_local_and_ray_train_rates(ray_session, tmp_path):
    cfg = bench_config(str(tmp_path / "run"), 1024).replace(**{"pretrain.batch_size": 256})
    from grade_ray.jobs.train import prepare_data

    train_path, _ = prepare_data(cfg)
    out = bench_stage1_epoch(cfg, train_path, tmp_path)
    for key in ("stage1.requests_per_s", "stage1.ray_train_requests_per_s"):
        assert out[key] > 0, key
    assert out["stage1.ray_train_wall_s"] > 1024 / out["stage1.ray_train_requests_per_s"]
    assert "`stage1.ray_train_requests_per_s` |" in markdown_table(out)


def test_bench_kernel_times_the_learner_against_its_reference_and_they_agree(tmp_path):
    cfg = bench_config(str(tmp_path / "run"), 512).replace(
        **{"rollout.batch_size": 256, "grpo.minibatch_size": 128}
    )
    from grade_ray.jobs.train import prepare_data

    train_path, _ = prepare_data(cfg)
    out = bench_kernel(cfg, train_path, 1, minibatch_sizes=(64,))
    for prefix in ("learner", "learner.mb64"):
        for key in ("requests_per_s", "reference_requests_per_s", "speedup"):
            assert out[f"{prefix}.{key}"] > 0, (prefix, key)
    assert out["learner.samples_per_s"] == pytest.approx(
        out["learner.requests_per_s"] * 20 * cfg.grpo.epochs_per_batch
    )
    assert "learner.mb128.requests_per_s" not in out  # the default size has the plain keys
    # both paths compute the same update from the same weights
    assert out["learner.update_max_abs"] > 1e-4
    assert out["learner.weights_max_abs_diff"] <= 1e-6
    md = markdown_table(out)
    assert "`learner.reference_requests_per_s` |" in md and "`learner.mb64.speedup` |" in md


def test_markdown_table_writes_tiny_differences_in_scientific_notation():
    md = markdown_table({"stage1.loss_abs_diff": 1.5e-8, "zero": 0.0})
    assert "| `stage1.loss_abs_diff` | 1.50e-08 |" in md and "| `zero` | 0.000 |" in md


def test_scaling_projection_by_hand():
    measured = {
        "rollout.requests_per_s_per_worker": 10_240.0,  # t_task = 0.1 s per 1024 requests
        "sync.actor_roundtrip_ms": 0.0,
        "sync.weights_ms": 0.0,
        "learner.requests_per_s": 20_480.0,  # an update of N tasks takes N * 0.05 s
    }
    p = scaling_projection(measured, workers=(1, 2, 4))
    assert p["projection.rollout_only.4"] == pytest.approx(4 * 10_240)
    assert p["projection.on_policy.1"] == pytest.approx(1024 / 0.15)
    assert p["projection.on_policy.4"] == pytest.approx(4096 / 0.3)
    assert p["projection.pipelined.1"] == pytest.approx(10_240)  # rollout-bound
    assert p["projection.pipelined.4"] == pytest.approx(20_480)  # learner-bound
    md = markdown_table({**measured, **p})
    assert "| 4 | 40,960 | 13,653 | 20,480 |" in md


def test_md_table_aligns_columns_and_checks_them():
    md = md_table(("arm", "value"), "lr", [["a", "1"], ["b", "2"]])
    assert md.splitlines() == ["| arm | value |", "|---|---:|", "| a | 1 |", "| b | 2 |"]
    with pytest.raises(ValueError, match="one 'l' or 'r' per column"):
        md_table(("arm", "value"), "l", [])


def test_cli_bench_learner_only_writes_the_learner_keys_alone(tmp_path, capsys):
    """`grade-ray bench --learner-only --quick`: the learner's keys (training's path against
    the earlier one, which compute the same update) and nothing of the other parts."""
    import json

    from grade_ray.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--learner-only", "--quick", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["learner.requests_per_s"] > 0 and got["learner.reference_requests_per_s"] > 0
    assert got["learner.speedup"] == pytest.approx(
        got["learner.requests_per_s"] / got["learner.reference_requests_per_s"]
    )
    assert got["learner.update_max_abs"] > 1e-4 and got["learner.weights_max_abs_diff"] <= 1e-6
    assert not [k for k in got if k.startswith(("rollout.", "stage1.", "training.", "quality."))]
    assert "`learner.speedup` |" in out.with_suffix(".md").read_text()
    assert json.loads(capsys.readouterr().out)["learner.speedup"] == got["learner.speedup"]


def test_cli_bench_refuses_an_unusable_out_before_measuring(tmp_path, capsys, monkeypatch):
    """A bad --out is one line at once, not an error after minutes of measuring (the
    measuring is replaced by a failure here: it must not be reached)."""
    from grade_ray.cli import main
    from grade_ray.jobs.bench import throughput

    def measured(*args, **kwargs):
        raise AssertionError("measured before --out was checked")

    monkeypatch.setattr(throughput, "_learner_only", measured)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, want in (
        (tmp_path / "bench.md", "give the JSON file"),  # its table would overwrite it
        (tmp_path, "is a directory"),
        (afile / "bench.json", "cannot create its directory"),
    ):
        assert main(["bench", "--learner-only", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
