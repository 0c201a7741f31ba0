"""``grade-ray compare``: GRADE and its ablations trained side by side, evaluated together.

Every variant shares the run's data and its Stage 1 (SP) policy, and sees the
same number of requests (equal sample budget); the evaluation puts all of
them, the baselines and the oracle into one paired A/B test.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from grade_ray.config import Config
from grade_ray.jobs.evaluate import EvalResult, run_evaluate
from grade_ray.learner.loop import POLICY_FILE, PRETRAIN_CKPT
from grade_ray.runlog import CHECKPOINT_DIR

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, object]] = {
    "GRADE": {},
    "GRADE-gaussian": {"exploration.kind": "gaussian"},
    "GRADE-no-prior": {"reward.l2": 0.0},
    "GRADE-no-format": {"reward.l3": 0.0},
}


def variant_config(cfg: Config, name: str, fresh: bool = False) -> Config:
    """Config of variant ``name`` in RUN_DIR/variants/NAME, set up to share the run's Stage 1
    (its ``pretrain.pt`` is copied in), its decoded-data cache and, for simulated data, its
    logs. ``fresh`` removes an earlier run of the variant first."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {list(VARIANTS)}")
    run_dir = Path(cfg.run_dir)
    sp = run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt"
    vdir = run_dir / "variants" / name
    if fresh and vdir.exists():
        shutil.rmtree(vdir)
    (vdir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy(sp, vdir / CHECKPOINT_DIR / sp.name)
    if not cfg.data.train_path and not (vdir / "data").exists():
        os.symlink((run_dir / "data").resolve(), vdir / "data")  # same simulated logs
    vcfg = cfg.replace(run_dir=str(vdir), **VARIANTS[name])
    if vcfg.data.cache and not vcfg.data.cache_dir:  # one decoded cache for all variants
        vcfg = vcfg.replace(**{"data.cache_dir": str(run_dir / "decoded")})
    return vcfg


def run_compare(
    cfg: Config, variants: list[str] | None = None, local: bool = True, address: str | None = None
) -> EvalResult:
    """Train each variant under RUN_DIR/variants/NAME, then evaluate all together."""
    from grade_ray.jobs.train import run_pretrain, run_train_local

    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    run_dir = Path(cfg.run_dir)
    if not (run_dir / CHECKPOINT_DIR / f"{PRETRAIN_CKPT}.pt").exists():
        run_pretrain(cfg)
    arms = {}
    for name in names:
        vcfg = variant_config(cfg, name)
        vdir = Path(vcfg.run_dir)
        log.info("training variant %s in %s", name, vdir)
        if local:
            run_train_local(vcfg)
        else:
            from grade_ray.jobs.train_ray import run_train_ray

            run_train_ray(vcfg, address=address)
        arms[name] = str(vdir / POLICY_FILE)
    return run_evaluate(cfg, run_dir, extra_arms=arms)
