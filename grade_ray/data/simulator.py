"""The marketplace simulator: the project's embedded data source, with ground truth.

Modelled on an e-commerce feed (GRADE's Kuaishou marketplace). One request =
one user opening the feed; ``N_q`` retrieved candidates are ranked by fusing
the upstream multi-task predictions and *all* of them are shown, item ``i`` at
rank ``r`` being examined with probability ``exam(r) = (1 + r / 5) ** -1``.

World::

    users    segment s ~ Categorical(segment_mix) (browser, buyer, premium, bargain)
             intent  z = mu_s + sigma_s * eps, 4 dims: click_bias, buy_bias,
                     price_slope, quality_slope; category affinity a (C,)
             context x = context_signal * (P_seg[s] + P_int z_std) + N(0, 1)
                     (D dims, the last quarter pure noise): reveals s only partly
    items    category, price (log-normal per category), margin, quality,
             attractiveness (click-bait: more clicks, fewer orders)
    truth    ctr  = sigmoid(-2.1 + z_click + 0.8 attract + 0.4 a[cat] + 0.1 quality)
             cvr  = sigmoid(-3.5 + z_buy + z_price * lp + z_quality * quality
                                - 1.0 attract + 0.3 a[cat])          (lp: centred log price)
             gmv  = price;   profit = price * margin                 (value of one order)
             P(click at rank r) = exam(r) * ctr;  P(order | click) = cvr

Upstream predictions (tasks ``ctr, cvr, gmv, profit``; kinds ``prob, prob,
value, value``; ``gmv``/``profit`` are the predicted value of an order) are the
truth seen through a segment-specific lens: for each segment and task a
calibration slope on the logit scale (``1 + miscalibration * (slope_s - 1)``,
and an offset), log-scale noise ``prediction_noise * noise_s``, and for pCVR
the share ``min(1, miscalibration * rho_s)`` of the user's own price/quality taste
the model misses (it
was fit mostly on majority segments, so it predicts bargain hunters' and
premium buyers' conversion with the population's price response).

**Where the personalization headroom comes from.** The north-star defaults to
``click + 10 * order`` (summed over a request's feed), the same gains as the
default R_post reward. (a) Segments sit on different parts of that objective: a
browser's value is almost all clicks (pCVR ranking is noise to them), about half
of a buyer's is orders, a premium buyer converts on expensive quality items and
a bargain hunter on cheap ones. (b) The upstream model is worse for some segments and
tasks: browsers' pCVR is noisy and over-confident (few positives), bargain
hunters' and premium buyers' pCVR misses their price response. So the best
log-product weights differ by segment; :func:`grade_ray.data.oracles.headroom`
measures how much per-segment oracle weights beat the best single static
weight vector on fresh requests (about 7% with the defaults; sorting each
request by its true item values would give about 15%).

Generation streams shards through :class:`~grade_ray.data.sessions.ShardWriter`
in chunks of :data:`CHUNK` requests (memory bounded by one chunk and one
shard's buffer; the user and item tables are the only full-size state). Each
chunk has its own seed derived from ``(seed, split, chunk index)``: the same
seed gives identical files, and train (days ``0..num_days``) and eval (the days
after) use disjoint random streams over the same user population.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from grade_ray.algos.fusion import fuse
from grade_ray.config import ConfigError, SimulatorConfig
from grade_ray.data.sessions import SessionBatch, SessionMeta, ShardWriter
from grade_ray.data.world import SEGMENTS, Catalogue, Population

log = logging.getLogger(__name__)

TASK_NAMES = ("ctr", "cvr", "gmv", "profit")
TASK_KINDS = ("prob", "prob", "value", "value")
LABEL_NAMES = ("click", "order", "gmv", "profit")
INTENT_NAMES = ("click_bias", "buy_bias", "price_slope", "quality_slope")
OUTCOME_KEYS = ("impressions", "clicks", "orders", "gmv", "profit", "north_star")

CHUNK = 4096
"""Requests generated per step (the unit of seeding and of memory)."""
START_TS = 1_767_225_600
"""2026-01-01T00:00:00Z: ``ts`` of the first training request."""
EXAM_SCALE = 5.0
"""exam(r) = 1 / (1 + r / EXAM_SCALE): probability that rank r (0-based) is examined."""
_SPLIT_STREAMS = {"train": 1, "eval": 2}
_FRESH_STREAM = 3
_REQUEST_ID_BASE = {"train": 0, "eval": 1 << 40, "fresh": 2 << 40}

# Response-model coefficients (see the module docstring).
_CTR0, _CTR_ATTRACT, _CTR_AFFINITY, _CTR_QUALITY = -2.1, 0.8, 0.4, 0.1
_CVR0, _CVR_ATTRACT, _CVR_AFFINITY = -3.5, -1.0, 0.3


def exam_prob(n: int) -> np.ndarray:
    """(n,) float64: probability that rank r = 0..n-1 is examined (position bias)."""
    return 1.0 / (1.0 + np.arange(n) / EXAM_SCALE)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------
# Ground truth, outcomes, A/B report


@dataclasses.dataclass
class Truth:
    """Ground truth for a :class:`SessionBatch`, aligned with its candidate order.

    segment: (B,) int64 index into ``segment_names``; intent: (B, 4) float32
    (click_bias, buy_bias, price_slope, quality_slope); ctr: (B, N) true click
    probability at rank 0 (position-debiased); cvr: (B, N) true P(order | click);
    gmv, profit: (B, N) value of one order. All (B, N) arrays are 0 where padded.
    """

    segment: np.ndarray
    intent: np.ndarray
    ctr: np.ndarray
    cvr: np.ndarray
    gmv: np.ndarray
    profit: np.ndarray

    def item_value(self, gains: dict[str, float]) -> np.ndarray:
        """(B, N) expected north-star of each candidate if shown at rank 0: sum_l g_l E[label_l]."""
        per_label = {
            "click": self.ctr,
            "order": self.ctr * self.cvr,
            "gmv": self.ctr * self.cvr * self.gmv,
            "profit": self.ctr * self.cvr * self.profit,
        }
        return sum(g * per_label[name].astype(np.float64) for name, g in gains.items())


def rank_positions(fused: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, N) int64 rank of each candidate when sorting ``fused`` (B, N) descending.

    Padded candidates (``mask`` False) go last; ties keep index order.
    """
    key = np.where(mask, -np.asarray(fused, dtype=np.float64), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :], axis=1)
    return ranks


# ---------------------------------------------------------------------------
# The simulator


def _duplicates(items: np.ndarray) -> np.ndarray:
    """(B, n) -> (B, n) bool: entries equal to an earlier-sorted entry of the same row."""
    order = np.argsort(items, axis=1)
    srt = np.take_along_axis(items, order, 1)
    dup = np.zeros_like(items, dtype=bool)
    np.put_along_axis(dup, order[:, 1:], srt[:, 1:] == srt[:, :-1], 1)
    return dup


class MarketplaceSimulator:
    """Seeded marketplace with users, items, an upstream model and a logging policy.

    The user and item tables are built once in ``__init__`` (O(num_users +
    num_items)); requests are generated chunk by chunk.
    """

    def __init__(self, cfg: SimulatorConfig) -> None:
        unknown = [s for s in cfg.segment_names if s not in SEGMENTS]
        if unknown:
            raise ConfigError(
                f"simulator.segment_names: unknown segment(s) {unknown}; valid: {list(SEGMENTS)}"
            )
        bad = [k for k in cfg.north_star if k not in LABEL_NAMES]
        if bad:
            raise ConfigError(
                f"simulator.north_star has unknown label(s) {bad}; labels: {list(LABEL_NAMES)}"
            )
        self.cfg = cfg
        self.segment_names: tuple[str, ...] = tuple(cfg.segment_names)
        self._profiles = [SEGMENTS[s] for s in self.segment_names]
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
        self.items = Catalogue.build(cfg.num_items, rng)
        self.users = Population.build(cfg, self._profiles, len(self.items.cat_size), rng)
        self._meta = SessionMeta(
            task_names=TASK_NAMES,
            task_kinds=TASK_KINDS,
            label_names=LABEL_NAMES,
            context_names=tuple(f"ctx_{j:02d}" for j in range(cfg.context_dim)),
            source={
                "generator": "grade_ray.data.simulator.MarketplaceSimulator",
                "simulator": dataclasses.asdict(cfg),
            },
        )

    @property
    def meta(self) -> SessionMeta:
        """Metadata of every file this simulator writes (tasks, labels, context names)."""
        return self._meta

    # -- one chunk of requests --------------------------------------------

    def _candidates(self, rng: np.random.Generator, users: np.ndarray, n: int) -> np.ndarray:
        """(B, n) distinct item indices per request: half by user affinity, half by popularity."""
        b = len(users)
        aff = np.exp(self.users.affinity[users].astype(np.float64))
        p_cat = 0.5 * aff / aff.sum(1, keepdims=True) + 0.5 * self.items.cat_share[None, :]
        cdf = np.cumsum(p_cat, axis=1)
        cat = (rng.random((b, n, 1)) * cdf[:, None, -1:] > cdf[:, None, :]).sum(-1)
        cat = np.minimum(cat, len(self.items.cat_size) - 1)
        items = self.items.cat_start[cat] + (rng.random((b, n)) * self.items.cat_size[cat]).astype(
            np.int64
        )
        for _ in range(20):  # replace duplicates by uniform draws until a list is distinct
            dup = _duplicates(items)
            if not dup.any():
                return items
            items[dup] = rng.integers(0, self.cfg.num_items, int(dup.sum()))
        # a catalogue barely larger than a list (num_items ~ num_candidates): the rows still
        # repeating an item draw their repeats from the items they lack
        dup = _duplicates(items)
        for row in np.flatnonzero(dup.any(1)):
            lacking = np.setdiff1d(np.arange(self.cfg.num_items), items[row])
            items[row, dup[row]] = rng.choice(lacking, int(dup[row].sum()), replace=False)
        return items

    def _truth(self, users: np.ndarray, items: np.ndarray) -> Truth:
        """True response of ``users`` (B,) to ``items`` (B, N) (no padding yet)."""
        z = self.users.intent[users].astype(np.float64)
        cat = self.items.category[items]
        aff = np.take_along_axis(self.users.affinity[users], cat, 1).astype(np.float64)
        lp, q = self.items.logprice[items], self.items.quality[items]
        attract = self.items.attract[items]
        ctr_logit = (
            _CTR0 + z[:, :1] + _CTR_ATTRACT * attract + _CTR_AFFINITY * aff + _CTR_QUALITY * q
        )
        cvr_logit = (
            _CVR0
            + z[:, 1:2]
            + z[:, 2:3] * lp
            + z[:, 3:4] * q
            + _CVR_ATTRACT * attract
            + _CVR_AFFINITY * aff
        )
        price = self.items.price[items].astype(np.float64)
        return Truth(
            segment=self.users.segment[users].astype(np.int64),
            intent=self.users.intent[users],
            ctr=_sigmoid(ctr_logit),
            cvr=_sigmoid(cvr_logit),
            gmv=price,
            profit=price * self.items.margin[items],
        )

    def _predict(self, rng: np.random.Generator, items: np.ndarray, truth: Truth) -> np.ndarray:
        """(B, N, 4) upstream predictions (pctr, pcvr, pgmv, pprofit) with segment-specific errors."""
        cfg, seg = self.cfg, truth.segment
        noise = np.array([p.noise for p in self._profiles])[seg] * cfg.prediction_noise  # (B, 4)
        slope = 1.0 + cfg.miscalibration * (np.array([p.slope for p in self._profiles])[seg] - 1)
        offset = cfg.miscalibration * np.array([p.offset for p in self._profiles])[seg]
        rho = np.minimum(cfg.miscalibration * np.array([p.rho for p in self._profiles]), 1.0)
        rho = rho[seg][:, None]
        eps = rng.normal(0.0, 1.0, (*items.shape, 4))
        z_dev = truth.intent[:, 2:4].astype(np.float64) - self.users.mean_intent[2:4]
        missed = rho * (
            z_dev[:, :1] * self.items.logprice[items] + z_dev[:, 1:] * self.items.quality[items]
        )
        logits = (_logit(truth.ctr), _logit(truth.cvr) - missed)
        centres = (_CTR0, _CVR0)
        out = np.empty((*items.shape, 4), dtype=np.float32)
        for k in range(2):
            lg = centres[k] + offset[:, k : k + 1] + slope[:, k : k + 1] * (logits[k] - centres[k])
            out[..., k] = _sigmoid(lg + noise[:, k : k + 1] * eps[..., k])
        for k, value in ((2, truth.gmv), (3, truth.profit)):
            sd = noise[:, k : k + 1]
            out[..., k] = value * np.exp(sd * eps[..., k] - 0.5 * sd**2)
        return out

    def _context(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """(B, D) float32 observed context: noisy projections of segment and intent."""
        pop = self.users
        signal = pop.ctx_segment[pop.segment[users]] + pop.intent_noise[users] @ pop.ctx_intent
        return (
            self.cfg.context_signal * signal
            + rng.normal(0.0, 1.0, (len(users), self.cfg.context_dim))
        ).astype(np.float32)

    def segment_posterior(self, context: np.ndarray) -> np.ndarray:
        """(B, S) p(segment | context) for contexts (B, D), under the generative model.

        Given segment s, x = c (P_seg[s] + z P_int) + e with z ~ N(0, I_4) and
        e ~ N(0, I_D) (see :meth:`_context`), so x | s ~ N(c P_seg[s], Sigma) with
        Sigma = I + c^2 P_int' P_int shared by all segments; the prior is
        ``segment_mix``. This is all a context-only policy can know about the segment.
        """
        pop, c = self.users, self.cfg.context_signal
        means = c * pop.ctx_segment  # (S, D)
        prec = np.linalg.inv(
            np.eye(self.cfg.context_dim) + c**2 * pop.ctx_intent.T @ pop.ctx_intent
        )
        x = np.asarray(context, dtype=np.float64)
        prior = np.log(np.maximum(np.asarray(self.cfg.segment_mix, dtype=np.float64), 1e-300))
        logits = x @ prec @ means.T - 0.5 * np.einsum("sd,de,se->s", means, prec, means) + prior
        logits -= logits.max(1, keepdims=True)
        post = np.exp(logits)
        return post / post.sum(1, keepdims=True)

    def _chunk(self, seed_key: list[int], b: int, logged: bool) -> tuple[SessionBatch, Truth]:
        """``b`` requests from the stream ``seed_key``; logged = ranked + labelled by the logger."""
        cfg, n = self.cfg, self.cfg.num_candidates
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, *seed_key]))
        users = np.minimum(
            np.searchsorted(self.users.activity_cdf, rng.random(b)), cfg.num_users - 1
        )
        lengths = rng.integers(cfg.min_candidates, n + 1, b)
        mask = np.arange(n)[None, :] < lengths[:, None]
        items = self._candidates(rng, users, n)
        truth = self._truth(users, items)
        scores = self._predict(rng, items, truth)
        context = self._context(rng, users)
        if logged:  # put candidates in the logging policy's order
            order = self._logging_order(rng, scores, mask)
            items = np.take_along_axis(items, order, 1)
            scores = np.take_along_axis(scores, order[..., None], 1)
            truth = _take_truth(truth, order)
        for f in ("ctr", "cvr", "gmv", "profit"):
            setattr(truth, f, np.where(mask, getattr(truth, f), 0.0))
        labels = np.zeros((b, n, 4), np.float32)
        if logged:  # candidate j is shown at rank j
            ranks = np.broadcast_to(np.arange(n), (b, n))
            labels = _labels_from_uniforms(rng.random((2, b, n)), truth, ranks, mask)
        batch = SessionBatch(
            request_id=np.zeros(b, np.int64),
            user_id=users.astype(np.int64),
            ts=np.zeros(b, np.int64),
            context=context,
            item_ids=np.where(mask, items + 1, 0).astype(np.int64),
            scores=np.where(mask[..., None], scores, 0).astype(np.float32),
            labels=labels,
            mask=mask,
        )
        return batch, truth

    def _logging_order(
        self, rng: np.random.Generator, scores: np.ndarray, mask: np.ndarray
    ) -> np.ndarray:
        """(B, N) candidate order of the logging policy: log-product fusion with the
        production weights plus per-request noise N(0, logging_noise), renormalised."""
        cfg, b = self.cfg, scores.shape[0]
        w = np.asarray(cfg.logging_weights, dtype=np.float64)
        w = np.clip(w / w.sum() + rng.normal(0, cfg.logging_noise, (b, 4)), 0, None)
        w = np.where(w.sum(1, keepdims=True) > 0, w, 1.0)
        w /= w.sum(1, keepdims=True)
        fused = fuse("log_product", torch.from_numpy(scores), torch.from_numpy(w)).numpy()
        return np.argsort(np.where(mask, -fused, np.inf), axis=1, kind="stable")

    # -- generation ---------------------------------------------------------

    def generate(
        self,
        out_dir: str | Path,
        num_requests: int,
        split: str = "train",
        progress: Callable[[int], None] | None = None,
    ) -> list[Path]:
        """Write ``num_requests`` logged requests as ``{split}-NNNNN.parquet`` shards in ``out_dir``.

        ``split`` is ``train`` (ts over days [0, num_days)) or ``eval`` (the following
        days, a disjoint random stream, same users). Stale ``{split}-*.parquet``
        files in ``out_dir`` are removed first. ``progress(k)`` is called after each
        chunk with the number of requests it added. Returns the shard paths.
        """
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"unknown split {split!r}; valid: {list(_SPLIT_STREAMS)}")
        if num_requests <= 0:
            raise ValueError(f"num_requests must be > 0, got {num_requests}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in sorted(out.glob(f"{split}-*.parquet")):
            log.warning("removing stale shard %s", stale)
            stale.unlink()
        t_start, span = self._time_window(split, num_requests)
        meta = dataclasses.replace(self._meta, source={**self._meta.source, "split": split})
        t0 = time.perf_counter()
        with ShardWriter(out, meta, self.cfg.rows_per_shard, prefix=split) as writer:
            for c, start in enumerate(range(0, num_requests, CHUNK)):
                b = min(CHUNK, num_requests - start)
                batch, _ = self._chunk([_SPLIT_STREAMS[split], c], b, logged=True)
                idx = np.arange(start, start + b, dtype=np.int64)
                batch.request_id = _REQUEST_ID_BASE[split] + idx
                batch.ts = t_start + (idx * span) // num_requests
                writer.write(batch)
                if progress is not None:
                    progress(b)
        log.info(
            "simulated %d %s requests into %d shard(s) in %s (%.0f req/s)",
            num_requests,
            split,
            len(writer.paths),
            out,
            num_requests / (time.perf_counter() - t0),
        )
        return writer.paths

    def _time_window(self, split: str, num_requests: int) -> tuple[int, int]:
        """(first ts, span in seconds) of a split: train = num_days, eval = the days after."""
        day, cfg = 86_400, self.cfg
        if split == "train":
            return START_TS, cfg.num_days * day
        eval_days = max(1, round(cfg.num_days * cfg.num_eval_requests / cfg.num_requests))
        return START_TS + cfg.num_days * day, eval_days * day

    def fresh_requests(self, n: int, seed: int) -> tuple[SessionBatch, Truth]:
        """``n`` unlogged requests (retrieval order, labels zero) with their ground truth.

        Same user population, a random stream of its own per ``seed``.
        """
        if n <= 0:
            raise ValueError(f"fresh_requests needs n > 0, got {n}")
        parts = [
            self._chunk([_FRESH_STREAM, seed, c], min(CHUNK, n - s), logged=False)
            for c, s in enumerate(range(0, n, CHUNK))
        ]
        # every chunk is padded to num_candidates, so fields stack directly
        batch = SessionBatch(
            **{
                f.name: np.concatenate([getattr(p[0], f.name) for p in parts])
                for f in dataclasses.fields(SessionBatch)
            }
        )
        batch.request_id = _REQUEST_ID_BASE["fresh"] + np.arange(n, dtype=np.int64)
        batch.ts[:] = START_TS + (self.cfg.num_days + 1) * 86_400
        truth = Truth(
            **{
                f.name: np.concatenate([getattr(p[1], f.name) for p in parts])
                for f in dataclasses.fields(Truth)
            }
        )
        return batch, truth

    # -- outcomes and A/B tests ---------------------------------------------

    def expected_outcomes(
        self, batch: SessionBatch, truth: Truth, fused: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Expected feedback per request (B,) when ranking by ``fused`` (B, N) descending.

        Keys :data:`OUTCOME_KEYS`; every real candidate is one impression, rank r
        is examined with :func:`exam_prob`; north_star = sum over ``cfg.north_star``
        of gain * expected label.
        """
        exam = exam_prob(batch.mask.shape[1])[rank_positions(fused, batch.mask)] * batch.mask
        clicks = exam * truth.ctr
        orders = clicks * truth.cvr
        out = {
            "impressions": batch.mask.sum(1).astype(np.float64),
            "clicks": clicks.sum(1),
            "orders": orders.sum(1),
            "gmv": (orders * truth.gmv).sum(1),
            "profit": (orders * truth.profit).sum(1),
        }
        return self._with_north_star(out)

    def sample_outcomes(
        self, batch: SessionBatch, truth: Truth, fused: np.ndarray, seed: int
    ) -> dict[str, np.ndarray]:
        """Sampled feedback per request (B,), same keys as :meth:`expected_outcomes`.

        Random numbers are drawn per (request, candidate), not per rank, so
        different rankings with the same ``seed`` share them (common random numbers).
        """
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, 4, seed]))
        u = rng.random((2, *batch.mask.shape))
        labels = _labels_from_uniforms(u, truth, rank_positions(fused, batch.mask), batch.mask)
        out = {"impressions": batch.mask.sum(1).astype(np.float64)}
        for j, key in enumerate(("clicks", "orders", "gmv", "profit")):
            out[key] = labels[..., j].sum(1, dtype=np.float64)
        return self._with_north_star(out)

    def _with_north_star(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = {"click": "clicks", "order": "orders", "gmv": "gmv", "profit": "profit"}
        out["north_star"] = sum(g * out[key[lab]] for lab, g in self.cfg.north_star.items())
        return out


# ---------------------------------------------------------------------------
# helpers


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _take_truth(truth: Truth, order: np.ndarray) -> Truth:
    return dataclasses.replace(
        truth,
        **{
            f: np.take_along_axis(getattr(truth, f), order, 1)
            for f in ("ctr", "cvr", "gmv", "profit")
        },
    )


def _labels_from_uniforms(
    u: np.ndarray, truth: Truth, ranks: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """u (2, B, N) uniforms -> (B, N, 4) float32 labels for items shown at ``ranks`` (B, N)."""
    click = (u[0] < exam_prob(ranks.shape[1])[ranks] * truth.ctr) & mask
    order = click & (u[1] < truth.cvr)
    return np.stack([click, order, order * truth.gmv, order * truth.profit], -1).astype(np.float32)


def generation_benchmark(
    n_requests: int, out_dir: str | Path, cfg: SimulatorConfig | None = None
) -> dict:
    """Generate ``n_requests`` train requests with the default (or given) config; report speed.

    Returns requests, seconds, requests_per_s, shards, bytes written,
    rss_before_mb and peak_rss_mb (the process's peak resident set before and
    after generating, ``getrusage`` maxrss: it includes what the process held
    before, e.g. ~270 MB for torch + pyarrow).
    """
    cfg = cfg or SimulatorConfig()
    t0 = time.perf_counter()
    sim = MarketplaceSimulator(cfg)
    t_tables = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    paths = sim.generate(out_dir, n_requests, split="train")
    dt = time.perf_counter() - t0
    return {
        "requests": n_requests,
        "seconds": dt,
        "requests_per_s": n_requests / dt,
        "table_build_s": t_tables,
        "shards": len(paths),
        "bytes": sum(p.stat().st_size for p in paths),
        "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
