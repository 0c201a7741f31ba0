"""How far a compiled step takes the Stage 2 learner on one CPU thread (an experiment).

    python scripts/learner_compiled.py [--repeats 7] [--out runs/learner_compiled]

Times :meth:`GRPOLearner.update` on one rollout batch of the bench's setup (1024 requests,
G = 20, minibatch 512, 2 epochs) three ways, alternating repeat by repeat from the same
weights: the path before issue 17 (``ReferenceGRPOLearner`` on the per-expert policy),
training's eager path, and the same loss (policy forward, Dirichlet log-prob, exact KL,
GRPO) through ``torch.compile(fullgraph=True)`` (inductor's C++ kernels for the forward
and the backward; Adam and clipping stay eager). Writes OUT/learner_compiled.json and
prints one Markdown table: requests/s, the ratio to the reference, the compile time, and
how far the compiled update's weights are from the eager one's after one update.

Not a training option: it needs a C++ compiler on every learner node and compiles for
each new minibatch shape; this script only measures what it would buy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grade_ray import keys  # noqa: E402
from grade_ray.learner.grpo import REF_PI, GRPOLearner, GRPOSettings  # noqa: E402


class CompiledGRPOLearner(GRPOLearner):
    """:class:`GRPOLearner` whose loss is one ``torch.compile`` graph (Dirichlet + exact KL)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = False  # inductor fuses the composed loss itself
        self._compiled = torch.compile(self._loss, fullgraph=True, dynamic=False)

    def _loss(self, context, weights, old_logp, adv, pi_ref, alpha_hat):
        s = self.settings
        pi = torch.softmax(self.model(context), dim=-1)
        logp = self.explore.log_prob(pi, weights, alpha_hat, floor=s.alpha_floor, sigma=s.sigma)
        kl = self.explore.kl(pi, pi_ref, alpha_hat, floor=s.alpha_floor, sigma=s.sigma)
        ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
        surr, clipped = ratio * adv, ratio.clamp(1 - s.clip_eps, 1 + s.clip_eps) * adv
        pg = -torch.minimum(surr, clipped).mean()
        kl_mean = kl.mean()
        stats = torch.stack([pg, kl_mean, (clipped < surr).float().mean(), ratio.mean()])
        return pg + s.beta * kl_mean, stats

    def compute_loss(self, mb, alpha_hat):
        loss, stats = self._compiled(
            mb[keys.CONTEXT],
            mb[keys.WEIGHTS],
            mb[keys.OLD_LOGP],
            mb[keys.ADVANTAGES],
            mb[REF_PI],
            alpha_hat,
        )
        pg, kl, clip_frac, ratio_mean = stats.tolist()
        return loss, {"pg_loss": pg, "kl": kl, "clip_frac": clip_frac, "ratio_mean": ratio_mean}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="runs/learner_compiled")
    args = ap.parse_args(argv)

    from grade_ray.jobs.bench.throughput import learner_batch
    from grade_ray.learner.grpo_reference import ReferenceGRPOLearner
    from grade_ray.models.policy_reference import per_expert_copy

    cfg, policy, batch = learner_batch()
    settings = GRPOSettings.from_config(cfg)
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    learners = {
        "reference (before issue 17)": ReferenceGRPOLearner(per_expert_copy(policy), settings),
        "eager (training's path)": GRPOLearner(copy.deepcopy(policy), settings),
        "compiled loss": CompiledGRPOLearner(copy.deepcopy(policy), settings),
    }
    warm: dict[str, float] = {}
    for name, learner in learners.items():  # the first update compiles; from the same state
        t0 = time.perf_counter()
        learner.update(batch)
        warm[name] = time.perf_counter() - t0
    eager, compiled = (learners[k].module.state_dict() for k in list(learners)[1:])
    diff = max(float((compiled[k] - v).abs().max()) for k, v in eager.items())
    moved = max(float((v - state[k]).abs().max()) for k, v in eager.items())
    times: dict[str, list[float]] = {name: [] for name in learners}
    for _ in range(args.repeats):
        for name, learner in learners.items():
            t0 = time.perf_counter()
            learner.update(batch)
            times[name].append(time.perf_counter() - t0)
    requests = len(batch[keys.CONTEXT])
    rate = {name: requests / statistics.median(t) for name, t in times.items()}
    ref = rate["reference (before issue 17)"]
    result = {
        "requests_per_s": rate,
        "speedup_vs_reference": {k: v / ref for k, v in rate.items()},
        "first_update_s": warm,
        "compiled_vs_eager_weights_max_abs_diff": diff,
        "update_max_abs": moved,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learner_compiled.json").write_text(json.dumps(result, indent=2))
    print("| learner path, 1 thread | requests/s | vs reference | first update (s) |")
    print("|---|---:|---:|---:|")
    for name, r in rate.items():
        print(f"| {name} | {r:,.0f} | {r / ref:.2f}x | {warm[name]:.1f} |")
    print(f"\ncompiled vs eager weights after one update: {diff:.1e} (update moves <= {moved:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
