"""``grade-ray data kuairand``, ``grade-ray data kuairand-more`` and ``grade-ray kuairand``."""

from __future__ import annotations

import argparse

from grade_ray.datasets.kuairand.convert import convert_more
from grade_ray.datasets.kuairand.datadir import ConvertOptions, convert, find_kuairand_files
from grade_ray.datasets.kuairand.dataset import GROUP_BY, LICENCE_NOTICE
from grade_ray.datasets.kuairand.pipeline import DEFAULT_VARIANTS, run_kuairand_pipeline
from grade_ray.datasets.kuairand.results_text import results_markdown


def _convert_opts(args: argparse.Namespace, seed: int = 0) -> ConvertOptions:
    return ConvertOptions(
        upstream_train_days=args.upstream_train_days,
        eval_days=args.eval_days,
        group_by=args.group_by,
        session_gap_s=args.session_gap_s,
        min_list_len=args.min_list_len,
        seed=seed,
        upstream_epochs=args.upstream_epochs,
    )


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="KuaiRand(-Pure) directory (default ../shared/data/kuairand-pure from the repo)",
    )
    p.add_argument(
        "--upstream-train-days",
        type=int,
        default=3,
        help="first N dates train the upstream model (default 3)",
    )
    p.add_argument("--eval-days", type=int, default=1, help="last N dates held out (default 1)")
    p.add_argument("--group-by", choices=GROUP_BY, default="user_day")
    p.add_argument(
        "--session-gap-s",
        type=float,
        default=1800.0,
        help="with --group-by session: a gap longer than this starts a new request",
    )
    p.add_argument("--min-list-len", type=int, default=2, help="shorter requests are not written")
    p.add_argument("--upstream-epochs", type=int, default=2, help="upstream MMoE epochs")


def cmd_data_kuairand(args: argparse.Namespace) -> int:
    report, reused = convert(
        args.data_dir,
        args.out,
        _convert_opts(args, args.seed),
        reuse=not args.overwrite,
        overwrite=args.overwrite,
        write_rejects=args.write_rejects,
    )
    note = " (reused: stamp matches)" if reused else ""
    print(f"KuaiRand sessions in {args.out}{note}")
    for split, s in report["splits"].items():
        print(
            f"  {split}: dates {s.get('dates')}, {s['requests']} requests, "
            f"{s['impressions']} impressions, mean list length {s.get('mean_list_len')}"
        )
    print(f"  upstream AUC (scored days): {report['upstream'].get('auc_scored_days')}")
    print(f"  licence: {LICENCE_NOTICE}")
    return 0


def cmd_data_kuairand_more(args: argparse.Namespace) -> int:
    files = find_kuairand_files(args.data_dir)
    logs = args.log or [str(p) for p in files["log"]]
    report = convert_more(
        logs,
        args.model,
        args.out,
        user_path=files["users"],
        video_path=files["videos"],
        dates=args.dates,
        overwrite=args.overwrite,
    )
    s = report["splits"]["more"]
    print(
        f"{args.out}: dates {s.get('dates')}, {s['requests']} requests; evaluate a trained "
        f"policy with: grade-ray evaluate RUN --data {args.out} --config configs/kuairand.yaml"
    )
    return 0


def cmd_kuairand(args: argparse.Namespace) -> int:
    from grade_ray.options import config_from_args

    cfg = config_from_args(args)
    variants = [] if args.variants == ["none"] else (args.variants or list(DEFAULT_VARIANTS))
    results = run_kuairand_pipeline(
        cfg,
        args.data_dir,
        out_dir=args.out or cfg.run_dir,
        upstream_train_days=args.upstream_train_days,
        eval_days=args.eval_days,
        group_by=args.group_by,
        session_gap_s=args.session_gap_s,
        min_list_len=args.min_list_len,
        upstream_epochs=args.upstream_epochs,
        upstream_seed=args.upstream_seed,
        variants=variants,
        reuse_conversion=not args.reconvert,
    )
    print(results_markdown(results))
    return 0


def add_parser(sub) -> None:
    """``grade-ray data kuairand|kuairand-more`` and ``grade-ray kuairand``."""
    from grade_ray.options import add_common_args

    p = sub.add_parser("data", help="convert real logs into logged-session Parquet")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser(
        "kuairand",
        help="KuaiRand-Pure -> sessions (upstream model on the first days, train/eval splits)",
    )
    _split_args(c)
    c.add_argument("--out", required=True, help="output directory (train/, eval/, upstream/)")
    c.add_argument("--seed", type=int, default=0, help="upstream model seed")
    c.add_argument("--write-rejects", action="store_true", help="write bad rows to rejects.parquet")
    c.add_argument("--overwrite", action="store_true", help="reconvert even if the stamp matches")
    c.set_defaults(fn=cmd_data_kuairand)
    m = dsub.add_parser(
        "kuairand-more",
        help="score further KuaiRand days with a saved upstream model (for grade-ray evaluate)",
    )
    m.add_argument("--model", required=True, help="conversion dir (or its upstream/) to reuse")
    m.add_argument("--out", required=True, help="output directory for the sessions")
    m.add_argument("--data-dir", help="directory with the user and video tables (and logs)")
    m.add_argument("--log", nargs="+", help="log file(s) (default: the data dir's logs)")
    m.add_argument("--dates", nargs="+", type=int, help="only these yyyymmdd dates")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_data_kuairand_more)

    k = sub.add_parser(
        "kuairand",
        help="real-data replay: convert KuaiRand-Pure, train GRADE + ablations, evaluate",
    )
    add_common_args(k)
    _split_args(k)
    k.add_argument("--out", help="run directory (default run_dir from the config)")
    k.add_argument(
        "--variants",
        nargs="+",
        help=f"ablations to train too (default {' '.join(DEFAULT_VARIANTS)}; 'none' for none)",
    )
    k.add_argument("--upstream-seed", type=int, default=0, help="upstream model seed")
    k.add_argument("--reconvert", action="store_true", help="ignore an existing conversion")
    k.set_defaults(fn=cmd_kuairand)
