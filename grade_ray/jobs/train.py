"""Jobs: simulate, pretrain (Stage 1) and train (Stage 1 + 2), local or on Ray.

Each job writes under ``cfg.run_dir``: ``config.yaml``, ``data/`` (when
simulated), ``metrics.csv|jsonl``, ``tb/``, ``checkpoints/``, ``policy.pt`` and, in
reject mode, ``rejects/`` (one Parquet file per input; never the input directory).

A run directory holds one run: ``metrics.jsonl`` has each Stage 1 epoch and each
Stage 2 round once. Starting a job on a directory that already holds its stage
either replaces that stage (``overwrite=True``, the default for programmatic callers;
logged) or refuses with :class:`~grade_ray.runlog.RunDirError` (the CLI); ``resume``
continues from the newest checkpoint that loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from grade_ray import keys
from grade_ray.config import STAGE1_KEYS, Config, config_changes, save_config
from grade_ray.data.plan import DataPlan
from grade_ray.data.reading import iter_validated, read_meta
from grade_ray.data.validation import ReadReport, read_scope, rejects_file
from grade_ray.learner.grpo import GRPOLearner, GRPOSettings
from grade_ray.learner.loop import (
    POLICY_FILE,
    PRETRAIN_CKPT,
    GRPOTrainer,
    Probe,
    load_policy,
    new_policy,
    pretrain,
    rollout_spec,
    save_policy,
)
from grade_ray.learner.stage1 import epoch_checkpoints
from grade_ray.rollout.backend import LocalRollout
from grade_ray.runlog import (
    CHECKPOINT_DIR,
    CheckpointError,
    MetricsLogger,
    RunDirError,
    load_checkpoint,
    load_latest,
    read_metrics,
    round_checkpoints,
)

log = logging.getLogger(__name__)

REJECTS_DIR = "rejects"


@contextlib.contextmanager
def data_scope(cfg: Config, run_dir: str | Path | None = None) -> Iterator[None]:
    """Session reads inside allow ``data.max_candidates`` candidates and put reject-mode
    rejects under RUN_DIR/rejects/ (``run_dir``: default ``cfg.run_dir``)."""
    with read_scope(cfg.data.max_candidates, Path(run_dir or cfg.run_dir) / REJECTS_DIR):
        yield


def simulator_for(cfg: Config):
    """The simulator when the run's data is simulated, else None."""
    if cfg.data.train_path:
        return None
    from grade_ray.data.simulator import MarketplaceSimulator

    return MarketplaceSimulator(cfg.simulator)


def prepare_data(cfg: Config) -> tuple[str, str]:
    """(train_path, eval_path): the configured logs, or simulated ones under RUN_DIR/data."""
    if cfg.data.train_path:
        return cfg.data.train_path, cfg.data.eval_path
    sim = simulator_for(cfg)
    root = Path(cfg.run_dir) / "data"
    paths = []
    for split, n in (
        ("train", cfg.simulator.num_requests),
        ("eval", cfg.simulator.num_eval_requests),
    ):
        d = root / split
        stamp = d / "_SIMULATED.json"
        want = {"simulator": cfg.to_dict()["simulator"], "requests": n}
        if not (stamp.exists() and json.loads(stamp.read_text()) == want):
            log.info("simulating %d %s requests into %s", n, split, d)
            for old in d.glob("*.parquet") if d.exists() else []:
                old.unlink()
            sim.generate(d, n, split=split)
            stamp.write_text(json.dumps(want))
        paths.append(str(d))
    return paths[0], paths[1]


def _start(cfg: Config) -> tuple[Path, MetricsLogger]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir, MetricsLogger(run_dir)


def _stage_rows(run_dir: Path, stage: int) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("stage") == stage]


def _drop_stage_rows(run_dir: Path, stage: int) -> None:
    rows = read_metrics(run_dir)
    kept = [r for r in rows if r.get("stage") != stage]
    if len(kept) != len(rows):
        MetricsLogger(run_dir, tensorboard=False).rewrite(kept)


def claim_stage2(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before Stage 2 starts in ``run_dir``: an earlier Stage 2 run there (round checkpoints
    or metric rows) is continued (``resume``), replaced (``overwrite``: its checkpoints and
    rows are removed, with a warning) or refused with :class:`RunDirError`."""
    ckpts, rows = round_checkpoints(run_dir), _stage_rows(run_dir, 2)
    if resume or not (ckpts or rows):
        return
    what = f"{len(ckpts)} round checkpoint(s) and {len(rows)} Stage 2 metric row(s)"
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a Stage 2 run ({what}); pass --resume to continue it, "
            f"use another --run-dir, or delete {run_dir / CHECKPOINT_DIR}/round-*.pt and "
            f"{run_dir}/metrics.* to start over"
        )
    log.warning("%s: replacing an earlier Stage 2 run (%s)", run_dir, what)
    for p in ckpts:
        p.unlink()
    for name in ("summary.json", "rollout_actors.json"):
        (run_dir / name).unlink(missing_ok=True)
    _drop_stage_rows(run_dir, 2)


def check_run_config(cfg: Config, resume: bool) -> None:
    """Before a run starts from what its directory holds, and before anything there is
    written: refuse with :class:`RunDirError`, naming the settings, when Stage 1's saved
    result (which every ``train`` in the directory reuses) or, with ``resume``, the
    checkpoint it continues from was made with settings that change what training computes
    (:func:`~grade_ray.config.config_changes`; where it runs and evaluation may differ)."""
    run_dir = Path(cfg.run_dir)
    sp = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    checks: list[tuple[list[Path], tuple[str, ...] | None, str]] = []
    if sp.exists():
        checks.append(([sp], STAGE1_KEYS, f"delete {sp} to train Stage 1 again"))
    elif resume:
        checks.append((epoch_checkpoints(run_dir), STAGE1_KEYS, "resume without --resume"))
    if resume:
        checks.append((round_checkpoints(run_dir), None, "start over without --resume"))
    now = cfg.to_dict()
    for paths, within, fix in checks:
        saved = _newest_config(paths)
        if saved is None:
            continue
        path, config = saved
        changes = config_changes(config, now, within)
        if changes:
            more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
            raise RunDirError(
                f"{path} was made with other settings ({'; '.join(changes[:4])}{more}); set "
                f"them back, use another --run-dir, or {fix}"
            )


def _newest_config(paths: list[Path]) -> tuple[Path, dict] | None:
    """(path, saved config) of the newest of ``paths`` that loads; a damaged one is left
    to the resume itself, which falls back past it or names it."""
    for path in reversed(paths):
        try:
            config = load_checkpoint(path).get("config")
        except CheckpointError:
            continue
        if isinstance(config, dict):
            return path, config
    return None


def _claim_stage1(run_dir: Path, overwrite: bool) -> None:
    """Before ``pretrain``: an earlier Stage 1 result in ``run_dir`` is replaced
    (``overwrite``, with a warning) or refused with :class:`RunDirError`."""
    ckpt = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    rows, rounds = _stage_rows(run_dir, 1), round_checkpoints(run_dir)
    epochs = epoch_checkpoints(run_dir)
    if not (ckpt.exists() or rows or rounds or epochs):
        return
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({'a' if ckpt.exists() else 'no'} Stage 1 "
            f"checkpoint, {len(epochs)} Stage 1 epoch checkpoint(s), {len(rows)} Stage 1 "
            f"metric row(s), {len(rounds)} round checkpoint(s)); use another --run-dir or "
            "delete it"
        )
    log.warning("%s: replacing an earlier Stage 1 result", run_dir)
    ckpt.unlink(missing_ok=True)
    for p in epoch_checkpoints(run_dir):
        p.unlink()
    _drop_stage_rows(run_dir, 1)


def count_rows(cfg: Config, path: str) -> ReadReport:
    """Validate every row at ``path`` once (rejects under RUN_DIR/rejects/ in reject mode)."""
    report = ReadReport()
    for _ in iter_validated(path, 8192, cfg.data.on_error, report=report):
        pass
    log.info("training data: %s", report.summary())
    return report


def run_pretrain(cfg: Config, *, overwrite: bool = True) -> Path:
    """Stage 1 only; writes checkpoints/pretrain.pt and policy.pt (the SP baseline).

    ``overwrite``: replace an earlier result in the run directory (else refuse)."""
    with data_scope(cfg):
        _claim_stage1(Path(cfg.run_dir), overwrite)
        run_dir, logger = _start(cfg)
        train_path, _ = prepare_data(cfg)
        meta = read_meta(train_path)
        plan = build_stage1_plan(cfg, train_path)
        log.info("training data: %s", plan.report.summary())
        policy = new_policy(cfg, meta, train_path)
        pretrain(cfg, policy, meta, train_path, logger, plan=plan, run_dir=run_dir)
        path = save_policy(run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt", policy, cfg, meta)
        save_policy(run_dir / POLICY_FILE, policy, cfg, meta, {"stage": 1})
        _write_json(run_dir / "summary.json", {"data": _counts(plan.report), "stage": 1})
        logger.close()
    return path


def initial_policy(
    cfg: Config,
    meta,
    train_path: str,
    logger: MetricsLogger | None,
    *,
    plan: DataPlan | None = None,
    resume: bool = False,
):
    """Stage 1 result: loaded from RUN_DIR/checkpoints/pretrain.pt if present, else trained
    in this process over ``plan``'s rows (default: a plan built here), checkpointing every
    epoch; ``resume`` continues after the newest epoch checkpoint (else an interrupted
    attempt's epoch checkpoints and metric rows are dropped first)."""
    ckpt = Path(cfg.run_dir) / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if ckpt.exists():
        policy = load_stage1(ckpt, meta)
        return policy.train()
    policy = new_policy(cfg, meta, train_path)
    if cfg.pretrain.epochs:
        plan = plan if plan is not None else build_stage1_plan(cfg, train_path)
        pretrain(
            cfg, policy, meta, train_path, logger, plan=plan, run_dir=cfg.run_dir, resume=resume
        )
        save_policy(ckpt, policy, cfg, meta)
    return policy


def load_stage1(ckpt: Path, meta):
    """The Stage 1 policy saved at ``ckpt`` (eval mode), checked against the data's tasks."""
    policy, saved_meta, _ = load_policy(ckpt)
    if saved_meta.task_names != meta.task_names:
        raise RunDirError(
            f"{ckpt} was trained on tasks {saved_meta.task_names}, data has "
            f"{meta.task_names}; delete it or use another run_dir"
        )
    log.info("Stage 1 policy loaded from %s", ckpt)
    return policy


def build_stage1_plan(cfg: Config, train_path: str) -> DataPlan:
    """A one-round plan for Stage 1 alone (``grade-ray pretrain``): the validated rows and
    the decoded cache, which Stage 1's epochs read."""
    return DataPlan.build(
        train_path,
        rounds=1,
        batch_size=cfg.pretrain.batch_size,
        on_error=cfg.data.on_error,
        rejects_path=rejects_file(Path(cfg.run_dir) / REJECTS_DIR, train_path),
        cache_dir=decode_cache_dir(cfg),
        max_candidates=cfg.data.max_candidates,
    )


def build_plan(cfg: Config, train_path: str) -> DataPlan:
    g = cfg.grpo
    return DataPlan.build(
        train_path,
        rounds=g.rounds,
        batch_size=cfg.rollout.batch_size,
        data_passes=g.data_passes,
        requests_per_round=g.requests_per_round,
        on_error=cfg.data.on_error,
        rejects_path=rejects_file(Path(cfg.run_dir) / REJECTS_DIR, train_path),
        cache_dir=decode_cache_dir(cfg),
        max_candidates=cfg.data.max_candidates,
    )


def decode_cache_dir(cfg: Config) -> Path | None:
    """Where the plan writes decoded training rows (None: ``data.cache`` is off)."""
    if not cfg.data.cache:
        return None
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run_dir) / "decoded"


def run_train_local(cfg: Config, resume: bool = False, *, overwrite: bool = True) -> Path:
    """Stage 1 + Stage 2 in this process (no Ray). ``resume``: continue from the newest
    round checkpoint that loads; ``overwrite``: replace an earlier Stage 2 run in the run
    directory (else refuse)."""
    claim_stage2(Path(cfg.run_dir), resume, overwrite)
    check_run_config(cfg, resume)
    with data_scope(cfg):
        return _train_local(cfg, resume)


def _train_local(cfg: Config, resume: bool) -> Path:
    run_dir, logger = _start(cfg)
    train_path, eval_path = prepare_data(cfg)
    meta = read_meta(train_path)
    plan = build_plan(cfg, train_path)
    log.info("training data: %s", plan.report.summary())
    policy = initial_policy(cfg, meta, train_path, logger, plan=plan, resume=resume)
    learner = GRPOLearner(policy, GRPOSettings.from_config(cfg), seed=cfg.seed)
    backend = LocalRollout(
        load_policy_copy(policy),
        rollout_spec(cfg, meta, train_path),
        meta,
        plan.cache,
        lanes=cfg.rollout.num_workers,  # the steps' lanes, all read by this one reader
    )
    probe = Probe(cfg, meta, eval_path, simulator_for(cfg))
    trainer = GRPOTrainer(cfg, plan, learner, backend, logger, run_dir, probe)
    resume_trainer(trainer, run_dir, resume)
    trainer.fit()
    out = save_policy(
        run_dir / POLICY_FILE,
        learner.module,
        cfg,
        meta,
        {"stage": 2, "ts_range": list(plan.ts_range)},
    )
    write_summary(run_dir, plan, trainer.history)
    logger.close()
    return out


def resume_trainer(trainer: GRPOTrainer, run_dir: Path, resume: bool) -> None:
    """Continue ``trainer`` from the run's newest loadable round checkpoint (``resume``), or
    start it fresh; either way its metrics file then holds exactly its done rounds."""
    found = load_latest(run_dir, trainer.check_state) if resume else None
    if found is None:
        if resume:
            log.warning("--resume: no round checkpoint in %s; starting Stage 2 fresh", run_dir)
        trainer.sync_metrics()
        return
    path, state = found
    trainer.restore(state)
    log.info(
        "resumed from %s at round %d/%d",
        path,
        trainer.position.next_round,
        len(trainer.plan.rounds),
    )


def load_policy_copy(policy):
    """A detached copy of a policy for a rollout worker."""
    import copy

    return copy.deepcopy(getattr(policy, "module", policy)).eval()


def _counts(report: ReadReport) -> dict:
    return {
        "rows_read": report.rows_read,
        "rows_used": report.rows_used,
        "rows_rejected": report.rows_rejected,
        "reasons": report.reasons,
        "rejects_path": report.rejects_path,
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def write_summary(run_dir: Path, plan: DataPlan, history: list[dict]) -> None:
    """RUN_DIR/summary.json: the data accounting, rounds and the last round's metrics."""
    summary = {
        "data": _counts(plan.report),
        "rounds": len(history),
        "requests": int(sum(h.get(keys.ROLLOUT_REQUESTS, 0) for h in history)),
        "final": history[-1] if history else {},
    }
    _write_json(run_dir / "summary.json", summary)
