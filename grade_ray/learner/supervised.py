"""Stage 1 learner: supervised learning-to-rank (LambdaLoss) through the fusion.

Each logged request is ranked by s(pi_theta(x)) = fuse(scores, pi_theta(x));
LambdaLoss against the graded feedback gains sends gradients through the
softmax head into theta. The result initialises Stage 2 and its reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from grade_ray import keys
from grade_ray.algos.fusion import fuse
from grade_ray.algos.losses import lambda_loss
from grade_ray.algos.metrics import ndcg_at_k
from grade_ray.data.sessions import SessionBatch
from grade_ray.spec import RewardSpec, as_tensor


@dataclasses.dataclass(frozen=True)
class SupervisedSettings:
    """Scalars Stage 1 needs."""

    lr: float
    temperature: float
    fusion: str
    fusion_eps: float
    logit_bound: float = 0.0
    """Largest logit spread max_k z - min_k z before a penalty (0 = off)."""

    @classmethod
    def from_config(cls, cfg) -> SupervisedSettings:
        """``pretrain.*`` and the policy's fusion from a :class:`grade_ray.config.Config`."""
        p = cfg.pretrain
        return cls(p.lr, p.temperature, cfg.policy.fusion, cfg.policy.fusion_eps, p.logit_bound)


def weight_entropy(pi: torch.Tensor) -> torch.Tensor:
    """pi: (B, K) on the simplex -> (B,) entropy -sum_k pi_k log pi_k (0 log 0 = 0)."""
    return -(pi * torch.log(pi.clamp_min(1e-30))).sum(-1)


def logit_spread_hinge(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Mean over requests of max(0, spread - bound)^2 with spread = max_k z - min_k z.

    logits: (B, K). Zero while every request's weights stay within a ratio e^bound of each
    other; past it the penalty's gradient grows with the excess, so (unlike an entropy
    penalty, whose gradient vanishes with the softmax's) it holds Stage 1 out of the
    saturated softmax where Stage 2's GRPO update has no gradient. ``bound`` <= 0: off.
    """
    if bound <= 0:
        return logits.new_zeros(())
    spread = logits.max(-1).values - logits.min(-1).values
    return torch.relu(spread - bound).pow(2).mean()


def standardize(fused: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-request z-score of fused scores over real candidates. (B, N) -> (B, N).

    Makes the loss depend on the ranking direction w, not its scale (the ranking is
    invariant to a positive rescale of w and of the per-request score offset)."""
    m = mask.to(fused.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1)
    mean = (fused * m).sum(-1, keepdim=True) / n
    var = (((fused - mean) * m) ** 2).sum(-1, keepdim=True) / n
    return (fused - mean) / (var + eps).sqrt() * m


RankingLoss = Callable[..., torch.Tensor]
"""``fn(fused, gains, mask, *, k, temperature) -> scalar loss`` (as :func:`lambda_loss`)."""


class Stage1Loss(NamedTuple):
    """A batch's Stage 1 loss (with its graph) and what :meth:`SupervisedLearner.step` logs."""

    loss: torch.Tensor
    pi: torch.Tensor
    """(B, K) fusion weights."""
    fused: torch.Tensor
    """(B, N) fused scores."""
    gains: torch.Tensor
    mask: torch.Tensor


def _all_reduce_mean(grad: torch.Tensor | None) -> None:
    """Average ``grad`` over the ranks of the default process group (no-op without one)."""
    import torch.distributed as dist

    if grad is None or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world > 1:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(world)


class SupervisedLearner:
    """LambdaLoss on logged feedback; one :meth:`step` per request batch.

    ``model`` may be DDP-wrapped (Ray Train with several workers): its gradients are
    averaged by the wrapper; the score scale, a parameter outside the model, is averaged
    here, so every rank takes the same optimizer step. ``device``: where the model is
    (batches are moved there)."""

    def __init__(
        self,
        model: nn.Module,
        settings: SupervisedSettings,
        reward: RewardSpec,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.module = getattr(model, "module", model)
        self.settings = settings
        self.reward = reward
        self.device = torch.device(device)
        # Rankings are invariant to a positive rescale of w, but LambdaLoss is not: a free
        # score scale lets the loss sharpen scores without polarizing w (which would saturate
        # the softmax and leave Stage 2 no gradient).
        self.log_scale = nn.Parameter(torch.zeros((), device=self.device))
        self.optimizer = torch.optim.Adam(
            [*self.model.parameters(), self.log_scale], lr=settings.lr
        )

    def loss(self, batch: SessionBatch, ranking_loss: RankingLoss = lambda_loss) -> Stage1Loss:
        """Stage 1's loss on a batch, with its graph (what :meth:`step` descends).

        ``ranking_loss``: ``fn(fused, gains, mask, *, k, temperature)``; training uses
        :func:`lambda_loss` (``grade-ray bench`` times it against the dense reference).
        """
        s = self.settings
        dev = self.device
        scores = as_tensor(batch.scores).to(dev)
        mask = as_tensor(batch.mask).to(dev)
        gains = self.reward.post_gain(as_tensor(batch.labels), as_tensor(batch.position)).to(dev)
        self.model.train()
        logits = self.model(as_tensor(batch.context).to(dev))
        if hasattr(self.module, "stage1_fused"):  # item-aware: per-item weights
            logits, pi, fused = self.module.stage1_fused(
                logits, scores, mask, s.fusion, s.fusion_eps
            )
        else:
            pi = torch.softmax(logits, dim=-1)
            fused = fuse(s.fusion, scores, pi, s.fusion_eps)
        loss = ranking_loss(
            standardize(fused, mask) * self.log_scale.exp(),
            gains,
            mask,
            k=self.reward.k,
            temperature=s.temperature,
        ) + logit_spread_hinge(logits, s.logit_bound)
        return Stage1Loss(loss, pi, fused, gains, mask)

    def step(self, batch: SessionBatch) -> dict[str, float]:
        """One gradient step on a batch; returns loss and the batch's NDCG@k (before the step)."""
        out = self.loss(batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LambdaLoss is {loss.item()}; check the logged scores")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # a DDP model's gradients are averaged over ranks here
        _all_reduce_mean(self.log_scale.grad)  # ... and the score scale's (not in the model)
        self.optimizer.step()
        with torch.no_grad():
            ndcg = ndcg_at_k(out.fused.detach(), out.gains, out.mask, self.reward.k).mean()
        return {
            keys.PRETRAIN_LOSS: float(loss.detach()),
            keys.PRETRAIN_NDCG: float(ndcg),
            "pretrain/score_scale": float(self.log_scale.detach().exp()),
            keys.PRETRAIN_ENTROPY: float(weight_entropy(out.pi.detach()).mean()),
        }
