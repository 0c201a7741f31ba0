"""``grade-ray report DIR`` on directories with nothing to report."""

from __future__ import annotations

from grade_ray.cli import main


def test_report_of_nothing_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, want in ((empty, "no Stage 2 metrics"), (afile, "no run or sweep directory")):
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    assert list(empty.iterdir()) == []  # no empty report/ left behind
