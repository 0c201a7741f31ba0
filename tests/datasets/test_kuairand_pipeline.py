"""Real-data pipeline (grade_ray.datasets.kuairand.pipeline) end to end on a hand-made KuaiRand-layout slice.

The slice is written to tmp_path in the original KuaiRand-Pure layout (log, user
table, basic video table). It is synthetic: no KuaiRand rows are copied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from grade_ray.cli import main
from grade_ray.config import load_config
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.data.sessions import SessionMeta
from grade_ray.datasets.kuairand.datadir import (
    STAMP_FILE,
    ConvertOptions,
    check_split_dates,
    convert,
    find_kuairand_files,
)
from grade_ray.datasets.kuairand.dataset import ATTRIBUTION, LICENCE_NOTICE
from grade_ray.datasets.kuairand.pipeline import (
    MIN_CONTEXT_STD,
    RESULTS_JSON,
    RESULTS_MD,
    SESSIONS_DIR,
    run_kuairand_pipeline,
)
from grade_ray.datasets.kuairand.replay import MEAN_STATIC
from grade_ray.datasets.kuairand.scoring import LeakageError
from grade_ray.learner.loop import INERT_STD, fit_normalization
from grade_ray.models.policy import FusionPolicy

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "kuairand-pure"
T0 = 1_650_816_000_000  # 2022-04-25 00:00 Beijing time, in ms
DAY_MS = 86_400_000
DATES = [20220425, 20220426, 20220427, 20220428]  # 2 upstream days, 1 train day, 1 eval day
N_USERS, N_VIDEOS = 40, 24


def _users(n: int) -> dict[str, list]:
    cols = {
        "user_id": list(range(n)),
        "user_active_degree": [
            ("full_active", "high_active", "middle_active")[i % 3] for i in range(n)
        ],
        "is_lowactive_period": [0] * n,
        "is_live_streamer": [-124] * n,
        "is_video_author": [i % 2 for i in range(n)],
        "follow_user_num": [7 * i for i in range(n)],
        "fans_user_num": [i for i in range(n)],
        "friend_user_num": [i % 4 for i in range(n)],
        "register_days": [50 + 3 * i for i in range(n)],
    }
    for f in range(18):
        cols[f"onehot_feat{f}"] = [(i + f) % 3 for i in range(n)]
    return cols


def _videos(n: int) -> dict[str, list]:
    return {
        "video_id": list(range(n)),
        "author_id": [500 + i // 3 for i in range(n)],
        "video_type": ["NORMAL"] * n,
        "upload_dt": ["2022-04-10"] * n,
        "upload_type": ["Web", "LongImport"] * (n // 2),
        "video_duration": [8_000.0 + 1_000 * i for i in range(n)],
        "server_width": [720.0] * n,
        "server_height": [1280.0] * n,
        "music_type": [9.0] * n,
        "tag": [str(i % 5) for i in range(n)],
    }


def _log(seed: int = 0) -> list[dict]:
    """Every user sees 2-6 videos a day; click / long view / like depend on video and user."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, date in enumerate(DATES):
        for u in range(N_USERS):
            for _ in range(int(rng.integers(2, 7))):
                v = int(rng.integers(0, N_VIDEOS))
                p_click = 0.75 if (v + u) % 3 == 0 else 0.25
                click = int(rng.random() < p_click)
                long_view = int(rng.random() < (0.6 if v % 2 == u % 2 else 0.15))
                t = T0 + d * DAY_MS + int(rng.integers(0, DAY_MS - 1))
                rows.append(
                    {
                        "user_id": u,
                        "video_id": v,
                        "date": date,
                        "hourmin": (t // 3_600_000 + 8) % 24 * 100,
                        "time_ms": t,
                        "is_click": click,
                        "is_like": int(click and rng.random() < 0.3),
                        "is_follow": int(rng.random() < 0.02),
                        "is_comment": int(rng.random() < 0.03),
                        "is_forward": int(rng.random() < 0.02),
                        "is_hate": int(rng.random() < 0.02),
                        "long_view": long_view,
                        "play_time_ms": int(rng.integers(0, 20_000)),
                        "duration_ms": 10_000,
                        "is_rand": 0,
                        "tab": 1,
                    }
                )
    return rows


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kuairand_slice")
    pq.write_table(pa.Table.from_pylist(_log()), d / "log_standard_tiny.parquet")
    pcsv.write_csv(pa.table(_users(N_USERS)), d / "user_features_pure.csv")
    pcsv.write_csv(pa.table(_videos(N_VIDEOS)), d / "video_features_basic_pure.csv")
    return d


TINY = [
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "policy.num_experts=2",
    "policy.expert_hidden=8",
    "grpo.rounds=2",
    "grpo.data_passes=1",
    "grpo.minibatch_size=32",
    "exploration.group_size=4",
    "rollout.batch_size=32",
    "eval.bootstrap=50",
    "eval.static_grid_step=0.25",
]


@pytest.fixture(scope="module")
def pipeline(slice_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kuairand_run")
    cfg = load_config([ROOT / "configs" / "kuairand.yaml"], TINY)
    results = run_kuairand_pipeline(
        cfg,
        slice_dir,
        out_dir=out,
        upstream_train_days=2,
        upstream_epochs=1,
        variants=["GRADE-no-prior", "GRADE-no-format"],
    )
    return out, results


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def test_pipeline_writes_all_arms_with_finite_metrics_and_cis(pipeline):
    out, results = pipeline
    saved = json.loads((out / RESULTS_JSON).read_text())
    assert saved["arms"].keys() == results["arms"].keys()
    expected = {"uniform", "best_static", "segment_static", "SP", "GRADE", "GRADE-no-prior"}
    expected.add(MEAN_STATIC)
    assert set(saved["arms"]) == expected
    # R_format is off in configs/kuairand.yaml, so the no-format ablation would be GRADE again
    assert "skipped" in saved["variants"]["GRADE-no-format"]
    for arm, row in saved["arms"].items():
        for metric in ("composite", "r_post", "r_prior", "ndcg/click", "gauc/click"):
            m = row["metrics"][metric]
            assert _finite(m["value"], m["ci_low"], m["ci_high"]), (arm, metric, m)
            assert m["ci_low"] <= m["value"] + 1e-9 and m["value"] <= m["ci_high"] + 1e-9
        assert 0 <= row["metrics"]["composite"]["value"] <= 1.3 + 1e-6
        if arm != "best_static":
            d = row["vs_best_static"]["composite"]
            assert _finite(d["diff"], d["ci_low"], d["ci_high"])
    assert set(saved["weights"]) == expected
    pers = saved["personalization"]["composite"]  # GRADE vs its own mean weights
    assert _finite(pers["diff"], pers["ci_low"], pers["ci_high"])
    assert pers["adj_ci_low"] <= pers["ci_low"] + 1e-9
    for w in saved["weights"].values():
        assert sum(w["mean"].values()) == pytest.approx(1.0, abs=1e-3)
    md = (out / RESULTS_MD).read_text()
    for arm in expected:
        assert f"| {arm} |" in md
    assert "## What this shows" in md and saved["interpretation"] in md
    assert saved["evidence"]["eval"]["list_length"]["histogram"]
    assert (out / "policy.pt").exists() and (out / "checkpoints" / "pretrain.pt").exists()


def test_licence_notice_travels_into_the_outputs(pipeline):
    out, results = pipeline
    saved = json.loads((out / RESULTS_JSON).read_text())
    assert saved["licence"]["licence"] == "CC BY-SA 4.0"
    assert saved["licence"]["notice"] == LICENCE_NOTICE
    md = (out / RESULTS_MD).read_text()
    assert LICENCE_NOTICE in md and ATTRIBUTION in md
    assert "CC BY-SA 4.0" in (out / SESSIONS_DIR / "README.md").read_text()
    for split in ("train", "eval"):
        assert read_meta(out / SESSIONS_DIR / split).source["licence"] == "CC BY-SA 4.0"


def test_no_leakage_eval_dates_after_training_dates(pipeline):
    out, results = pipeline
    dates = results["dates"]
    assert dates == {"upstream_train": DATES[:2], "policy_train": [DATES[2]], "eval": [DATES[3]]}
    train, _, _ = read_sessions(out / SESSIONS_DIR / "train")
    ev, _, _ = read_sessions(out / SESSIONS_DIR / "eval")
    train_dates, eval_dates = train.request_id // 10**11, ev.request_id // 10**11
    assert train_dates.min() > max(dates["upstream_train"])
    assert train_dates.max() < eval_dates.min()
    assert set(eval_dates.tolist()) == {DATES[3]}
    # the best-static search and the policy saw only the training split
    assert results["config"]["data"]["train_path"].endswith("sessions/train")
    meta = SessionMeta(
        ("click",), ("prob",), ("click",), ("x",), {"dates": [DATES[3]], "upstream_train_dates": []}
    )
    late = SessionMeta(("click",), ("prob",), ("click",), ("x",), {"dates": [DATES[2]]})
    with pytest.raises(LeakageError, match="time split"):
        check_split_dates(meta, late)


def test_policy_ignores_context_columns_constant_on_training(pipeline):
    out, results = pipeline
    from grade_ray.learner.loop import load_policy

    inert = results["stage1"]["inert_context_columns"]
    assert "dow=thu" in inert  # the eval day (Thursday) never occurs on the training day
    policy, meta, _ = load_policy(out / "policy.pt")
    ev, _, _ = read_sessions(out / SESSIONS_DIR / "eval")
    x = torch.from_numpy(ev.context.copy())
    assert (x[:, meta.context_names.index("dow=thu")] == 1).all()
    with torch.no_grad():
        pi = policy.pi(x)
        x[:, meta.context_names.index("dow=thu")] = 0.0
        again = policy.pi(x)
    assert torch.isfinite(pi).all() and torch.allclose(pi, again, atol=1e-4)


def test_guarded_normalization_units():
    policy = FusionPolicy(3, 2, num_experts=1, expert_hidden=4)
    x = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.001], [2.0, 0.0, 5.0]], dtype=np.float32)
    info = fit_normalization(policy, [x[:2], x[2:]], min_std=MIN_CONTEXT_STD)
    assert info["inert"] == [1] and info["floored"] == 1
    assert policy.x_std[1] == INERT_STD and policy.x_std[2] == pytest.approx(MIN_CONTEXT_STD)
    assert policy.x_mean[0] == pytest.approx(2.0)  # streamed over two arrays


def test_conversion_is_reused_and_not_silently_replaced(pipeline, slice_dir):
    out, _ = pipeline
    opts = ConvertOptions(upstream_train_days=2, upstream_epochs=1)
    _, reused = convert(slice_dir, out / SESSIONS_DIR, opts)
    assert reused
    other = ConvertOptions(upstream_train_days=1, upstream_epochs=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(slice_dir, out / SESSIONS_DIR, other)


def test_cli_data_kuairand_converts_and_missing_dir_errors(slice_dir, tmp_path, capsys):
    out = tmp_path / "conv"
    args = ["data", "kuairand", "--data-dir", str(slice_dir), "--out", str(out)]
    assert main([*args, "--upstream-train-days", "2", "--upstream-epochs", "1"]) == 0
    assert "CC BY-SA 4.0" in capsys.readouterr().out
    assert read_meta(out / "eval").source["dates"] == [DATES[3]]
    assert (out / STAMP_FILE).exists() and (out / "upstream" / "upstream.json").exists()
    assert main(["data", "kuairand", "--data-dir", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="user_features"):
        find_kuairand_files(_only_log(slice_dir, tmp_path))


def test_unknown_variant_fails_before_any_work(slice_dir, tmp_path):
    cfg = load_config([ROOT / "configs" / "kuairand.yaml"], TINY)
    with pytest.raises(ValueError, match="unknown variant"):
        run_kuairand_pipeline(cfg, slice_dir, out_dir=tmp_path / "run", variants=["GRADE-x"])
    assert not (tmp_path / "run").exists()


def _only_log(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "only_log"
    d.mkdir()
    (d / "log_x.parquet").write_bytes((src / "log_standard_tiny.parquet").read_bytes())
    return d


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="shipped KuaiRand-Pure copy not present")
def test_real_kuairand_pipeline(tmp_path):
    cfg = load_config([ROOT / "configs" / "kuairand.yaml"])
    results = run_kuairand_pipeline(cfg, REAL, out_dir=tmp_path, variants=["GRADE-gaussian"])
    assert results["dates"]["eval"] == [20220430]
    assert results["dates"]["policy_train"] == [20220428, 20220429]
    assert results["evidence"]["eval"]["requests"] > 4000
    for row in results["arms"].values():
        m = row["metrics"]["composite"]
        assert _finite(m["value"], m["ci_low"], m["ci_high"])
    assert "CC BY-SA 4.0" in (tmp_path / RESULTS_MD).read_text()


def test_the_no_format_ablation_runs_whenever_the_format_term_moves_the_reward():
    from grade_ray.config import load_config
    from grade_ray.datasets.kuairand.pipeline import format_term_active

    base = load_config([ROOT / "configs" / "kuairand.yaml"]).reward  # l3 = 0: no format term
    assert not format_term_active(base)
    learned = base.__class__(**{**base.__dict__, "l3": 0.05, "format_kind": "learned"})
    assert learned.format_rules == () and format_term_active(learned)  # no rules needed
    assert format_term_active(base.__class__(**{**base.__dict__, "l3": 0.05}))  # gate bonus
    none = base.__class__(**{**base.__dict__, "l3": 0.05, "format_kind": "none"})
    assert not format_term_active(none)
