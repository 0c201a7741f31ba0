"""Ray Train callbacks of the training job (imported where Ray Train runs)."""

from __future__ import annotations

from ray.train import UserCallback


class Stage2Reports(UserCallback):
    """Passes on only Stage 2's round reports to ``inner`` (e.g. Tune's report callback).

    Stage 1's epoch reports carry checkpoints, so a restarted worker group resumes Stage 1,
    but not the rounds' held-out metrics a Tuner ranks and schedules trials by (and ASHA
    counts reports as iterations)."""

    def __init__(self, inner: UserCallback) -> None:
        self.inner = inner

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and metrics[0].get("stage") == 1:
            return
        self.inner.after_report(run_context, metrics, checkpoint)

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.inner.after_exception(run_context, worker_exceptions)
