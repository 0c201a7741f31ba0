"""``grade-ray report DIR``: PNG plots and a Markdown page for a run, sweep, suite or
data-scale directory.

For a training run: reward components and KL per round, the alpha_hat
schedule, clip and zero-variance fractions, policy diagnostics, the learned
weights per user segment (simulator) and the evaluation tables when present.
For a sweep (a directory with ``sweep_results.json``): the trade-off between
objectives across trials with the Pareto front marked, and the sensitivity of
the validation metric to group size and the concentration schedule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grade_ray import keys  # noqa: E402
from grade_ray.jobs.tune.results import SWEEP_FILE  # noqa: E402
from grade_ray.runlog import read_metrics  # noqa: E402

log = logging.getLogger(__name__)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[keys.ROUND], r[key]) for r in rows if key in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x), np.asarray(y, dtype=float)


def _panel(ax, rows, series: list[tuple[str, str]], title: str) -> bool:
    drawn = False
    for key, label in series:
        x, y = _series(rows, key)
        if len(x):
            ax.plot(x + 1, y, marker="o", label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("round")
    if drawn:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return drawn


# training.png: a 2 x 2 grid of panels, each (title, [(metric key, legend label), ...])
TRAINING_PANELS = (
    (
        "rollout reward components",
        [
            (keys.ROLLOUT_REWARD, "composite R"),
            (keys.ROLLOUT_R_POST, "R_post"),
            (keys.ROLLOUT_R_PRIOR, "R_prior"),
            (keys.ROLLOUT_R_FORMAT, "R_format"),
        ],
    ),
    ("KL to reference", [(keys.LEARNER_KL, "KL(pi || pi_ref)")]),
    (
        "Dirichlet concentration schedule",
        [(keys.ROLLOUT_ALPHA_HAT, "alpha_hat (mean over round)")],
    ),
    (
        "clipping, zero-variance, polarization",
        [
            (keys.LEARNER_CLIP_FRAC, "clip fraction"),
            (keys.ROLLOUT_ZERO_VAR_FRAC, "zero-variance groups"),
            (keys.POLICY_POLARIZED, "polarized (max w > 0.9)"),
        ],
    ),
)
# diagnostics.png, right panel
PERSONALIZATION = [
    (keys.POLICY_ENTROPY, "weight entropy"),
    (keys.POLICY_SPREAD, "user spread (std of w across users)"),
]


def plot_training(run_dir: Path, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per-round training curves -> PNG files in ``out``."""
    paths = [
        _plot_training_curves(run_dir, rows, out / "training.png"),
        _plot_diagnostics(rows, out / "diagnostics.png"),
    ]
    seg = _segment_weights(rows[-1]) if rows else {}
    if seg:
        paths.append(_plot_segments(seg, out / "segment_weights.png", _oracle_weights(run_dir)))
    return paths


def _plot_training_curves(run_dir: Path, rows: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, series) in zip(axes.flat, TRAINING_PANELS):
        _panel(ax, rows, series, title)
    fig.suptitle(f"GRADE training: {run_dir.name}")
    return _save(fig, path)


def _plot_diagnostics(rows: list[dict[str, Any]], path: Path) -> Path:
    """The held-out business metric and the personalization diagnostics."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    business = [k for k in ("eval/north_star", keys.EVAL_NDCG) if any(k in r for r in rows)]
    _panel(axes[0], rows, [(k, k) for k in business], "held-out business metric")
    _panel(axes[1], rows, PERSONALIZATION, "personalization")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _segment_weights(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    seg: dict[str, dict[str, float]] = {}
    prefix = keys.SEGMENT_MEAN_W + "/"
    for k, v in row.items():
        if k.startswith(prefix):
            _, name, task = k.split("/")
            seg.setdefault(name, {})[task.removeprefix("w_")] = float(v)
    return seg


def _oracle_weights(run_dir: Path) -> dict[str, list[float]] | None:
    """Per-segment oracle weights from the simulator (when the run used it)."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    from grade_ray.config import load_config

    cfg = load_config([cfg_path])
    if cfg.data.train_path:
        return None
    from grade_ray.data.simulator import MarketplaceSimulator
    from grade_ray.jobs.headroom import world_truth_table

    sim = MarketplaceSimulator(cfg.simulator)
    w = world_truth_table(cfg, sim).segment_best()
    return {s: w[i].tolist() for i, s in enumerate(sim.segment_names)}


def _plot_segments(
    seg: dict[str, dict[str, float]], path: Path, oracle: dict[str, list[float]] | None
) -> Path:
    names = list(seg)
    tasks = list(next(iter(seg.values())))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(tasks)
    x = np.arange(len(names))
    for j, t in enumerate(tasks):
        ax.bar(x + j * width, [seg[n][t] for n in names], width, label=f"learned w_{t}")
        if oracle:
            ax.scatter(
                x + j * width,
                [oracle[n][j] for n in names],
                color="black",
                marker="_",
                s=200,
                zorder=3,
                label="oracle" if j == 0 else None,
            )
    ax.set_xticks(x + width * (len(tasks) - 1) / 2, names)
    ax.set_ylabel("mean weight")
    ax.set_title("learned fusion weights per user segment (black: per-segment oracle)")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """points (P, M) to maximise -> (P,) bool: not dominated by any other point."""
    p = np.asarray(points, dtype=float)
    keep = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        dominated = np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1)
        keep[i] = not dominated.any()
    return keep


TRADEOFF_LIFTS = ("lift/ctr", "lift/cvr", "lift/opm")
"""Axes of the trade-off plot (x, y, colour), when every A/B-tested trial has them."""
SENSITIVITY_PARAMS = (
    "exploration.group_size",
    "exploration.alpha_start",
    "exploration.alpha_end",
    "exploration.schedule",
    "reward.l2",
    "exploration.kind",
)
"""Swept keys the sensitivity plot shows, when a sweep varies them."""


def plot_sweep(results: list[dict[str, Any]], out: Path, metric: str) -> list[Path]:
    """Trade-off (Pareto) and sensitivity plots for a sweep's trials."""
    trials = [r for r in results if r.get("metrics", {}).get(metric) is not None]
    if not trials:
        return []
    plots = [
        _plot_tradeoff(trials, out / "tradeoff.png"),
        _plot_sensitivity(trials, metric, out / "sensitivity.png"),
    ]
    return [p for p in plots if p is not None]


def _plot_tradeoff(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """Lifts of the trials that finished and were A/B tested (early-stopped ones have no
    lifts), Pareto front circled; None with fewer than two lifts to plot."""
    tested = [t for t in trials if all(k in t["metrics"] for k in TRADEOFF_LIFTS[:2])]
    lift_keys = [k for k in TRADEOFF_LIFTS if tested and all(k in t["metrics"] for t in tested)]
    if len(lift_keys) < 2:
        return None
    pts = np.array([[t["metrics"][k] for k in lift_keys] for t in tested])
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    c = pts[:, 2] if pts.shape[1] > 2 else None
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=c, cmap="viridis", s=40)
    ax.scatter(
        pts[front, 0],
        pts[front, 1],
        facecolors="none",
        edgecolors="red",
        s=140,
        label="Pareto front",
    )
    if c is not None:
        fig.colorbar(sc, label=lift_keys[2])
    ax.set_xlabel(lift_keys[0])
    ax.set_ylabel(lift_keys[1])
    ax.set_title("objective trade-off across trials (lift over best static)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_sensitivity(trials: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """``metric`` per value of each swept :data:`SENSITIVITY_PARAMS` key (red: the mean)."""
    params = [k for k in SENSITIVITY_PARAMS if any(k in t["config"] for t in trials)]
    if not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False)
    for ax, k in zip(axes[0], params):
        xs = [t["config"].get(k) for t in trials]
        ys = [t["metrics"][metric] for t in trials]
        cats = sorted({str(x) for x in xs}, key=lambda s: (len(s), s))
        pos = {c: i for i, c in enumerate(cats)}
        ax.scatter([pos[str(x)] for x in xs], ys)
        for c in cats:
            v = [y for x, y in zip(xs, ys) if str(x) == c]
            ax.hlines(np.mean(v), pos[c] - 0.3, pos[c] + 0.3, color="red")
        ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sensitivity of {metric} (red: mean per value)")
    return _save(fig, path)


def plot_suite(results: dict[str, Any], out: Path) -> list[Path]:
    """Captured attainable headroom per world, one bar per arm (a ``grade-ray suite`` run)."""
    worlds = list(results)
    arms = list(dict.fromkeys(a for r in results.values() for a in r["arms"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(worlds)), 4))
    width = 0.8 / max(len(arms), 1)
    for j, arm in enumerate(arms):
        vals = [results[w]["arms"].get(arm, {}).get("captured", np.nan) for w in worlds]
        ax.bar(np.arange(len(worlds)) + j * width, vals, width, label=arm)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(worlds)) + 0.4 - width / 2, worlds, rotation=20)
    ax.set_ylabel("captured attainable headroom")
    ax.set_title("(P - S) / (O_ctx - S) per world (1 = the best context-only weights)")
    ax.legend(fontsize=8)
    return [_save(fig, out / "suite.png")]


def plot_scale(scale: dict[str, Any], out: Path) -> list[Path]:
    """Captured attainable headroom against training requests, per world and arm."""
    sizes = sorted(int(n) for n in scale)
    first = scale[str(sizes[0])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for world, res in first.items():
        for arm in res["arms"]:
            ys = [
                scale[str(n)].get(world, {}).get("arms", {}).get(arm, {}).get("captured", np.nan)
                for n in sizes
            ]
            ax.plot(sizes, ys, marker="o", label=f"{world} / {arm}")
    ax.set_xscale("log")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("training requests")
    ax.set_ylabel("captured attainable headroom")
    ax.set_title("Data scale: (P - S) / (O_ctx - S)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / "scale.png")]


def _suite_page(root: Path, out: Path) -> tuple[list[str], list[Path]] | None:
    """Lines and plots for a suite (suite.json) or data-scale (scale.json) directory."""
    if (root / "scale.json").exists():
        scale = json.loads((root / "scale.json").read_text())
        return [(root / "scale.md").read_text()], plot_scale(scale, out)
    if (root / "suite.json").exists():
        results = json.loads((root / "suite.json").read_text())
        return [(root / "suite.md").read_text()], plot_suite(results, out)
    return None


def run_report(path: str | Path) -> Path:
    """Write plots and ``report.md`` into PATH/report; returns the Markdown path. A
    directory with nothing to report gets no (empty) report folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no run or sweep directory at {root}")
    out = root / "report"
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_report(root, out)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _write_report(root: Path, out: Path) -> Path:
    lines = [f"# grade_ray report: {root.name}", ""]
    sweep = root / SWEEP_FILE
    suite = _suite_page(root, out)
    if suite is not None:
        lines += suite[0]
        pngs = suite[1]
    elif sweep.exists():
        data = json.loads(sweep.read_text())
        pngs = plot_sweep(data["trials"], out, data["metric"])
        lines += [
            f"Sweep of {len(data['trials'])} trials; metric `{data['metric']}` ({data['mode']}).",
            "",
            data.get("table_md", ""),
            "",
        ]
    else:
        rows = [r for r in read_metrics(root) if r.get("stage") == 2]
        if not rows:
            raise FileNotFoundError(f"{root} has no Stage 2 metrics (metrics.jsonl) to report")
        pngs = plot_training(root, rows, out)
        last = rows[-1]
        lines += [
            f"{len(rows)} Stage 2 rounds. Last round:",
            "",
            "| metric | value |",
            "|---|---:|",
        ]
        lines += [
            f"| `{k}` | {v:.4g} |"
            for k, v in last.items()
            if isinstance(v, (int, float)) and not k.startswith(keys.SEGMENT_MEAN_W)
        ]
        ev = root / "eval" / "eval.md"
        if ev.exists():
            lines += ["", "## Evaluation", "", ev.read_text()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    log.info("report: %s (%d plots)", md, len(pngs))
    return md


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="plots + Markdown page for a run, sweep, suite or data-scale directory"
    )
    p.add_argument("path", help="a run, sweep (Tune), suite or data-scale output directory")

    def handler(args) -> int:
        print(f"report: {run_report(args.path)}")
        return 0

    p.set_defaults(fn=handler)
