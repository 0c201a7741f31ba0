"""A damaged or edited export is refused, served weights are checked, serving checks scores as
training does, work is chunked, and `infer` accounts for every row (issue 14, findings 3, 5
and 7)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import grade_ray.serving.service as service_mod
from grade_ray.data.reading import read_sessions
from grade_ray.serving.export import (
    MANIFEST_FILE,
    METADATA_FILE,
    TORCHSCRIPT_FILE,
    export_policy,
    sha256_file,
    write_manifest,
)
from grade_ray.serving.infer import run_infer
from grade_ray.serving.service import FusionService, RequestError


@pytest.fixture(scope="module")
def exported(personalised_run, tmp_path_factory):
    run = personalised_run(tmp_path_factory.mktemp("integrity_run"), 3)
    export_policy(run, run / "export")
    return run / "export"


def copy(src, tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(src, dst)
    return dst


def rehash(d) -> None:
    """What a careful tamperer does: metadata's file hashes and the manifest updated."""
    md = json.loads((d / METADATA_FILE).read_text())
    md["files"]["torchscript"]["sha256"] = sha256_file(d / TORCHSCRIPT_FILE)
    (d / METADATA_FILE).write_text(json.dumps(md))
    write_manifest(d, [TORCHSCRIPT_FILE, METADATA_FILE])


def test_edited_metadata_is_refused(exported, tmp_path):
    d = copy(exported, tmp_path)
    md = json.loads((d / METADATA_FILE).read_text())
    md["fusion"]["form"] = "linear" if md["fusion"]["form"] == "log_product" else "log_product"
    (d / METADATA_FILE).write_text(json.dumps(md, indent=2, sort_keys=True))
    with pytest.raises(RequestError, match=f"{METADATA_FILE} does not match the sha256"):
        FusionService.load(d)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / MANIFEST_FILE).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST_FILE).write_text("{"), "not a valid manifest"),
        (
            lambda d: (d / MANIFEST_FILE).write_text(
                json.dumps({**json.loads((d / MANIFEST_FILE).read_text()), "digest": "0" * 64})
            ),
            "digest does not match",
        ),
        (lambda d: (d / TORCHSCRIPT_FILE).unlink(), "is missing"),
        (lambda d: (d / TORCHSCRIPT_FILE).write_bytes(b"x"), "does not match the sha256"),
    ],
)
def test_damaged_export_is_refused(exported, tmp_path, damage, match):
    d = copy(exported, tmp_path)
    damage(d)
    with pytest.raises(RequestError, match=match):
        FusionService.load(d)


class Constant(torch.nn.Module):
    def __init__(self, k: int, value: float) -> None:
        super().__init__()
        self.k, self.value = k, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], self.k), self.value)


def test_replaced_model_off_the_simplex_is_refused_even_with_updated_hashes(exported, tmp_path):
    d = copy(exported, tmp_path)
    k = len(json.loads((d / METADATA_FILE).read_text())["tasks"]["names"])
    torch.jit.save(torch.jit.script(Constant(k, -3.0)), str(d / TORCHSCRIPT_FILE))
    rehash(d)
    with pytest.raises(RequestError, match="not .* weights on the simplex"):
        FusionService.load(d)


def test_weights_off_the_simplex_are_never_served(exported):
    svc = FusionService.load(exported)
    md = svc.metadata
    x = np.zeros((3, svc.context_dim), np.float32)

    def bad_row(z):  # a model that is right on its self test but wrong on row 1
        w = np.full((len(z), svc.num_tasks), 1 / svc.num_tasks, np.float32)
        w[(z[:, 0] == 7.0)] = -3.0
        return w

    broken = FusionService(bad_row, md, "test")
    x[1, 0] = 7.0
    with pytest.raises(RequestError, match=r"off the simplex for context rows \[1\]"):
        broken.weights(x)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{", "is not valid JSON"),
        ("[]", "JSON object"),
        ('{"format_version": 2}', "missing or malformed"),
    ],
)
def test_broken_metadata_is_named(exported, tmp_path, text, match):
    d = copy(exported, tmp_path)
    (d / METADATA_FILE).write_text(text)
    with pytest.raises(RequestError, match=match) as e:
        FusionService.load(d, verify=False)
    assert str(d / METADATA_FILE) in str(e.value)


def test_metadata_values_are_checked(exported, tmp_path):
    d = copy(exported, tmp_path)
    md = json.loads((d / METADATA_FILE).read_text())
    md["fusion"]["form"] = "softmax"
    (d / METADATA_FILE).write_text(json.dumps(md))
    with pytest.raises(RequestError, match="fusion.form='softmax'"):
        FusionService.load(d, verify=False)


def test_scores_are_checked_as_training_checks_them(exported):
    svc = FusionService.load(exported)
    x = np.zeros((2, svc.context_dim), np.float32)
    s = np.full((2, 3, svc.num_tasks), 0.5, np.float32)
    s[1, 0, 0] = 10.0  # pCTR = 10
    with pytest.raises(RequestError, match=r"task 'ctr' must be a probability in \[0, 1\].*\[1\]"):
        svc.fused_scores(x, s)
    mask = np.ones((2, 3), bool)
    mask[1, 0] = False  # padding may hold anything
    assert svc.fused_scores(x, s, mask).shape == (2, 3)


def test_chunked_answers_equal_whole_ones(exported, monkeypatch):
    svc = FusionService.load(exported)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, svc.context_dim)).astype(np.float32)
    s = rng.uniform(0.01, 1, (37, 11, svc.num_tasks)).astype(np.float32)
    mask = rng.random((37, 11)) < 0.8
    w, fused = svc.weights(x), svc.fused_scores(x, s, mask)
    monkeypatch.setattr(service_mod, "CHUNK_ROWS", 5)
    monkeypatch.setattr(service_mod, "CHUNK_CELLS", 30)
    np.testing.assert_allclose(svc.weights(x), w, rtol=0, atol=1e-6)  # batch-size rounding
    got = svc.fused_scores(x, s, mask)
    assert (np.isneginf(got) == ~mask).all()
    np.testing.assert_allclose(got[mask], fused[mask], rtol=1e-5)
    s[23, 4, 1] = np.nan
    mask[23, 4] = True
    with pytest.raises(RequestError, match=r"requests \[23\]"):  # absolute, not chunk rows
        svc.fused_scores(x, s, mask)


def _eval_with_far_contexts(smoke_data, tmp_path, rows=(5, 130)):
    t = pq.read_table(smoke_data[1]).slice(0, 300)
    ctx = t.column("context").to_pylist()
    for r in rows:
        ctx[r] = [3e38] * len(ctx[r])
    i = t.schema.get_field_index("context")
    t = t.set_column(i, t.schema.field(i), pa.array(ctx, t.schema.field(i).type))
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(t, d / "eval.parquet")
    return d


def test_infer_rejects_unscorable_rows_with_their_source_rows(exported, smoke_data, tmp_path):
    data = _eval_with_far_contexts(smoke_data, tmp_path)
    out = tmp_path / "out" / "scored.parquet"
    with pytest.raises(Exception, match=r"eval.parquet: row 5, column 'context': gives non-finite"):
        run_infer(exported, data, out, batch_size=64)
    assert not out.exists() and not list(out.parent.glob("*.tmp"))  # no partial output
    res = run_infer(exported, data, out, batch_size=64, on_error="reject")
    assert (res["rows_read"], res["rows_used"], res["rows_rejected"]) == (300, 298, 2)
    assert res["rows_written"] == 298 == pq.read_table(out).num_rows
    rej = pq.read_table(res["rejects_path"])
    assert rej.column("source_row").to_pylist() == [5, 130]  # file rows, not batch rows
    assert all("non-finite" in r for r in rej.column("reject_reason").to_pylist())


def test_infer_never_writes_into_the_input_directory(exported, smoke_data, tmp_path):
    data = _eval_with_far_contexts(smoke_data, tmp_path, rows=())
    for out, extra in (
        (data / "scored.parquet", {}),
        (tmp_path / "o.parquet", {"rejects_path": data / "r.parquet", "on_error": "reject"}),
    ):
        with pytest.raises(RequestError, match="inside the input data directory"):
            run_infer(exported, data, out, **extra)
    assert sorted(p.name for p in data.iterdir()) == ["eval.parquet"]
    batch, _, _ = read_sessions(data)
    assert len(batch) == 300


def test_infer_never_writes_over_its_input_file(exported, smoke_data, tmp_path):
    data = _eval_with_far_contexts(smoke_data, tmp_path, rows=()) / "eval.parquet"
    before = data.read_bytes()
    for out, extra in (
        (data, {}),
        (data.parent / "." / data.name, {}),  # the same file, spelled differently
        (tmp_path / "o.parquet", {"rejects_path": data, "on_error": "reject"}),
    ):
        with pytest.raises(RequestError, match="is the input data file"):
            run_infer(exported, data, out, **extra)
    assert data.read_bytes() == before
    out = data.parent / "o.parquet"  # the rejects file over the output would replace it
    with pytest.raises(RequestError, match="is the --out file"):
        run_infer(exported, data, out, on_error="reject", rejects_path=out)
    # beside the input file is fine: a file input never reads its directory
    res = run_infer(exported, data, data.parent / "scored.parquet")
    assert res["rows_written"] == 300
