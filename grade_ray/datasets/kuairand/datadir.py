"""A KuaiRand directory -> a run's sessions: find the files, convert once, check the time split.

:func:`convert` keeps an existing conversion while its ``_CONVERSION.json``
stamp names the same files (and sizes) and options; :func:`check_split_dates`
refuses sessions whose upstream, policy-training and eval dates overlap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from grade_ray.data.sessions import SessionMeta
from grade_ray.datasets.kuairand.convert import convert_kuairand
from grade_ray.datasets.kuairand.scoring import LeakageError

log = logging.getLogger(__name__)

STAMP_FILE = "_CONVERSION.json"
STAMP_VERSION = 1


def default_data_dir() -> Path:
    """``../shared/data/kuairand-pure`` relative to the repository root."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "kuairand-pure"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The KuaiRand directory to read; a clear FileNotFoundError when it is missing."""
    d = Path(data_dir) if data_dir else default_data_dir()
    if not d.is_dir():
        hint = "" if data_dir else " (the default, ../shared/data/kuairand-pure from the repo)"
        raise FileNotFoundError(
            f"KuaiRand-Pure data directory not found: {d}{hint}; pass --data-dir DIR holding "
            "the log (log*.parquet or log*.csv), user_features and video features files"
        )
    return d


def find_kuairand_files(data_dir: str | Path) -> dict[str, Any]:
    """{'log': [paths], 'users': path, 'videos': path} in a KuaiRand(-Pure) directory.

    Logs: every ``log*.parquet`` (else every ``log*.csv*``). Users:
    ``user_features*.parquet`` / ``.csv``. Videos: the basic table
    ``video_features_basic*.csv`` if present, else ``item_features.parquet`` (the
    converter reads its basic columns only; the statistic columns leak the future).
    """
    d = resolve_data_dir(data_dir)

    def first(*patterns: str) -> Path | None:
        for pat in patterns:
            hits = sorted(d.glob(pat))
            if hits:
                return hits[0]
        return None

    logs = sorted(d.glob("log*.parquet")) or sorted(d.glob("log*.csv*"))
    users = first("user_features*.parquet", "user_features*.csv*")
    videos = first(
        "video_features_basic*.csv*", "video_features_basic*.parquet", "item_features*.parquet"
    )
    missing = [
        what
        for what, v in (("log*.parquet|csv", logs), ("user_features", users), ("videos", videos))
        if not v
    ]
    if missing:
        raise FileNotFoundError(
            f"{d}: no {', '.join(missing)} file(s); present: {sorted(p.name for p in d.iterdir())}"
        )
    return {"log": logs, "users": users, "videos": videos}


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """How the KuaiRand log is split and grouped (see :func:`convert_kuairand`)."""

    upstream_train_days: int = 3
    eval_days: int = 1
    group_by: str = "user_day"
    session_gap_s: float = 1800.0
    min_list_len: int = 2
    seed: int = 0
    upstream_epochs: int = 2


def _stamp(files: dict[str, Any], opts: ConvertOptions) -> dict[str, Any]:
    paths = [*files["log"], files["users"], files["videos"]]
    return {
        "version": STAMP_VERSION,
        "files": {p.name: p.stat().st_size for p in paths},
        "options": dataclasses.asdict(opts),
    }


def convert(
    data_dir: str | Path | None,
    out: str | Path,
    opts: ConvertOptions = ConvertOptions(),
    *,
    reuse: bool = True,
    overwrite: bool = False,
    write_rejects: bool = False,
) -> tuple[dict[str, Any], bool]:
    """KuaiRand directory -> ``out/{train,eval,upstream}``; returns (report, reused).

    With ``reuse``, an existing conversion whose ``_CONVERSION.json`` stamp names
    the same files (and sizes) and options is kept. Other existing sessions in
    ``out`` are replaced only with ``overwrite`` (else FileExistsError).
    """
    files = find_kuairand_files(data_dir)
    out = Path(out)
    stamp = _stamp(files, opts)
    stamp_path, report_path = out / STAMP_FILE, out / "upstream_report.json"
    if (
        reuse
        and stamp_path.exists()
        and report_path.exists()
        and json.loads(stamp_path.read_text()) == stamp
        and all(any((out / s).glob("*.parquet")) for s in ("train", "eval"))
    ):
        log.info("reusing the KuaiRand conversion in %s (stamp matches)", out)
        return json.loads(report_path.read_text()), True
    if not overwrite and any(any((out / s).glob("*.parquet")) for s in ("train", "eval")):
        raise FileExistsError(
            f"{out} holds sessions from another conversion (no matching {STAMP_FILE}); "
            "pass --overwrite to replace them"
        )
    stamp_path.unlink(missing_ok=True)
    report = convert_kuairand(
        [str(p) for p in files["log"]],
        files["users"],
        files["videos"],
        out,
        upstream_train_days=opts.upstream_train_days,
        eval_days=opts.eval_days,
        group_by=opts.group_by,
        session_gap_s=opts.session_gap_s,
        min_list_len=opts.min_list_len,
        seed=opts.seed,
        epochs=opts.upstream_epochs,
        write_rejects=write_rejects,
        overwrite=True,
    )
    stamp_path.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    return report, False


def check_split_dates(train_meta: SessionMeta, eval_meta: SessionMeta) -> dict[str, list[int]]:
    """Dates of the upstream model, the policy's training split and the eval split.

    Raises :class:`grade_ray.datasets.kuairand.scoring.LeakageError` unless
    upstream dates < train dates < eval dates.
    """
    up = [int(d) for d in train_meta.source.get("upstream_train_dates", [])]
    train = [int(d) for d in train_meta.source.get("dates", [])]
    ev = [int(d) for d in eval_meta.source.get("dates", [])]
    if not train or not ev:
        raise LeakageError("session metadata lacks dates; cannot check the time split")
    if (up and max(up) >= min(train)) or max(train) >= min(ev):
        raise LeakageError(
            f"time split violated: upstream {up}, policy training {train}, eval {ev} "
            "(each must end before the next begins)"
        )
    if eval_meta.source.get("upstream_train_dates", up) != up:
        raise LeakageError("train and eval sessions were scored by different upstream models")
    return {"upstream_train": up, "policy_train": train, "eval": ev}
