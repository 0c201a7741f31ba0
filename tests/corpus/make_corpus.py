"""Generate the bad-input corpus that tests/corpus/test_corpus.py runs through the CLI.

    python tests/corpus/make_corpus.py OUT_DIR    # writes every case, prints the case list

Every case is made here from a small seeded good session table (or a good run / export
directory) by one edit; nothing binary is checked in. Kinds:

- ``row``: session files with bad rows (NaN/inf, ranges, widths, lengths, nulls, duplicate
  ids, positions, too many candidates ...). Raise mode must stop naming file, row and
  column; reject mode must count every row and put each bad one, with its reason and its
  row number in the source file, in the rejects file.
- ``file``: inputs that are not usable session data at all (other formats, truncated or
  corrupt Parquet, broken metadata, wrong types, rejects files, mixed schemas, empty).
  Both modes must stop with one line naming the file.
- ``config``, ``checkpoint``, ``export``: bad configs, damaged checkpoints and policies,
  damaged or edited export directories; one line naming the file or key.
- ``request``: bad FusionService calls (the Python API): a RequestError naming the rows.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade_ray.data.sessions import META_KEY, SessionBatch, SessionMeta, to_table

META = SessionMeta(
    ("ctr", "cvr", "gmv", "profit"),
    ("prob", "prob", "value", "value"),
    ("click", "order"),
    ("c0", "c1", "c2"),
)
ROWS = 40
MAX_CANDIDATES = 8  # the corpus runs with data.max_candidates=8 (infer --max-candidates 8)


@dataclasses.dataclass
class Case:
    """One corpus entry. ``bad`` lists (file, row, column) of every bad row in read order;
    ``match`` is text the error line must contain besides them."""

    id: str
    kind: str
    path: Path | None = None
    rows_read: int = 0
    bad: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    match: str = ""
    commands: tuple[str, ...] = ()
    argv: list[str] = dataclasses.field(default_factory=list)
    call: Callable | None = None


def good_batch(rows: int = ROWS, first_id: int = 0, seed: int = 0) -> SessionBatch:
    rng = np.random.default_rng(seed)
    n = 6
    lengths = rng.integers(3, n + 1, rows)
    mask = np.arange(n)[None] < lengths[:, None]
    scores = rng.uniform(0.05, 0.95, (rows, n, 4)).astype(np.float32)
    scores[..., 2:] *= 20  # gmv, profit: values
    return SessionBatch(
        request_id=first_id + np.arange(rows, dtype=np.int64),
        user_id=rng.integers(0, 10, rows),
        ts=1_700_000_000 + 60 * (first_id + np.arange(rows, dtype=np.int64)),
        context=rng.standard_normal((rows, 3)).astype(np.float32),
        item_ids=(rng.integers(1, 1000, (rows, n)) * mask).astype(np.int64),
        scores=scores * mask[..., None],
        labels=(rng.random((rows, n, 2)) < 0.3).astype(np.float32) * mask[..., None],
        mask=mask,
    )


def good_table(rows: int = ROWS, first_id: int = 0, seed: int = 0) -> pa.Table:
    return to_table(good_batch(rows, first_id, seed), META)


def set_values(table: pa.Table, column: str, values: list, type_: pa.DataType | None = None):
    i = table.schema.get_field_index(column)
    t = type_ or table.schema.field(i).type
    return table.set_column(i, pa.field(column, t), pa.array(values, t))


def edit(table: pa.Table, column: str, row: int, fn, type_: pa.DataType | None = None):
    values = table.column(column).to_pylist()
    values[row] = fn(values[row])
    return set_values(table, column, values, type_)


def write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------
# row-level cases: (id, column, edits {row: fn}, type override)

NAN, INF = float("nan"), float("inf")


def _first(v, x):
    """Item 0's first value replaced by x."""
    return [[x, *v[0][1:]], *v[1:]]


ROW_EDITS: dict[str, tuple[str, dict[int, Callable], pa.DataType | None, str]] = {
    "nan score": ("scores", {7: lambda v: _first(v, NAN)}, None, "NaN or inf in scores"),
    "inf score": (
        "scores",
        {3: lambda v: [v[0], [0.5, INF, 1.0, 1.0], *v[2:]]},
        None,
        "NaN or inf",
    ),
    "nan label": ("labels", {11: lambda v: [[0.0, NAN], *v[1:]]}, None, "NaN or inf in labels"),
    "-inf label": ("labels", {0: lambda v: _first(v, -INF)}, None, "NaN or inf in labels"),
    "nan context": ("context", {5: lambda v: [NAN, *v[1:]]}, None, "NaN or inf in context"),
    "inf context": ("context", {39: lambda v: [*v[:-1], INF]}, None, "NaN or inf in context"),
    "ctr above 1": ("scores", {2: lambda v: _first(v, 1.5)}, None, "probability outside [0, 1]"),
    "cvr below 0": ("scores", {4: lambda v: [[v[0][0], -0.1, *v[0][2:]], *v[1:]]}, None, "'cvr'"),
    "negative gmv": (
        "scores",
        {9: lambda v: [[*v[0][:2], -1.0, v[0][3]], *v[1:]]},
        None,
        "negative value",
    ),
    "negative label": ("labels", {6: lambda v: _first(v, -1.0)}, None, "label 'click' is negative"),
    "3 of 4 task values": ("scores", {8: lambda v: [v[0][:3], *v[1:]]}, None, "needs 4 scores"),
    "5 of 4 task values": ("scores", {8: lambda v: [[*v[0], 0.5], *v[1:]]}, None, "needs 4 scores"),
    "1 of 2 label values": ("labels", {12: lambda v: [v[0][:1], *v[1:]]}, None, "needs 2 labels"),
    "scores for fewer items": ("scores", {13: lambda v: v[:-1]}, None, "different number of items"),
    "labels for more items": ("labels", {14: lambda v: [*v, [0.0, 0.0]]}, None, "different number"),
    "empty candidate list": ("item_ids", {15: lambda v: []}, None, "empty candidate list"),
    "short context": ("context", {16: lambda v: v[:2]}, None, "context length != 3"),
    "long context": ("context", {17: lambda v: [*v, 0.0]}, None, "context length != 3"),
    "null request_id": ("request_id", {18: lambda v: None}, pa.int64(), "null value"),
    "null user_id": ("user_id", {19: lambda v: None}, pa.int64(), "null value"),
    "null ts": ("ts", {20: lambda v: None}, pa.int64(), "null value"),
    "null scores": ("scores", {21: lambda v: None}, None, "null value"),
    "null score value": ("scores", {22: lambda v: _first(v, None)}, None, "NaN or inf in scores"),
    "null labels": ("labels", {23: lambda v: None}, None, "null value"),
    "null label value": ("labels", {24: lambda v: [[None, 0.0], *v[1:]]}, None, "NaN or inf"),
    "null context": ("context", {25: lambda v: None}, None, "null value"),
    "null item id": ("item_ids", {26: lambda v: [None, *v[1:]]}, None, "null item id"),
    "null logged_position": ("logged_position", {27: lambda v: None}, None, "null value"),
    "negative logged_position": (
        "logged_position",
        {28: lambda v: [-1, *v[1:]]},
        None,
        "logged_position outside",
    ),
    "huge logged_position": (
        "logged_position",
        {29: lambda v: [3_000_000_000, *v[1:]]},
        pa.list_(pa.int64()),
        "logged_position outside",
    ),
    "logged_position length": (
        "logged_position",
        {30: lambda v: v[:-1]},
        None,
        "logged_position length",
    ),
    "duplicate request_id": ("request_id", {31: lambda v: 4}, None, "duplicate request_id"),
    "too many candidates": (
        "item_ids",
        {32: lambda v: v + [7] * (MAX_CANDIDATES + 2 - len(v))},
        None,
        "more than 8 candidates",
    ),
    "short row hides a NaN (finding 1)": (
        "scores",
        {1: lambda v: [v[0][:3], *v[1:]], 33: lambda v: _first(v, NAN)},
        None,
        "needs 4 scores",
    ),
    "short row hides ctr 1.5 (finding 1)": (
        "scores",
        {1: lambda v: [v[0][:3], *v[1:]], 34: lambda v: _first(v, 1.5)},
        None,
        "needs 4 scores",
    ),
    "two kinds of bad row": (
        "labels",
        {3: lambda v: _first(v, NAN), 35: lambda v: _first(v, -2.0)},
        None,
        "NaN or inf",
    ),
}


def _too_many(table: pa.Table, row: int) -> pa.Table:
    """Give row ``row`` MAX_CANDIDATES + 2 candidates in every per-candidate column."""
    n = MAX_CANDIDATES + 2
    for col, item in (
        ("item_ids", 7),
        ("scores", [0.5, 0.5, 1.0, 1.0]),
        ("labels", [0.0, 0.0]),
    ):
        table = edit(table, col, row, lambda v, item=item: (v + [item] * n)[:n])
    return edit(table, "logged_position", row, lambda v: list(range(n)))


def row_cases(root: Path) -> list[Case]:
    cases = []
    for name, (column, edits, type_, match) in ROW_EDITS.items():
        table = good_table()
        if name == "too many candidates":
            table = _too_many(table, 32)
        else:
            for row, fn in edits.items():
                table = edit(table, column, row, fn, type_)
        cid = "row-" + name.replace(" ", "-").replace("(", "").replace(")", "")
        f = write(root / cid / "data" / "part-00000.parquet", table)
        col = "scores" if "finding 1" in name else column
        bad = [
            (str(f), r, "request_id" if name == "duplicate request_id" else col)
            for r in sorted(edits)
        ]
        if name == "two kinds of bad row":
            bad = [(str(f), 3, "labels"), (str(f), 35, "labels")]
        cases.append(Case(cid, "row", f.parent, ROWS, bad, match))
    # across files: a duplicate id in the second file; a session file named like a rejects file
    d = root / "row-duplicate-across-files" / "data"
    write(d / "part-00000.parquet", good_table())
    write(d / "part-00001.parquet", good_table(10, first_id=ROWS - 2, seed=1))  # ids 38, 39 again
    b = str(d / "part-00001.parquet")
    cases.append(
        Case(
            "row-duplicate-across-files",
            "row",
            d,
            ROWS + 10,
            [(b, 0, "request_id"), (b, 1, "request_id")],
            "first read at",
        )
    )
    d = root / "row-shard-named-rejects" / "data"
    write(d / "part-00000.parquet", good_table())
    write(
        d / "rejects-part-00001.parquet",
        edit(good_table(10, ROWS, 2), "scores", 4, lambda v: _first(v, NAN)),
    )
    cases.append(
        Case(
            "row-shard-named-rejects",
            "row",
            d,
            ROWS + 10,
            [(str(d / "rejects-part-00001.parquet"), 4, "scores")],
            "NaN",
        )
    )
    return cases


# ---------------------------------------------------------------------------
# file-level cases


def file_cases(root: Path) -> list[Case]:
    good = good_table()
    out: list[tuple[str, str, Callable[[Path], None]]] = []

    def bytes_case(cid, match, content_fn):
        out.append((cid, match, lambda p: p.write_bytes(content_fn())))

    def table_case(cid, match, table_fn):
        out.append((cid, match, lambda p: pq.write_table(table_fn(), p)))

    def raw() -> bytes:
        import io

        buf = io.BytesIO()
        pq.write_table(good_table(400), buf)
        return buf.getvalue()

    bytes_case("file-csv", "not a readable Parquet file", lambda: b"request_id,user_id\n1,2\n")
    bytes_case("file-empty", "not a readable Parquet file", lambda: b"")
    bytes_case("file-truncated", "not a readable Parquet file", lambda: raw()[: len(raw()) // 2])
    bytes_case("file-json", "not a readable Parquet file", lambda: json.dumps({"a": 1}).encode())

    def corrupt() -> bytes:
        b = bytearray(raw())
        b[len(b) // 4 : len(b) // 4 + 200] = b"\xff" * 200
        return bytes(b)

    bytes_case("file-corrupt-pages", "", corrupt)
    table_case(
        "file-no-metadata", "no grade_ray metadata", lambda: good.replace_schema_metadata({})
    )
    for cid, value, match in (
        ("file-metadata-not-json", b"{tasks", "not valid JSON"),
        ("file-metadata-array", b"[]", "JSON object"),
        ("file-metadata-missing-keys", json.dumps({"format_version": 1}).encode(), "lacks"),
        (
            "file-metadata-bad-kind",
            META.to_json().replace('"prob"', '"chance"', 1).encode(),
            "unknown task kind",
        ),
        (
            "file-metadata-version",
            META.to_json().replace('"format_version": 1', '"format_version": 9').encode(),
            "format_version=9",
        ),
        (
            "file-metadata-names-not-strings",
            META.to_json().replace('["c0", "c1", "c2"]', "[1, 2, 3]").encode(),
            "list of strings",
        ),
        (
            "file-metadata-duplicate-tasks",
            META.to_json().replace('"profit"]', '"gmv"]', 1).encode(),
            "duplicate task names",
        ),
    ):
        table_case(cid, match, lambda value=value: good.replace_schema_metadata({META_KEY: value}))
    table_case(
        "file-missing-labels", "missing column(s) ['labels']", lambda: good.drop_columns(["labels"])
    )
    table_case(
        "file-flat-scores",
        "column 'scores' has type",
        lambda: set_values(good, "scores", [[0.5] * 4] * ROWS, pa.list_(pa.float32())),
    )
    table_case(
        "file-string-labels",
        "column 'labels' has type string",
        lambda: set_values(good, "labels", ["1"] * ROWS, pa.string()),
    )
    table_case(
        "file-float-request-id",
        "column 'request_id' has type double",
        lambda: set_values(good, "request_id", [float(i) for i in range(ROWS)], pa.float64()),
    )
    table_case(
        "file-uint64-request-id",
        "do not convert",
        lambda: set_values(good, "request_id", [2**63 + i for i in range(ROWS)], pa.uint64()),
    )
    table_case(
        "file-string-context",
        "column 'context' has type",
        lambda: set_values(good, "context", [["a"] * 3] * ROWS, pa.list_(pa.string())),
    )
    table_case(
        "file-struct-ts",
        "column 'ts' has type",
        lambda: set_values(good, "ts", [{"s": 1}] * ROWS, pa.struct([("s", pa.int64())])),
    )

    def rejects_like() -> pa.Table:
        return good.append_column("reject_reason", pa.array(["x"] * ROWS))

    table_case("file-a-rejects-file", "this is a rejects file", rejects_like)
    table_case("file-zero-rows", "no usable rows", lambda: good.slice(0, 0))
    cases = []
    for cid, match, make in out:
        p = root / cid / "data" / "part-00000.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        make(p)
        cases.append(Case(cid, "file", p.parent, match=match, bad=[(str(p), -1, "")]))
    # directories
    other_tasks = SessionMeta(
        ("ctr", "cvr", "gmv", "margin"), META.task_kinds, META.label_names, META.context_names
    )
    other_ctx = SessionMeta(META.task_names, META.task_kinds, META.label_names, ("c0", "c1", "cX"))
    for cid, meta, match in (
        ("file-dir-mixed-tasks", other_tasks, "differ from"),
        ("file-dir-mixed-context", other_ctx, "context features"),
    ):
        d = root / cid / "data"
        write(d / "part-00000.parquet", good)
        write(d / "part-00001.parquet", to_table(good_batch(10, ROWS, 3), meta))
        cases.append(
            Case(cid, "file", d, match=match, bad=[(str(d / "part-00001.parquet"), -1, "")])
        )
    # an unreadable shard after a good one (read before validation: cache sizing, row totals)
    for cid, content in (
        ("file-dir-second-csv", lambda: b"request_id,user_id\n1,2\n"),
        ("file-dir-second-truncated", lambda: raw()[: len(raw()) // 2]),
    ):
        d = root / cid / "data"
        write(d / "part-00000.parquet", good)
        (d / "part-00001.parquet").write_bytes(content())
        cases.append(
            Case(
                cid,
                "file",
                d,
                match="not a readable Parquet file",
                bad=[(str(d / "part-00001.parquet"), -1, "")],
            )
        )
    d = root / "file-empty-dir" / "data"
    d.mkdir(parents=True)
    cases.append(
        Case("file-empty-dir", "file", d, match="no *.parquet files", bad=[(str(d), -1, "")])
    )
    d = root / "file-missing-path" / "data"
    cases.append(
        Case("file-missing-path", "file", d, match="no such session file", bad=[(str(d), -1, "")])
    )
    d = root / "file-all-rows-bad" / "data"
    all_bad = set_values(good, "context", [[NAN, 0.0, 0.0]] * ROWS)
    write(d / "part-00000.parquet", all_bad)
    cases.append(
        Case(
            "file-all-rows-bad",
            "file",
            d,
            rows_read=ROWS,
            match="",
            bad=[(str(d / "part-00000.parquet"), 0, "context")],
        )
    )
    return cases


# ---------------------------------------------------------------------------
# config, checkpoint and export cases (need a trained run and its export)


def config_cases(root: Path, good_data: Path) -> list[Case]:
    d = root / "configs"
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "config-base-cycle": ("base: b.yaml\nseed: 1\n", "base: chain loops"),
        "config-yaml-syntax": ("grpo: {rounds: [1\n", "not valid YAML"),
        "config-python-tag": ("seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        "config-not-a-mapping": ("- 1\n", "must be a mapping"),
        "config-unknown-key": ("grpo:\n  roundz: 2\n", "unknown config key"),
    }
    (d / "b.yaml").write_text("base: config-base-cycle.yaml\n")
    cases = []
    for cid, (text, match) in files.items():
        p = d / f"{cid}.yaml"
        p.write_text(text)
        cases.append(
            Case(
                cid,
                "config",
                p,
                match=match,
                argv=["--config", str(p)],
                commands=("pretrain", "train"),
            )
        )
    for cid, override, match in (
        ("config-pretrain-lr-zero", "pretrain.lr=0", "pretrain.lr"),
        ("config-pretrain-batch-zero", "pretrain.batch_size=0", "pretrain.batch_size"),
        ("config-grpo-lr-nan", "grpo.lr=.nan", "grpo.lr must be a finite number"),
        ("config-rounds-not-int", "grpo.rounds=abc", "grpo.rounds must be an integer"),
        ("config-on-error-unknown", "data.on_error=skip", "data.on_error='skip'"),
        ("config-max-candidates-zero", "data.max_candidates=0", "data.max_candidates"),
        ("config-gain-inf", "reward.post_gains={click: .inf}", "finite"),
    ):
        cases.append(
            Case(
                cid,
                "config",
                None,
                match=match,
                argv=["--set", override],
                commands=("pretrain", "train"),
            )
        )
    p = d / "missing.yaml"
    cases.append(
        Case(
            "config-file-missing",
            "config",
            p,
            match="config file not found",
            argv=["--config", str(p)],
            commands=("pretrain", "train"),
        )
    )
    return cases


def checkpoint_cases(root: Path, run: Path) -> list[Case]:
    cases = []

    def copy(cid: str) -> Path:
        dst = root / cid / "run"
        shutil.copytree(run, dst, symlinks=True)
        return dst

    r = copy("checkpoint-pretrain-truncated")
    p = r / "checkpoints" / "pretrain.pt"
    for q in (r / "checkpoints").glob("round-*.pt"):
        q.unlink()
    (r / "metrics.jsonl").write_text("")
    p.write_bytes(p.read_bytes()[:500])
    cases.append(
        Case(
            "checkpoint-pretrain-truncated",
            "checkpoint",
            p,
            match="does not load",
            commands=("train",),
            argv=["--run-dir", str(r)],
        )
    )
    r = copy("checkpoint-all-rounds-garbage")
    for q in (r / "checkpoints").glob("round-*.pt"):
        q.write_bytes(b"garbage")
    cases.append(
        Case(
            "checkpoint-all-rounds-garbage",
            "checkpoint",
            r / "checkpoints" / "round-0000.pt",
            match="no round checkpoint",
            commands=("train-resume",),
            argv=["--run-dir", str(r)],
        )
    )
    r = copy("checkpoint-run-dir-in-use")
    cases.append(
        Case(
            "checkpoint-run-dir-in-use",
            "checkpoint",
            r,
            match="already holds a Stage 2 run",
            commands=("train",),
            argv=["--run-dir", str(r)],
        )
    )
    r = copy("checkpoint-pretrain-dir-in-use")
    cases.append(
        Case(
            "checkpoint-pretrain-dir-in-use",
            "checkpoint",
            r,
            match="already holds a run",
            commands=("pretrain",),
            argv=["--run-dir", str(r)],
        )
    )
    r = copy("checkpoint-policy-garbage")
    (r / "policy.pt").write_bytes(b"PK\x03\x04 not really")
    cases.append(
        Case(
            "checkpoint-policy-garbage",
            "checkpoint",
            r / "policy.pt",
            match="does not load",
            commands=("export", "evaluate"),
        )
    )

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    r = copy("checkpoint-policy-pickle")
    with (r / "policy.pt").open("wb") as f:
        pickle.dump({"state_dict": Boom()}, f)
    cases.append(
        Case(
            "checkpoint-policy-pickle",
            "checkpoint",
            r / "policy.pt",
            match="does not load",
            commands=("export", "evaluate"),
        )
    )
    r = root / "checkpoint-no-policy" / "run"
    r.mkdir(parents=True)
    cases.append(
        Case(
            "checkpoint-no-policy",
            "checkpoint",
            r / "policy.pt",
            match="no policy",
            commands=("export",),
        )
    )
    return cases


def export_cases(root: Path, export: Path, good_data: Path) -> list[Case]:
    from grade_ray.serving.export import (
        MANIFEST_FILE,
        METADATA_FILE,
        TORCHSCRIPT_FILE,
        sha256_file,
        write_manifest,
    )

    def copy(cid: str) -> Path:
        dst = root / cid / "export"
        shutil.copytree(export, dst)
        return dst

    def rehash(d: Path) -> None:
        md_text = (d / METADATA_FILE).read_text()
        try:
            md = json.loads(md_text)
            md["files"]["torchscript"]["sha256"] = sha256_file(d / TORCHSCRIPT_FILE)
            (d / METADATA_FILE).write_text(json.dumps(md))
        except (ValueError, KeyError, TypeError):
            pass
        write_manifest(d, [TORCHSCRIPT_FILE, METADATA_FILE])

    def md_edit(d: Path, fn) -> None:
        md = json.loads((d / METADATA_FILE).read_text())
        fn(md)
        (d / METADATA_FILE).write_text(json.dumps(md))

    cases = []

    def add(cid, match, damage, file_name, fix_hashes=False):
        d = copy(cid)
        damage(d)
        if fix_hashes:
            rehash(d)
        cases.append(Case(cid, "export", d / file_name, match=match, commands=("infer", "service")))

    add(
        "export-metadata-fusion-edited",
        "does not match the sha256",
        lambda d: md_edit(d, lambda m: m["fusion"].update(form="linear")),
        METADATA_FILE,
    )
    add(
        "export-manifest-missing",
        "no manifest.json",
        lambda d: (d / MANIFEST_FILE).unlink(),
        MANIFEST_FILE,
    )
    add(
        "export-manifest-digest",
        "digest does not match",
        lambda d: (d / MANIFEST_FILE).write_text(
            json.dumps({**json.loads((d / MANIFEST_FILE).read_text()), "digest": "0" * 64})
        ),
        MANIFEST_FILE,
    )
    add(
        "export-manifest-not-json",
        "not a valid manifest",
        lambda d: (d / MANIFEST_FILE).write_text("{"),
        MANIFEST_FILE,
    )
    add(
        "export-torchscript-truncated",
        "does not match the sha256",
        lambda d: (d / TORCHSCRIPT_FILE).write_bytes((d / TORCHSCRIPT_FILE).read_bytes()[:300]),
        TORCHSCRIPT_FILE,
    )
    add(
        "export-torchscript-missing",
        "is missing",
        lambda d: (d / TORCHSCRIPT_FILE).unlink(),
        TORCHSCRIPT_FILE,
    )
    add(
        "export-metadata-not-json",
        "is not valid JSON",
        lambda d: (d / METADATA_FILE).write_text("{"),
        METADATA_FILE,
        True,
    )
    add(
        "export-metadata-missing-key",
        "missing or malformed",
        lambda d: md_edit(d, lambda m: m.pop("tasks")),
        METADATA_FILE,
        True,
    )
    add(
        "export-metadata-unknown-fusion",
        "fusion.form='softmax'",
        lambda d: md_edit(d, lambda m: m["fusion"].update(form="softmax")),
        METADATA_FILE,
        True,
    )
    add(
        "export-metadata-dim-mismatch",
        "disagree",
        lambda d: md_edit(d, lambda m: m["architecture"].update(context_dim=5)),
        METADATA_FILE,
        True,
    )

    def replace_model(d: Path) -> None:
        import torch

        class Constant(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.full((x.shape[0], 4), -3.0)

        torch.jit.save(torch.jit.script(Constant()), str(d / TORCHSCRIPT_FILE))

    add("export-model-off-simplex", "simplex", replace_model, TORCHSCRIPT_FILE, True)
    d = root / "export-no-metadata" / "export"
    d.mkdir(parents=True)
    cases.append(
        Case(
            "export-no-metadata",
            "export",
            d / METADATA_FILE,
            match="no metadata.json",
            commands=("infer", "service"),
        )
    )
    # data whose tasks are in another order than the export's
    swapped = SessionMeta(
        META.task_names[::-1], META.task_kinds[::-1], META.label_names, META.context_names
    )
    p = write(
        root / "export-data-tasks-swapped" / "data" / "part-00000.parquet",
        to_table(good_batch(), swapped),
    )
    cases.append(
        Case(
            "export-data-tasks-swapped",
            "export",
            p.parent,
            match="order must match",
            commands=("infer",),
        )
    )
    return cases


def request_cases() -> list[Case]:
    """Bad FusionService calls: fn(service) must raise RequestError matching ``match``."""

    def ctx(svc, b=3):
        return np.zeros((b, svc.context_dim), np.float32)

    def scores(b=3, n=4):
        return np.full((b, n, 4), 0.5, np.float32)

    def with_(a, idx, v):
        a = a.copy()
        a[idx] = v
        return a

    calls = {
        "request-ctr-10": (
            lambda s: s.fused_scores(ctx(s), with_(scores(), (1, 0, 0), 10.0)),
            r"task 'ctr' must be a probability",
        ),
        "request-negative-gmv": (
            lambda s: s.fused_scores(ctx(s), with_(scores(), (2, 1, 2), -1.0)),
            "negative scores in requests [2]",
        ),
        "request-nan-context": (
            lambda s: s.weights(with_(ctx(s), (1, 0), np.nan)),
            "NaN or inf in context",
        ),
        "request-context-width": (
            lambda s: s.weights(np.zeros((2, s.context_dim + 1), np.float32)),
            "features per request",
        ),
        "request-scores-width": (
            lambda s: s.fused_scores(ctx(s), scores()[..., :3]),
            "3 tasks per candidate",
        ),
        "request-string-context": (
            lambda s: s.weights(np.full((1, s.context_dim), "x")),
            "dtype <U1",
        ),
        "request-mask-not-bool": (
            lambda s: s.fused_scores(ctx(s), scores(), np.ones((3, 4), int)),
            "mask must be a bool",
        ),
        "request-nan-score": (
            lambda s: s.fused_scores(ctx(s), with_(scores(), (0, 3, 1), np.nan)),
            "NaN or inf in scores",
        ),
        "request-overflowing-context": (
            lambda s: s.weights(np.full((2, s.context_dim), 3e38, np.float32)),
            "non-finite weights",
        ),
    }
    return [Case(cid, "request", match=m, call=fn) for cid, (fn, m) in calls.items()]


def build(root: Path, run: Path | None = None, export: Path | None = None) -> list[Case]:
    """Write every case under ``root``; cases that damage a run or an export need them."""
    root.mkdir(parents=True, exist_ok=True)
    good = write(root / "good" / "part-00000.parquet", good_table(ROWS, 10_000, 9)).parent
    cases = row_cases(root) + file_cases(root) + config_cases(root, good)
    if run is not None:
        cases += checkpoint_cases(root, run)
    if export is not None:
        cases += export_cases(root, export, good)
    return cases + request_cases()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for c in build(out):
        print(f"{c.kind:10s} {c.id}")
