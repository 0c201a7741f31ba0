"""Jobs: simulate, pretrain (Stage 1) and train (Stage 1 + 2), local or on Ray.

Each job writes under ``cfg.run_dir``: ``config.yaml``, ``data/`` (when
simulated), ``metrics.csv|jsonl``, ``tb/``, ``checkpoints/`` and ``policy.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from grade_ray.config import Config, save_config
from grade_ray.data.plan import DataPlan
from grade_ray.data.schema import read_meta
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
from grade_ray.rollout.backend import LocalRollout
from grade_ray.runlog import CHECKPOINT_DIR, MetricsLogger, latest_checkpoint

log = logging.getLogger(__name__)


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


def run_pretrain(cfg: Config) -> Path:
    """Stage 1 only; writes checkpoints/pretrain.pt and policy.pt (the SP baseline)."""
    run_dir, logger = _start(cfg)
    train_path, _ = prepare_data(cfg)
    meta = read_meta(train_path)
    policy = new_policy(cfg, meta, train_path)
    pretrain(cfg, policy, meta, train_path, logger)
    path = save_policy(run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt", policy, cfg, meta)
    save_policy(run_dir / POLICY_FILE, policy, cfg, meta, {"stage": 1})
    logger.close()
    return path


def initial_policy(cfg: Config, meta, train_path: str, logger: MetricsLogger | None):
    """Stage 1 result: loaded from RUN_DIR/checkpoints/pretrain.pt if present, else trained."""
    ckpt = Path(cfg.run_dir) / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    if ckpt.exists():
        policy, saved_meta, _ = load_policy(ckpt)
        if saved_meta.task_names != meta.task_names:
            raise ValueError(
                f"{ckpt} was trained on tasks {saved_meta.task_names}, data has "
                f"{meta.task_names}; delete it or use another run_dir"
            )
        log.info("Stage 1 policy loaded from %s", ckpt)
        return policy.train()
    policy = new_policy(cfg, meta, train_path)
    if cfg.pretrain.epochs:
        pretrain(cfg, policy, meta, train_path, logger)
        save_policy(ckpt, policy, cfg, meta)
    return policy


def build_plan(cfg: Config, train_path: str) -> DataPlan:
    g = cfg.grpo
    return DataPlan.build(
        train_path,
        rounds=g.rounds,
        batch_size=cfg.rollout.batch_size,
        data_passes=g.data_passes,
        requests_per_round=g.requests_per_round,
        on_error=cfg.data.on_error,
        rejects_path=Path(cfg.run_dir) / "rejects.parquet",
        cache_dir=decode_cache_dir(cfg),
    )


def decode_cache_dir(cfg: Config) -> Path | None:
    """Where the plan writes decoded training rows (None: ``data.cache`` is off)."""
    if not cfg.data.cache:
        return None
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run_dir) / "decoded"


def run_train_local(cfg: Config, resume: bool = False) -> Path:
    """Stage 1 + Stage 2 in this process (no Ray)."""
    run_dir, logger = _start(cfg)
    train_path, eval_path = prepare_data(cfg)
    meta = read_meta(train_path)
    plan = build_plan(cfg, train_path)
    log.info("training data: %s", plan.report.summary())
    policy = initial_policy(cfg, meta, train_path, logger)
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
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            log.warning("--resume: no checkpoint in %s; starting fresh", run_dir)
        else:
            trainer.resume_from(ckpt)
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


def load_policy_copy(policy):
    """A detached copy of a policy for a rollout worker."""
    import copy

    return copy.deepcopy(getattr(policy, "module", policy)).eval()


def write_summary(run_dir: Path, plan: DataPlan, history: list[dict]) -> None:
    summary = {
        "data": {
            "rows_read": plan.report.rows_read,
            "rows_used": plan.report.rows_used,
            "rows_rejected": plan.report.rows_rejected,
            "reasons": plan.report.reasons,
        },
        "rounds": len(history),
        "final": history[-1] if history else {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
