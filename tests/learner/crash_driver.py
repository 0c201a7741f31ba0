"""`grade-ray ARGS...` that SIGKILLs itself at one point (run as a script; not a test module).

usage: crash_driver.py POINT N -- ARGS...

POINT names where the process kills itself on the N-th time it gets there (see POINTS);
``none`` runs the command to the end. Used by test_crash_consistency.py.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth(owner, name: str, n: int, *, after: bool = False, when=None) -> None:
    """Kill on the n-th call of ``owner.name`` (that passes ``when``), before or after it."""
    fn = getattr(owner, name)
    seen = [0]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        hit = when is None or when(*args, **kwargs)
        seen[0] += hit
        if hit and seen[0] == n and not after:
            die()
        out = fn(*args, **kwargs)
        if hit and seen[0] == n and after:
            die()
        return out

    setattr(owner, name, wrapped)


def _stage2(self, step, metrics) -> bool:
    return metrics.get("stage") == 2


def half_a_metrics_line(n: int) -> None:
    """The n-th Stage 2 metrics row is cut in half by the kill."""
    from grade_ray.runlog import MetricsLogger

    seen = [0]
    log = MetricsLogger.log

    def cut(self, step, metrics):
        if metrics.get("stage") == 2:
            seen[0] += 1
            if seen[0] == n:
                line = json.dumps({"step": step, **{k: v for k, v in metrics.items()}})
                with self.jsonl.open("a") as f:
                    f.write(line[: len(line) // 2])
                die()
        return log(self, step, metrics)

    MetricsLogger.log = cut


HALF_WRITTEN = {
    # which torch.save is cut: a round checkpoint, Stage 1's pretrain.pt, the reward's fit
    "checkpoint-half-written": lambda obj: "next_round" in obj,
    "pretrain-half-written": lambda obj: "state_dict" in obj and "stage" not in obj,
    "reward-fit-half-written": lambda obj: "post_scale" in obj,
}


def half_written(point: str, n: int) -> None:
    """The n-th torch.save of the kind ``point`` names has written half its bytes (to the
    file object or path it was given) when the kill comes."""
    import io

    import torch

    import grade_ray.runlog as runlog

    seen = [0]
    save = torch.save
    kind = HALF_WRITTEN[point]

    def partial(obj, f, *args, **kwargs):
        hit = isinstance(obj, dict) and kind(obj)
        seen[0] += hit
        if hit and seen[0] == n:
            buf = io.BytesIO()
            save(obj, buf)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(half)
                f.flush()
            else:
                with open(f, "wb") as out:
                    out.write(half)
            die()
        return save(obj, f, *args, **kwargs)

    torch.save = partial
    runlog.torch.save = partial


def install(point: str, n: int) -> None:
    from grade_ray.data.plan import DecodedCache
    from grade_ray.learner import loop
    from grade_ray.learner.grpo import GRPOLearner
    from grade_ray.learner.supervised import SupervisedLearner
    from grade_ray.runlog import MetricsLogger

    if point == "stage1-step":
        on_nth(SupervisedLearner, "step", n)
    elif point == "cache-write":
        on_nth(DecodedCache, "add", n)
    elif point == "grpo-update":
        on_nth(GRPOLearner, "update", n)
    elif point in HALF_WRITTEN:
        half_written(point, n)
    elif point == "after-checkpoint-before-log":
        on_nth(loop, "save_checkpoint", n, after=True)
    elif point == "metrics-line-half-written":
        half_a_metrics_line(n)
    elif point == "after-log":
        on_nth(MetricsLogger, "log", n, after=True, when=_stage2)
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    point, n, sep, *argv = sys.argv[1:]
    assert sep == "--"
    install(point, int(n))
    from grade_ray.cli import main

    sys.exit(main(argv))
