"""`grade-ray evaluate`'s paired replay: paired bootstrap, statics, per-day rows, --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grade_ray.jobs.paired import arm_table
from grade_ray.jobs.replay import day_index, per_day, replay_markdown

ROOT = Path(__file__).resolve().parents[2]


def _arm(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-request metrics of one arm: composite = x, r_post = x / 2 (den = 1)."""
    ones = np.ones(len(x))
    return {"composite": (x, ones), "r_post": (x / 2, ones)}


TINY = {
    "best_static": _arm(np.array([0.5, 0.2, 0.9, 0.4, 0.7])),
    "GRADE": _arm(np.array([0.6, 0.1, 1.0, 0.8, 0.7])),
    "uniform": _arm(np.array([0.4, 0.3, 0.2, 0.4, 0.5])),
}


def test_paired_ci_equals_a_hand_computed_bootstrap():
    """Each resample draws n request indices once; both arms are read at the same ones."""
    n_boot, seed, n = 40, 7, 5
    table = arm_table(TINY, n_boot, seed)
    g, b = TINY["GRADE"]["composite"][0], TINY["best_static"]["composite"][0]
    rng = np.random.default_rng(seed)
    diffs, g_means = [], []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        diffs.append(g[rows].mean() - b[rows].mean())
        g_means.append(g[rows].mean())
    d = table["GRADE"]["vs_best_static"]["composite"]
    assert d["diff"] == pytest.approx(g.mean() - b.mean(), abs=1e-6)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi), abs=1e-6)
    # Bonferroni over the m = 2 arms compared with best_static: the 1 - 0.05/2 interval
    alo, ahi = np.percentile(diffs, [100 * 0.0125, 100 * 0.9875])
    assert d["comparisons"] == 2
    assert (d["adj_ci_low"], d["adj_ci_high"]) == pytest.approx((alo, ahi), abs=1e-6)
    assert d["significant_adjusted"] == (alo > 0 or ahi < 0)
    m = table["GRADE"]["metrics"]["composite"]
    assert (m["ci_low"], m["ci_high"]) == pytest.approx(
        tuple(np.percentile(g_means, [2.5, 97.5])), abs=1e-6
    )
    # the paired interval is narrower than an unpaired one here (the arms move together)
    assert d["ci_high"] - d["ci_low"] < (m["ci_high"] - m["ci_low"]) * 2


def test_an_arm_identical_to_best_static_differs_by_exactly_zero():
    same = {**TINY, "copy": TINY["best_static"]}
    d = arm_table(same, 50, 0)["copy"]["vs_best_static"]["composite"]
    assert d["diff"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0
    assert not d["significant"] and not d["significant_adjusted"]


def test_per_day_rows_count_and_average_to_the_whole():
    day = 86_400
    ts = np.array([0, 100, day + 5, day + 6, 3 * day - 1]) + 20 * day
    days = day_index(ts)
    rows = per_day(TINY, days, 30, 1)
    assert [r["day"] for r in rows] == ["1970-01-21", "1970-01-22", "1970-01-23"]
    assert [r["requests"] for r in rows] == [2, 2, 1]
    for arm in TINY:
        total = sum(r["requests"] * r["arms"][arm]["metrics"]["composite"]["value"] for r in rows)
        assert total / 5 == pytest.approx(TINY[arm]["composite"][0].mean(), abs=1e-5)
    diff = sum(
        r["requests"] * r["arms"]["GRADE"]["vs_best_static"]["composite"]["diff"] for r in rows
    )
    want = (TINY["GRADE"]["composite"][0] - TINY["best_static"]["composite"][0]).mean()
    assert diff / 5 == pytest.approx(want, abs=1e-5) and want > 0
    # the time zone moves the cut: 8 h later, the last request falls on the next day
    assert list(day_index(ts, 8.0)) == [20, 20, 21, 21, 23]
    assert per_day(TINY, np.zeros(5, np.int64), 30, 1) == []


@pytest.fixture(scope="module")
def evaluated_cli(smoke_data, tmp_path_factory):
    """A smoke run trained locally, then `grade-ray evaluate RUN --out DIR` (stdout kept)."""
    import contextlib
    import io

    from grade_ray.cli import main
    from grade_ray.config import load_config
    from grade_ray.jobs.train import run_train_local

    run = tmp_path_factory.mktemp("evalany") / "run"
    run.mkdir()
    (run / "data").symlink_to(Path(smoke_data[0]).parent)
    cfg = load_config([ROOT / "configs" / "smoke.yaml"], [f"run_dir={run}"])
    run_train_local(cfg)
    out = run.parent / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            ["evaluate", str(run), "--config", str(ROOT / "configs" / "smoke.yaml")]
            + ["--set", f"run_dir={run}", "--out", str(out)]
        )
    assert rc == 0
    return run, out, buf.getvalue()


def test_evaluate_out_writes_the_printed_tables(evaluated_cli):
    run, out, printed = evaluated_cli
    md = (out / "eval.md").read_text()
    assert printed.rstrip("\n") == md
    assert (run / "eval" / "eval.md").read_text() == md
    record = json.loads((out / "eval.json").read_text())
    # the keys suite, bench, tune and the tests read are still there
    for key in ("offline", "online", "headroom", "oracles", "logs_headroom", "static_weights"):
        assert record[key] is not None, key
    assert set(record["offline"]) == {"uniform", "best_static", "SP", "GRADE"}
    assert replay_markdown(record["replay"]) in md


def test_evaluate_replay_arms_and_days(evaluated_cli):
    run, out, _ = evaluated_cli
    record = json.loads((out / "eval.json").read_text())
    rep = record["replay"]
    arms = rep["arms"]
    assert list(arms) == [
        "uniform",
        "best_static",
        "segment_static",
        "SP",
        "GRADE",
        "SP-mean-static",
        "GRADE-mean-static",
    ]
    assert rep["comparisons"] == len(arms) - 1
    assert "vs_best_static" not in arms["best_static"]
    for arm, row in arms.items():
        if arm != "best_static":
            d = row["vs_best_static"]["composite"]
            assert d["comparisons"] == len(arms) - 1
            assert d["adj_ci_low"] <= d["ci_low"] <= d["diff"] <= d["ci_high"] <= d["adj_ci_high"]
    # the same composite as the offline table (which scores every arm on the same reward)
    for arm in ("uniform", "best_static", "SP", "GRADE"):
        got = arms[arm]["metrics"]["composite"]["value"]
        assert got == pytest.approx(record["offline"][arm]["composite"], abs=1e-5), arm
    seg = rep["static_weights"]["segment_static"]
    assert seg["source"] == "simulator user segment"
    assert set(seg["segments"]) == {"browser", "buyer", "premium", "bargain"}
    w = rep["static_weights"]["GRADE-mean-static"]
    assert sum(w.values()) == pytest.approx(1.0, abs=2e-3)
    # the smoke eval logs span two days: rows that count and average to the whole
    days = rep["days"]
    assert len(days) >= 2
    assert sum(d["requests"] for d in days) == rep["requests"] == 500
    for arm in arms:
        whole = arms[arm]["metrics"]["composite"]["value"]
        parts = sum(d["requests"] * d["arms"][arm]["metrics"]["composite"]["value"] for d in days)
        assert parts / rep["requests"] == pytest.approx(whole, abs=1e-5), arm
    assert set(rep["personalization"]) == {"SP", "GRADE"}
