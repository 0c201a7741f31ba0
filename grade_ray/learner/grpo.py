"""Stage 2 learner: critic-free GRPO on rollout batches (plain class, no Ray).

The Ray Train loop and the single-process loop both drive this class. The
loss lives in one overridable method (:meth:`GRPOLearner.compute_loss`);
optimizer steps, gradient clipping, finiteness checks, metrics and
state_dict live around it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from grade_ray import keys
from grade_ray.algos.exploration import DirichletExploration, safe_log
from grade_ray.algos.losses import POLICY_LOSSES, dirichlet_grpo_loss, grpo_loss, kl_k3
from grade_ray.algos.modulation import exploration_name, get_exploration
from grade_ray.spec import as_tensor


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Scalars the learner needs (resolved from GRPOConfig + ExplorationConfig)."""

    lr: float
    clip_eps: float
    beta: float
    kl_estimator: str
    epochs_per_batch: int
    minibatch_size: int
    grad_clip: float
    exploration: str
    alpha_floor: float
    sigma: float
    loss: str = "grpo"

    @classmethod
    def from_config(cls, cfg) -> GRPOSettings:
        g, e = cfg.grpo, cfg.exploration
        return cls(
            lr=g.lr,
            clip_eps=g.clip_eps,
            beta=g.beta,
            kl_estimator=g.kl_estimator,
            epochs_per_batch=g.epochs_per_batch,
            minibatch_size=g.minibatch_size,
            grad_clip=g.grad_clip,
            exploration=exploration_name(e.kind, cfg.policy.kind == "item_aware"),
            alpha_floor=e.alpha_floor,
            sigma=e.sigma,
        )


_TRAIN_COLUMNS = (keys.CONTEXT, keys.WEIGHTS, keys.OLD_LOGP, keys.ADVANTAGES)
REF_PI = "ref_pi"
"""Minibatch key of pi_ref(context) (B, K): :meth:`GRPOLearner.update` computes the frozen
reference policy once per request and batch, not once per minibatch and epoch;
:meth:`GRPOLearner.compute_loss` runs the reference itself when the key is absent."""
LOG_W = "log_w"
"""Minibatch key of log(w) (B, G, K) of the samples, computed once per batch (the fused
Dirichlet loss reads it; absent, it is computed from keys.WEIGHTS)."""


def check_finite(batch: dict[str, np.ndarray], columns=_TRAIN_COLUMNS) -> None:
    """Raise a clear error if any training input holds NaN/inf (never corrupt weights)."""
    for col in columns:
        a = np.asarray(batch[col])
        if not np.isfinite(a).all():
            n_bad = int((~np.isfinite(a)).sum())
            raise FloatingPointError(
                f"rollout batch column {col!r} holds {n_bad} non-finite value(s); refusing to "
                "update the policy (check the logged scores/labels and exploration.alpha_floor)"
            )


def _synced_minibatches(n: int, minibatch_size: int) -> int:
    """Minibatches per epoch; under torch.distributed the max over ranks (DDP symmetry)."""
    n_mb = -(-n // minibatch_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([n_mb], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        n_mb = int(t.item())
    return n_mb


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam takes these parameters (floating point, CPU or CUDA)."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def _stack_legacy_adam(state: dict, module: nn.Module) -> dict:
    """An Adam state dict saved with the per-expert FusionPolicy of earlier versions
    (4 tensors per expert: experts.{i}.0.weight, .0.bias, .3.weight, .3.bias, then gate and
    tower) -> the same moments for the stacked layout (expert_w1, expert_b1, expert_w2,
    expert_b2, then gate and tower). Any other state dict is returned as it is."""
    w1 = getattr(module, "expert_w1", None)
    groups = state.get("param_groups", [])
    if w1 is None or len(groups) != 1:
        return state
    e, n_now = w1.shape[0], len(list(module.parameters()))
    ids = groups[0]["params"]
    if len(ids) != n_now - 4 + 4 * e:  # 4 tensors per expert instead of 4 stacked ones
        return state
    old, new = state["state"], {}
    if ids[0] in old and old[ids[0]]["exp_avg"].shape == w1.shape:
        return state  # already stacked (with one expert the tensor counts agree)
    for j in range(4):  # the stacked tensors, per-expert moments stacked along dim 0
        per = [old.get(ids[4 * i + j]) for i in range(e)]
        if all(p is not None for p in per):
            new[j] = {
                k: (v if k == "step" else torch.stack([p[k] for p in per]))
                for k, v in per[0].items()
            }
    for j, pid in enumerate(ids[4 * e :]):  # gate and tower: same tensors, same order
        if pid in old:
            new[4 + j] = old[pid]
    return {"state": new, "param_groups": [{**groups[0], "params": list(range(n_now))}]}


class GRPOLearner:
    """GRPO update: -mean min(rho A, clip(rho) A) + beta KL(pi || pi_ref)."""

    def __init__(
        self,
        model: nn.Module,
        settings: GRPOSettings,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.model = model  # possibly DDP-wrapped: call it, not .module, in forward
        self.module = getattr(model, "module", model)
        self.settings = settings
        self.device = torch.device(device)
        self.ref = copy.deepcopy(self.module).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        params = list(self.model.parameters())
        # fused: one kernel for all parameters instead of ~10 small ops per tensor (the same
        # Adam update; its per-op overhead was ~10% of a 512-request CPU step)
        self.fused_adam = _can_fuse(params)
        self.optimizer = torch.optim.Adam(params, lr=settings.lr, fused=self.fused_adam)
        self.explore = get_exploration(settings.exploration)
        self.policy_loss = POLICY_LOSSES.get(settings.loss)
        # Dirichlet exploration + GRPO + exact KL (the defaults): one fused loss op with a
        # hand-written gradient (dirichlet_grpo_loss) instead of ~150 small autograd ops
        self.fused_loss = (
            type(self.explore) is DirichletExploration  # a subclass may change log_prob / kl
            and self.policy_loss is grpo_loss
            and settings.kl_estimator == "exact"
        )
        self.version = 0
        self.generator = torch.Generator().manual_seed(seed)  # minibatch order

    def sync_reference(self) -> None:
        """pi_ref <- pi_theta (start of each training round)."""
        self.ref.load_state_dict(self.module.state_dict())

    def _pi(self, model: nn.Module, context: torch.Tensor) -> torch.Tensor:
        params = getattr(self.module, "exploration_params", None)  # item-aware: [pi, c, sigma]
        if params is not None:
            return params(model(context))
        return torch.softmax(model(context), dim=-1)

    def compute_loss(
        self, mb: dict[str, torch.Tensor], alpha_hat: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one minibatch; override this (and only this) to change the objective."""
        s = self.settings
        pi = self._pi(self.model, mb[keys.CONTEXT])
        pi_ref = mb.get(REF_PI)
        if pi_ref is None:
            with torch.no_grad():
                pi_ref = self._pi(self.ref, mb[keys.CONTEXT])
        if self.fused_loss:
            log_w = mb.get(LOG_W)
            return dirichlet_grpo_loss(
                pi,
                pi_ref,
                safe_log(mb[keys.WEIGHTS]) if log_w is None else log_w,
                mb[keys.OLD_LOGP],
                mb[keys.ADVANTAGES],
                alpha_hat,
                floor=s.alpha_floor,
                clip_eps=s.clip_eps,
                beta=s.beta,
            )
        logp = self.explore.log_prob(
            pi, mb[keys.WEIGHTS], alpha_hat, floor=s.alpha_floor, sigma=s.sigma
        )
        if s.kl_estimator == "exact":
            kl = self.explore.kl(pi, pi_ref, alpha_hat, floor=s.alpha_floor, sigma=s.sigma)
        else:
            ref_logp = self.explore.log_prob(
                pi_ref, mb[keys.WEIGHTS], alpha_hat, floor=s.alpha_floor, sigma=s.sigma
            )
            kl = kl_k3(logp, ref_logp)
        return self.policy_loss(
            logp, mb[keys.OLD_LOGP], mb[keys.ADVANTAGES], kl, clip_eps=s.clip_eps, beta=s.beta
        )

    def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """epochs_per_batch passes of minibatch steps over one rollout batch; returns means."""
        check_finite(batch)
        s = self.settings
        alpha_hat = float(batch[keys.ALPHA_HAT])
        tensors = {c: as_tensor(np.asarray(batch[c])).to(self.device) for c in _TRAIN_COLUMNS}
        n = tensors[keys.CONTEXT].shape[0]
        n_mb = _synced_minibatches(n, s.minibatch_size)
        # Rollouts sample in eval mode; the ratio and the KL must see the same policy (with
        # dropout, train mode would put the first update off ratio 1 and KL off 0).
        self.model.eval()
        tensors.update(self._batch_columns(tensors))
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(s.epochs_per_batch):
            # every DDP rank runs n_mb minibatches; a rank with fewer rows reuses some
            order = torch.randperm(n, generator=self.generator).repeat(
                -(-n_mb * s.minibatch_size // n)
            )
            size = -(-n // n_mb) if n_mb else 0
            for j in range(n_mb):
                idx = order[j * size : (j + 1) * size].to(self.device)
                stats = self._step({c: t[idx] for c, t in tensors.items()}, alpha_hat)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                steps += 1
        self.version += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def _batch_columns(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Columns computed once per batch instead of per minibatch: pi_ref (frozen for the
        whole update) and, for the fused loss, the samples' logs."""
        with torch.no_grad():
            cols = {REF_PI: self._pi(self.ref, tensors[keys.CONTEXT])}
        if self.fused_loss:
            cols[LOG_W] = safe_log(tensors[keys.WEIGHTS])
        return cols

    def _step(self, mb: dict[str, torch.Tensor], alpha_hat: float) -> dict[str, float]:
        loss, stats = self.compute_loss(mb, alpha_hat)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"GRPO loss is {loss.item()}; weights left unchanged")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite gradient norm; weights left unchanged")
        self.optimizer.step()
        return {
            keys.LEARNER_LOSS: float(loss.detach()),
            keys.LEARNER_PG_LOSS: float(stats["pg_loss"]),
            keys.LEARNER_KL: float(stats["kl"]),
            keys.LEARNER_CLIP_FRAC: float(stats["clip_frac"]),
            keys.LEARNER_RATIO_MEAN: float(stats["ratio_mean"]),
            keys.LEARNER_GRAD_NORM: float(grad_norm),
        }

    def policy_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the policy weights (what rollout workers load)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def state_dict(self) -> dict:
        return {
            "policy": self.module.state_dict(),
            "ref": self.ref.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        state = {**state, "optimizer": _stack_legacy_adam(state["optimizer"], self.module)}
        self.module.load_state_dict(state["policy"])
        self.ref.load_state_dict(state["ref"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.fused_adam:  # a state saved by the for-loop Adam carries fused=None
            for group in self.optimizer.param_groups:
                group["fused"], group["foreach"] = True, None
        self.version = int(state["version"])
        self.generator.set_state(state["generator"])
