"""Command-line options every job shares, used by the CLI and by the modules that add
their own subcommands (so that nothing imports :mod:`grade_ray.cli`).

``add_common_args(parser)`` adds ``--config FILE`` (repeatable, merged in order),
``--set section.key=value`` (repeatable) and ``--run-dir``, plus ``--address`` for
jobs that use Ray; ``config_from_args(args)`` turns them into a :class:`Config`.
"""

from __future__ import annotations

import argparse
import os

from grade_ray.config import Config, load_config

# ``-v``: Ray's own INFO lines (Train's per-report lines, checkpoint paths, worker-group
# banners) reach the console too; without it only its warnings and errors do. Kept in the
# environment so that the processes an embedded Ray starts later (its workers, a Tune
# trial's driver actor) see it as well; grade_ray.raysession turns it into Ray's settings
# (Train workers on a cluster get it through their train-loop config).
VERBOSE_ENV = "GRADE_RAY_VERBOSE"

# Subcommands defined in grade_ray.cli itself.
CORE_COMMANDS: tuple[str, ...] = ("simulate", "pretrain", "train", "evaluate", "compare", "bench")

# Modules that add their own subcommands: each defines ``add_parser(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "grade_ray.jobs.report",
    "grade_ray.cluster.submit",
    "grade_ray.serving.export",
    "grade_ray.serving.infer",
    "grade_ray.serving.serve",
    "grade_ray.datasets.kuairand.commands",
    "grade_ray.jobs.tune.command",
    "grade_ray.jobs.suite",
    "grade_ray.baselines.rllib_ppo.command",
)


def set_verbose(verbose: bool) -> None:
    """Record ``-v`` for this process and the ones it starts (see ``VERBOSE_ENV``)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def verbose() -> bool:
    """Whether ``-v`` was given (Ray's INFO lines on the console)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def command_names() -> list[str]:
    """Every ``grade-ray`` subcommand (what ``grade-ray submit`` accepts), without the CLI."""
    import importlib

    sub = argparse.ArgumentParser().add_subparsers()
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return sorted({*CORE_COMMANDS, *sub.choices})


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- ``--config`` files <- ``--set`` overrides <- ``--run-dir``."""
    overrides = list(args.set or [])
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config or [], overrides)


def add_common_args(p: argparse.ArgumentParser, ray: bool = False) -> None:
    """``--config``, ``--set`` and ``--run-dir`` (and ``--address`` when ``ray``)."""
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="config YAML (repeatable; later files override earlier ones)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set exploration.group_size=10",
    )
    p.add_argument("--run-dir", help="shortcut for --set run_dir=DIR")
    if ray:
        p.add_argument(
            "--address",
            default=None,
            help="Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)",
        )
