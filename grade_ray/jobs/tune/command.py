"""``grade-ray tune``: the subcommand that runs (or resumes) a sweep and prints its results."""

from __future__ import annotations

import sys

from grade_ray.jobs.tune.spec import load_tune_spec
from grade_ray.jobs.tune.sweep import run_tune


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
