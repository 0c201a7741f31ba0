"""The ``grade-ray`` command (also ``python -m grade_ray``).

Every job takes ``--config FILE`` (repeatable, merged in order) and
``--set section.key=value`` (repeatable) and writes under ``run_dir``.
Jobs that use Ray start an embedded local Ray unless ``--address`` /
``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from grade_ray.config import UserError
from grade_ray.options import COMMAND_MODULES, add_common_args, config_from_args, set_verbose

log = logging.getLogger("grade_ray")


def cmd_simulate(args: argparse.Namespace) -> int:
    from grade_ray.data.simulator import MarketplaceSimulator

    cfg = config_from_args(args)
    sim = MarketplaceSimulator(cfg.simulator)
    out = Path(args.out or Path(cfg.run_dir) / "data")
    for split, n in (
        ("train", cfg.simulator.num_requests),
        ("eval", cfg.simulator.num_eval_requests),
    ):
        paths = sim.generate(out / split, n, split=split)
        print(f"{split}: {n} requests in {len(paths)} shard(s) under {out / split}")
    if args.headroom:
        from grade_ray.data.oracles import headroom

        h = headroom(
            sim,
            cfg.policy.fusion,
            cfg.eval.static_grid_step,
            n_requests=cfg.eval.search_requests,
            seed=cfg.eval.ab_seed,
            eps=cfg.policy.fusion_eps,
        )
        print(json.dumps(h, indent=2, default=float))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from grade_ray.jobs.train import run_pretrain

    path = run_pretrain(config_from_args(args), overwrite=False)
    print(f"Stage 1 policy: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.local:
        from grade_ray.jobs.train import run_train_local

        path = run_train_local(cfg, resume=args.resume, overwrite=False)
    else:
        from grade_ray.jobs.train_ray import run_train_ray

        path = run_train_ray(cfg, resume=args.resume, address=args.address, overwrite=False)
    print(f"policy: {path}")
    if args.evaluate:
        from grade_ray.jobs.evaluate import run_evaluate
        from grade_ray.jobs.train import data_scope

        with data_scope(cfg):
            result = run_evaluate(cfg, Path(cfg.run_dir), baselines=not args.no_baselines)
        print(result.markdown)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from grade_ray.jobs.evaluate import run_evaluate
    from grade_ray.jobs.train import data_scope

    cfg = config_from_args(args)
    run = Path(args.run) if args.run else Path(cfg.run_dir)
    # the ablations `compare` and `grade-ray kuairand` trained beside the run are arms too
    variants = {p.parent.name: str(p) for p in sorted(run.glob("variants/*/policy.pt"))}
    with data_scope(cfg, run):  # rejects (reject mode) under RUN/rejects/
        result = run_evaluate(
            cfg,
            run,
            eval_path=args.data,
            baselines=not args.no_baselines,
            extra_arms=variants,
            out_dir=args.out,
        )
    print(result.markdown)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from grade_ray.jobs.compare import run_compare
    from grade_ray.jobs.train import data_scope

    cfg = config_from_args(args)
    with data_scope(cfg):
        result = run_compare(cfg, variants=args.variants, local=not args.ray, address=args.address)
    print(result.markdown)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from grade_ray.jobs.bench.throughput import run_bench

    if args.stage1_only or args.learner_only:
        parts: tuple[str, ...] = ("stage1",) if args.stage1_only else ("learner",)
    else:
        parts = ("quality",) if args.quality_only else ("throughput",)
        if not (args.no_quality or args.quality_only):
            parts += ("quality",)
    results = run_bench(quick=args.quick, out=args.out, address=args.address, parts=parts)
    curves = {k for k in results if k.startswith("quality.curves.")}  # long lists: in the JSON
    print(
        json.dumps({k: v for k, v in results.items() if k not in curves}, indent=2, default=float)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grade-ray", description="GRADE personalized multi-task fusion on Ray"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, tracebacks, and Ray's own INFO lines (Train reports, checkpoints)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_pretrain, _add_train, _add_evaluate, _add_compare, _add_bench):
        add(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="generate logged sessions with the marketplace simulator")
    add_common_args(p)
    p.add_argument("--out", help="output directory (default RUN_DIR/data)")
    p.add_argument(
        "--headroom",
        action="store_true",
        help="also measure per-segment oracle vs best static weights",
    )
    p.set_defaults(fn=cmd_simulate)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="Stage 1: supervised LambdaLoss (single process)")
    add_common_args(p)
    p.set_defaults(fn=cmd_pretrain)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Stage 1 + Stage 2 GRPO (Ray by default, --local: no Ray)")
    add_common_args(p, ray=True)
    p.add_argument("--local", action="store_true", help="single process, no Ray")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--evaluate", action="store_true", help="evaluate against baselines after")
    p.add_argument("--no-baselines", action="store_true", help="with --evaluate: policy only")
    p.set_defaults(fn=cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="offline metrics and simulated A/B test vs baselines")
    add_common_args(p)
    p.add_argument("run", nargs="?", help="run directory holding policy.pt (default run_dir)")
    p.add_argument("--data", help="held-out session file/dir (default: the run's eval data)")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the policy only")
    p.add_argument("--out", help="also write the tables here: eval.md (as printed) and eval.json")
    p.set_defaults(fn=cmd_evaluate)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train GRADE and its ablations, evaluate all together")
    add_common_args(p, ray=True)
    p.add_argument(
        "--variants",
        nargs="+",
        help="subset of: GRADE GRADE-gaussian GRADE-no-prior GRADE-no-format (default all)",
    )
    p.add_argument("--ray", action="store_true", help="train variants on Ray (default local)")
    p.set_defaults(fn=cmd_compare)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, scaling, memory and the quality table (GRADE, ablations, RLlib PPO)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes: ~2 min throughput + ~4 min quality"
    )
    p.add_argument("--out", help="write results JSON here (and a Markdown table beside it)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-quality", action="store_true", help="throughput/memory part only")
    which.add_argument("--quality-only", action="store_true", help="the quality table only")
    which.add_argument(
        "--stage1-only",
        action="store_true",
        help="the Stage 1 kernel only: top-k vs dense LambdaLoss requests/s per thread",
    )
    which.add_argument(
        "--learner-only",
        action="store_true",
        help="the Stage 2 learner update only: training's path vs the earlier one, per thread",
    )
    p.add_argument("--address", default=None)
    p.set_defaults(fn=cmd_bench)


# Errors a user can fix from the message alone: printed on one line, no traceback (-v shows
# it). UserError is grade_ray's own family (config, data, serving, resources, run dirs);
# the OS errors name the path.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    set_verbose(args.verbose)  # before any Ray session starts: its processes inherit it
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"grade-ray: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("grade-ray: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, UserError) else f"{text} ({type(e).__name__})"


if __name__ == "__main__":
    sys.exit(main())
