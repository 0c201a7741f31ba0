"""A finished (or interrupted) sweep's results: one row per trial, tables, the best config.

Trials are ranked by the tune metric (last round); their lifts go into
``sweep_results.json``, ``results.md`` and ``results.csv``, and the best trial's full
config is written as ``best_config.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from grade_ray.config import save_config
from grade_ray.jobs.tune.spec import TuneSpec
from grade_ray.jobs.tune.trial import LIFT_METRICS, TRIAL_RESULT, TRIALS_DIR, trial_config

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep_results.json"  # also read by grade_ray.jobs.report


@dataclasses.dataclass
class SweepResult:
    sweep_dir: Path
    trials: list[dict[str, Any]]
    table_md: str
    best: dict[str, Any] | None
    best_config: Path | None
    incomplete: bool = False
    """Some trials failed or the sweep was interrupted: ``--resume`` continues it."""


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})")
_KEEP = ("eval/", "lift/", "ab/", "offline/", "headroom")
_KEEP_EXACT = (
    "rollout/reward",
    "learner/kl",
    "policy/weight_entropy",
    "policy/user_spread",
    "round",
    "training_iteration",
    "time_total_s",
)


def _trial_row(spec: TuneSpec, result, tune_trial=None) -> dict[str, Any]:
    from grade_ray.runlog import latest_checkpoint, read_metrics

    metrics = dict(result.metrics or {})
    tid = getattr(tune_trial, "trial_id", None) or metrics.get("trial_id")
    if not tid:
        m = _TRIAL_ID.search(Path(result.path).name) if result.path else None
        tid = m.group(1) if m else Path(str(result.path)).name
    trial_dir = spec.sweep_dir / TRIALS_DIR / tid
    # The trial's own log is the truth for its last round: Tune may have missed the last
    # report (a sweep interrupted between a round and its report) and a resumed trial
    # whose rounds were all done reports nothing.
    logged = [r for r in read_metrics(trial_dir) if r.get("stage") == 2]
    if logged:
        metrics.update(logged[-1])
    keep = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (k.startswith(_KEEP) or k in _KEEP_EXACT)
    }
    done = trial_dir / TRIAL_RESULT
    if done.exists():
        keep.update(json.loads(done.read_text()))
    if "round" in keep:
        keep["rounds_done"] = keep.pop("round") + 1
    tune_status = getattr(tune_trial, "status", "TERMINATED")
    if result.error or tune_status == "ERROR":
        status = "error"
    elif tune_status != "TERMINATED":
        status = "unfinished"  # the sweep was interrupted; --resume continues it
    else:
        status = "completed" if done.exists() else "stopped"  # stopped: by the scheduler
    policy = trial_dir / "policy.pt"
    ckpt = policy if done.exists() and policy.exists() else latest_checkpoint(trial_dir)
    config = {k: (result.config or {}).get(k) for k in spec.space}
    return {
        "trial_id": tid,
        "status": status,
        "config": config,
        "metrics": keep,
        "checkpoint": str(ckpt) if ckpt else "",
        "run_dir": str(trial_dir),
        "error": str(result.error).splitlines()[0][:300] if result.error else "",
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key.startswith("lift/"):
            return f"{value:+.2%}"
        return f"{value:.4g}"
    return str(value)


def results_table(spec: TuneSpec, trials: list[dict[str, Any]]) -> tuple[list[str], list[list]]:
    """(header, rows) of the results table, one row per trial (already sorted)."""
    extra = [f"lift/{m}" for m in LIFT_METRICS]
    extra = [k for k in extra if any(k in t["metrics"] for t in trials)]
    header = ["trial_id", "status", *spec.space, spec.metric, *extra, "rounds_done"]
    rows = []
    for t in trials:
        rows.append(
            [t["trial_id"], t["status"]]
            + [t["config"].get(k) for k in spec.space]
            + [t["metrics"].get(k) for k in [spec.metric, *extra, "rounds_done"]]
        )
    return header, rows


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_fmt(h, v) for h, v in zip(header, row)]
        cells[-1] = "-" if row[-1] is None else str(int(row[-1]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(spec: TuneSpec, grid) -> SweepResult:
    """sweep_results.json, results.md/.csv and best_config.yaml from a Tune ResultGrid."""
    trials = _ranked(spec, _trial_rows(spec, grid))
    header, rows = results_table(spec, trials)
    table_md = _markdown(header, rows)
    _write_tables(spec, len(trials), header, rows, table_md)
    best = _best(spec, trials)
    best_config = _write_best_config(spec, best)
    incomplete = _warn_incomplete(trials)
    data = _sweep_json(spec, trials, best, best_config, table_md)
    (spec.sweep_dir / SWEEP_FILE).write_text(json.dumps(data, indent=2, default=str))
    log.info("sweep results: %s", spec.sweep_dir / SWEEP_FILE)
    return SweepResult(spec.sweep_dir, trials, table_md, data["best"], best_config, incomplete)


def _trial_rows(spec: TuneSpec, grid) -> list[dict[str, Any]]:
    results = list(grid)
    # Tune's own trial records give ids and states (RUNNING etc. when interrupted)
    tune_trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if tune_trials is None or len(tune_trials) != len(results):
        tune_trials = [None] * len(results)
    return [_trial_row(spec, r, t) for r, t in zip(results, tune_trials)]


def _value(spec: TuneSpec, trial: dict[str, Any]) -> float | None:
    """The trial's tune metric (last round), None when it has none."""
    v = trial["metrics"].get(spec.metric)
    return None if v is None or math.isnan(v) else float(v)


def _ranked(spec: TuneSpec, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first by the metric; trials without it last."""
    sign = 1.0 if spec.mode == "max" else -1.0
    return sorted(trials, key=lambda t: (_value(spec, t) is None, -sign * (_value(spec, t) or 0.0)))


def _write_tables(
    spec: TuneSpec, n: int, header: list[str], rows: list[list], table_md: str
) -> None:
    (spec.sweep_dir / "results.md").write_text(
        f"Sweep `{spec.name}`: {n} trials, metric `{spec.metric}` ({spec.mode}, last "
        "round); lifts over best static weights in the simulated A/B test.\n\n" + table_md + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    (spec.sweep_dir / "results.csv").write_text(buf.getvalue())


def _best(spec: TuneSpec, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial that finished all rounds (its policy.pt exists), else the best at all."""
    scored = [t for t in trials if _value(spec, t) is not None]
    return next((t for t in scored if t["status"] == "completed"), scored[0] if scored else None)


def _write_best_config(spec: TuneSpec, best: dict[str, Any] | None) -> Path | None:
    """The best trial's full config as best_config.yaml (its run_dir: SWEEP_DIR/best_run)."""
    if best is None:
        return None
    cfg = trial_config(spec.cfg, best["config"], spec.sweep_dir / "best_run")
    path = spec.sweep_dir / "best_config.yaml"
    save_config(cfg, path)
    if best["status"] != "completed":
        log.warning("the best trial %s did not finish all rounds", best["trial_id"])
    return path


def _warn_incomplete(trials: list[dict[str, Any]]) -> bool:
    """Warn about failed and unfinished trials; True if there are any."""
    errors = [t["trial_id"] for t in trials if t["status"] == "error"]
    if errors:
        log.warning("trial(s) %s failed; `grade-ray tune --resume` reruns them", errors)
    unfinished = [t["trial_id"] for t in trials if t["status"] == "unfinished"]
    if unfinished:
        log.warning(
            "the sweep was interrupted (%s unfinished); `grade-ray tune --resume` continues it",
            unfinished,
        )
    return bool(errors or unfinished)


def _sweep_json(
    spec: TuneSpec,
    trials: list[dict[str, Any]],
    best: dict[str, Any] | None,
    best_config: Path | None,
    table_md: str,
) -> dict[str, Any]:
    """sweep_results.json: the sweep's settings, every trial row, the best, the table."""
    return {
        "name": spec.name,
        "metric": spec.metric,
        "mode": spec.mode,
        "search": spec.search,
        "scheduler": spec.scheduler,
        "space": spec.space,
        "trials": trials,
        "best": {
            "trial_id": best["trial_id"],
            "config": best["config"],
            "metric": best["metrics"].get(spec.metric),
            "checkpoint": best["checkpoint"],
            "best_config": str(best_config),
        }
        if best
        else None,
        "table_md": table_md,
    }
