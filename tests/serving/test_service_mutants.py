"""Serving answers equal the trained policy's, recomputed here (the serving mutations in
``scripts/mutants.py`` run this file; tests/serving/test_export.py covers the artifact)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.data.reading import read_sessions
from grade_ray.learner.loop import load_policy
from grade_ray.serving.export import export_policy
from grade_ray.serving.infer import OUT_RANKING, OUT_REQUEST_ID, OUT_WEIGHTS, run_infer
from grade_ray.serving.service import FusionService, RequestError


@pytest.fixture(scope="module")
def exported(personalised_run, tmp_path_factory):
    d = personalised_run(tmp_path_factory.mktemp("serve"), seed=5)
    export_policy(d, d / "export")
    reference, _, _ = load_policy(d / "policy.pt")
    return d / "export", reference


def _fused(reference, service, context, scores):
    with torch.no_grad():
        w = reference.pi(torch.from_numpy(context))
    return w, fuse(service.fusion, torch.from_numpy(scores), w, service.fusion_eps).numpy()


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_weights_are_the_trained_policys(exported, smoke_data, backend):
    export_dir, reference = exported
    service = FusionService.load(export_dir, backend)
    batch, _, _ = read_sessions(smoke_data[1], max_rows=300)
    got = service.weights(batch.context)
    w, _ = _fused(reference, service, batch.context, batch.scores)
    np.testing.assert_allclose(got, w.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert float(np.abs(got - 0.25).max()) > 0.05  # personalised, so the check has teeth


def test_rank_is_best_first_and_masked_candidates_last(exported, smoke_data):
    export_dir, reference = exported
    service = FusionService.load(export_dir)
    batch, _, _ = read_sessions(smoke_data[1], max_rows=200)
    assert not batch.mask.all()  # variable-length lists: padding present
    _, fused = _fused(reference, service, batch.context, batch.scores)
    got_scores = service.fused_scores(batch.context, batch.scores, batch.mask)
    assert np.isneginf(got_scores[~batch.mask]).all()
    np.testing.assert_allclose(got_scores[batch.mask], fused[batch.mask], rtol=1e-6)
    order = service.rank(batch.context, batch.scores, batch.mask)
    for r in range(len(batch)):
        n = int(batch.mask[r].sum())
        np.testing.assert_array_equal(order[r, :n], np.argsort(-fused[r, :n], kind="stable"))
        assert set(order[r, n:]) == set(range(n, batch.mask.shape[1]))


def test_bad_requests_are_refused(exported):
    export_dir, _ = exported
    service = FusionService.load(export_dir)
    x = np.zeros((3, service.context_dim), np.float32)
    x[1, 0] = np.nan
    with pytest.raises(RequestError, match=r"NaN or inf in context .* rows \[1\]"):
        service.weights(x)
    s = np.full((2, 4, service.num_tasks), 0.5, np.float32)
    s[1, 2, 0] = -0.5
    assert service.fusion == "log_product"
    with pytest.raises(RequestError, match=r"negative scores in requests \[1\]"):
        service.fused_scores(np.zeros((2, service.context_dim), np.float32), s)
    s[1, 2, 0] = 0.5
    w = np.full((2, service.num_tasks), 1 / service.num_tasks, np.float32)
    for bad in (np.nan, 5.0):  # fuse() takes weights from the caller: checked like the model's
        w_bad = w.copy()
        w_bad[1, 0] = bad
        with pytest.raises(RequestError, match=r"weights rows \[1\] are not on the simplex"):
            service.fuse(w_bad, s)
    mask = np.ones((2, 4), bool)
    mask[1] = False
    with pytest.raises(RequestError, match=r"mask marks no real candidate in requests \[1\]"):
        service.fuse(w, s, mask)
    with pytest.raises(RequestError, match="mask is not a rectangular array"):
        service.fuse(w, s, [[True, True, True, True], [True]])
    assert service.fuse(w, s[:, :0], np.zeros((2, 0), bool)).shape == (2, 0)  # no candidates


def test_infer_writes_every_request_with_its_ranking(exported, smoke_data, tmp_path):
    export_dir, reference = exported
    out = tmp_path / "scored.parquet"
    res = run_infer(export_dir, smoke_data[1], out, batch_size=64)  # many batches
    batch, _, report = read_sessions(smoke_data[1])
    assert res["rows_read"] == res["rows_written"] == report.rows_read == len(batch)
    table = pq.read_table(out)
    np.testing.assert_array_equal(table.column(OUT_REQUEST_ID).to_numpy(), batch.request_id)
    service = FusionService.load(export_dir)
    w, fused = _fused(reference, service, batch.context, batch.scores)
    got_w = np.array(table.column(OUT_WEIGHTS).to_pylist(), np.float32)
    np.testing.assert_allclose(got_w, w.numpy(), rtol=0, atol=1e-5)
    lengths = batch.mask.sum(1)
    for r, ranking in enumerate(table.column(OUT_RANKING).to_pylist()):
        n = int(lengths[r])
        np.testing.assert_array_equal(ranking, np.argsort(-fused[r, :n], kind="stable"))
