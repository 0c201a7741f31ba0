"""Run directory plumbing: metrics (CSV + TensorBoard), checkpoints, progress lines.

Checkpoints are ``torch.save`` dicts of tensors and plain Python values and
are always loaded with ``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


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
    """All metric rows of a run (from metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.generic, torch.Tensor)):
            v = v.item()
        out[k] = v
    return out


def save_checkpoint(run_dir: str | Path, name: str, state: dict[str, Any]) -> Path:
    """Atomically write ``RUN_DIR/checkpoints/NAME.pt`` (tensors + plain values only)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest round checkpoint of a run, or None."""
    d = Path(run_dir) / CHECKPOINT_DIR
    cands = sorted(d.glob("round-*.pt")) if d.exists() else []
    return cands[-1] if cands else None


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

    def __init__(self, what: str, total: int, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, max(int(total), 1), every_s
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
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
