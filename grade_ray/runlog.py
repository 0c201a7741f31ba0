"""Run directory plumbing: metrics (CSV + TensorBoard), checkpoints, progress lines.

Checkpoints are ``torch.save`` dicts of tensors and plain Python values and
are always loaded with ``weights_only=True`` (no arbitrary unpickling). They are
written aside, flushed to disk and renamed into place, so a killed process leaves
either the old file or the new one; one that still does not load (truncated
elsewhere) raises :class:`CheckpointError` naming it, and :func:`load_latest`
falls back to the round before. ``metrics.jsonl`` is appended one row at a time;
:meth:`MetricsLogger.rewrite` replaces it whole (a resumed run makes it agree with
its checkpoint) and :func:`read_metrics` skips a last line cut short by a kill.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade_ray.config import UserError, error_brief

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint or policy file that cannot be loaded; the message names it."""


class RunDirError(UserError):
    """A run directory in a state the job cannot start from; the message says what to do."""


class MetricsLogger:
    """Appends metric rows to ``metrics.csv`` / ``metrics.jsonl`` and TensorBoard events."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # pragma: no cover - optional dependency
                log.warning("tensorboardX not installed; writing CSV/JSONL metrics only")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), "time": time.time(), **_plain(metrics)}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._rewrite_csv()
        if self._writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace every metric row (written aside, then renamed into place)."""
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(_plain(r)) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.jsonl)
        self._rewrite_csv()

    def _rewrite_csv(self) -> None:
        rows = read_metrics(self.run_dir)
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        tmp = self.csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All metric rows of a run (from metrics.jsonl); a line that is not JSON (the last one,
    cut short when a process was killed while appending it) is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not a metrics row (cut short?); skipped", path, i + 1)
    return rows


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.generic, torch.Tensor)):
            v = v.item()
        out[k] = v
    return out


def save_checkpoint(run_dir: str | Path, name: str, state: dict[str, Any]) -> Path:
    """Atomically write ``RUN_DIR/checkpoints/NAME.pt`` (tensors + plain values only): the
    bytes reach the disk before the file takes the name."""
    return save_atomic(Path(run_dir) / CHECKPOINT_DIR / f"{name}.pt", state)


def save_atomic(path: str | Path, state: Any) -> Path:
    """``torch.save`` to ``path`` so that a crash leaves the old file or the new one, never
    part of one: written aside, fsynced, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a missing file raises
    FileNotFoundError, one that does not load (truncated, not a checkpoint, or pickled
    objects other than tensors and plain values) :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(
            f"{path} does not load as a checkpoint ({type(e).__name__}: {error_brief(e)}); it is "
            "truncated, damaged or not a grade_ray checkpoint"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def round_checkpoints(run_dir: str | Path) -> list[Path]:
    """The round checkpoints of a run, oldest first."""
    d = Path(run_dir) / CHECKPOINT_DIR
    return sorted(d.glob("round-*.pt")) if d.exists() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest round checkpoint of a run, or None."""
    cands = round_checkpoints(run_dir)
    return cands[-1] if cands else None


def load_latest(
    run_dir: str | Path, check: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest round checkpoint that loads (and passes ``check``, which
    raises :class:`CheckpointError` for a state it cannot use), falling back round by
    round with a warning naming each file skipped; None when the run has none. Raises
    :class:`CheckpointError` when there are checkpoints but none loads."""
    cands = round_checkpoints(run_dir)
    errors = []
    for path in reversed(cands):
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(state)
        except CheckpointError as e:
            log.warning("%s; falling back to the round before", e)
            errors.append(str(e))
            continue
        return path, state
    if cands:
        raise CheckpointError(
            f"no round checkpoint of {run_dir} loads ({'; '.join(errors)}); delete "
            f"{Path(run_dir) / CHECKPOINT_DIR}/round-*.pt to start Stage 2 over"
        )
    return None


def rng_state(np_rng: np.random.Generator, torch_gen: torch.Generator) -> dict[str, Any]:
    """RNG states as plain values + tensors (checkpointable with weights_only)."""
    return {
        "numpy": json.dumps(np_rng.bit_generator.state),
        "torch": torch_gen.get_state(),
        "torch_global": torch.get_rng_state(),
    }


def restore_rng(
    state: dict[str, Any], np_rng: np.random.Generator, torch_gen: torch.Generator
) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    torch_gen.set_state(state["torch"])
    torch.set_rng_state(state["torch_global"])


class Progress:
    """A one-line-per-update progress reporter for long jobs (logs, never prints)."""

    def __init__(self, what: str, total: int, every_s: float = 5.0, at_end: bool = True) -> None:
        """``at_end=False``: no line when the work completes (the caller logs a summary)."""
        self.what, self.total, self.every_s = what, max(int(total), 1), every_s
        self.at_end = at_end
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total and not self.at_end:
            return
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info(
                "%s: %d/%d (%.0f%%) %.0f/s eta %.0fs %s",
                self.what,
                self.done,
                self.total,
                100 * self.done / self.total,
                rate,
                eta,
                extra,
            )
