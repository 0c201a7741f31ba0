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
from grade_ray.data.reading import read_sessions
from grade_ray.data.sessions import SessionMeta
from grade_ray.learner.loop import load_policy
from grade_ray.serving.export import (
    MANIFEST_FILE,
    METADATA_FILE,
    ONNX_FILE,
    ONNX_OPSET,
    ONNX_PACKAGES,
    TORCHSCRIPT_FILE,
    export_policy,
    sha256_file,
    write_manifest,
)
from grade_ray.serving.infer import OUT_RANKING, OUT_REQUEST_ID, OUT_WEIGHTS
from grade_ray.serving.service import (
    EAGER_PREFIX,
    ONNX_PREFIX,
    FusionService,
    RequestError,
    serving_latency,
)

TS_RANGE = [1_700_000_000, 1_700_600_000]


@pytest.fixture(scope="module")
def run_dir(personalised_run, tmp_path_factory):
    """A run dir with a saved policy whose weights are far from uniform."""
    d = tmp_path_factory.mktemp("export_run")
    return personalised_run(d, seed=1, info={"ts_range": TS_RANGE})


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
    assert md["files"]["onnx"] is None and md["onnx"] is None  # only with --onnx
    assert any("--onnx" in n for n in md["notes"])


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


# ---------------------------------------------------------------------------
# ONNX (`grade-ray export --onnx`, the grade_ray[onnx] extra)

ONNX_REASON = "the grade_ray[onnx] extra is not installed (pip install 'grade_ray[onnx]')"


@pytest.fixture(scope="module")
def onnx_export(run_dir):
    """An export with policy.onnx; skips (saying why) without the onnx extra."""
    for module in ONNX_PACKAGES:
        pytest.importorskip(module, reason=ONNX_REASON)
    out = run_dir / "export_onnx"
    md = export_policy(run_dir, out, onnx=True)
    return out, md


def _extreme_contexts(policy) -> np.ndarray:
    """Contexts with large and tiny raw values: +-1e5 .. +-1e30, 1e-30, subnormal, 0."""
    d = policy.context_dim
    rows = [np.full(d, v, np.float32) for v in (1e5, -1e5, 1e10, 1e20, 1e30, -1e30)]
    rows += [np.full(d, v, np.float32) for v in (1e-30, -1e-30, 1e-45, 0.0)]
    alternating = np.where(np.arange(d) % 2 == 0, 1e30, -1e30).astype(np.float32)
    # float32's largest value overflows inside the network: both must say so (non-finite)
    return np.stack(rows + [alternating, np.full(d, np.finfo(np.float32).max)])


def test_onnx_export_is_in_metadata_and_manifest(onnx_export):
    out, md = onnx_export
    assert md["files"]["onnx"] == {"path": ONNX_FILE, "sha256": sha256_file(out / ONNX_FILE)}
    assert md["onnx"]["opset"] == ONNX_OPSET and md["notes"] == []
    manifest = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert manifest[ONNX_FILE] == sha256_file(out / ONNX_FILE)
    assert manifest[METADATA_FILE] == sha256_file(out / METADATA_FILE)
    assert {p.name for p in out.iterdir()} == {
        TORCHSCRIPT_FILE,
        ONNX_FILE,
        METADATA_FILE,
        MANIFEST_FILE,
    }


def test_onnx_parity_every_batch_size(onnx_export, reference):
    """The raw graph through onnxruntime vs the PyTorch policy, batch sizes 1..256 on one
    session (the batch axis is dynamic), typical and far-out contexts."""
    import onnxruntime as ort

    out, md = onnx_export
    policy, _ = reference
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == sess.get_outputs()[0].shape[0] == "batch"
    x_all = _contexts(policy, 256 * 257 // 2, seed=7)
    worst, a = 0.0, 0
    for b in range(1, 257):
        x = x_all[a : a + b]
        a += b
        with torch.no_grad():
            want = policy.pi(torch.from_numpy(x)).numpy()
        got = sess.run(None, {md["input"]["name"]: x})[0]
        assert got.shape == want.shape == (b, policy.num_tasks)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"ONNX vs PyTorch, batch sizes 1..256: max abs error {worst:.3g}")
    assert worst <= 1e-5


def test_onnx_parity_extreme_contexts(onnx_export, reference):
    import onnxruntime as ort

    out, md = onnx_export
    policy, _ = reference
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    x = _extreme_contexts(policy)
    with torch.no_grad():
        want = policy.pi(torch.from_numpy(x)).numpy()
    got = sess.run(None, {md["input"]["name"]: x})[0]
    finite = np.isfinite(want).all(axis=1)
    assert finite[:-1].all() and not finite[-1]  # the inputs reach both regimes
    np.testing.assert_array_equal(np.isfinite(got).all(axis=1), finite)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5)


def test_onnx_backend_serves_like_torchscript(onnx_export, reference):
    out, _ = onnx_export
    policy, _ = reference
    onnx_svc = FusionService.load(out, "onnx")
    ts_svc = FusionService.load(out, "torchscript")
    x = np.concatenate([_contexts(policy, 64), _extreme_contexts(policy)[:-1]])
    with torch.no_grad():
        want = policy.pi(torch.from_numpy(x)).numpy()
    got = onnx_svc.weights(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    rng = np.random.default_rng(0)
    s = rng.uniform(0.01, 1.0, (len(x), 20, onnx_svc.num_tasks)).astype(np.float32)
    np.testing.assert_allclose(
        onnx_svc.fused_scores(x, s), ts_svc.fused_scores(x, s), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(RequestError, match="non-finite weights"):  # same checks as torchscript
        onnx_svc.weights(_extreme_contexts(policy)[-1:])


def test_onnx_file_is_checked(onnx_export, tmp_path):
    import shutil

    out, _ = onnx_export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(RequestError, match=f"{ONNX_FILE} does not match the sha256"):
        FusionService.load(bad, "onnx")
    # dropped from the manifest: metadata.json (covered) still records its sha256
    write_manifest(bad, [TORCHSCRIPT_FILE, METADATA_FILE])
    with pytest.raises(RequestError, match=f"{ONNX_FILE} is missing or does not match"):
        FusionService.load(bad, "onnx")


def test_onnx_backend_needs_an_onnx_export(export_dir):
    pytest.importorskip("onnxruntime", reason=ONNX_REASON)
    with pytest.raises(RequestError, match="no ONNX export.*--onnx"):
        FusionService.load(export_dir, "onnx")


def test_cli_export_onnx_and_infer_onnx(onnx_export, run_dir, smoke_data, tmp_path, capsys):
    _, eval_path = smoke_data
    out_dir = tmp_path / "exp"
    assert main(["export", str(run_dir), "--out", str(out_dir), "--onnx"]) == 0
    assert f"onnx: {ONNX_FILE} sha256=" in capsys.readouterr().out
    tables = {}
    for backend in ("torchscript", "onnx"):
        out = tmp_path / f"{backend}.parquet"
        argv = ["infer", str(out_dir), "--data", str(eval_path), "--out", str(out)]
        assert main([*argv, "--backend", backend]) == 0
        tables[backend] = pq.read_table(out)
    ts, ox = tables["torchscript"], tables["onnx"]
    assert ts.num_rows == ox.num_rows > 0
    np.testing.assert_allclose(
        np.array(ox.column(OUT_WEIGHTS).to_pylist()),
        np.array(ts.column(OUT_WEIGHTS).to_pylist()),
        rtol=0,
        atol=1e-5,
    )
    same = [
        a == b
        for a, b in zip(ox.column(OUT_RANKING).to_pylist(), ts.column(OUT_RANKING).to_pylist())
    ]
    assert np.mean(same) > 0.99  # fused scores within ~1e-6: only near-ties may swap


def test_cli_export_onnx_without_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    import grade_ray.serving.export as export_mod

    monkeypatch.setattr(export_mod, "missing_onnx_packages", lambda: ["onnxscript"])
    out_dir = tmp_path / "exp"
    assert main(["export", str(run_dir), "--out", str(out_dir), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "--onnx needs the onnx extra (onnxscript not installed)" in err
    assert "grade_ray[onnx]" in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()  # refused before anything is written


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
    assert not any(k.startswith(ONNX_PREFIX) for k in res)  # no policy.onnx in this export


def test_serving_latency_onnx_keys(onnx_export):
    out, _ = onnx_export
    res = serving_latency(out, repeats_b1=20, repeats_b256=5, warmup=2)
    for k in ("p50_ms_b1", "p99_ms_b1", "p50_ms_b256", "p99_ms_b256"):
        assert res["serving." + k] > 0 and res[ONNX_PREFIX + k] > 0


def test_export_missing_run_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no policy"):
        export_policy(tmp_path, tmp_path / "out")
    assert main(["export", str(tmp_path)]) == 2
    assert not (Path(tmp_path) / "out").exists()


def test_export_refuses_a_checkpoint_that_is_not_a_policy_and_a_foreign_out(
    run_dir, tmp_path, capsys
):
    """One line each: a round checkpoint given as the policy, and an --out directory that
    holds other files (they would end up beside the export, outside its manifest)."""
    from grade_ray.cli import main
    from grade_ray.runlog import save_checkpoint

    rnd = save_checkpoint(tmp_path / "r", "round-0000", {"next_round": 1, "history": []})
    assert main(["export", str(rnd), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a policy file" in err[0], err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files that are not an export" in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    again = tmp_path / "again"  # over an earlier export: allowed
    assert main(["export", str(run_dir), "--out", str(again)]) == 0
    assert main(["export", str(run_dir), "--out", str(again)]) == 0
