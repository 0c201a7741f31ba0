"""``grade-ray tune``: hyperparameter sweeps of GRADE training on Ray Tune.

A tune YAML is an experiment config (``base:`` and/or ``experiment: [files]``
plus overrides, resolved like ``--config``) with a ``tune:`` section::

    tune:
      name: smoke                      # sweep directory name (default: the YAML's stem)
      space:                           # dotted config key -> one distribution
        exploration.group_size: {grid: [4, 8]}
        exploration.alpha_end: {choice: [10.0, 15.0]}
        grpo.lr: {loguniform: [1.0e-4, 3.0e-3]}   # also uniform, randint (ends included)
      search: grid                     # grid | random (optuna | hyperopt if installed)
      num_samples: 1                   # grid: repeats of the grid; random: samples
      metric: eval/north_star          # held-out, per round (default by data kind)
      mode: max
      scheduler: asha                  # none | asha (early stopping over rounds)
      grace_period: 1                  # asha: rounds before a trial can be stopped
      reduction_factor: 2              # asha
      max_concurrent_trials: 1
      cpus_per_trial: 0.1              # CPUs of each trial's own function
      storage_path: RUN_DIR/tune       # the sweep lives in STORAGE_PATH/NAME

Every trial is a GRADE training run on the ``grade-ray train`` path (Ray Train
learner driving rollout actors; ``distributed._train_loop``) whose per-round
reports reach Tune through ``TuneReportCallback``, so ASHA can stop trials on
the held-out metric. Trials share the sweep's simulated data and, when no swept
key affects it, its Stage 1 policy. A trial that finishes all rounds is then
evaluated (simulated A/B test against best static weights, searched with the
base reward so every trial faces the same control), and its lifts go into
``sweep_results.json``, ``results.md`` and ``results.csv``; the best trial's
full config is written as ``best_config.yaml``. Each trial's Train job is started
from a helper actor outside the trial's placement group (see :class:`_TrialDriver`).

``--resume`` restores the Tune experiment (unfinished and errored trials go on;
a restarted trial continues from its own last round checkpoint).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from grade_ray.config import (
    Config,
    ConfigError,
    from_dict,
    merge_dicts,
    parse_override,
    read_yaml,
    save_config,
    set_dotted,
    to_dict,
)

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep_results.json"  # read by grade_ray.jobs.report
SPEC_FILE = "tune_spec.json"
TRIALS_DIR = "trials"
TRIAL_RESULT = "tune_result.json"
LIFT_METRICS = ("ctr", "cvr", "opm", "gpm", "north_star")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHERS = ("grid", "random")
# Model-based searchers that ship with Ray Tune but need a package of their own.
MODEL_SEARCHERS = {  # name -> (package, module, class, name of its seed argument)
    "optuna": ("optuna", "ray.tune.search.optuna", "OptunaSearch", "seed"),
    "hyperopt": ("hyperopt", "ray.tune.search.hyperopt", "HyperOptSearch", "random_state_seed"),
}
HELD_OUT_METRICS = {"eval/north_star": "simulated", "eval/ndcg": "logged"}
TRAINING_PREFIXES = ("rollout/", "learner/", "pretrain/", "perf/", "policy/", "segment/")
# Keys that change what Stage 1 learns (or the data it learns from).
STAGE1_PREFIXES = ("simulator.", "data.", "policy.", "pretrain.")
STAGE1_KEYS = {
    "seed",
    "reward.k",
    "reward.post_gains",
    "reward.propensity",
    "reward.propensity_scale",
    "reward.propensity_power",
    "reward.propensity_min",
}
RESOURCE_KEYS = (
    "rollout.num_workers",
    "rollout.num_cpus_per_worker",
    "learner.num_workers",
    "learner.num_cpus_per_worker",
    "learner.use_gpu",
)


class TuneError(ConfigError):
    """A sweep that cannot start or resume; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """A parsed and validated tune YAML."""

    cfg: Config
    """The base experiment config (run_dir resolved); trials override the swept keys."""
    space: dict[str, dict[str, list]]
    """Dotted config key -> {kind: values}."""
    search: str = "grid"
    num_samples: int = 1
    metric: str = "eval/north_star"
    mode: str = "max"
    scheduler: str = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 0.1
    storage_path: str = ""
    name: str = "sweep"
    seed: int = 0

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def max_rounds(self) -> int:
        return int(max(_extremes(self.space.get("grpo.rounds"), self.cfg.grpo.rounds)))

    def shares_data(self) -> bool:
        """Trials reuse the sweep's simulated logs (none of them changes the simulator)."""
        return not self.cfg.data.train_path and not any(
            k.startswith(("simulator.", "data.train_path", "data.eval_path")) for k in self.space
        )

    def shares_stage1(self) -> bool:
        """Trials start from one Stage 1 policy (no swept key changes Stage 1)."""
        return not any(k in STAGE1_KEYS or k.startswith(STAGE1_PREFIXES) for k in self.space)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must keep unchanged."""
        return {"space": self.space, "search": self.search, "config_hash": self.cfg.hash()}


_TUNE_FIELDS = {f.name for f in dataclasses.fields(TuneSpec)} - {"cfg"}


def _extremes(dist: dict[str, list] | None, default: Any) -> list[Any]:
    """Values to check a distribution with: every discrete value, or both range ends."""
    if not dist:
        return [default]
    (kind, values), *_ = dist.items()
    return list(values)


def _parse_space(raw: Any) -> dict[str, dict[str, list]]:
    if not isinstance(raw, dict) or not raw:
        raise TuneError(
            "tune.space is empty: give at least one dotted config key, e.g. "
            "'exploration.group_size: {grid: [4, 8]}'"
        )
    space = {}
    for key, dist in raw.items():
        where = f"tune.space[{key!r}]"
        if key == "run_dir" or key.startswith("run_dir"):
            raise TuneError(f"{where}: run_dir cannot be swept (each trial gets its own)")
        if not isinstance(dist, dict) or len(dist) != 1:
            raise TuneError(
                f"{where} must be a one-key mapping {{kind: values}} with kind one of "
                f"{list(DISTRIBUTIONS)}, got {dist!r}"
            )
        (kind, values), *_ = dist.items()
        if kind not in DISTRIBUTIONS:
            raise TuneError(f"{where}: unknown distribution {kind!r}; use one of {DISTRIBUTIONS}")
        if not isinstance(values, list) or not values:
            raise TuneError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise TuneError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
            lo, hi = values
            if not lo < hi:
                raise TuneError(f"{where}: {kind} needs low < high, got {values!r}")
            if kind == "loguniform" and lo <= 0:
                raise TuneError(f"{where}: loguniform needs low > 0, got {values!r}")
            if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
                raise TuneError(f"{where}: randint needs integer bounds, got {values!r}")
        space[str(key)] = {kind: list(values)}
    return space


def _check_space(cfg: Config, space: dict[str, dict[str, list]]) -> None:
    """Every key exists and every value (range end) builds a valid Config."""
    for key, dist in space.items():
        for value in _extremes(dist, None):
            try:
                cfg.replace(**{key: value})
            except ConfigError as e:
                raise TuneError(f"tune.space[{key!r}] value {value!r}: {e}") from e
    discrete = {
        k: v for k, d in space.items() for kind, v in d.items() if kind in ("grid", "choice")
    }
    if discrete and math.prod(len(v) for v in discrete.values()) <= 512:
        for combo in itertools.product(*discrete.values()):
            over = dict(zip(discrete, combo))
            try:
                cfg.replace(**over)
            except ConfigError as e:
                raise TuneError(f"tune.space combination {over}: {e}") from e


def _default_metric(cfg: Config) -> str:
    return "eval/ndcg" if cfg.data.train_path else "eval/north_star"


def _check_metric(cfg: Config, metric: str) -> None:
    if metric.startswith(TRAINING_PREFIXES):
        raise TuneError(
            f"tune.metric={metric!r} is a training signal, not a held-out validation metric; "
            f"tune on {_default_metric(cfg)!r} (the per-round held-out probe)"
        )
    if metric not in HELD_OUT_METRICS:
        raise TuneError(
            f"tune.metric={metric!r}: use a per-round held-out metric, one of "
            f"{list(HELD_OUT_METRICS)} (lift/* are measured only after a trial ends)"
        )
    kind = "logged" if cfg.data.train_path else "simulated"
    if HELD_OUT_METRICS[metric] != kind:
        raise TuneError(
            f"tune.metric={metric!r} is reported only for {HELD_OUT_METRICS[metric]} data; "
            f"this experiment uses {kind} data: use {_default_metric(cfg)!r}"
        )


def parse_tune_spec(
    data: dict[str, Any], root: Path, overrides: list[str] | None = None, stem: str = "sweep"
) -> TuneSpec:
    """A tune YAML's mapping (files relative to ``root``) -> a validated :class:`TuneSpec`."""
    data = dict(data)
    section = data.pop("tune", None)
    if not isinstance(section, dict):
        raise TuneError("a tune config needs a 'tune:' section with at least 'space:'")
    section = dict(section)
    experiments = data.pop("experiment", []) or []
    if isinstance(experiments, str):
        experiments = [experiments]
    d = to_dict(Config())
    base = data.pop("base", None)
    for f in ([base] if base else []) + list(experiments):
        d = merge_dicts(d, read_yaml(root / f))
    d = merge_dicts(d, data)
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("tune."):
            section[key.removeprefix("tune.")] = value
        else:
            set_dotted(d, key, value)
    cfg = from_dict(Config, d)
    cfg = cfg.replace(run_dir=str(Path(cfg.run_dir).resolve()))
    for k in ("train_path", "eval_path", "cache_dir"):
        p = getattr(cfg.data, k)
        if p:
            cfg = cfg.replace(**{f"data.{k}": str(Path(p).resolve())})

    unknown = sorted(set(section) - _TUNE_FIELDS)
    if unknown:
        raise TuneError(f"unknown tune key(s) {unknown}; valid: {sorted(_TUNE_FIELDS)}")
    space = _parse_space(section.pop("space", None))
    _check_space(cfg, space)
    search = str(section.get("search", "grid"))
    if search not in SEARCHERS and search not in MODEL_SEARCHERS:
        raise TuneError(
            f"tune.search={search!r}: unknown search; use one of {list(SEARCHERS)} "
            f"(model-based, if their package is installed: {list(MODEL_SEARCHERS)})"
        )
    if search == "grid":
        ranged = [k for k, dist in space.items() if "grid" not in dist]
        if ranged:
            raise TuneError(
                f"tune.search=grid needs {{grid: [...]}} for every key; {ranged} are not grids: "
                "make them grids or use tune.search=random"
            )
    if search in MODEL_SEARCHERS:
        grids = [k for k, dist in space.items() if "grid" in dist]
        if grids:
            raise TuneError(
                f"tune.search={search} cannot take grid entries {grids}; use choice instead"
            )
    metric = str(section.get("metric") or _default_metric(cfg))
    _check_metric(cfg, metric)
    mode = str(section.get("mode", "max"))
    if mode not in ("max", "min"):
        raise TuneError(f"tune.mode={mode!r}: use 'max' or 'min'")
    scheduler = str(section.get("scheduler") or "none")
    if scheduler not in ("none", "asha"):
        raise TuneError(f"tune.scheduler={scheduler!r}: use 'none' or 'asha'")

    def number(name: str, default: Any, kind: type, low: float) -> Any:
        value = section.get(name, default)
        try:
            if isinstance(value, bool):
                raise ValueError
            value = kind(value)
            if kind is int and float(section.get(name, default)) != value:
                raise ValueError
        except (TypeError, ValueError):
            raise TuneError(f"tune.{name} must be a {kind.__name__}, got {value!r}") from None
        if value < low:
            raise TuneError(f"tune.{name}={value} must be >= {low}")
        return value

    storage = section.get("storage_path") or str(Path(cfg.run_dir) / "tune")
    spec = TuneSpec(
        cfg=cfg,
        space=space,
        search=search,
        num_samples=number("num_samples", 1, int, 1),
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        grace_period=number("grace_period", 1, int, 1),
        reduction_factor=number("reduction_factor", 2.0, float, 1.0),
        max_concurrent_trials=number("max_concurrent_trials", 1, int, 1),
        cpus_per_trial=number("cpus_per_trial", 0.1, float, 0.0),
        storage_path=str(Path(storage).resolve()),
        name=str(section.get("name") or stem),
        seed=number("seed", 0, int, 0),
    )
    if spec.cpus_per_trial <= 0:
        raise TuneError("tune.cpus_per_trial must be > 0 (Ray refuses 0; 0.1 is enough)")
    if scheduler == "asha":
        if spec.reduction_factor <= 1:
            raise TuneError("tune.reduction_factor must be > 1")
        if spec.grace_period >= spec.max_rounds:
            raise TuneError(
                f"tune.grace_period={spec.grace_period} must be < grpo.rounds={spec.max_rounds}: "
                "ASHA stops trials only before their last round"
            )
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", spec.name):
        raise TuneError(f"tune.name={spec.name!r}: use letters, digits, '.', '_' or '-'")
    return spec


def load_tune_spec(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Read a tune YAML (``yaml.safe_load``) and validate it."""
    path = Path(path)
    if not path.exists():
        raise TuneError(f"tune config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TuneError(f"{path}: a tune config must be a mapping")
    return parse_tune_spec(data, path.parent, overrides, stem=path.stem)


# ---------------------------------------------------------------------------
# Resources


def check_sweep_resources(spec: TuneSpec, resources: dict[str, float]) -> None:
    """Fail before starting if concurrent trials cannot fit the cluster, naming the setting."""
    from grade_ray.raysession import DATA_CPU_RESERVE, ResourceError, check_resources

    n, cpus = spec.max_concurrent_trials, resources.get("CPU", 0.0)
    share = {
        **resources,
        "CPU": (cpus - DATA_CPU_RESERVE) / n - spec.cpus_per_trial + DATA_CPU_RESERVE,
        "GPU": resources.get("GPU", 0.0) / n,
    }
    keys = [k for k in RESOURCE_KEYS if k in spec.space]
    for combo in itertools.product(*(_extremes(spec.space[k], None) for k in keys)):
        over = dict(zip(keys, combo))
        try:
            check_resources(spec.cfg.replace(**over), share)
        except ResourceError as e:
            what = f" with {over}" if over else ""
            raise ResourceError(
                f"a tune trial{what} gets {share['CPU']:g} of the cluster's {cpus:g} CPUs "
                f"(tune.max_concurrent_trials={n}, tune.cpus_per_trial={spec.cpus_per_trial:g} "
                f"for the trial itself): {e}; or lower tune.max_concurrent_trials / "
                "tune.cpus_per_trial"
            ) from None


# ---------------------------------------------------------------------------
# One trial


def trial_config(
    base: Config, params: dict[str, Any], trial_dir: Path, sweep_dir: Path | None = None
) -> Config:
    """The trial's full config: base + its sampled values, in its own run_dir. Trials of
    one sweep share the decoded-data cache (SWEEP_DIR/decoded) unless one is configured."""
    cfg = base.replace(run_dir=str(trial_dir), **params)
    if sweep_dir is not None and cfg.data.cache and not cfg.data.cache_dir:
        cfg = cfg.replace(**{"data.cache_dir": str(sweep_dir / "decoded")})
    return cfg


def _fit_stage2(cfg: Config, callbacks: list, fail_at_round: int | None = None) -> Path:
    """Stage 1 (loaded or trained) then Stage 2 on Ray Train, as ``grade-ray train`` does.

    ``resume`` is always on: a restarted trial continues from its own last round.
    """
    from grade_ray.jobs.train_ray import run_train_ray

    return run_train_ray(cfg, resume=True, fail_at_round=fail_at_round, callbacks=callbacks)


def _evaluate_trial(cfg: Config, eval_reward: dict[str, Any]) -> dict[str, float]:
    """Lifts of the trial's policy over best static weights (simulated A/B test).

    The control is searched with the sweep's base reward, so every trial is compared
    with the same best-static arm even when reward weights are swept.
    """
    from grade_ray.jobs.evaluate import run_evaluate

    eval_cfg = from_dict(Config, {**cfg.to_dict(), "reward": eval_reward})
    res = run_evaluate(eval_cfg, cfg.run_dir)
    out: dict[str, float] = {}
    for row in res.online or []:
        if row["arm"] == "GRADE" and row["metric"] in LIFT_METRICS:
            out[f"lift/{row['metric']}"] = float(row["lift"])
            out[f"ab/{row['metric']}"] = float(row["value"])
    if res.headroom and "GRADE" in res.headroom:
        out["headroom"] = float(res.headroom["GRADE"])
    composite = res.offline.get("GRADE", {}).get("composite")
    if composite is not None:
        out["offline/composite"] = float(composite)
    return out


class _TrialDriver:
    """Runs a trial's Ray Train job from outside the trial's placement group.

    Tune schedules a trial in a placement group that captures child tasks, and Ray
    passes that capture on: the Train controller started from the trial would make
    each Train worker capture its children, so the rollout actors a worker creates
    would wait forever for room in the worker's own one-bundle group. Started here
    (plain scheduling, pinned to the trial's node, no CPUs reserved), the Train job
    places its workers and rollout actors exactly as ``grade-ray train`` does.
    """

    def fit(self, cfg_dict: dict[str, Any], callbacks: list, fail_at: int | None) -> str:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return str(_fit_stage2(from_dict(Config, cfg_dict), callbacks, fail_at))


def _fit_outside_trial_group(cfg: Config, callbacks: list, fail_at: int | None) -> Path:
    """``_fit_stage2`` in a :class:`_TrialDriver` actor owned by (and dying with) the trial.

    The Tune callback is built in the trial (it needs the Tune session) and travels
    with the trainer; its reports reach the trial through the session's queue actor.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver = (
        ray.remote(_TrialDriver)
        .options(
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            ),
        )
        .remote()
    )
    try:
        return Path(ray.get(driver.fit.remote(cfg.to_dict(), callbacks, fail_at)))
    finally:
        ray.kill(driver)


def _run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune trainable: one GRADE training run for one point of the space."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from grade_ray.learner.loop import PRETRAIN_CKPT
    from grade_ray.runlog import CHECKPOINT_DIR

    trial_id = ray.tune.get_context().get_trial_id()
    sweep_dir = Path(ctx["sweep_dir"])
    trial_dir = sweep_dir / TRIALS_DIR / trial_id
    (trial_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    cfg = trial_config(from_dict(Config, ctx["base"]), params, trial_dir, sweep_dir)
    (trial_dir / "trial.json").write_text(
        json.dumps({"trial_id": trial_id, "config": params}, default=str)
    )
    if ctx["shared_data"] and not (trial_dir / "data").exists():
        os.symlink(sweep_dir / "data", trial_dir / "data")  # same simulated logs
    sp = sweep_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if ctx["shared_stage1"] and not (trial_dir / CHECKPOINT_DIR / sp.name).exists():
        shutil.copy(sp, trial_dir / CHECKPOINT_DIR / sp.name)  # same Stage 1 policy
    fail_at = None
    inject = ctx.get("inject_failure")
    marker = trial_dir / "_injected_failure"
    if inject and trial_id.endswith(f"_{int(inject[0]):05d}") and not marker.exists():
        marker.touch()  # fail once (fault-injection hook for tests)
        fail_at = int(inject[1])
    log.info("trial %s: %s in %s", trial_id, params, trial_dir)
    _fit_outside_trial_group(cfg, [TuneReportCallback()], fail_at)
    result = _evaluate_trial(cfg, ctx["eval_reward"]) if ctx["evaluate"] else {}
    (trial_dir / TRIAL_RESULT).write_text(json.dumps(result, indent=2))
    log.info("trial %s done: %s", trial_id, result)


# ---------------------------------------------------------------------------
# The sweep


def _param_space(spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, dist in spec.space.items():
        (kind, v), *_ = dist.items()
        if kind == "grid":
            out[key] = tune.grid_search(v)
        elif kind == "choice":
            out[key] = tune.choice(v)
        elif kind == "uniform":
            out[key] = tune.uniform(float(v[0]), float(v[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(v[0]), float(v[1]))
        else:  # randint: both ends included
            out[key] = tune.randint(int(v[0]), int(v[1]) + 1)
    return out


def _search_alg(spec: TuneSpec):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.search in SEARCHERS:
        return BasicVariantGenerator(
            random_state=spec.seed, max_concurrent=spec.max_concurrent_trials
        )
    package, module, cls, seed_arg = MODEL_SEARCHERS[spec.search]
    try:
        __import__(package)
    except ImportError:
        raise TuneError(
            f"tune.search={spec.search} needs the {package!r} package, which is not installed "
            "here; use tune.search=grid or random"
        ) from None
    searcher = getattr(__import__(module, fromlist=[cls]), cls)(
        metric=spec.metric, mode=spec.mode, **{seed_arg: spec.seed}
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent_trials)


def _scheduler(spec: TuneSpec):
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One Tune iteration per Stage 2 round (each round's ray.train.report). Rungs lie
    # before the last round, and a trial that passes them is never cut off at max_t:
    # a stop there would kill it before it saves policy.pt and is evaluated.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.max_rounds - 1,
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
        stop_last_trials=False,
    )


def prepare_shared(spec: TuneSpec) -> None:
    """Simulate the sweep's data and train its Stage 1 policy once, in the driver."""
    from grade_ray.data.schema import read_meta
    from grade_ray.jobs.train import initial_policy, prepare_data
    from grade_ray.learner.loop import PRETRAIN_CKPT, save_policy
    from grade_ray.runlog import CHECKPOINT_DIR

    cfg = spec.cfg.replace(run_dir=str(spec.sweep_dir))
    if not (spec.shares_data() or spec.shares_stage1()):
        return
    train_path, _ = prepare_data(cfg) if spec.shares_data() else (cfg.data.train_path, "")
    if spec.shares_stage1():
        if not train_path:  # simulator keys swept: Stage 1 needs its own data per trial
            return
        ckpt = spec.sweep_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
        if not ckpt.exists():
            meta = read_meta(train_path)
            log.info("Stage 1 once for the whole sweep -> %s", ckpt)
            policy = initial_policy(cfg, meta, train_path, None)
            if not ckpt.exists():  # pretrain.epochs == 0
                save_policy(ckpt, policy, cfg, meta)


@dataclasses.dataclass
class SweepResult:
    sweep_dir: Path
    trials: list[dict[str, Any]]
    table_md: str
    best: dict[str, Any] | None
    best_config: Path | None
    incomplete: bool = False
    """Some trials failed or the sweep was interrupted: ``--resume`` continues it."""


def run_tune(
    spec: TuneSpec,
    resume: bool = False,
    address: str | None = None,
    inject_failure: tuple[int, int] | None = None,
) -> SweepResult:
    """Run (or ``resume``) the sweep; write the results table, JSON and best config."""
    from ray import tune

    from grade_ray.raysession import init_ray

    sweep_dir = spec.sweep_dir
    exists = sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir))
    if resume and not exists:
        raise FileNotFoundError(
            f"--resume: no Tune experiment to resume at {sweep_dir} "
            "(tune.storage_path / tune.name); run without --resume to start the sweep"
        )
    if not resume and exists:
        raise TuneError(
            f"{sweep_dir} already holds a sweep: pass --resume to continue it, or set another "
            "tune.name (or delete the directory) to start over"
        )
    spec_file = sweep_dir / SPEC_FILE
    if resume and spec_file.exists():
        saved = json.loads(spec_file.read_text())
        now = json.loads(json.dumps(spec.fingerprint()))
        if saved != now:
            raise TuneError(
                f"--resume: the tune config changed since {sweep_dir} started (space, search or "
                f"base config); saved: {saved}, now: {now}"
            )
    init_ray(address)
    import ray

    check_sweep_resources(spec, ray.cluster_resources())
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec.fingerprint(), indent=2, default=str))
    save_config(spec.cfg, sweep_dir / "base_config.yaml")
    prepare_shared(spec)

    ctx = {
        "base": spec.cfg.to_dict(),
        "sweep_dir": str(sweep_dir),
        "shared_data": spec.shares_data(),
        "shared_stage1": spec.shares_stage1(),
        "eval_reward": spec.cfg.to_dict()["reward"],
        "evaluate": True,
        "inject_failure": list(inject_failure) if inject_failure else None,
    }
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, ctx=ctx), {"cpu": spec.cpus_per_trial}
    )
    if resume:
        log.info("resuming the sweep in %s", sweep_dir)
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        log.info(
            "sweep %s: %s search over %s (%d sample(s)), metric %s (%s), scheduler %s",
            spec.name,
            spec.search,
            list(spec.space),
            spec.num_samples,
            spec.metric,
            spec.mode,
            spec.scheduler,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=_search_alg(spec),
                scheduler=_scheduler(spec),
                num_samples=spec.num_samples,  # concurrency: capped by the search_alg
            ),
            run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, verbose=1),
        )
    grid = tuner.fit()
    return write_results(spec, grid)


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
    sweep_dir = spec.sweep_dir
    results = list(grid)
    # Tune's own trial records give ids and states (RUNNING etc. when interrupted)
    tune_trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if tune_trials is None or len(tune_trials) != len(results):
        tune_trials = [None] * len(results)
    trials = [_trial_row(spec, r, t) for r, t in zip(results, tune_trials)]
    sign = 1.0 if spec.mode == "max" else -1.0

    def value(t: dict[str, Any]) -> float | None:
        v = t["metrics"].get(spec.metric)
        return None if v is None or math.isnan(v) else float(v)

    # best first by the metric (trials without it last)
    trials.sort(key=lambda t: (value(t) is None, -sign * (value(t) or 0.0)))
    header, rows = results_table(spec, trials)
    table_md = _markdown(header, rows)
    (sweep_dir / "results.md").write_text(
        f"Sweep `{spec.name}`: {len(trials)} trials, metric `{spec.metric}` ({spec.mode}, last "
        "round); lifts over best static weights in the simulated A/B test.\n\n" + table_md + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    (sweep_dir / "results.csv").write_text(buf.getvalue())

    # the best trial that finished all rounds (its policy.pt exists), else the best at all
    scored = [t for t in trials if value(t) is not None]
    best = next((t for t in scored if t["status"] == "completed"), scored[0] if scored else None)
    best_config = None
    if best is not None:
        cfg = trial_config(spec.cfg, best["config"], sweep_dir / "best_run")
        best_config = sweep_dir / "best_config.yaml"
        save_config(cfg, best_config)
        if best["status"] != "completed":
            log.warning("the best trial %s did not finish all rounds", best["trial_id"])
    errors = [t["trial_id"] for t in trials if t["status"] == "error"]
    if errors:
        log.warning("trial(s) %s failed; `grade-ray tune --resume` reruns them", errors)
    unfinished = [t["trial_id"] for t in trials if t["status"] == "unfinished"]
    if unfinished:
        log.warning(
            "the sweep was interrupted (%s unfinished); `grade-ray tune --resume` continues it",
            unfinished,
        )
    data = {
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
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(data, indent=2, default=str))
    log.info("sweep results: %s", sweep_dir / SWEEP_FILE)
    return SweepResult(
        sweep_dir, trials, table_md, data["best"], best_config, bool(errors or unfinished)
    )


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="hyperparameter sweep of GRADE training on Ray Tune")
    p.add_argument("--config", required=True, metavar="FILE", help="tune YAML (configs/tune/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, or a tune key as tune.KEY=VALUE",
    )
    p.add_argument("--resume", action="store_true", help="continue the sweep in its directory")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)",
    )

    def handler(args) -> int:
        from grade_ray.raysession import ResourceError

        try:
            spec = load_tune_spec(args.config, args.set)
            res = run_tune(spec, resume=args.resume, address=args.address)
        except ResourceError as e:
            print(f"grade-ray: error: {e}", file=sys.stderr)
            return 2
        print(res.table_md)
        print(f"sweep: {res.sweep_dir}")
        if res.best:
            print(f"best trial: {res.best['trial_id']} {res.best['config']}")
            print(f"best config: {res.best_config}")
            print(f"best checkpoint: {res.best['checkpoint']}")
        if res.incomplete:
            print("sweep incomplete (failed or unfinished trials): continue it with --resume")
        return 0

    p.set_defaults(fn=handler)
