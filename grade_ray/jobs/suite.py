"""``grade-ray suite``: every arm trained and evaluated on every simulator world.

A suite file (``configs/suite/*.yaml``) names the worlds (simulator overlays in
``configs/worlds/``), the settings every run shares (``set``) and the arms: each
arm is a named set of config files and overrides (the defaults, the paper's
configuration, ablations). Per world the suite simulates the logs once, trains
Stage 1 once per distinct Stage 1 setting, trains every arm's Stage 2, then puts
all arms and the oracles into one paired A/B test on fresh requests with the
true best static vector as the control. It writes ``RUN/suite.md|json|csv``: per
world and arm, the north-star lift with its 95% CI, captured attainable headroom,
and the objective and optimisation gaps of the arm's own reward.

Order in which settings apply (later wins): defaults <- ``--config`` files <- the
world file <- the suite's ``set`` <- the arm's config files <- the arm's ``set``
<- ``--set`` on the command line. Arms may not change ``simulator.*`` (a world's
data is shared) or ``eval.*`` (one A/B test per world). Re-running continues: an arm whose ``policy.pt`` was trained with
the same config is not trained again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from grade_ray.algos.fusion import fuse_requests
from grade_ray.config import Config, ConfigError, load_config, save_config, stage1_settings
from grade_ray.data.abtest import ab_test
from grade_ray.jobs.headroom import (
    CONTEXT_ORACLE,
    REWARD_ORACLE,
    SEGMENT_ORACLE,
    STATIC,
    headroom,
    posterior_arm,
    reward_table,
    truth_oracle_arms,
    world_truth_table,
)
from grade_ray.learner.loop import POLICY_FILE, PRETRAIN_CKPT
from grade_ray.runlog import CHECKPOINT_DIR
from grade_ray.spec import as_tensor

log = logging.getLogger(__name__)

SUITE_KEYS = ("worlds", "set", "arms")
ARM_KEYS = ("config", "set")


class SuiteError(ConfigError):
    """A suite file that cannot be run; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """A named training configuration: config files then dotted overrides."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """Worlds (name -> overlay file), shared overrides and arms, from a suite file."""

    worlds: dict[str, str]
    shared: tuple[str, ...]
    arms: tuple[Arm, ...]


def _overrides(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise SuiteError(f"{where} must be a mapping of section.key: value")
    return tuple(f"{k}={json.dumps(v)}" for k, v in raw.items())


def _worlds(raw: Any, here: Path) -> dict[str, str]:
    paths: list[Path] = []
    for item in [raw] if isinstance(raw, str) else list(raw or []):
        p = (here / item).resolve()
        if p.is_dir():
            paths += sorted(p.glob("*.yaml"))
        elif p.exists():
            paths.append(p)
        else:
            raise SuiteError(f"suite world {item!r}: no such file or folder ({p})")
    if not paths:
        raise SuiteError("the suite names no worlds (worlds: a folder or a list of files)")
    return {p.stem: str(p) for p in paths}


def load_suite(path: str | Path) -> SuiteSpec:
    """Read and check a suite file (YAML, safe_load); paths are relative to it."""
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"suite file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - set(SUITE_KEYS):
        raise SuiteError(f"{path}: a suite file is a mapping with keys {list(SUITE_KEYS)}")
    arms = []
    for name, body in (raw.get("arms") or {}).items():
        body = body or {}
        if not isinstance(body, dict) or set(body) - set(ARM_KEYS):
            raise SuiteError(f"{path}: arm {name!r} takes keys {list(ARM_KEYS)}")
        files = body.get("config") or []
        files = [files] if isinstance(files, str) else list(files)
        arms.append(
            Arm(
                str(name),
                tuple(str((path.parent / f).resolve()) for f in files),
                _overrides(body.get("set"), f"{path}: arms.{name}.set"),
            )
        )
    if not arms:
        raise SuiteError(f"{path}: the suite names no arms")
    return SuiteSpec(
        _worlds(raw.get("worlds"), path.parent), _overrides(raw.get("set"), "set"), tuple(arms)
    )


def select(spec: SuiteSpec, worlds: list[str] | None, arms: list[str] | None) -> SuiteSpec:
    """The suite restricted to the named worlds and arms (unknown names raise)."""
    for asked, have, what in (
        (worlds, spec.worlds, "world"),
        (arms, [a.name for a in spec.arms], "arm"),
    ):
        unknown = sorted(set(asked or []) - set(have))
        if unknown:
            raise SuiteError(f"unknown {what}(s) {unknown}; this suite has {sorted(have)}")
    return SuiteSpec(
        {w: p for w, p in spec.worlds.items() if not worlds or w in worlds},
        spec.shared,
        tuple(a for a in spec.arms if not arms or a.name in arms),
    )


# ---------------------------------------------------------------------------
# configs and training


def arm_config(
    spec: SuiteSpec,
    world: str,
    arm: Arm,
    run_dir: Path,
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The config arm ``arm`` trains with in ``world`` (see the module docstring's order)."""
    files = [*(configs or []), spec.worlds[world], *arm.configs]
    over = [*spec.shared, *arm.overrides, *(overrides or []), f"run_dir={run_dir}"]
    world_only = load_config(
        [*(configs or []), spec.worlds[world]], [*spec.shared, *(overrides or [])]
    )
    cfg = load_config(files, over)
    if cfg.simulator != world_only.simulator:
        raise SuiteError(f"arm {arm.name!r} changes simulator settings; put those in a world")
    if cfg.eval != world_only.eval:
        raise SuiteError(
            f"arm {arm.name!r} changes eval settings; every arm shares one A/B test per world, "
            "so put those in the suite's set"
        )
    return cfg


def _stage1_key(cfg: Config) -> str:
    keep = stage1_settings(cfg.to_dict())
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def _share_data(world_dir: Path, run_dir: Path, cfg: Config) -> Config:
    """Point a run at the world's simulated logs and decoded cache."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train_path and not (run_dir / "data").exists():
        os.symlink((world_dir / "data").resolve(), run_dir / "data")
    if cfg.data.cache and not cfg.data.cache_dir:
        cfg = cfg.replace(**{"data.cache_dir": str(world_dir / "decoded")})
    return cfg


def _stage1(world_dir: Path, cfg: Config) -> Path:
    """The Stage 1 checkpoint for ``cfg``'s Stage 1 settings, trained once per world."""
    from grade_ray.jobs.train import run_pretrain

    sdir = world_dir / "stage1" / _stage1_key(cfg)
    ckpt = sdir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if not ckpt.exists():
        log.info("Stage 1 for %s in %s", Path(cfg.run_dir).name, sdir)
        run_pretrain(_share_data(world_dir, sdir, cfg.replace(run_dir=str(sdir))))
    return ckpt


def train_arm(world_dir: Path, cfg: Config, ray: bool = False, address: str | None = None) -> dict:
    """Train one arm (Stage 1 shared, Stage 2 in RUN/WORLD/arms/ARM) unless its policy exists
    with the same config; returns {"policy": path, "train_s": seconds or None if reused}."""
    from grade_ray.jobs.train import run_train_local

    run_dir = Path(cfg.run_dir)
    cfg = _share_data(world_dir, run_dir, cfg)
    policy = run_dir / POLICY_FILE
    saved = run_dir / "config.yaml"
    if policy.exists() and saved.exists() and yaml.safe_load(saved.read_text()) == cfg.to_dict():
        log.info("%s: trained already (%s)", run_dir.name, policy)
        return {"policy": str(policy), "train_s": None}
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy(_stage1(world_dir, cfg), run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt")
    t0 = time.perf_counter()
    if ray:
        from grade_ray.jobs.train_ray import run_train_ray

        run_train_ray(cfg, address=address)
    else:
        run_train_local(cfg)
    return {"policy": str(policy), "train_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# evaluation: one paired A/B test per world


def _reward_key(cfg: Config) -> str:
    d = cfg.to_dict()
    return json.dumps(
        [d["reward"], d["policy"]["fusion"], d["policy"]["fusion_eps"]], sort_keys=True
    )


def evaluate_world(cfgs: dict[str, Config], policies: dict[str, str], world_dir: Path) -> dict:
    """One A/B test of every arm, S, O_ctx, O_seg and each distinct reward's O_rew on the
    same fresh requests (control S). Returns per-arm rows and the world's oracle values."""
    from grade_ray.jobs.evaluate import policy_arm
    from grade_ray.jobs.train import prepare_data, simulator_for

    first = next(iter(cfgs.values()))
    sim = simulator_for(first)
    train_path, _ = prepare_data(first.replace(run_dir=str(world_dir)))
    arms = truth_oracle_arms(sim, world_truth_table(first, sim))
    owner: dict[str, str] = {}  # reward config -> the first arm trained with it
    reward_arm: dict[str, str] = {}
    for name, cfg in cfgs.items():
        key = _reward_key(cfg)
        if key not in owner:
            owner[key] = name
            table = reward_table(cfg, sim, train_path)
            arms[f"{REWARD_ORACLE}[{name}]"] = posterior_arm(sim, table)
        reward_arm[name] = owner[key]
    for name, path in policies.items():
        arms[name] = policy_arm(path)
    e = first.eval
    batch, truth = sim.fresh_requests(e.ab_requests, e.ab_seed)
    sc = as_tensor(batch.scores)
    fused = {}
    for n, fn in arms.items():
        w = torch.from_numpy(np.ascontiguousarray(fn(batch, truth)))
        fused[n] = fuse_requests(first.policy.fusion, sc, w, first.policy.fusion_eps).numpy()
    ab = ab_test(sim, batch, truth, fused, control=STATIC, seed=e.ab_seed, bootstrap=e.bootstrap)
    ns = dict(zip(ab.arms, ab.north_star))
    rows = {}
    for name in policies:
        oracle = f"{REWARD_ORACLE}[{reward_arm[name]}]"
        base = {k: ns[k] for k in (STATIC, CONTEXT_ORACLE, SEGMENT_ORACLE)}
        h = headroom(
            {**base, REWARD_ORACLE: ns[oracle], name: ns[name]}, truth.segment, sim.segment_names
        )
        r = ab.row(name, "north_star")
        rows[name] = {
            "north_star": r["value"],
            "lift": r["lift"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "significant": r["significant"],
            "captured": h.captured[name],
            "captured_segment": h.captured_segment[name],
            "objective_gap": h.objective_gap,
            "optimisation_gap": h.optimisation_gap[name],
            "per_segment": h.per_segment[name],
        }
    oracles = {k: float(np.mean(ns[k])) for k in ab.arms if k not in policies}
    return {"arms": rows, "oracles": oracles, "ab": ab.to_rows()}


# ---------------------------------------------------------------------------
# the job


COLUMNS = (
    "world",
    "arm",
    "north-star",
    "lift vs static_truth [95% CI]",
    "captured (attainable)",
    "captured (segment oracle)",
    "objective gap",
    "optimisation gap",
    "train s",
)


def _row_cells(world: str, arm: str, r: dict, train_s: float | None) -> list[str]:
    star = "*" if r["significant"] else ""
    return [
        world,
        arm,
        f"{r['north_star']:.4f}",
        f"{r['lift']:+.2%}{star} [{r['ci_low']:+.2%}, {r['ci_high']:+.2%}]",
        f"{r['captured']:.2f}",
        f"{r['captured_segment']:.2f}",
        f"{r['objective_gap']:.2f}",
        f"{r['optimisation_gap']:.2f}",
        "reused" if train_s is None else f"{train_s:.0f}",
    ]


def suite_markdown(results: dict[str, dict]) -> str:
    """The suite table: one row per world and arm, then each world's headroom."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    for world, res in results.items():
        for arm, r in res["arms"].items():
            lines.append("| " + " | ".join(_row_cells(world, arm, r, res["train_s"][arm])) + " |")
    lines += [
        "",
        "* = 95% paired bootstrap CI excludes 0. Captured = (P - S) / (O_ctx - S); objective gap "
        "= (O_ctx - O_rew) / (O_ctx - S) for the arm's own reward; optimisation gap = "
        "(O_rew - P) / (O_ctx - S).",
        "",
        "| world | static_truth | oracle_ctx (attainable) | oracle (segment) |",
        "|---|---:|---:|---:|",
    ]
    for world, res in results.items():
        o = res["oracles"]
        s = o[STATIC]
        lines.append(
            f"| {world} | {s:.4f} | {o[CONTEXT_ORACLE]:.4f} ({o[CONTEXT_ORACLE] / s - 1:+.2%}) | "
            f"{o[SEGMENT_ORACLE]:.4f} ({o[SEGMENT_ORACLE] / s - 1:+.2%}) |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict[str, dict]) -> None:
    (out / "suite.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "suite.md").write_text(suite_markdown(results))
    with open(out / "suite.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "world",
                "arm",
                "north_star",
                "lift",
                "ci_low",
                "ci_high",
                "captured",
                "captured_segment",
                "objective_gap",
                "optimisation_gap",
                "train_s",
            ]
        )
        for world, res in results.items():
            for arm, r in res["arms"].items():
                w.writerow(
                    [
                        world,
                        arm,
                        r["north_star"],
                        r["lift"],
                        r["ci_low"],
                        r["ci_high"],
                        r["captured"],
                        r["captured_segment"],
                        r["objective_gap"],
                        r["optimisation_gap"],
                        res["train_s"][arm],
                    ]
                )


def run_suite(
    spec: SuiteSpec,
    run_dir: str | Path,
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
    ray: bool = False,
    address: str | None = None,
) -> dict[str, dict]:
    """Train and evaluate every arm on every world; writes RUN/suite.md|json|csv after each
    world (a stopped suite keeps what it finished)."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for i, world in enumerate(spec.worlds, 1):
        wdir = out / world
        cfgs = {
            a.name: arm_config(spec, world, a, wdir / "arms" / a.name, configs, overrides)
            for a in spec.arms
        }
        from grade_ray.jobs.train import prepare_data

        wdir.mkdir(parents=True, exist_ok=True)
        first = next(iter(cfgs.values()))
        save_config(first.replace(run_dir=str(wdir)), wdir / "world.yaml")
        prepare_data(first.replace(run_dir=str(wdir)))
        trained = {}
        for j, (name, cfg) in enumerate(cfgs.items(), 1):
            log.info(
                "suite: world %d/%d %s, arm %d/%d %s",
                i,
                len(spec.worlds),
                world,
                j,
                len(cfgs),
                name,
            )
            trained[name] = train_arm(wdir, cfg, ray=ray, address=address)
        res = evaluate_world(cfgs, {n: t["policy"] for n, t in trained.items()}, wdir)
        res["train_s"] = {n: t["train_s"] for n, t in trained.items()}
        results[world] = res
        (wdir / "eval.json").write_text(json.dumps(res, indent=2, default=float))
        _write(out, results)
        log.info("suite: %s done\n%s", world, suite_markdown({world: res}))
    return results


def scale_markdown(scale: dict[int, dict[str, dict]]) -> str:
    """Captured attainable headroom (and lift) per world and arm at each training size."""
    sizes = sorted(scale)
    lines = [
        "| world | arm | " + " | ".join(f"{n:,} requests" for n in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for world, res in scale[sizes[0]].items():
        for arm in res["arms"]:
            cells = []
            for n in sizes:
                r = scale[n].get(world, {}).get("arms", {}).get(arm)
                cells.append("" if r is None else f"{r['captured']:.2f} ({r['lift']:+.2%})")
            lines.append(f"| {world} | {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Captured attainable headroom (lift over static_truth) by training requests."]
    return "\n".join(lines) + "\n"


def run_scale(
    spec: SuiteSpec,
    run_dir: str | Path,
    sizes: list[int],
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
    ray: bool = False,
    address: str | None = None,
) -> dict[int, dict[str, dict]]:
    """The suite at each number of training requests (RUN/nSIZE/), plus RUN/scale.md|json."""
    out = Path(run_dir)
    scale: dict[int, dict[str, dict]] = {}
    for n in sorted(sizes):
        over = [*(overrides or []), f"simulator.num_requests={n}"]
        scale[n] = run_suite(spec, out / f"n{n}", configs, over, ray=ray, address=address)
        (out / "scale.json").write_text(json.dumps(scale, indent=2, default=float))
        (out / "scale.md").write_text(scale_markdown(scale))
    return scale


def add_parser(sub) -> None:
    from grade_ray.options import add_common_args

    p = sub.add_parser(
        "suite", help="train and evaluate every arm on every simulator world (one table)"
    )
    add_common_args(p, ray=True)
    p.add_argument(
        "--suite", default="configs/suite/default.yaml", help="suite file (worlds, set, arms)"
    )
    p.add_argument("--worlds", nargs="+", help="only these worlds (names of the world files)")
    p.add_argument("--arms", nargs="+", help="only these arms")
    p.add_argument("--ray", action="store_true", help="train Stage 2 on Ray (default: in process)")
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        metavar="N",
        help="run the suite at each number of training requests (RUN/nN/, RUN/scale.md)",
    )

    def handler(args) -> int:
        spec = select(load_suite(args.suite), args.worlds, args.arms)
        run_dir = args.run_dir or "runs/suite"
        kw = {"ray": args.ray, "address": args.address}
        if args.sizes:
            scale = run_scale(spec, run_dir, args.sizes, args.config, args.set, **kw)
            print(scale_markdown(scale))
            print(f"written: {Path(run_dir) / 'scale.md'}")
            return 0
        results = run_suite(spec, run_dir, args.config, args.set, **kw)
        print(suite_markdown(results))
        print(f"written: {Path(run_dir) / 'suite.md'}")
        return 0

    p.set_defaults(fn=handler)
