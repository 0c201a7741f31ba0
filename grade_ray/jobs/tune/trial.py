"""One trial: a GRADE training run for one point of the space, then its evaluation.

Every trial is a GRADE training run on the ``grade-ray train`` path (Ray Train learner
driving rollout actors; :func:`grade_ray.jobs.train_ray.run_train_ray`) whose per-round
reports reach Tune through ``TuneReportCallback``, so ASHA can stop trials on the held-out
metric. Trials share the sweep's simulated data and, when no swept key affects it, its
Stage 1 policy. A trial that finishes all rounds is then evaluated (simulated A/B test
against best static weights, searched with the base reward so every trial faces the same
control) and its lifts are written to ``SWEEP_DIR/trials/ID/tune_result.json``. Each
trial's Train job is started from a helper actor outside the trial's placement group (see
:class:`_TrialDriver`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from grade_ray.config import Config, from_dict
from grade_ray.jobs.tune.spec import TuneSpec

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
TRIAL_RESULT = "tune_result.json"
LIFT_METRICS = ("ctr", "cvr", "opm", "gpm", "north_star")


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


def trial_context(spec: TuneSpec, inject_failure: tuple[int, int] | None) -> dict[str, Any]:
    """What every trial of the sweep reads (plain values: it travels to the trial)."""
    return {
        "base": spec.cfg.to_dict(),
        "sweep_dir": str(spec.sweep_dir),
        "shared_data": spec.shares_data(),
        "shared_stage1": spec.shares_stage1(),
        "eval_reward": spec.cfg.to_dict()["reward"],
        "evaluate": True,
        "inject_failure": list(inject_failure) if inject_failure else None,
    }


def _run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune trainable: one GRADE training run for one point of the space.

    ``ctx`` is :func:`trial_context`. Tune names each trial's directory after this
    function, so the name stays (a sweep started before a rename still resumes).
    """
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
