"""The sweep: check, prepare the shared data and Stage 1, run (or resume) Ray Tune, write results.

``--resume`` restores the Tune experiment (unfinished and errored trials go on; a
restarted trial continues from its own last round checkpoint).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from grade_ray.config import save_config
from grade_ray.jobs.tune.results import SweepResult, write_results
from grade_ray.jobs.tune.spec import (
    MODEL_SEARCHERS,
    SEARCHERS,
    TuneError,
    TuneSpec,
    check_sweep_resources,
)
from grade_ray.jobs.tune.trial import _run_trial, trial_context

log = logging.getLogger(__name__)

SPEC_FILE = "tune_spec.json"


def run_tune(
    spec: TuneSpec,
    resume: bool = False,
    address: str | None = None,
    inject_failure: tuple[int, int] | None = None,
) -> SweepResult:
    """Run (or ``resume``) the sweep; write the results table, JSON and best config.

    ``inject_failure=(trial_index, round)``: that trial fails once after that round (a
    fault-injection hook for tests).
    """
    from ray import tune

    from grade_ray.raysession import init_ray

    _check_start(spec, resume)
    init_ray(address)
    import ray

    check_sweep_resources(spec, ray.cluster_resources())
    _prepare(spec)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, ctx=trial_context(spec, inject_failure)),
        {"cpu": spec.cpus_per_trial},
    )
    tuner = _restored_tuner(spec, trainable) if resume else _new_tuner(spec, trainable)
    grid = tuner.fit()
    return write_results(spec, grid)


def _check_start(spec: TuneSpec, resume: bool) -> None:
    """A new sweep needs a free directory; a resumed one its Tune experiment, unchanged."""
    from ray import tune

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
        now = json.loads(json.dumps(spec.fingerprint(), default=str))
        # a sweep started by an older grade_ray saved fewer keys: those it has must hold
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            what = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise TuneError(
                f"--resume: the tune config changed since {sweep_dir} started ({what}); Tune "
                "would keep the old settings: set them back, or start a new sweep (tune.name)"
            )


def _prepare(spec: TuneSpec) -> None:
    """The sweep directory: its fingerprint, base config, shared data and Stage 1."""
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    (spec.sweep_dir / SPEC_FILE).write_text(json.dumps(spec.fingerprint(), indent=2, default=str))
    save_config(spec.cfg, spec.sweep_dir / "base_config.yaml")
    prepare_shared(spec)


def _new_tuner(spec: TuneSpec, trainable):
    from ray import tune

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
    return tune.Tuner(
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


def _restored_tuner(spec: TuneSpec, trainable):
    """The sweep's Tune experiment; its unfinished and errored trials go on."""
    from ray import tune

    log.info("resuming the sweep in %s", spec.sweep_dir)
    return tune.Tuner.restore(
        str(spec.sweep_dir), trainable, resume_unfinished=True, resume_errored=True
    )


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
    from grade_ray.data.reading import read_meta
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
