"""runlog.Progress: a line every ``every_s`` seconds and, unless ``at_end=False``, at the end."""

from __future__ import annotations

import logging

from grade_ray.runlog import Progress


def _lines(caplog, progress: Progress, updates: int) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grade_ray.runlog"):
        for _ in range(updates):
            progress.update(10, "x")
    return [r.getMessage() for r in caplog.records]


def test_progress_logs_the_end_unless_a_summary_follows(caplog):
    done = _lines(caplog, Progress("job", 30, every_s=1e9), 3)
    assert len(done) == 1 and done[0].startswith("job: 30/30 (100%)")
    assert _lines(caplog, Progress("round 1/2", 30, every_s=1e9, at_end=False), 3) == []
    # within the work it still reports every every_s seconds
    within = _lines(caplog, Progress("round 1/2", 30, every_s=0.0, at_end=False), 3)
    assert [m.split(" (")[0] for m in within] == ["round 1/2: 10/30", "round 1/2: 20/30"]
