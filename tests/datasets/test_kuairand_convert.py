"""KuaiRand converter and upstream MMoE on hand-made slices (written to tmp_path)."""

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

from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.datasets.kuairand.convert import convert_kuairand, convert_more, score_log
from grade_ray.datasets.kuairand.dataset import LABEL_NAMES, USER_CATEGORICAL, KuaiRandOptions
from grade_ray.datasets.kuairand.features import KuaiRandEncoder
from grade_ray.datasets.kuairand.grouping import group_requests
from grade_ray.datasets.kuairand.raw import clean_log, read_log, read_users, read_videos
from grade_ray.datasets.kuairand.scoring import LeakageError, check_no_leakage, load_upstream
from grade_ray.datasets.kuairand.sessions import session_batch
from grade_ray.datasets.kuairand.upstream import (
    UpstreamConfig,
    binary_auc,
    fit_mmoe,
    load_mmoe,
    predict_proba,
    save_mmoe,
)

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "kuairand-pure"  # ../shared/data next to the checkout
D1, D2, D3 = 20220425, 20220426, 20220427
T0 = 1_650_816_000_000  # 2022-04-25 00:00 Beijing time, in ms
DAY_MS = 86_400_000
TINY = UpstreamConfig(num_experts=2, expert_hidden=8, tower_hidden=4, emb_dim=2, epochs=1)


# ---------------------------------------------------------------------------
# fixtures: tiny files in the original KuaiRand layout


def _user_rows(ids) -> dict[str, list]:
    n = len(ids)
    cols = {
        "user_id": list(ids),
        "user_active_degree": ["full_active", "high_active"] * (n // 2) + ["full_active"] * (n % 2),
        "is_lowactive_period": [0] * n,
        "is_live_streamer": [-124] * n,
        "is_video_author": [i % 2 for i in range(n)],
        "follow_user_num": [10 * i for i in range(n)],
        "follow_user_num_range": ["(0,10]"] * n,
        "fans_user_num": [i for i in range(n)],
        "fans_user_num_range": ["[1,10)"] * n,
        "friend_user_num": [0] * n,
        "friend_user_num_range": ["0"] * n,
        "register_days": [100 + i for i in range(n)],
        "register_days_range": ["91-180"] * n,
    }
    for f in range(18):
        cols[f"onehot_feat{f}"] = [(i + f) % 3 for i in range(n)]
    cols["onehot_feat4"] = [None if i == 0 else float(i % 2) for i in range(n)]  # NaNs as in Pure
    return cols


def _video_rows(ids) -> dict[str, list]:
    n = len(ids)
    return {
        "video_id": list(ids),
        "author_id": [1000 + i // 2 for i in range(n)],
        "video_type": ["NORMAL"] * (n - 1) + ["AD"],
        "upload_dt": ["2022-04-10"] * n,
        "upload_type": ["Web", "LongImport"] * (n // 2) + ["Web"] * (n % 2),
        "visible_status": [0.0] * n,
        "video_duration": [None if i == 1 else 10_000.0 * (i + 1) for i in range(n)],
        "server_width": [720.0] * n,
        "server_height": [1280.0] * n,
        "music_id": list(range(n)),
        "music_type": [None if i == 2 else 9.0 for i in range(n)],
        "tag": [f"{i % 4},{i % 7 + 10}" if i % 2 else str(i % 4) for i in range(n)],
        # a statistic column (whole-period aggregate, leaks the future): must be ignored
        "show_cnt": [1e6 * i for i in range(n)],
    }


def _log_row(user, video, date, t_ms, **kw) -> dict:
    row = {
        "user_id": user,
        "video_id": video,
        "date": date,
        "hourmin": 0 if t_ms is None else (t_ms // 3_600_000 + 8) % 24 * 100,
        "time_ms": t_ms,
        "is_click": 0,
        "is_like": 0,
        "is_follow": 0,
        "is_comment": 0,
        "is_forward": 0,
        "is_hate": 0,
        "long_view": 0,
        "play_time_ms": 1000,
        "duration_ms": 10_000,
        "profile_stay_time": 0,
        "comment_stay_time": 0,
        "is_profile_enter": 0,
        "is_rand": 0,
        "tab": 1,
    }
    row.update(kw)
    return row


def _write(path: Path, rows: list[dict] | dict[str, list]) -> Path:
    table = pa.Table.from_pylist(rows) if isinstance(rows, list) else pa.table(rows)
    if path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    """User table (users 0..5, CSV) and video table (videos 0..9, Parquet with a stats column)."""
    users = _write(tmp_path / "user_features_pure.csv", _user_rows(range(6)))
    videos = _write(tmp_path / "item_features.parquet", _video_rows(range(10)))
    return users, videos


def _load(log: Path, tables: tuple[Path, Path]):
    users, videos = read_users(tables[0]), read_videos(tables[1])
    return clean_log(read_log(log), users, videos)


def _synthetic_log(n_days: int = 4, n_users: int = 6, seed: int = 0) -> list[dict]:
    """Random impressions: every user sees 2-5 videos a day; clicks depend on the video."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_days):
        date = int(f"202204{25 + d}")
        for u in range(n_users):
            for _ in range(int(rng.integers(2, 6))):
                v = int(rng.integers(0, 10))
                click = int(rng.random() < (0.8 if v < 5 else 0.2))
                rows.append(
                    _log_row(
                        u,
                        v,
                        date,
                        T0 + d * DAY_MS + int(rng.integers(0, DAY_MS - 1)),
                        is_click=click,
                        long_view=click * int(rng.random() < 0.5),
                        is_like=int(rng.random() < 0.2),
                        play_time_ms=int(rng.integers(0, 20_000)),
                    )
                )
    return rows


# ---------------------------------------------------------------------------
# grouping and labels


def test_a_row_logged_twice_is_dropped_and_counted(tmp_path, tables):
    """An impression logged twice (every column equal) is one impression: a one-impression
    user-day must not become a two-item request of the same video. Rows that only share
    user, video and time are kept and counted."""
    rows = [
        _log_row(1, 2, D1, T0 + 1_000, is_click=1),
        _log_row(1, 2, D1, T0 + 1_000, is_click=1),  # the same row again
        _log_row(2, 6, D1, T0 + 500),
        _log_row(2, 6, D1, T0 + 500, is_click=1),  # same key, another label: kept
    ]
    imp, report, rejected = _load(_write(tmp_path / "log.csv", rows), tables)
    assert (report["rows_read"], report["rows_valid"], report["rows_rejected"]) == (4, 3, 0)
    assert report["rows_duplicate_dropped"] == 1 and report["duplicate_impressions"] == 1
    assert rejected is None and imp.src.tolist() == [0, 2, 3]  # the first copy is kept
    req = group_requests(imp, "user_day")
    assert sorted(req.lengths.tolist()) == [1, 2]  # user 1's day: one impression


def test_user_day_grouping_orders_by_time_and_maps_labels(tmp_path, tables):
    rows = [
        _log_row(1, 3, D1, T0 + 3_000, play_time_ms=3000, duration_ms=2000),  # wr 1.5
        _log_row(1, 2, D1, T0 + 1_000, is_click=1, is_like=1, is_comment=1, long_view=1),
        _log_row(1, 4, D1, T0 + 2_000, play_time_ms=30_000, duration_ms=1000, is_hate=1),  # 5
        _log_row(1, 5, D2, T0 + DAY_MS, duration_ms=0, is_follow=1, is_forward=1),  # wr 0
        _log_row(2, 6, D1, T0 + 500, is_click=1),
    ]
    imp, report, rejected = _load(_write(tmp_path / "log.csv", rows), tables)
    assert report["rows_read"] == 5 and report["rows_rejected"] == 0 and rejected is None
    req = group_requests(imp, "user_day")
    assert len(req) == 3
    by_id = {int(r): i for i, r in enumerate(req.request_id)}
    first = by_id[D1 * 10**11 + 1 * 10**4]
    s, e = req.offsets[first], req.offsets[first + 1]
    assert imp.video_id[req.order[s:e]].tolist() == [2, 4, 3]  # time order
    assert req.ts[first] == (T0 + 1_000) // 1000
    lab = dict(zip(imp.video_id.tolist(), imp.labels.tolist()))
    names = "click long_view like follow comment forward hate watch_ratio"
    assert tuple(names.split()) == LABEL_NAMES
    assert lab[2] == pytest.approx([1, 1, 1, 0, 1, 0, 0, 0.1])
    assert lab[4] == [0, 0, 0, 0, 0, 0, 1, 5.0]  # watch ratio clipped to 5
    assert lab[3][-1] == 1.5 and lab[5] == [0, 0, 0, 1, 0, 1, 0, 0.0]
    batch = session_batch(req, imp, np.zeros((len(imp), 3), np.float32), np.zeros((3, 1)))
    row = batch.request_id.tolist().index(D1 * 10**11 + 1 * 10**4)
    assert batch.item_ids[row].tolist() == [2, 4, 3] and batch.mask[row].all()


def test_session_gap_splits_requests_and_never_crosses_a_date(tmp_path, tables):
    t = T0 + 10 * 3_600_000
    rows = [_log_row(1, v, D1, t + dt * 1000) for v, dt in enumerate([0, 10, 2000, 2010, 20])]
    rows.append(_log_row(1, 9, D2, t + 2030 * 1000))  # 20 s later but the next date
    imp, _, _ = _load(_write(tmp_path / "log.csv", rows), tables)
    req = group_requests(imp, "session", session_gap_s=1800)
    assert req.lengths.tolist() == [3, 2, 1]
    base = 1 * 10**4
    assert req.request_id.tolist() == [
        D1 * 10**11 + base,
        D1 * 10**11 + base + 1,
        D2 * 10**11 + base,
    ]
    assert imp.video_id[req.order].tolist() == [0, 1, 4, 2, 3, 9]
    assert len(group_requests(imp, "user_day")) == 2
    with pytest.raises(ValueError, match="group_by"):
        group_requests(imp, "hour")


def test_provided_watch_ratio_column_is_used(tmp_path, tables):
    rows = [_log_row(1, 1, D1, T0, watch_ratio=0.25), _log_row(1, 2, D1, T0 + 1, watch_ratio=9.0)]
    imp, _, _ = _load(_write(tmp_path / "log.parquet", rows), tables)
    assert imp.labels[:, -1].tolist() == [0.25, 5.0]


# ---------------------------------------------------------------------------
# bad rows


def test_bad_rows_are_counted_with_reasons(tmp_path, tables):
    rows = [
        _log_row(1, 1, D1, T0),
        _log_row(9, 1, D1, T0 + 1),  # user not in user table
        _log_row(1, 99, D1, T0 + 2),  # unknown video
        _log_row(1, 2, D1, T0 + 3, is_click=None),  # NaN in a label
        _log_row(1, 2, D1, None),  # NaN time
        _log_row(1, 2, 20221345, T0 + 5),  # not a date
        _log_row(1, 2, D1, T0 + 6, is_like=2),
    ]
    imp, report, rejected = _load(_write(tmp_path / "log.csv", rows), tables)
    assert len(imp) == 1 and report["rows_read"] == 7 and report["rows_rejected"] == 6
    assert report["rejected_by_reason"] == {
        "user_id not in user table": 1,
        "video_id not in video table": 1,
        "NaN in is_click": 1,
        "NaN in time_ms": 1,
        "invalid date (expected yyyymmdd)": 1,
        "is_like not 0/1": 1,
    }
    assert rejected.num_rows == 6
    assert rejected["log_row"].to_pylist() == [1, 2, 3, 4, 5, 6]
    assert rejected["reject_reason"][0].as_py() == "user_id not in user table"


def test_missing_column_names_file_and_column(tmp_path, tables):
    path = tmp_path / "log.csv"
    _write(path, [{k: v for k, v in _log_row(1, 1, D1, T0).items() if k != "long_view"}])
    with pytest.raises(ValueError, match=r"log\.csv.*long_view"):
        read_log(path)


# ---------------------------------------------------------------------------
# end to end on a synthetic slice


@pytest.fixture
def converted(tmp_path, tables):
    rows = _synthetic_log()
    rows.append(_log_row(9, 1, D3, T0 + 2 * DAY_MS + 5))  # a bad row on a scored day
    log = _write(tmp_path / "log_standard_pure.csv", rows)
    out = tmp_path / "out"
    report = convert_kuairand(
        log, *tables, out, upstream_train_days=2, upstream=TINY, write_rejects=True
    )
    return log, out, report


def test_convert_writes_valid_sessions_after_the_training_boundary(converted):
    log, out, report = converted
    boundary = max(report["upstream"]["train_dates"])
    assert report["upstream"]["train_dates"] == [D1, D2]
    for split, dates in (("train", [D3]), ("eval", [20220428])):
        batch, meta, read = read_sessions(out / split)
        assert read.rows_rejected == 0 and len(batch) == report["splits"][split]["requests"]
        req_dates = batch.request_id // 10**11
        assert (req_dates > boundary).all() and sorted(set(req_dates.tolist())) == dates
        assert meta.task_names == ("click", "long_view", "like") and meta.task_kinds[0] == "prob"
        assert meta.label_names == LABEL_NAMES
        assert batch.context.shape[1] == meta.context_dim == len(meta.context_names)
        assert (batch.mask.sum(1) >= 2).all()
        assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
        assert meta.source["licence"] == "CC BY-SA 4.0" and "KuaiRand" in meta.source["attribution"]
        assert meta.source["upstream_train_dates"] == [D1, D2]
        assert "show_cnt" not in " ".join(meta.context_names)
    pos = pq.read_table(next((out / "eval").glob("*.parquet")))["logged_position"].to_pylist()
    assert all(p == list(range(len(p))) for p in pos)
    rows = report["rows"]
    assert rows["rows_rejected"] == 1 and (out / "rejects.parquet").exists()
    parts = (
        "rows_rejected",
        "rows_duplicate_dropped",
        "rows_upstream_train",
        "rows_in_sessions",
        "rows_in_short_lists",
    )
    assert sum(rows[k] for k in parts) == rows["rows_read"]
    assert "CC BY-SA 4.0" in (out / "README.md").read_text()
    # every derived file carries the notice: the rejects (raw rows) and the upstream bundle
    # (KuaiRand's id vocabularies) too
    notice = pq.read_schema(out / "rejects.parquet").metadata[b"licence_notice"].decode()
    assert "CC BY-SA 4.0" in notice
    assert (
        "CC BY-SA 4.0"
        in json.loads((out / "upstream" / "upstream.json").read_text())["licence_notice"]
    )
    saved = json.loads((out / "upstream_report.json").read_text())
    assert set(saved["upstream"]["auc_scored_days"]) == {"click", "long_view", "like"}


def test_scoring_a_training_day_raises(converted, tables):
    log, out, _ = converted
    bundle = load_upstream(out)
    users, videos = read_users(tables[0]), read_videos(tables[1])
    imp, _, _ = clean_log(read_log(log), users, videos)
    train_day = imp.take(np.flatnonzero(imp.date == D2))
    with pytest.raises(LeakageError, match="refusing to score"):
        bundle.score(users, videos, train_day)
    with pytest.raises(LeakageError):
        convert_more(log, out, out / "more", user_path=tables[0], video_path=tables[1])
    with pytest.raises(LeakageError):
        check_no_leakage(np.array([D1 - 1]), [D1, D2])  # before the window: also refused
    check_no_leakage(np.array([D3]), [D1, D2])


def test_convert_more_scores_later_days_with_the_saved_model(converted, tables):
    log, out, report = converted
    more = convert_more(
        log, out, out / "more", user_path=tables[0], video_path=tables[1], dates=[20220428]
    )
    batch, meta, _ = read_sessions(out / "more")
    assert more["splits"]["more"]["requests"] == len(batch) == report["splits"]["eval"]["requests"]
    assert meta.source["split"] == "more" and (out / "more" / "README.md").exists()
    ref, _, _ = read_sessions(out / "eval")  # same model, same day: same scores
    np.testing.assert_allclose(
        np.sort(batch.scores.ravel()), np.sort(ref.scores.ravel()), atol=1e-6
    )
    table, rep = score_log(
        log, out, user_path=tables[0], video_path=tables[1], dates=[D3, 20220428]
    )
    assert set(table["date"].to_pylist()) == {D3, 20220428} and "p_like" in table.column_names
    assert rep["rows_outside_dates"] > 0

    # evaluate refuses held-out days that a policy trained on out/train has seen
    from grade_ray.jobs.evaluate import _check_time_split

    _check_time_split(str(out / "train"), str(out / "more"))  # 04-28 after D3: fine
    convert_more(log, out, out / "seen", user_path=tables[0], video_path=tables[1], dates=[D3])
    with pytest.raises(LeakageError, match="time split violated"):
        _check_time_split(str(out / "train"), str(out / "seen"))


def test_vocabularies_are_fitted_on_training_days_only(tmp_path, tables):
    rows = _synthetic_log(n_days=3, n_users=4)
    rows = [r for r in rows if not (r["video_id"] == 7 or r["user_id"] == 5)]
    rows += [_log_row(5, 7, D3, T0 + 2 * DAY_MS + i) for i in range(3)]  # only on a scored day
    users, videos = read_users(tables[0]), read_videos(tables[1])
    imp, _, _ = clean_log(read_log(_write(tmp_path / "log.csv", rows)), users, videos)
    train = imp.take(np.flatnonzero(imp.date < D3))
    enc = KuaiRandEncoder.fit(users, videos, train, KuaiRandOptions())
    assert "7" not in enc.id_vocab["video_id"] and "5" not in enc.id_vocab["user_id"]
    assert enc.train_dates == [D1, D2]
    _, cats, sizes = enc.upstream_inputs(users, videos, imp.take(np.flatnonzero(imp.date == D3)))
    assert cats.shape[1] == len(sizes) and (cats < np.array(sizes)).all()
    scored_only = imp.take(np.flatnonzero(imp.user_id == 5))
    _, cats, _ = enc.upstream_inputs(users, videos, scored_only)
    names = [*USER_CATEGORICAL, *enc.embedding_names()]
    assert (cats[:, names.index("video_id")] == 0).all() and (
        cats[:, names.index("user_id")] == 0
    ).all()


def test_too_few_dates_is_a_clear_error(tmp_path, tables):
    log = _write(tmp_path / "log.csv", _synthetic_log(n_days=2))
    with pytest.raises(ValueError, match="at least one date for the train split"):
        convert_kuairand(log, *tables, tmp_path / "o", upstream_train_days=1, upstream=TINY)


# ---------------------------------------------------------------------------
# upstream model


def test_binary_auc_hand_values():
    assert binary_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert binary_auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5  # ties count one half
    assert math.isnan(binary_auc(np.ones(3), np.arange(3.0)))


def test_mmoe_learns_and_roundtrips_through_a_safe_state_dict(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(2000, 3)).astype(np.float32)
    cats = rng.integers(0, 5, size=(2000, 2))
    y = np.stack([dense[:, 0] > 0, cats[:, 1] >= 3], 1).astype(np.float32)
    cfg = UpstreamConfig(tasks=("a", "b"), epochs=4, batch_size=64, num_experts=2)
    model, hist = fit_mmoe(dense, cats, y, [5, 5], cfg)
    p = predict_proba(model, dense, cats)
    assert p.shape == (2000, 2) and binary_auc(y[:, 0], p[:, 0]) > 0.9
    assert binary_auc(y[:, 1], p[:, 1]) > 0.9 and hist["epoch_loss"][-1] < hist["epoch_loss"][0]
    save_mmoe(model, tmp_path / "w.pt")
    assert all(isinstance(v, torch.Tensor) for v in torch.load(tmp_path / "w.pt").values())
    again, _ = load_mmoe(tmp_path / "w.pt", model.architecture(cfg))
    np.testing.assert_array_equal(predict_proba(again, dense, cats), p)


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="shipped KuaiRand-Pure copy not present")
def test_real_kuairand_end_to_end(tmp_path):
    report = convert_kuairand(
        REAL / "log_2022-04-25_to_04-30.parquet",
        REAL / "user_features.parquet",
        REAL / "video_features_basic_pure.csv",
        tmp_path,
        upstream_train_days=3,
    )
    assert report["rows"]["rows_read"] == 94_784
    assert report["upstream"]["auc_scored_days"]["click"] > 0.6
    for split in ("train", "eval"):
        batch, meta, _ = read_sessions(tmp_path / split)
        assert len(batch) == report["splits"][split]["requests"] > 1000
    assert read_meta(tmp_path / "eval").source["dates"] == [20220430]


def test_a_malformed_log_is_one_line_naming_file_and_line(tmp_path, tables, capsys):
    """`grade-ray data kuairand` on a log with a non-number or a short line: one error line
    naming the file and the line (the header is line 1), exit 2, no traceback."""
    from grade_ray.cli import main

    rows = [_log_row(1, 2, D1, T0 + i * 1000) for i in range(4)]
    for case, edit, want in (
        ("text", lambda s: s.replace(",0,", ",abc,", 1), ("line 2, column", "is not a number")),
        ("short", lambda s: s + "1,2\n", ("line 6 has 2 fields",)),
    ):
        d = tmp_path / case
        d.mkdir()
        for src in tables:
            (d / src.name).write_bytes(src.read_bytes())
        log = _write(d / "log_random.csv", rows)
        log.write_text(edit(log.read_text()))
        rc = main(["data", "kuairand", "--data-dir", str(d), "--out", str(tmp_path / f"o-{case}")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert str(log) in err[0] and all(w in err[0] for w in want), err
