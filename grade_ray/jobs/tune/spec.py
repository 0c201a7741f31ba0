"""Tune YAML -> a validated :class:`TuneSpec`, and the check that its trials fit the cluster.

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

Every mistake is a :class:`TuneError` naming the key and how to fix it, raised before
Ray starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Any

import yaml

from grade_ray.config import (
    Config,
    ConfigError,
    flat_settings,
    from_dict,
    merge_dicts,
    parse_override,
    read_yaml,
    set_dotted,
    stage1_key,
    to_dict,
)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHERS = ("grid", "random")
# Model-based searchers that ship with Ray Tune but need a package of their own.
MODEL_SEARCHERS = {  # name -> (package, module, class, name of its seed argument)
    "optuna": ("optuna", "ray.tune.search.optuna", "OptunaSearch", "seed"),
    "hyperopt": ("hyperopt", "ray.tune.search.hyperopt", "HyperOptSearch", "random_state_seed"),
}
HELD_OUT_METRICS = {"eval/north_star": "simulated", "eval/ndcg": "logged"}
TRAINING_PREFIXES = ("rollout/", "learner/", "pretrain/", "perf/", "policy/", "segment/")
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
        return not any(stage1_key(k) for k in self.space)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must keep unchanged: the space, the base config and every
        tune setting (Tune restores its own copy of mode, samples, scheduler and
        concurrency, so a changed one would be ignored by Tune but not by the results)."""
        return {
            "space": self.space,
            "config_hash": self.cfg.hash(),
            **{f: getattr(self, f) for f in sorted(_TUNE_FIELDS - {"space", "storage_path"})},
        }


_TUNE_FIELDS = {f.name for f in dataclasses.fields(TuneSpec)} - {"cfg"}


def _extremes(dist: dict[str, list] | None, default: Any) -> list[Any]:
    """Every discrete value of a distribution, or both range ends."""
    if not dist:
        return [default]
    (kind, values), *_ = dist.items()
    return list(values)


RANDINT_ALL = 64
"""A randint range of up to this many integers is checked value by value."""


def _check_values(dist: dict[str, list]) -> list[Any]:
    """Values a trial may get, to check a distribution with: every discrete value, every
    integer of a small randint range (else its ends and middle), a continuous range's ends
    and three points inside (an integer key swept with uniform fails there)."""
    (kind, values), *_ = dist.items()
    if kind in ("grid", "choice"):
        return list(values)
    lo, hi = values
    if kind == "randint":
        lo, hi = int(lo), int(hi)
        if hi - lo + 1 <= RANDINT_ALL:
            return list(range(lo, hi + 1))
        return sorted({lo, (lo + hi) // 2, hi})
    if kind == "loguniform":
        return [float(lo * (hi / lo) ** q) for q in (0.0, 0.29, 0.5, 0.71, 1.0)]
    return [float(lo + (hi - lo) * q) for q in (0.0, 0.29, 0.5, 0.71, 1.0)]


def _parse_space(raw: Any) -> dict[str, dict[str, list]]:
    if not isinstance(raw, dict) or not raw:
        raise TuneError(
            "tune.space is empty: give at least one dotted config key, e.g. "
            "'exploration.group_size: {grid: [4, 8]}'"
        )
    space = {}
    for key, dist in raw.items():
        where = f"tune.space[{key!r}]"
        if not isinstance(key, str):
            raise TuneError(f"{where}: a swept key is a dotted config name such as 'grpo.lr'")
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


COMBINATIONS_CHECKED = 1024
"""Up to this many combinations of the keys' check values are each built as a Config (~1 ms
each); a larger space is checked key by key."""


def _check_space(cfg: Config, space: dict[str, dict[str, list]]) -> None:
    """Every key is a setting (not a whole section) and every value a trial may get builds
    a valid Config, alone and (up to :data:`COMBINATIONS_CHECKED`) with the other keys'."""
    leaves = set(flat_settings(to_dict(cfg)))
    values = {}
    for key, dist in space.items():
        inside = sorted(k for k in leaves if k.startswith(key + "."))
        if key not in leaves and inside:  # unknown keys get the config's own message below
            raise TuneError(
                f"tune.space[{key!r}] is a config section, not a setting: sweep its keys, "
                f"e.g. {inside[:4]}"
            )
        values[key] = _check_values(dist)
        for value in values[key]:
            try:
                cfg.replace(**{key: value})
            except ConfigError as e:
                raise TuneError(f"tune.space[{key!r}] value {value!r}: {e}") from e
    if len(values) > 1 and math.prod(len(v) for v in values.values()) <= COMBINATIONS_CHECKED:
        for combo in itertools.product(*values.values()):
            over = dict(zip(values, combo))
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
    """A tune YAML's mapping (files relative to ``root``) -> a validated :class:`TuneSpec`.

    The experiment config is resolved like ``--config`` (``base``, the ``experiment``
    files, the YAML's own keys, then ``overrides``; ``tune.KEY=VALUE`` ones go to the
    tune section); then the tune keys are checked: names, space, search, metric, mode,
    scheduler, numbers, and the rules between them.
    """
    data = dict(data)
    section = data.pop("tune", None)
    if not isinstance(section, dict):
        raise TuneError("a tune config needs a 'tune:' section with at least 'space:'")
    section = dict(section)
    d = _experiment_dict(data, root)
    _apply_overrides(d, section, overrides or [])
    cfg = _resolve_paths(from_dict(Config, d))

    unknown = sorted(set(section) - _TUNE_FIELDS)
    if unknown:
        raise TuneError(f"unknown tune key(s) {unknown}; valid: {sorted(_TUNE_FIELDS)}")
    space = _parse_space(section.pop("space", None))
    _check_space(cfg, space)
    search = _check_search(str(section.get("search", "grid")), space)
    metric = str(section.get("metric") or _default_metric(cfg))
    _check_metric(cfg, metric)
    spec = TuneSpec(
        cfg=cfg,
        space=space,
        search=search,
        metric=metric,
        mode=_one_of("mode", str(section.get("mode", "max")), ("max", "min")),
        scheduler=_one_of("scheduler", str(section.get("scheduler") or "none"), ("none", "asha")),
        **_numbers(section),
        storage_path=str(Path(section.get("storage_path") or Path(cfg.run_dir) / "tune").resolve()),
        name=str(section.get("name") or stem),
    )
    _check_rules(spec)
    return spec


def _experiment_dict(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Defaults <- ``base`` <- ``experiment`` files (relative to ``root``) <- the other keys."""
    experiments = data.pop("experiment", []) or []
    if isinstance(experiments, str):
        experiments = [experiments]
    d = to_dict(Config())
    base = data.pop("base", None)
    for f in ([base] if base else []) + list(experiments):
        d = merge_dicts(d, read_yaml(root / f))
    return merge_dicts(d, data)


def _apply_overrides(d: dict[str, Any], section: dict[str, Any], overrides: list[str]) -> None:
    """``KEY=VALUE`` into the config dict ``d``, ``tune.KEY=VALUE`` into the tune ``section``."""
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("tune."):
            section[key.removeprefix("tune.")] = value
        else:
            set_dotted(d, key, value)


def _resolve_paths(cfg: Config) -> Config:
    """Absolute run_dir and data paths: trials run in other working directories."""
    cfg = cfg.replace(run_dir=str(Path(cfg.run_dir).resolve()))
    for k in ("train_path", "eval_path", "cache_dir"):
        p = getattr(cfg.data, k)
        if p:
            cfg = cfg.replace(**{f"data.{k}": str(Path(p).resolve())})
    return cfg


def _check_search(search: str, space: dict[str, dict[str, list]]) -> str:
    """A known searcher that can take the space's distributions."""
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
    return search


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise TuneError(f"tune.{name}={value!r}: use " + " or ".join(map(repr, allowed)))
    return value


# Numeric tune keys -> (type, lowest allowed value); their defaults are TuneSpec's.
_NUMBERS: dict[str, tuple[type, float]] = {
    "num_samples": (int, 1),
    "grace_period": (int, 1),
    "reduction_factor": (float, 1.0),
    "max_concurrent_trials": (int, 1),
    "cpus_per_trial": (float, 0.0),
    "seed": (int, 0),
}


def _numbers(section: dict[str, Any]) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(TuneSpec)}
    return {
        name: _number(section, name, defaults[name], kind, low)
        for name, (kind, low) in _NUMBERS.items()
    }


def _number(section: dict[str, Any], name: str, default: Any, kind: type, low: float) -> Any:
    value = section.get(name, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        value = kind(value)
        if kind is int and float(section.get(name, default)) != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise TuneError(f"tune.{name} must be a {kind.__name__}, got {value!r}") from None
    if not math.isfinite(value):
        raise TuneError(f"tune.{name} must be a finite number, got {value!r}")
    if value < low:
        raise TuneError(f"tune.{name}={value} must be >= {low}")
    return value


def _check_rules(spec: TuneSpec) -> None:
    """The rules between keys: Ray needs CPUs per trial, ASHA needs rungs before the last
    round, the name is a directory name."""
    if spec.cpus_per_trial <= 0:
        raise TuneError("tune.cpus_per_trial must be > 0 (Ray refuses 0; 0.1 is enough)")
    if spec.scheduler == "asha":
        if spec.reduction_factor <= 1:
            raise TuneError("tune.reduction_factor must be > 1")
        if spec.grace_period >= spec.max_rounds:
            raise TuneError(
                f"tune.grace_period={spec.grace_period} must be < grpo.rounds={spec.max_rounds}: "
                "ASHA stops trials only before their last round"
            )
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", spec.name):
        raise TuneError(f"tune.name={spec.name!r}: use letters, digits, '.', '_' or '-'")


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
