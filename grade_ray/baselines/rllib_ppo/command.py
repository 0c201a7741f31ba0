"""``grade-ray baseline rllib-ppo``: the subcommand that trains the RLlib PPO baseline."""

from __future__ import annotations

import argparse
import json
import sys

from grade_ray.baselines.rllib_ppo.training import PPOSettings, train_rllib_ppo
from grade_ray.options import add_common_args, config_from_args

DEFAULT_STEPS = 100_000
"""Training budget in env steps when neither ``--steps`` nor ``--seconds`` is given."""


def cmd_rllib_ppo(args: argparse.Namespace) -> int:
    from grade_ray.raysession import init_ray

    cfg = config_from_args(args)
    settings = PPOSettings(
        train_batch=args.train_batch,
        minibatch=min(args.minibatch, args.train_batch),
        num_epochs=args.epochs,
        lr=args.lr,
        num_env_runners=args.env_runners,
        num_envs_per_env_runner=args.envs_per_runner,
        max_requests=args.max_requests,
    )
    steps, seconds = args.steps, args.seconds
    if steps is None and seconds is None:
        steps = DEFAULT_STEPS
    init_ray(args.address)
    try:
        run = train_rllib_ppo(
            cfg,
            steps=steps,
            seconds=seconds,
            settings=settings,
            out_dir=args.out,
            init_policy=args.init_policy,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"grade-ray: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run.summary(), indent=2, default=float))
    print(f"policy: {run.path}  (evaluate: grade-ray evaluate {run.path.parent} --config ...)")
    return 0


def add_parser(subparsers) -> None:
    """Add ``grade-ray baseline rllib-ppo``."""
    p = subparsers.add_parser(
        "baseline", help="train a peer baseline on the same logs and reward as GRADE"
    )
    sub = p.add_subparsers(dest="baseline", required=True)
    q = sub.add_parser(
        "rllib-ppo",
        help="RLlib PPO with a critic (GAE) on a one-step env; writes policy.pt",
        description=(
            "Train RLlib PPO (new API stack, value function + GAE) on a one-step env that "
            "serves one logged training request per step, with GRADE's composite reward and "
            "GRADE's policy network. Writes OUT/policy.pt (a FusionPolicy: evaluate it with "
            "`grade-ray evaluate OUT --config ...`), OUT/rllib_ppo.json and "
            "OUT/rllib_ppo/metrics.csv."
        ),
    )
    add_common_args(q, ray=True)
    budget = q.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps", type=int, help=f"env steps (requests) to train on (default {DEFAULT_STEPS})"
    )
    budget.add_argument("--seconds", type=float, help="training wall-clock seconds")
    q.add_argument("--out", help="output directory (default run_dir)")
    q.add_argument(
        "--init-policy",
        help="start from this FusionPolicy checkpoint (e.g. RUN_DIR/checkpoints/pretrain.pt)",
    )
    d = PPOSettings()
    q.add_argument("--train-batch", type=int, default=d.train_batch, help="env steps/iteration")
    q.add_argument("--minibatch", type=int, default=d.minibatch)
    q.add_argument("--epochs", type=int, default=d.num_epochs, help="passes per batch")
    q.add_argument("--lr", type=float, default=d.lr)
    q.add_argument("--env-runners", type=int, default=d.num_env_runners)
    q.add_argument("--envs-per-runner", type=int, default=d.num_envs_per_env_runner)
    q.add_argument(
        "--max-requests", type=int, default=0, help="training requests to cycle over (0 = all)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace another algo's policy.pt")
    q.set_defaults(fn=cmd_rllib_ppo)
