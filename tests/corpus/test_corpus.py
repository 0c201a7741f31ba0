"""The bad-input corpus (tests/corpus/make_corpus.py) through the CLI and FusionService
(issue 14, "What to build").

Per case and command, in-process through ``grade_ray.cli.main``:

- ``row`` cases through pretrain, train --local, evaluate and infer. Raise mode: exit 2 and
  exactly one stderr line, ``grade-ray: error: FILE: row R, column 'C': ...``. Reject mode:
  exit 0, rows read / used / rejected exact, and the rejects file holds exactly the bad
  rows, each with its reason (naming the column) and its row number in the source file.
- ``file`` cases through the same four commands in both modes: exit 2, one line naming
  the file (the all-rows-bad and zero-row files: counted, see below).
- ``config`` cases through pretrain and train; ``checkpoint`` cases through the command
  that reads the damaged file; ``export`` cases through infer and FusionService.load;
  ``request`` cases through FusionService calls (a RequestError).

No case may print a traceback (tests/corpus/test_corpus.py::test_tracebacks_only_with_verbose
also runs real child processes), accept bad input silently or lose a row. The last test
prints the table of cases by kind and outcome.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grade_ray.cli import main
from grade_ray.serving.service import FusionService, RequestError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus as mc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
base: {smoke}
pretrain: {{epochs: 1, batch_size: 16}}
grpo: {{rounds: 1, minibatch_size: 16}}
rollout: {{num_workers: 1, batch_size: 16}}
exploration: {{group_size: 4}}
eval: {{bootstrap: 5, search_requests: 20, static_grid_step: 0.5}}
data: {{max_candidates: {maxc}, cache: false}}
"""
DATA_COMMANDS = ("pretrain", "train", "evaluate", "infer")
OUTCOMES: dict[str, list[str]] = collections.defaultdict(list)  # case id -> outcomes
KINDS: dict[str, str] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    cfg = base / "corpus.yaml"
    cfg.write_text(CONFIG.format(smoke=ROOT / "configs" / "smoke.yaml", maxc=mc.MAX_CANDIDATES))
    good = mc.write(base / "good" / "part-00000.parquet", mc.good_table(mc.ROWS, 10_000, 9)).parent
    run = base / "trained"
    common = [
        "--config",
        str(cfg),
        "--set",
        f"data.train_path={good}",
        "--set",
        f"data.eval_path={good}",
    ]
    assert main(["train", "--local", *common, "--run-dir", str(run)]) == 0
    assert main(["export", str(run), "--out", str(base / "export")]) == 0
    cases = mc.build(base / "cases", run, base / "export")
    return {
        "cases": {c.id: c for c in cases},
        "cfg": cfg,
        "good": good,
        "run": run,
        "export": base / "export",
        "base": base,
    }


def _ids(kind: str) -> list[str]:
    """Case ids of a kind, known without building (the generator's names)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return [c.id for c in mc.build(Path(d)) if c.kind == kind] + (_LATE.get(kind, []))


_LATE = {  # cases that need the trained run / export (named here for parametrization)
    "checkpoint": [
        "checkpoint-pretrain-truncated",
        "checkpoint-all-rounds-garbage",
        "checkpoint-run-dir-in-use",
        "checkpoint-pretrain-dir-in-use",
        "checkpoint-policy-garbage",
        "checkpoint-policy-pickle",
        "checkpoint-no-policy",
    ],
    "export": [
        "export-metadata-fusion-edited",
        "export-manifest-missing",
        "export-manifest-digest",
        "export-manifest-not-json",
        "export-torchscript-truncated",
        "export-torchscript-missing",
        "export-metadata-not-json",
        "export-metadata-missing-key",
        "export-metadata-unknown-fusion",
        "export-metadata-dim-mismatch",
        "export-model-off-simplex",
        "export-no-metadata",
        "export-data-tasks-swapped",
    ],
}


def argv(corpus, command: str, data: Path, mode: str, out: Path) -> list[str]:
    cfg, good = str(corpus["cfg"]), str(corpus["good"])
    settings = ["--set", f"data.on_error={mode}"]
    if command == "infer":
        extra = ["--on-error", "reject"] if mode == "reject" else []
        return [
            "infer",
            str(corpus["export"]),
            "--data",
            str(data),
            "--out",
            str(out / "scored.parquet"),
            "--max-candidates",
            str(mc.MAX_CANDIDATES),
            *extra,
        ]
    if command == "evaluate":
        return [
            "evaluate",
            str(corpus["run"]),
            "--config",
            cfg,
            "--data",
            str(data),
            "--no-baselines",
            "--set",
            f"data.train_path={good}",
            "--set",
            f"data.eval_path={good}",
            *settings,
        ]
    head = ["pretrain"] if command == "pretrain" else ["train", "--local"]
    extra = [] if command == "pretrain" else ["--set", "pretrain.epochs=0"]
    return [
        *head,
        "--config",
        cfg,
        "--run-dir",
        str(out / "run"),
        "--set",
        f"data.train_path={data}",
        "--set",
        f"data.eval_path={good}",
        *settings,
        *extra,
    ]


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("grade-ray: error: "), lines[0]
    return lines[0]


def counts(command: str, out: str, run: Path, corpus) -> tuple[tuple[int, int, int], str | None]:
    """(rows read, used, rejected) and the rejects file a successful command reported."""
    if command == "infer":
        res = json.loads(out)
        return (res["rows_read"], res["rows_used"], res["rows_rejected"]), res["rejects_path"]
    if command == "evaluate":
        m = re.search(
            r"rows read (\d+), used (\d+), rejected (\d+).*?(?:; rejects in (\S+))?$",
            out.splitlines()[0],
        )
        return tuple(int(x) for x in m.groups()[:3]), m.group(4)
    data = json.loads((run / "summary.json").read_text())["data"]
    return (data["rows_read"], data["rows_used"], data["rows_rejected"]), data["rejects_path"]


def check_rejects(path: str | None, case, corpus, command: str) -> None:
    """The rejects file holds exactly the case's bad rows, with reasons and source rows."""
    assert path, "rows were rejected but no rejects file was reported"
    p = Path(path)
    data_dir = Path(case.path)
    assert not p.resolve().is_relative_to(data_dir.resolve()), f"rejects written into {data_dir}"
    t = pq.read_table(p)
    got = sorted(zip(t.column("source_file").to_pylist(), t.column("source_row").to_pylist()))
    assert got == sorted((f, r) for f, r, _ in case.bad)
    reasons = dict(
        zip(
            zip(t.column("source_file").to_pylist(), t.column("source_row").to_pylist()),
            t.column("reject_reason").to_pylist(),
        )
    )
    for f, r, col in case.bad:
        assert reasons[(f, r)].startswith(f"{col}: "), (reasons[(f, r)], col)


@pytest.mark.parametrize("cid", _ids("row"))
def test_row_case(corpus, cid, capsys, tmp_path):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    f, row, col = case.bad[0]
    n_bad = len(case.bad)
    for command in DATA_COMMANDS:
        rc, out, err = run_cli(
            capsys, argv(corpus, command, case.path, "raise", tmp_path / f"{command}-raise")
        )
        line = one_error_line(err)
        assert rc == 2 and f"{f}: row {row}, column '{col}'" in line and case.match in line, line
        OUTCOMES[cid].append(f"{command}: clear error")
        run = tmp_path / f"{command}-reject"
        rc, out, err = run_cli(capsys, argv(corpus, command, case.path, "reject", run))
        assert rc == 0 and not err.strip(), err
        got, rejects = counts(command, out, run / "run", corpus)
        assert got == (case.rows_read, case.rows_read - n_bad, n_bad), (command, got)
        check_rejects(rejects, case, corpus, command)
        OUTCOMES[cid].append(f"{command}: rejected and counted")


@pytest.mark.parametrize("cid", _ids("file"))
def test_file_case(corpus, cid, capsys, tmp_path):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    named = str(case.path) if cid == "file-zero-rows" else case.bad[0][0]  # no row to name
    for command in DATA_COMMANDS:
        for mode in ("raise", "reject"):
            out_dir = tmp_path / f"{command}-{mode}"
            rc, out, err = run_cli(capsys, argv(corpus, command, case.path, mode, out_dir))
            if cid == "file-zero-rows" and command == "infer":  # nothing to score: counted
                assert rc == 0 and counts(command, out, out_dir, corpus)[0] == (0, 0, 0)
                OUTCOMES[cid].append(f"{command} {mode}: counted (0 rows)")
                continue
            if cid == "file-all-rows-bad" and mode == "reject":
                if command == "infer":  # scoring what is left (nothing) is not an error
                    got, rejects = counts(command, out, out_dir, corpus)
                    assert rc == 0 and got == (mc.ROWS, 0, mc.ROWS)
                    assert len(pq.read_table(rejects)) == mc.ROWS
                    OUTCOMES[cid].append(f"{command} {mode}: rejected and counted")
                    continue
                line = one_error_line(err)
                assert rc == 2 and "no usable rows" in line and f"rejected {mc.ROWS}" in line, line
                OUTCOMES[cid].append(f"{command} {mode}: clear error")
                continue
            line = one_error_line(err)
            assert rc == 2 and named in line and case.match in line, (command, mode, line)
            if cid == "file-all-rows-bad":
                assert "row 0, column 'context'" in line
            OUTCOMES[cid].append(f"{command} {mode}: clear error")


@pytest.mark.parametrize("cid", _ids("config"))
def test_config_case(corpus, cid, capsys, tmp_path):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    good = str(corpus["good"])
    for command in case.commands:
        head = ["pretrain"] if command == "pretrain" else ["train", "--local"]
        args = [
            *head,
            "--run-dir",
            str(tmp_path / command),
            "--set",
            f"data.train_path={good}",
            "--set",
            f"data.eval_path={good}",
            *case.argv,
        ]
        rc, _, err = run_cli(capsys, args)
        line = one_error_line(err)
        assert rc == 2 and case.match in line, line
        if case.path is not None:
            assert str(case.path) in line or case.path.name in line, line
        assert not (tmp_path / command / "metrics.jsonl").exists()  # refused before any work
        OUTCOMES[cid].append(f"{command}: clear error")


@pytest.mark.parametrize("cid", _LATE["checkpoint"])
def test_checkpoint_case(corpus, cid, capsys, tmp_path):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    cfg, good = str(corpus["cfg"]), str(corpus["good"])
    data = ["--config", cfg, "--set", f"data.train_path={good}", "--set", f"data.eval_path={good}"]
    run = case.path  # the run directory, or the damaged file in it
    while run.name != "run":
        run = run.parent
    for command in case.commands:
        if command == "train":
            args = ["train", "--local", *data, *case.argv]
        elif command == "train-resume":
            args = ["train", "--local", "--resume", *data, *case.argv]
        elif command == "pretrain":
            args = ["pretrain", *data, *case.argv]
        elif command == "export":
            args = ["export", str(run), "--out", str(tmp_path / "export")]
        else:
            args = ["evaluate", str(run), *data, "--no-baselines"]
        before = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else None
        rc, _, err = run_cli(capsys, args)
        line = one_error_line(err)
        assert rc == 2 and case.match in line and str(case.path) in line, line
        if before is not None:
            assert (run / "metrics.jsonl").read_text() == before  # nothing appended
        OUTCOMES[cid].append(f"{command}: clear error")


@pytest.mark.parametrize("cid", _LATE["export"])
def test_export_case(corpus, cid, capsys, tmp_path):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    data = case.path if cid == "export-data-tasks-swapped" else corpus["good"]
    export = corpus["export"] if cid == "export-data-tasks-swapped" else case.path.parent
    out = tmp_path / "scored.parquet"
    rc, _, err = run_cli(capsys, ["infer", str(export), "--data", str(data), "--out", str(out)])
    line = one_error_line(err)
    named = str(
        case.path if cid != "export-data-tasks-swapped" else case.path / "part-00000.parquet"
    )
    assert rc == 2 and case.match in line and (named in line or str(export) in line), line
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    OUTCOMES[cid].append("infer: clear error")
    if "service" in case.commands:
        with pytest.raises((RequestError, FileNotFoundError), match=re.escape(case.match)):
            FusionService.load(export)
        OUTCOMES[cid].append("FusionService.load: clear error")


@pytest.mark.parametrize("cid", [c.id for c in mc.request_cases()])
def test_request_case(corpus, cid):
    case = corpus["cases"][cid]
    KINDS[cid] = case.kind
    service = FusionService.load(corpus["export"])
    with pytest.raises(
        RequestError, match=case.match if case.match.startswith("task") else re.escape(case.match)
    ):
        case.call(service)
    OUTCOMES[cid].append("FusionService: clear error")


def test_tracebacks_only_with_verbose(corpus, tmp_path):
    """Real child processes: the error is stderr's last line and no traceback is printed;
    with -v the traceback is shown."""
    case = corpus["cases"]["row-nan-score"]
    args = argv(corpus, "infer", case.path, "raise", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for verbose in (False, True):
        done = subprocess.run(
            [sys.executable, "-m", "grade_ray", *(["-v"] if verbose else []), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode != 0
        if verbose:
            assert "Traceback" in done.stderr and "SchemaError" in done.stderr
        else:
            assert "Traceback" not in done.stderr
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("grade-ray: error: ") and "row 7, column 'scores'" in last


def test_corpus_table(corpus):
    """Cases by kind and how each command ended; at least 60 cases, every one seen."""
    cases = corpus["cases"]
    assert len(cases) >= 60
    seen = {cid for cid in OUTCOMES if OUTCOMES[cid]}
    if seen != set(cases):
        pytest.skip(f"run the whole module for the table ({len(seen)} of {len(cases)} cases ran)")
    table = collections.defaultdict(collections.Counter)
    for cid, outs in OUTCOMES.items():
        for o in outs:
            table[KINDS[cid]][o.split(": ", 1)[1]] += 1
    lines = [
        "| kind | cases | clear error | rejected and counted | counted (0 rows) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("row", "file", "config", "checkpoint", "export", "request"):
        n = sum(1 for c in cases.values() if c.kind == kind)
        t = table[kind]
        lines.append(
            f"| {kind} | {n} | {t['clear error']} | {t['rejected and counted']} | {t['counted (0 rows)']} |"
        )
    print("\n" + "\n".join(lines))
    print("tracebacks: 0, silent acceptances: 0, lost rows: 0 (each run asserts them)")
