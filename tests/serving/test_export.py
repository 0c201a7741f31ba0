"""Policy export (TorchScript + metadata) and the serving API built on it."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.cli import main
from grade_ray.data.reading import read_meta, read_sessions
from grade_ray.data.sessions import SessionMeta
from grade_ray.learner.loop import load_policy, new_policy, save_policy
from grade_ray.serving.export import (
    MANIFEST_FILE,
    METADATA_FILE,
    TORCHSCRIPT_FILE,
    export_policy,
    sha256_file,
)
from grade_ray.serving.infer import OUT_RANKING, OUT_REQUEST_ID, OUT_WEIGHTS
from grade_ray.serving.service import EAGER_PREFIX, FusionService, RequestError, serving_latency

TS_RANGE = [1_700_000_000, 1_700_600_000]


@pytest.fixture(scope="module")
def run_dir(smoke_cfg, smoke_data, tmp_path_factory):
    """A run dir with a saved policy whose weights are far from uniform."""
    train_path, _ = smoke_data
    meta = read_meta(train_path)
    policy = new_policy(smoke_cfg, meta, train_path)
    torch.manual_seed(1)
    with torch.no_grad():  # the fresh policy is uniform; make it personalise
        for p in policy.tower.parameters():
            p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("export_run")
    save_policy(d / "policy.pt", policy, smoke_cfg, meta, {"stage": 2, "ts_range": TS_RANGE})
    return d


@pytest.fixture(scope="module")
def export_dir(run_dir):
    out = run_dir / "export"
    export_policy(run_dir, out)
    return out


@pytest.fixture(scope="module")
def service(export_dir):
    return FusionService.load(export_dir)


@pytest.fixture(scope="module")
def reference(run_dir):
    """The in-framework policy loaded from the run (not from the export)."""
    policy, meta, _ = load_policy(run_dir)
    return policy, meta


def _contexts(policy, n: int, seed: int = 0) -> np.ndarray:
    """(n, D) float32 contexts: typical, far out (+-1e4 std), zeros and constant extremes."""
    rng = np.random.default_rng(seed)
    mean, std = policy.x_mean.numpy(), policy.x_std.numpy()
    z = rng.standard_normal((n, len(mean)))
    z[: n // 4] *= 1e4
    x = (mean + std * z).astype(np.float32)
    x[-1] = 0.0
    x[-2] = 1e5
    x[-3] = -1e5
    return x


# ---------------------------------------------------------------------------
# the artifact


def test_export_writes_torchscript_zip_and_json_only(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    md = json.loads((export_dir / METADATA_FILE).read_text())
    expected = {TORCHSCRIPT_FILE, METADATA_FILE, MANIFEST_FILE} | (
        {md["files"]["onnx"]["path"]} if md["files"]["onnx"] else set()
    )
    assert names == expected
    ts = export_dir / TORCHSCRIPT_FILE
    assert zipfile.is_zipfile(ts)
    with zipfile.ZipFile(ts) as z:
        entries = z.namelist()
    assert any("/code/" in e for e in entries)  # a TorchScript archive, not a pickled module


def test_metadata_content(export_dir, reference, smoke_cfg):
    policy, meta = reference
    md = json.loads((export_dir / METADATA_FILE).read_text())
    assert md["format_version"] == 2
    assert md["grade_ray_version"]
    assert md["context"]["names"] == list(meta.context_names)
    assert md["context"]["dim"] == meta.context_dim
    pre = md["context"]["preprocessing"]
    np.testing.assert_array_equal(np.float32(pre["mean"]), policy.x_mean.numpy())
    np.testing.assert_array_equal(np.float32(pre["std"]), policy.x_std.numpy())
    assert md["tasks"]["names"] == list(meta.task_names)
    assert md["fusion"] == {"form": smoke_cfg.policy.fusion, "eps": smoke_cfg.policy.fusion_eps}
    assert md["training"]["ts_range"] == TS_RANGE
    assert md["training"]["config_hash"] == smoke_cfg.hash()
    ts = md["files"]["torchscript"]
    assert ts["sha256"] == sha256_file(export_dir / ts["path"])
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert md["files"]["onnx"] is None
        assert any("onnx" in n.lower() for n in md["notes"])


def test_load_never_unpickles(export_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("serving must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for backend in ("torchscript", "eager"):
        svc = FusionService.load(export_dir, backend)
        assert svc.weights(np.zeros((2, svc.context_dim), np.float32)).shape == (2, svc.num_tasks)


def test_tampered_export_is_refused(export_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    data = bytearray((bad / TORCHSCRIPT_FILE).read_bytes())
    data[-100] ^= 0xFF
    (bad / TORCHSCRIPT_FILE).write_bytes(bytes(data))
    with pytest.raises(RequestError, match="sha256"):
        FusionService.load(bad)


# ---------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("n", [3, 7, 256])
def test_parity_with_in_framework_policy(export_dir, reference, backend, n):
    policy, _ = reference
    x = _contexts(policy, n, seed=n)
    with torch.no_grad():
        want = policy.pi(torch.from_numpy(x)).numpy()
    got = FusionService.load(export_dir, backend).weights(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert (got >= 0).all()
    assert np.ptp(got[: n // 2 + 1], axis=0).max() > 1e-3  # personalised, not constant


def test_parity_batch_of_one(service, reference):
    policy, _ = reference
    x = _contexts(policy, 8)
    for row in x:
        with torch.no_grad():
            want = policy.pi(torch.from_numpy(row[None])).numpy()
        np.testing.assert_allclose(service.weights(row[None]), want, rtol=0, atol=1e-5)


def test_onnx_parity(export_dir, reference):
    pytest.importorskip("onnxruntime")
    md = json.loads((export_dir / METADATA_FILE).read_text())
    if md["files"]["onnx"] is None:
        pytest.skip("no ONNX export here: " + "; ".join(md["notes"]))
    policy, _ = reference
    x = _contexts(policy, 64)
    with torch.no_grad():
        want = policy.pi(torch.from_numpy(x)).numpy()
    got = FusionService.load(export_dir, "onnx").weights(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# request checks


def test_numeric_dtypes_are_cast(service):
    x = np.arange(3 * service.context_dim).reshape(3, -1) % 5
    want = service.weights(x.astype(np.float32))
    for dt in (np.int64, np.int32, np.uint8, np.float64, np.float16):
        np.testing.assert_array_equal(service.weights(x.astype(dt)), want)
    np.testing.assert_array_equal(service.weights(x.tolist()), want)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: np.zeros((2, d + 1), np.float32), "features per request"),
        (lambda d: np.zeros((2, d - 1), np.float32), "features per request"),
        (lambda d: np.zeros(d, np.float32), r"2-D.*context\[None, :\]"),
        (lambda d: np.zeros((1, 2, d), np.float32), "2-D"),
        (lambda d: np.full((2, d), np.nan, np.float32), r"NaN or inf.*rows \[0, 1\]"),
        (lambda d: np.where(np.arange(d) == 3, np.inf, 0.0)[None], "NaN or inf"),
        (lambda d: np.full((1, d), 1e39), "NaN or inf"),  # overflows float32
        (lambda d: np.full((1, d), "0.5"), "dtype <U3"),
        (lambda d: np.array([[0.5] * d], dtype=object), "dtype object"),
        (lambda d: np.zeros((1, d), bool), "dtype bool"),
        (lambda d: np.zeros((1, d), np.complex64), "dtype complex64"),
        (lambda d: [[0.0] * d, [0.0]], "rectangular"),
    ],
)
def test_bad_context_raises(service, make, match):
    with pytest.raises(RequestError, match=match):
        service.weights(make(service.context_dim))


def test_empty_batch(service):
    assert service.weights(np.zeros((0, service.context_dim), np.float32)).shape == (0, 4)


def _request(service, b=3, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, service.context_dim)).astype(np.float32)
    s = rng.uniform(0.01, 1.0, (b, n, service.num_tasks)).astype(np.float32)
    return x, s


def test_fused_scores_match_fusion(service):
    x, s = _request(service)
    w = service.weights(x)
    want = fuse(service.fusion, torch.from_numpy(s), torch.from_numpy(w), service.fusion_eps)
    np.testing.assert_allclose(service.fused_scores(x, s), want.numpy(), rtol=1e-6)
    order = service.rank(x, s)
    np.testing.assert_array_equal(order, np.argsort(-want.numpy(), axis=1, kind="stable"))


def test_single_request_and_mask(service):
    x, s = _request(service, b=1)
    single = service.fused_scores(x, s[0])
    np.testing.assert_array_equal(single, service.fused_scores(x, s))
    mask = np.array([True, False, True, True, False, True])
    s_pad = s.copy()
    s_pad[0, ~mask] = np.nan  # padding may hold anything
    fused = service.fused_scores(x, s_pad[0], mask)
    assert np.isneginf(fused[0, ~mask]).all()
    np.testing.assert_array_equal(fused[0, mask], single[0, mask])
    order = service.rank(x, s_pad[0], mask)[0]
    assert set(order[-2:]) == {1, 4}  # masked candidates rank last
    np.testing.assert_array_equal(order[:4], np.flatnonzero(mask)[np.argsort(-single[0, mask])])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, s: (x, s[:2]), r"scores are for 2 request\(s\) but context has 3"),
        (lambda x, s: (x[:1], s[0]), None),  # single request, fine
        (lambda x, s: (x, s[0]), r"context of shape \(1, D\)"),
        (lambda x, s: (x, s[..., :3]), "3 tasks per candidate"),
        (lambda x, s: (x, s[0, 0]), "scores must be"),
        (lambda x, s: (x, np.where(s > 0.5, np.nan, s)), "NaN or inf in scores"),
        (lambda x, s: (x, s.astype(str)), "scores has dtype"),
    ],
)
def test_bad_scores_raise(service, change, match):
    x, s = _request(service)
    x2, s2 = change(x, s)
    if match is None:
        assert service.fused_scores(x2, s2).shape == (1, s.shape[1])
        return
    with pytest.raises(RequestError, match=match):
        service.fused_scores(x2, s2)


def test_negative_scores_and_bad_mask(service):
    x, s = _request(service)
    s[1, 2, 0] = -0.1
    if service.fusion == "log_product":
        with pytest.raises(RequestError, match=r"negative scores in requests \[1\]"):
            service.fused_scores(x, s)
    mask = np.ones(s.shape[:2], dtype=bool)
    mask[1, 2] = False  # the negative one is padding: fine
    assert service.fused_scores(x, s, mask).shape == s.shape[:2]
    with pytest.raises(RequestError, match="mask must be a bool"):
        service.fused_scores(x, s, mask.astype(int))
    with pytest.raises(RequestError, match="mask has shape"):
        service.fused_scores(x, s, mask[:, :3])


def test_check_meta(service, reference):
    _, meta = reference
    service.check_meta(meta)
    swapped = SessionMeta(
        meta.task_names[::-1], meta.task_kinds[::-1], meta.label_names, meta.context_names
    )
    with pytest.raises(RequestError, match="order must match"):
        service.check_meta(swapped)
    other = SessionMeta(meta.task_names, meta.task_kinds, meta.label_names, ("a", "b"))
    with pytest.raises(RequestError, match="context features"):
        service.check_meta(other)


# ---------------------------------------------------------------------------
# CLI: export and infer


def test_cli_export_and_infer(run_dir, smoke_data, reference, tmp_path, capsys):
    _, eval_path = smoke_data
    policy, _ = reference
    out_dir = tmp_path / "exp"
    assert main(["export", str(run_dir), "--out", str(out_dir)]) == 0
    assert (out_dir / TORCHSCRIPT_FILE).exists() and (out_dir / METADATA_FILE).exists()
    assert "exported to" in capsys.readouterr().out

    out = tmp_path / "scored.parquet"
    rc = main(
        ["infer", str(out_dir), "--data", str(eval_path), "--out", str(out), "--batch-size", "128"]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["rows_written"] > 0

    table = pq.read_table(out)
    batch, _, report = read_sessions(eval_path)
    assert table.num_rows == len(batch) == report.rows_read  # one row per request
    np.testing.assert_array_equal(table.column(OUT_REQUEST_ID).to_numpy(), batch.request_id)
    w_out = np.array(table.column(OUT_WEIGHTS).to_pylist(), dtype=np.float32)
    with torch.no_grad():
        w = policy.pi(torch.from_numpy(batch.context))
    np.testing.assert_allclose(w_out, w.numpy(), rtol=0, atol=1e-5)

    fusion = json.loads((out_dir / METADATA_FILE).read_text())["fusion"]
    fused = fuse(fusion["form"], torch.from_numpy(batch.scores), w, fusion["eps"]).numpy()
    rankings = table.column(OUT_RANKING).to_pylist()
    lengths = batch.mask.sum(1)
    for r, ranking in enumerate(rankings):
        n = lengths[r]
        assert sorted(ranking) == list(range(n))
        np.testing.assert_array_equal(ranking, np.argsort(-fused[r, :n], kind="stable"))


def test_cli_infer_errors_are_clear(export_dir, tmp_path, capsys):
    assert main(["infer", str(export_dir), "--data", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "no such session file" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# latency benchmark


def test_serving_latency_keys(export_dir):
    threads = torch.get_num_threads()
    res = serving_latency(export_dir, repeats_b1=20, repeats_b256=5, warmup=2)
    assert torch.get_num_threads() == threads
    for prefix in ("serving.", EAGER_PREFIX):
        for k in ("p50_ms_b1", "p99_ms_b1", "p50_ms_b256", "p99_ms_b256"):
            assert res[prefix + k] > 0
        assert res[prefix + "p99_ms_b1"] >= res[prefix + "p50_ms_b1"]


def test_export_missing_run_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no policy"):
        export_policy(tmp_path, tmp_path / "out")
    assert main(["export", str(tmp_path)]) == 2
    assert not (Path(tmp_path) / "out").exists()
