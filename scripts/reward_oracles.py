"""How much of the attainable headroom each reward's own optimum reaches, before any training.

    python scripts/reward_oracles.py WORLD [--requests N] [--out FILE.json]

For a world of ``configs/worlds/`` it simulates N logged requests, scores every grid weight
vector on each request with the reward's components (R_post and R_prior as NDCG per
request or as DCG over one dataset constant; R_prior on raw or recalibrated predictions),
and for each reward variant picks, per request of a fresh A/B sample, the grid weights
maximising the posterior-weighted segment mean of that reward (the reward oracle O_rew of
``grade_ray.jobs.headroom``). It prints each variant's captured share of the attainable
headroom, (O_rew - S) / (O_ctx - S), in true north-star: 1 = the reward's optimum is the
best context-only policy, 0 = no better than the best static vector. R_format is left out
(it is a property of the weights, not of the ranking). The README's "What moved the
numbers" quotes these values (N = 30,000).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.algos.metrics import ideal_dcg_at_k
from grade_ray.config import load_config
from grade_ray.data.oracles import ValueTable, simplex_grid, truth_table
from grade_ray.data.reading import read_sessions
from grade_ray.data.simulator import MarketplaceSimulator
from grade_ray.learner.reward_fit import fit_prior_calibration
from grade_ray.spec import RewardFit, RewardSpec, as_tensor

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "reward.prior_calibration={ctr: click, cvr: 'order|click'}"


def components(spec: RewardSpec, batch, grid: np.ndarray) -> dict[str, np.ndarray]:
    """(B, P) NDCG of R_post, R_prior (raw) and R_prior (recalibrated), and (B,) their IDCGs."""
    raw = dataclasses.replace(spec, calibrate=(), calibration=None, normalization="request")
    w = torch.from_numpy(grid.astype(np.float32))
    out: dict[str, list] = {
        k: [] for k in ("post", "prior", "prior_cal", "i_post", "i_prior", "i_cal")
    }
    for s in range(0, len(batch), 256):
        b = batch.slice(s, min(s + 256, len(batch)))
        sc, m, ctx = as_tensor(b.scores), as_tensor(b.mask), as_tensor(b.context)
        gains = {
            "post": spec.post_gain(as_tensor(b.labels), as_tensor(b.position)),
            "prior": raw.prior_gain(sc),
            "prior_cal": spec.prior_gain(sc, ctx),
        }
        for name, g in gains.items():
            r = raw.group_rewards(
                sc, w.expand(len(b), *w.shape), g, g, m, fusion="log_product", fusion_eps=1e-6
            )
            out[name].append(r["post"].numpy())
        for name, key in (("post", "i_post"), ("prior", "i_prior"), ("prior_cal", "i_cal")):
            out[key].append(ideal_dcg_at_k(torch.where(m, gains[name], 0.0), m, spec.k).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def variants(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewards (B, P) built from the components: 'ndcg' = per request, 'dcg' = dataset scale."""

    def dcg(name: str, ideal: str) -> np.ndarray:
        return c[name] * c[ideal][:, None] / c[ideal].mean()

    post_dcg, prior_dcg, cal_dcg = (
        dcg("post", "i_post"),
        dcg("prior", "i_prior"),
        dcg("prior_cal", "i_cal"),
    )
    return {
        "paper: ndcg post + 0.3 ndcg prior": c["post"] + 0.3 * c["prior"],
        "ndcg post alone": c["post"],
        "ndcg prior alone": c["prior"],
        "ndcg recalibrated prior alone": c["prior_cal"],
        "dcg post alone": post_dcg,
        "dcg post + 0.3 ndcg prior": post_dcg + 0.3 * c["prior"],
        "dcg post + 0.3 dcg prior": post_dcg + 0.3 * prior_dcg,
        "defaults: dcg post + 0.3 dcg recalibrated prior": post_dcg + 0.3 * cal_dcg,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("world", help="a world file name in configs/worlds (e.g. default)")
    p.add_argument("--requests", type=int, default=30_000, help="logged requests")
    p.add_argument("--out", help="also write the results here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config([ROOT / "configs" / "worlds" / f"{args.world}.yaml"], [CALIBRATION])
    sim = MarketplaceSimulator(cfg.simulator)
    with tempfile.TemporaryDirectory() as d:
        sim.generate(d, args.requests)
        batch, meta, _ = read_sessions(d)
    cal = fit_prior_calibration(cfg, batch, meta)
    spec = RewardSpec.from_config(cfg.reward, meta, RewardFit(calibration=cal))
    grid = simplex_grid(meta.num_tasks, cfg.eval.static_grid_step)
    segments = sim.users.segment[batch.user_id]
    table = truth_table(sim, "log_product", cfg.eval.static_grid_step, 5_000, cfg.eval.ab_seed + 7)
    ab, truth = sim.fresh_requests(10_000, cfg.eval.ab_seed)
    posterior = sim.segment_posterior(ab.context)

    def north_star(w: np.ndarray) -> float:
        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        fused = fuse("log_product", torch.from_numpy(ab.scores), wt).numpy()
        return float(sim.expected_outcomes(ab, truth, fused)["north_star"].mean())

    s = north_star(np.broadcast_to(table.static_best(), (len(ab), meta.num_tasks)))
    o_ctx = north_star(table.posterior_best(posterior))
    result = {"world": args.world, "requests": args.requests, "attainable_headroom": o_ctx / s - 1}
    for name, values in variants(components(spec, batch, grid)).items():
        rew = ValueTable.from_requests(grid, values, segments, len(sim.segment_names))
        result[name] = (north_star(rew.posterior_best(posterior)) - s) / (o_ctx - s)
    for k, v in result.items():
        print(f"{k:>50}: {v:.3f}" if isinstance(v, float) else f"{k:>50}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
