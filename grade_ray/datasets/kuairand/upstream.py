"""Upstream multi-task model (MMoE) that produces the K scores GRADE fuses.

Real logs such as KuaiRand carry no upstream predictions, so we train our own
multi-gate mixture-of-experts (Ma et al., KDD 2018) on earlier days and score
later days. The model is data-agnostic: it reads a dense feature matrix and a
matrix of categorical indices; :mod:`grade_ray.datasets.kuairand.features` builds both.

Architecture, for input ``x = [standardize(dense) ; emb_1(cat_1) ; ... ; emb_C(cat_C)]``::

    e_j(x) = MLP_j(x)                      j = 1..E shared experts, (B, H) each
    g_k(x) = softmax(W_k x)                one gate per task, (B, E)
    h_k    = sum_j g_k(x)_j e_j(x)         (B, H)
    logit_k = tower_k(h_k)                 (B,)
    p_k    = sigmoid(logit_k)              in [0, 1]

Loss: sum over tasks of the mean binary cross-entropy. Categorical index 0 is
reserved for "unknown / missing" (values not seen when the vocabulary was fitted).

The module also holds :func:`binary_auc` (tie-aware ROC AUC) used to report the
upstream model's quality on held-out days, and safe (de)serialisation: weights
go to a plain ``state_dict`` file loaded with ``torch.load(weights_only=True)``,
the architecture to a JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from grade_ray.datasets.kuairand.dataset import KuaiRandError

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("click", "long_view", "like")
"""Tasks with enough positives in KuaiRand-Pure (click ~44%, long_view ~31%, like ~1.7%).

follow, comment, forward and hate are at 0.1-0.3%: a few dozen positives per
day, too few for a stable tower or a meaningful daily AUC. They stay available
as labels (R_post gains) and can be added with ``tasks=``.
"""


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """MMoE upstream model and its training loop."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Predicted tasks (label names); their order is the order of the session ``scores``."""
    num_experts: int = 4
    """Shared experts."""
    expert_hidden: int = 64
    """Hidden and output width of each expert MLP."""
    tower_hidden: int = 32
    """Hidden width of each task tower."""
    emb_dim: int = 8
    """Embedding width of every categorical feature."""
    dropout: float = 0.1
    """Dropout inside experts."""
    epochs: int = 2
    """Passes over the training impressions (more overfits the id embeddings on a few days)."""
    batch_size: int = 512
    """Impressions per gradient step."""
    lr: float = 2e-3
    """Adam learning rate."""
    weight_decay: float = 3e-4
    """Adam (L2) weight decay."""
    seed: int = 0
    """Seed for initialisation and shuffling (training is deterministic on CPU)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise KuaiRandError(f"upstream tasks must be non-empty and distinct, got {self.tasks}")
        if min(self.num_experts, self.expert_hidden, self.tower_hidden, self.emb_dim) < 1:
            raise KuaiRandError("num_experts, expert_hidden, tower_hidden and emb_dim must be >= 1")
        if not 0 <= self.dropout < 1:
            raise KuaiRandError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise KuaiRandError("epochs and batch_size must be >= 1 and lr > 0")


class MMoE(nn.Module):
    """Multi-gate mixture of experts: dense (B, F) float32 + cats (B, C) int64 -> logits (B, K).

    Experts, gates and towers are stored as stacked weights and applied with
    ``einsum`` (a handful of kernels per step instead of dozens of small ones).
    """

    def __init__(
        self, dense_dim: int, cat_sizes: Sequence[int], num_tasks: int, cfg: UpstreamConfig
    ) -> None:
        super().__init__()
        self.dense_dim = int(dense_dim)
        self.cat_sizes = [int(s) for s in cat_sizes]
        self.num_tasks = int(num_tasks)
        e, h, t, k = cfg.num_experts, cfg.expert_hidden, cfg.tower_hidden, self.num_tasks
        self.register_buffer("dense_mean", torch.zeros(self.dense_dim))
        self.register_buffer("dense_std", torch.ones(self.dense_dim))
        offsets = np.concatenate([[0], np.cumsum(self.cat_sizes)[:-1]]).astype(np.int64)
        self.register_buffer("cat_offsets", torch.from_numpy(offsets))
        self.embedding = nn.Embedding(max(sum(self.cat_sizes), 1), cfg.emb_dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        d_in = self.dense_dim + cfg.emb_dim * len(self.cat_sizes)
        self.expert_in = nn.Linear(d_in, e * h)  # first layer of all experts
        self.expert_w = nn.Parameter(torch.randn(e, h, h) / math.sqrt(h))
        self.expert_b = nn.Parameter(torch.zeros(e, h))
        self.gates = nn.Linear(d_in, k * e)
        self.tower_w1 = nn.Parameter(torch.randn(k, h, t) / math.sqrt(h))
        self.tower_b1 = nn.Parameter(torch.zeros(k, t))
        self.tower_w2 = nn.Parameter(torch.randn(k, t) / math.sqrt(t))
        self.tower_b2 = nn.Parameter(torch.zeros(k))
        self.dropout = nn.Dropout(cfg.dropout)
        self.shape = (e, h, k)

    def set_normalization(self, dense: np.ndarray) -> None:
        """Fit the dense-feature standardisation on training rows. dense: (M, F)."""
        mean = dense.mean(axis=0)
        std = dense.std(axis=0)
        self.dense_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.dense_std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32)))

    def forward(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """dense: (B, F) float32; cats: (B, C) int64 in [0, cat_sizes[c]); returns logits (B, K)."""
        e, h, k = self.shape
        emb = self.embedding(cats + self.cat_offsets).flatten(1)  # (B, C * emb_dim)
        x = torch.cat([(dense - self.dense_mean) / self.dense_std, emb], dim=1)  # (B, d_in)
        z = self.dropout(torch.relu(self.expert_in(x))).view(-1, e, h)
        experts = torch.relu(torch.einsum("beh,ehj->bej", z, self.expert_w) + self.expert_b)
        gates = torch.softmax(self.gates(x).view(-1, k, e), dim=2)  # (B, K, E)
        mixed = torch.einsum("bke,beh->bkh", gates, experts)  # (B, K, H)
        hidden = torch.relu(torch.einsum("bkh,kht->bkt", mixed, self.tower_w1) + self.tower_b1)
        return torch.einsum("bkt,kt->bk", hidden, self.tower_w2) + self.tower_b2

    def architecture(self, cfg: UpstreamConfig) -> dict[str, Any]:
        """JSON-able description that :func:`build_mmoe` turns back into this module."""
        return {
            "dense_dim": self.dense_dim,
            "cat_sizes": list(self.cat_sizes),
            "num_tasks": self.num_tasks,
            "config": dataclasses.asdict(cfg),
        }


def build_mmoe(arch: dict[str, Any]) -> tuple[MMoE, UpstreamConfig]:
    """Inverse of :meth:`MMoE.architecture` (weights uninitialised: load a state_dict)."""
    cfg = UpstreamConfig(**arch["config"])
    return MMoE(arch["dense_dim"], arch["cat_sizes"], arch["num_tasks"], cfg), cfg


def _check_inputs(dense: np.ndarray, cats: np.ndarray, labels: np.ndarray | None) -> None:
    m = dense.shape[0]
    if dense.ndim != 2 or cats.ndim != 2 or cats.shape[0] != m:
        raise ValueError(f"dense (M, F) and cats (M, C) must agree: {dense.shape}, {cats.shape}")
    if labels is not None and (labels.ndim != 2 or labels.shape[0] != m):
        raise ValueError(f"labels must be (M, K) with M={m}, got {labels.shape}")
    if not np.isfinite(dense).all():
        raise ValueError("dense features contain NaN or inf")


def fit_mmoe(
    dense: np.ndarray,
    cats: np.ndarray,
    labels: np.ndarray,
    cat_sizes: Sequence[int],
    cfg: UpstreamConfig,
) -> tuple[MMoE, dict[str, Any]]:
    """Train an MMoE with Adam on binary labels.

    dense: (M, F) float32; cats: (M, C) int64; labels: (M, K) {0, 1}, K = len(cfg.tasks).
    Returns (model in eval mode, history with the mean loss of each epoch).
    """
    _check_inputs(dense, cats, labels)
    if labels.shape[1] != len(cfg.tasks):
        raise ValueError(f"labels have {labels.shape[1]} columns, cfg.tasks has {len(cfg.tasks)}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = MMoE(dense.shape[1], cat_sizes, labels.shape[1], cfg)
        model.set_normalization(dense)
        gen = torch.Generator().manual_seed(cfg.seed)
        history = _train_loop(model, dense, cats, labels, cfg, gen)
    model.eval()
    return model, history


def _train_loop(
    model: MMoE,
    dense: np.ndarray,
    cats: np.ndarray,
    labels: np.ndarray,
    cfg: UpstreamConfig,
    gen: torch.Generator,
) -> dict[str, Any]:
    x = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(cats, dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    history: dict[str, Any] = {"epoch_loss": [], "steps": 0}
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        total, n = 0.0, 0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = model(x[idx], c[idx])
            loss = sum(loss_fn(logits[:, k], y[idx, k]) for k in range(y.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            history["steps"] += 1
        history["epoch_loss"].append(total / max(n, 1))
        log.info("upstream epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, total / max(n, 1))
    return history


@torch.no_grad()
def predict_proba(
    model: MMoE, dense: np.ndarray, cats: np.ndarray, batch_size: int = 16_384
) -> np.ndarray:
    """Probabilities p = sigmoid(logits). dense: (M, F); cats: (M, C); returns (M, K) float32 in [0, 1]."""
    _check_inputs(dense, cats, None)
    model.eval()
    out = np.empty((dense.shape[0], model.num_tasks), dtype=np.float32)
    for s in range(0, dense.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(dense[s : s + batch_size], dtype=np.float32))
        c = torch.from_numpy(np.ascontiguousarray(cats[s : s + batch_size], dtype=np.int64))
        out[s : s + batch_size] = torch.sigmoid(model(x, c)).numpy()
    return np.clip(out, 0.0, 1.0)


def binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC with ties counted as one half. y: (M,) {0, 1}; p: (M,) scores.

    AUC = (sum of positive ranks - P(P+1)/2) / (P * N) with average ranks for ties;
    NaN when only one class is present.
    """
    y = np.asarray(y).astype(bool).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank per unique value
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def save_mmoe(model: MMoE, path: str | Path) -> None:
    """Weights only (a plain tensor state_dict, safe to load with ``weights_only=True``)."""
    torch.save(model.state_dict(), Path(path))


def load_mmoe(path: str | Path, arch: dict[str, Any]) -> tuple[MMoE, UpstreamConfig]:
    """Rebuild from :meth:`MMoE.architecture` and load weights with ``weights_only=True``."""
    model, cfg = build_mmoe(arch)
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, cfg
