"""Mutation check: plant known bugs one at a time and see that the tests catch each.

    python scripts/mutants.py                 # all mutations (make mutants)
    python scripts/mutants.py --list          # names, files and covering tests
    python scripts/mutants.py --only NAME ... # some of them
    python scripts/mutants.py --no-baseline   # skip the unmutated run of the covering tests

Each mutation is an exact source-text replacement in one file of ``grade_ray/``, applied to
a temporary COPY of the repository (package, tests, configs, pyproject.toml); the working
tree is never touched. For each mutation only the tests listed with it run (``pytest -x``
in the copy, ``PYTHONPATH`` pointing at the copy so Ray actors and subprocesses import the
mutated package too). A mutation is *caught* when those tests fail (or time out).

If a mutation's original text is not found exactly once, the script says so loudly and
counts it as an ERROR (code moved: update the list here), never as skipped. Before the
mutations, the union of all covering tests runs once on the unmutated copy (the baseline):
a test that fails without a mutation would make every mutation look caught, so a failing
baseline stops the run.

Prints a table (mutation, file, tests, result, seconds) and the score; exits 0 only when
every mutation is caught and there are no errors. Takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("grade_ray", "tests", "configs")
COPY_FILES = ("pyproject.toml",)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to grade_ray/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids relative to the repository root
    why: str = ""


T_LEARNER = "tests/learner/test_grpo_learner.py"
T_WORKER = "tests/rollout/test_worker.py"
T_LOCAL = "tests/learner/test_local_run.py"
T_STEPS = "tests/learner/test_trainer_steps.py"
T_CHUNKS = "tests/data/test_schema_chunks.py"
T_RAY = "tests/jobs/test_train_ray.py"
T_SERVE = "tests/serving/test_service_mutants.py"
T_HEAD = "tests/jobs/test_headroom.py"
T_FIT = "tests/learner/test_reward_fit.py"

MUTATIONS: list[Mutation] = [
    # -- algos ------------------------------------------------------------------------------
    Mutation(
        "grpo-loss-sign",
        "algos/losses.py",
        "\n    pg_loss = -torch.minimum(surr, surr_clipped).mean()",
        "\n    pg_loss = torch.minimum(surr, surr_clipped).mean()",
        ("tests/algos/test_losses.py::test_grpo_loss_by_hand",),
        "the composed GRPO loss climbs",
    ),
    Mutation(
        "fused-grpo-gradient-sign",
        "algos/losses.py",
        "torch.full_like(surr, -1.0 / logp.numel())",
        "torch.full_like(surr, 1.0 / logp.numel())",
        (f"{T_LEARNER}::test_update_on_a_fixed_batch_raises_the_reward_of_fresh_samples",),
        "the learner (fused loss, the default) climbs the loss",
    ),
    Mutation(
        "fused-loss-clipped-samples",
        "algos/losses.py",
        ".masked_fill_(clipped, 0.0) * adv",
        " * adv",
        (
            "tests/algos/test_losses.py::test_fused_dirichlet_grpo_equals_the_composed_loss_in_value_stats_and_gradient",
        ),
        "the fused gradient flows through samples whose clipped term is the minimum",
    ),
    Mutation(
        "kl-penalty-sign",
        "algos/losses.py",
        "\n    loss = pg_loss + beta * kl_mean",
        "\n    loss = pg_loss - beta * kl_mean",
        ("tests/algos/test_losses.py::test_grpo_loss_by_hand",),
        "KL rewarded instead of penalised",
    ),
    Mutation(
        "fused-kl-gradient-sign",
        "algos/losses.py",
        "d_a = d_a + (beta / kl.numel()) * d_kl",
        "d_a = d_a - (beta / kl.numel()) * d_kl",
        (
            "tests/algos/test_losses.py::test_fused_dirichlet_grpo_equals_the_composed_loss_in_value_stats_and_gradient",
        ),
        "the fused gradient rewards the KL",
    ),
    Mutation(
        "format-gate-strict",
        "algos/rewards.py",
        "return base + l3 * r_format * (base >= tau).to(base.dtype)",
        "return base + l3 * r_format * (base > tau).to(base.dtype)",
        ("tests/algos/test_rewards.py::test_composite_reward_gate_is_inclusive_at_tau",),
        "R_format gate >= becomes >",
    ),
    Mutation(
        "std-advantage-variance",
        "algos/advantages.py",
        "return ((rewards.to(torch.float64) - mean) / (std + eps)).to(rewards.dtype)",
        "return ((rewards.to(torch.float64) - mean) / (std * std + eps)).to(rewards.dtype)",
        ("tests/algos/test_advantages.py",),
        "advantages divided by the variance",
    ),
    # -- learner ----------------------------------------------------------------------------
    Mutation(
        "learner-loss-sign",
        "learner/grpo.py",
        "logp, mb[keys.OLD_LOGP], mb[keys.ADVANTAGES], kl, clip_eps=s.clip_eps, beta=s.beta",
        "logp, mb[keys.OLD_LOGP], -mb[keys.ADVANTAGES], kl, clip_eps=s.clip_eps, beta=s.beta",
        # the composed (non-fused) loss: the reference learner's, compared with the fused one
        ("tests/learner/test_grpo_reference.py::test_updates_equal_the_reference_learner",),
        "GRPOLearner.compute_loss flips the sign (composed loss)",
    ),
    Mutation(
        "learner-fused-loss-sign",
        "learner/grpo.py",
        "                mb[keys.ADVANTAGES],\n                alpha_hat,",
        "                -mb[keys.ADVANTAGES],\n                alpha_hat,",
        (f"{T_LEARNER}::test_update_on_a_fixed_batch_raises_the_reward_of_fresh_samples",),
        "GRPOLearner.compute_loss flips the sign (fused Dirichlet loss, the default)",
    ),
    Mutation(
        "sync-reference-noop",
        "learner/grpo.py",
        "self.ref.load_state_dict(self.module.state_dict())",
        "pass",
        (f"{T_LEARNER}::test_sync_reference_makes_the_reference_the_current_policy",),
        "sync_reference does nothing",
    ),
    Mutation(
        "learner-optimizer-not-restored",
        "learner/grpo.py",
        '        self.optimizer.load_state_dict(state["optimizer"])\n',
        "",
        (f"{T_LEARNER}::test_loaded_state_continues_exactly_like_the_saved_learner",),
        "GRPOLearner.load_state_dict forgets Adam's moments",
    ),
    Mutation(
        "learner-order-not-restored",
        "learner/grpo.py",
        '        self.generator.set_state(state["generator"])\n',
        "",
        (f"{T_LEARNER}::test_loaded_state_continues_exactly_like_the_saved_learner",),
        "GRPOLearner.load_state_dict forgets the minibatch order",
    ),
    Mutation(
        "learner-seed-random",
        "learner/grpo.py",
        "self.generator = torch.Generator().manual_seed(seed)  # minibatch order",
        "self.generator = torch.Generator().manual_seed(int.from_bytes(__import__('os').urandom(4), 'little'))",
        (f"{T_LOCAL}::test_training_is_deterministic_given_the_seed",),
        "minibatch order not seeded (training not reproducible)",
    ),
    Mutation(
        "non-finite-batch-accepted",
        "learner/grpo.py",
        "        if not np.isfinite(a).all():\n",
        "        if False:\n",
        ("tests/learner/test_learners.py::test_non_finite_inputs_raise_and_leave_weights",),
        "NaN advantages reach the optimizer",
    ),
    Mutation(
        "ddp-minibatches-not-synced",
        "learner/grpo.py",
        "if torch.distributed.is_available() and torch.distributed.is_initialized():",
        "if False:",
        ("tests/learner/test_ddp.py::test_unequal_shards_step_the_same_number_of_times",),
        "DDP ranks with fewer rows run fewer minibatches (all-reduce deadlock)",
    ),
    Mutation(
        "trainer-learner-not-restored",
        "learner/loop.py",
        '        self.learner.load_state_dict(state["learner"])\n',
        "",
        (f"{T_LOCAL}::test_stopped_run_resumes_to_the_uninterrupted_result",),
        "learner state not restored on resume",
    ),
    Mutation(
        "trainer-alpha-schedule-restarts",
        "learner/loop.py",
        '"steps_done": self.steps_done,',
        '"steps_done": 0,',
        (f"{T_LOCAL}::test_stopped_run_resumes_to_the_uninterrupted_result",),
        "a resumed run restarts the alpha schedule",
    ),
    Mutation(
        "trainer-alpha-constant",
        "learner/loop.py",
        "progress = self.steps_done / max(self.total_steps - 1, 1)",
        "progress = 0.0",
        (f"{T_LOCAL}::test_run_dir_contents_and_diagnostics",),
        "the exploration schedule never advances",
    ),
    Mutation(
        "probe-scores-uniform",
        "learner/loop.py",
        "fused = fuse(self.cfg.policy.fusion, scores, pi, self.cfg.policy.fusion_eps)",
        "fused = fuse(self.cfg.policy.fusion, scores, torch.full_like(pi, 1.0 / pi.shape[-1]),"
        " self.cfg.policy.fusion_eps)",
        ("tests/learner/test_probe.py::test_simulator_probe_north_star_is_the_policys",),
        "the held-out probe scores uniform weights instead of the policy",
    ),
    Mutation(
        "probe-without-positions",
        "learner/loop.py",
        "self.spec.post_gain(as_tensor(b.labels), as_tensor(b.position)),",
        "self.spec.post_gain(as_tensor(b.labels)),",
        ("tests/learner/test_probe.py::test_logs_probe_ndcg_uses_the_policy_and_logged_positions",),
        "the logs probe drops propensity weighting",
    ),
    Mutation(
        "weights-not-synced-to-rollouts",
        "learner/loop.py",
        "            self.backend.set_weights(self.learner.policy_state(), self.learner.version)"
        "  # sync\n",
        "",
        (f"{T_STEPS}::test_max_staleness_bounds_the_lag_and_uses_every_request_once",),
        "rollouts never receive the updated weights",
    ),
    Mutation(
        "staleness-window-too-wide",
        "learner/loop.py",
        "len(pending) <= self.cfg.rollout.max_staleness",
        "len(pending) <= self.cfg.rollout.max_staleness + 1",
        (f"{T_STEPS}::test_max_staleness_bounds_the_lag_and_uses_every_request_once",),
        "rollouts run two versions ahead",
    ),
    Mutation(
        "staleness-check-off-by-one",
        "learner/loop.py",
        "if lag > self.cfg.rollout.max_staleness:",
        "if lag > self.cfg.rollout.max_staleness + 1:",
        (f"{T_STEPS}::test_a_batch_older_than_the_bound_is_refused",),
        "a batch past the staleness bound is used",
    ),
    Mutation(
        "ranks-overlap",
        "data/plan.py",
        "return [split_for_ranks(s, world, setting)[rank::world] for s in steps]",
        "return [split_for_ranks(s, world, setting)[rank:] for s in steps]",
        (f"{T_STEPS}::test_ranks_share_each_step_and_use_every_request_once",),
        "learner ranks train on the same requests",
    ),
    # -- rollout ----------------------------------------------------------------------------
    Mutation(
        "advantages-from-r-post",
        "rollout/worker.py",
        'adv, zero_var = group_advantages(r["reward"], s.advantage)',
        'adv, zero_var = group_advantages(r["post"], s.advantage)',
        (f"{T_WORKER}::test_advantages_are_the_composite_rewards_group_advantages",),
        "advantages from R_post only instead of the composite reward",
    ),
    Mutation(
        "logged-positions-dropped",
        "rollout/worker.py",
        "s.reward.post_gain(as_tensor(batch.labels), as_tensor(batch.position)),",
        "s.reward.post_gain(as_tensor(batch.labels)),",
        (f"{T_WORKER}::test_advantages_are_the_composite_rewards_group_advantages",),
        "R_post without propensity weighting",
    ),
    Mutation(
        "rollout-version-tag",
        "rollout/worker.py",
        "keys.POLICY_VERSION: np.int64(self.version),",
        "keys.POLICY_VERSION: np.int64(0),",
        (f"{T_WORKER}::test_samples_come_from_the_current_weights_and_seed",),
        "batches carry the wrong policy version",
    ),
    Mutation(
        "reseed-ignored",
        "rollout/worker.py",
        "        self.generator.manual_seed(int(seed))\n",
        "        pass\n",
        (f"{T_WORKER}::test_samples_come_from_the_current_weights_and_seed",),
        "a task's samples depend on what the worker ran before",
    ),
    Mutation(
        "restarted-actor-keeps-stale-weights",
        "rollout/actor.py",
        "if version != self.worker.version:",
        "if version == self.worker.version + 1:",
        (f"{T_RAY}::test_killed_actor_task_is_redone_exactly_once_with_the_current_weights",),
        "a restarted rollout actor never reloads the weights",
    ),
    Mutation(
        "fresh-actor-trusts-its-init",
        "rollout/actor.py",
        "        self.worker = RolloutWorker(policy, spec)\n",
        "        self.worker = RolloutWorker(policy, spec)\n        self.worker.version = 0\n",
        (f"{T_RAY}::test_killed_actor_task_is_redone_exactly_once_with_the_current_weights",),
        "a new actor samples version 0 with its own random weights",
    ),
    Mutation(
        "actor-results-out-of-order",
        "rollout/actor.py",
        "out[i :: len(self.actors)] = part",
        "out[i * len(part) : (i + 1) * len(part)] = part",
        (f"{T_RAY}::test_actors_run_ahead_within_max_staleness",),
        "batches from several actors come back in the wrong task order",
    ),
    # -- data -------------------------------------------------------------------------------
    Mutation(
        "group-spread-across-requests",
        "rollout/worker.py",
        "float(out[keys.REWARD].std(axis=1).mean())",
        "float(out[keys.REWARD].std(axis=0).mean())",
        (f"{T_WORKER}::test_summary_reports_the_spread_within_groups_and_near_zero_advantages",),
        "the group-reward spread taken across requests instead of within each group",
    ),
    Mutation(
        "nan-labels-accepted",
        "data/validation.py",
        "_any_per_row(_any_per_row(~np.isfinite(vals), inner_len), outer),",
        "_any_per_row(_any_per_row(~np.isfinite(vals), inner_len), outer) & (col == SCORES),",
        ("tests/data/test_schema.py::test_bad_input_names_file_row_column",),
        "NaN/inf in labels no longer rejected",
    ),
    Mutation(
        "error-row-without-offset",
        "data/validation.py",
        'f"{file}: row {row_offset + int(idx[0])}, column {col!r}: "',
        'f"{file}: row {int(idx[0])}, column {col!r}: "',
        (f"{T_CHUNKS}::test_error_names_the_absolute_row",),
        "row 808 reported for row 9000",
    ),
    Mutation(
        "read-offset-stuck",
        "data/reading.py",
        "                offset += rb.num_rows\n",
        "                offset += 0\n",
        (f"{T_CHUNKS}::test_plan_names_every_row_exactly_once",),
        "the read offset never advances",
    ),
    Mutation(
        "rejects-rows-without-offset",
        "data/validation.py",
        "[flags.text(int(i)) for i in idx], file, idx + row_offset",
        "[flags.text(int(i)) for i in idx], file, idx",
        (f"{T_CHUNKS}::test_reject_mode_across_chunks",),
        "rejected rows numbered within their chunk",
    ),
    Mutation(
        "plan-rows-without-offset",
        "data/reading.py",
        "return np.flatnonzero(self.kept).astype(np.int64) + self.offset",
        "return np.flatnonzero(self.kept).astype(np.int64)",
        (f"{T_CHUNKS}::test_plan_names_every_row_exactly_once",),
        "the plan names chunk rows instead of file rows",
    ),
    Mutation(
        "plan-drops-a-row-per-task",
        "data/plan.py",
        "part = run[start : start + batch_size]",
        "part = run[start : start + batch_size - 1]",
        ("tests/learner/test_learners.py::test_plan_covers_every_row_once_in_time_order",),
        "each task loses its last request",
    ),
    Mutation(
        "plan-one-window",
        "data/plan.py",
        "window = windows[r % len(windows)]",
        "window = windows[0]",
        ("tests/learner/test_learners.py::test_plan_covers_every_row_once_in_time_order",),
        "every round trains on the first day",
    ),
    Mutation(
        "cache-rows-unmapped",
        "data/plan.py",
        "idx = np.searchsorted(source_rows, task.rows)",
        "idx = np.minimum(task.rows, len(source_rows) - 1)",
        (f"{T_CHUNKS}::test_plan_with_rejects_and_cache_across_chunks",),
        "cached rows read by file row number although rejected rows are missing",
    ),
    # -- jobs/evaluate ----------------------------------------------------------------------
    Mutation(
        "eval-policy-arm-uniform",
        "jobs/evaluate.py",
        "        return policy.pi(x).numpy()",
        "        return np.full((len(batch), policy.num_tasks), 1.0 / policy.num_tasks, np.float32)",
        (f"{T_LOCAL}::test_evaluate_scores_the_runs_policy",),
        "evaluation scores uniform weights for the trained arms",
    ),
    Mutation(
        "eval-offline-without-positions",
        "jobs/evaluate.py",
        "post = ndcg_at_k(fused, spec.post_gain(labels, as_tensor(batch.position)), mask, spec.k)",
        "post = ndcg_at_k(fused, spec.post_gain(labels), mask, spec.k)",
        (f"{T_LOCAL}::test_evaluate_scores_the_runs_policy",),
        "offline R_post without propensity weighting",
    ),
    Mutation(
        "eval-best-static-argmin",
        "jobs/replay.py",
        "return self.grid[int(self.rewards.mean(0).argmax())]",
        "return self.grid[int(self.rewards.mean(0).argmin())]",
        (f"{T_LOCAL}::test_best_static_weights_beat_every_grid_point",),
        "the A/B control is the worst static weights",
    ),
    Mutation(
        "eval-headroom-denominator",
        "jobs/headroom.py",
        "captured_segment={a: share(v - s, o_seg - s) for a, v in ns.items()},",
        "captured_segment={a: share(v - s, o_seg) for a, v in ns.items()},",
        (f"{T_LOCAL}::test_evaluate_all_arms", f"{T_HEAD}::test_headroom_shares_by_hand"),
        "headroom not a share of the oracle's gap",
    ),
    Mutation(
        "attainable-headroom-vs-segment-oracle",
        "jobs/headroom.py",
        "captured={a: share(v - s, gap) for a, v in ns.items()},",
        "captured={a: share(v - s, o_seg - s) for a, v in ns.items()},",
        (f"{T_HEAD}::test_headroom_shares_by_hand",),
        "attainable headroom measured against the unattainable segment oracle",
    ),
    Mutation(
        "reward-oracle-wrong-segments",
        "jobs/headroom.py",
        "segments = sim.users.segment[batch.user_id]",
        "segments = np.zeros_like(sim.users.segment[batch.user_id])",
        (
            f"{T_HEAD}::test_reward_oracle_matches_the_true_oracle_when_the_reward_is_the_north_star",
        ),
        "reward oracle pools every segment",
    ),
    Mutation(
        "policy-equal-to-sp-unflagged",
        "jobs/headroom.py",
        'if policy in weights and "SP" in weights and same_weights(weights[policy], weights["SP"]):',
        'if policy in weights and "SP" in weights and not same_weights(weights[policy], weights["SP"]):',
        (f"{T_HEAD}::test_diagnosis_flags_a_policy_equal_to_sp",),
        "a GRADE equal to SP goes unflagged",
    ),
    Mutation(
        "posterior-ignores-intent-covariance",
        "data/simulator.py",
        "np.eye(self.cfg.context_dim) + c**2 * pop.ctx_intent.T @ pop.ctx_intent",
        "np.eye(self.cfg.context_dim) + 0.0 * pop.ctx_intent.T @ pop.ctx_intent",
        ("tests/data/test_oracles.py::test_segment_posterior_is_calibrated",),
        "the attainable oracle's posterior is overconfident",
    ),
    Mutation(
        "dataset-scale-ignored",
        "algos/rewards.py",
        "out[name] = dcg / scale if scale else ndcg_from_dcg(dcg, ideal_dcg_at_k(g, m, k))",
        "out[name] = ndcg_from_dcg(dcg, ideal_dcg_at_k(g, m, k))",
        (f"{T_FIT}::test_dataset_normalization_divides_dcg_by_one_constant",),
        "reward.normalization=dataset silently gives NDCG",
    ),
    Mutation(
        "calibration-without-examination",
        "learner/reward_fit.py",
        "log_exam = log_exam_all if given is None else torch.zeros_like(log_exam_all)",
        "log_exam = torch.zeros_like(log_exam_all)",
        (f"{T_FIT}::test_fitted_calibration_tracks_true_rates_better_than_the_raw_model",),
        "pCTR recalibrated to position-biased click rates",
    ),
    Mutation(
        "calibration-not-applied",
        "spec.py",
        "scores = apply_calibration(scores, context, self.calibration)",
        "scores = scores",
        (f"{T_WORKER}::test_advantages_are_the_composite_rewards_group_advantages",),
        "R_prior ignores the fitted calibration",
    ),
    Mutation(
        "stage1-score-scale-not-all-reduced",
        "learner/supervised.py",
        "        _all_reduce_mean(self.log_scale.grad)",
        "        pass",
        (
            "tests/learner/test_stage1_ddp.py::"
            "test_two_ranks_step_like_one_process_on_the_mean_of_both_halves",
        ),
        "DDP ranks' Stage 1 score scales drift apart",
    ),
    Mutation(
        "stage1-restart-from-scratch",
        "jobs/train_ray.py",
        'if restart is not None and restart.get("stage") == 1:',
        "if False:",
        ("tests/jobs/test_stage1_ray.py::test_stage1_failure_restarts_after_the_last_epoch",),
        "a restarted Train worker group redoes Stage 1 from epoch 0",
    ),
    Mutation(
        "logit-bound-ignored",
        "learner/supervised.py",
        ") + logit_spread_hinge(logits, s.logit_bound)",
        ") + logit_spread_hinge(logits, 0.0)",
        ("tests/learner/test_saturation.py::test_logit_bound_keeps_stage2_able_to_move",),
        "Stage 1 saturates the softmax",
    ),
    Mutation(
        "stalled-stage2-unwarned",
        "learner/diagnostics.py",
        "if grad is not None and grad < STALLED_GRAD_NORM:",
        "if grad is not None and grad < 0.0:",
        (
            "tests/learner/test_saturation.py::"
            "test_saturated_stage1_stalls_stage2_and_the_round_says_why",
        ),
        "a round with zero gradient passes without a word",
    ),
    Mutation(
        "batch-advantage-per-group",
        "algos/advantages.py",
        "return (centred / (centred.pow(2).mean().sqrt() + eps)).to(rewards.dtype)",
        "return (centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(rewards.dtype)",
        (
            "tests/algos/test_advantages.py::test_batch_advantage_by_hand_keeps_requests_relative_scale",
        ),
        "batch advantages re-weight every request to unit variance",
    ),
    Mutation(
        "k3-unbounded",
        "algos/losses.py",
        "return (torch.exp(delta) - 1.0 - delta).clamp(0.0, bound)",
        "return torch.exp(delta) - 1.0 - delta",
        ("tests/algos/test_losses.py::test_kl_k3_is_bounded_in_the_reference_tail",),
        "one tail sample swamps the KL",
    ),
    Mutation(
        "learner-train-mode",
        "learner/grpo.py",
        "        self.model.eval()\n",
        "        self.model.train()\n",
        ("tests/learner/test_stage2_modes.py",),
        "with dropout the first update is off-policy",
    ),
    Mutation(
        "lambda-pairs-counted-twice",
        "algos/losses.py",
        "weight = below.neg_().add_(disc.view(-1)[anchor].unsqueeze(-1)).clamp_min_(0.0)",
        "weight = below.neg_().add_(disc.view(-1)[anchor].unsqueeze(-1)).abs_()",
        (
            "tests/algos/test_losses.py::test_lambda_loss_pairs_from_positive_or_top_rows_equal_all_pairs",
        ),
        "top-k rows pair items ranked above the anchor too: pairs counted twice",
    ),
    Mutation(
        "lambda-padded-pairs",
        "algos/losses.py",
        "g_real = g_norm.masked_fill(~m, math.inf)",
        "g_real = g_norm",
        (
            "tests/algos/test_losses.py::test_lambda_loss_pairs_from_positive_or_top_rows_equal_all_pairs",
        ),
        "padded candidates paired with positive items",
    ),
    Mutation(
        "lambda-positive-rows-below-top",
        "algos/losses.py",
        "for anchor in (positive & in_top, positive & ~in_top):",
        "for anchor in (positive & in_top,):",
        (
            "tests/algos/test_losses.py::test_lambda_loss_pairs_from_positive_or_top_rows_equal_all_pairs",
        ),
        "positive items ranked below the top k lose their pairs with the top k",
    ),
    # -- serving ----------------------------------------------------------------------------
    Mutation(
        "serving-rank-ascending",
        "serving/service.py",
        'return np.argsort(-fused, axis=1, kind="stable")',
        'return np.argsort(fused, axis=1, kind="stable")',
        (f"{T_SERVE}::test_rank_is_best_first_and_masked_candidates_last",),
        "serving ranks worst first",
    ),
    Mutation(
        "serving-padding-scored",
        "serving/service.py",
        "return np.where(m, fused.numpy(), np.float32(-np.inf))",
        "return fused.numpy()",
        (f"{T_SERVE}::test_rank_is_best_first_and_masked_candidates_last",),
        "padded candidates can outrank real ones",
    ),
    Mutation(
        "serving-nan-context-accepted",
        "serving/service.py",
        "bad = ~np.isfinite(x).all(axis=1)",
        "bad = np.zeros(len(x), dtype=bool)",
        (f"{T_SERVE}::test_bad_requests_are_refused",),
        "NaN context gives an answer instead of an error",
    ),
    Mutation(
        "infer-ranking-lengths",
        "serving/infer.py",
        "keep = np.arange(order.shape[1])[None, :] < lengths[:, None]",
        "keep = np.arange(order.shape[1])[None, :] <= lengths[:, None]",
        (f"{T_SERVE}::test_infer_writes_every_request_with_its_ranking",),
        "infer output rankings shifted into the next request",
    ),
    # -- item-aware policy (policy.kind=item_aware) -----------------------------------------
    Mutation(
        "item-weights-softmax-of-w",
        "algos/modulation.py",
        "return w * torch.exp(c.clamp(-C_CLIP, C_CLIP) * phi)",
        "return torch.exp(w + c.clamp(-C_CLIP, C_CLIP) * phi)",
        (
            "tests/algos/test_modulation.py::test_zero_modulation_ranks_like_the_item_agnostic_fusion",
        ),
        "softmax(w + c phi) instead of softmax(log w + c phi): c = 0 no longer gives w",
    ),
    Mutation(
        "joint-logprob-drops-modulation",
        "algos/modulation.py",
        "return lp + _gauss_logpdf(cs.to(c.dtype), c.unsqueeze(1), sd.unsqueeze(1))",
        "return lp",
        (
            "tests/algos/test_modulation.py::test_joint_log_prob_matches_torch_distributions",
            "tests/learner/test_item_aware.py::test_stage2_gradients_reach_the_modulation",
        ),
        "the ratio ignores the sampled modulation: c gets no Stage 2 gradient",
    ),
    Mutation(
        "joint-kl-drops-modulation",
        "algos/modulation.py",
        "return kl_w + 0.5 * ((cp - cq) ** 2).sum(-1) / sd.squeeze(-1) ** 2",
        "return kl_w",
        ("tests/algos/test_modulation.py::test_joint_kl_matches_torch_distributions",),
        "the KL to the reference does not hold c back",
    ),
    Mutation(
        "stage1-modulation-detached",
        "models/item_aware.py",
        "return logits, pi, modulated_fusion(fusion, scores, mask, pi, c, eps)",
        "return logits, pi, modulated_fusion(fusion, scores, mask, pi, c.detach(), eps)",
        ("tests/learner/test_item_aware.py::test_stage1_gradients_reach_both_heads",),
        "Stage 1 never trains the modulation",
    ),
    Mutation(
        "rollout-ignores-item-weights",
        "rollout/worker.py",
        "item_weights=w_items,",
        "item_weights=None,",
        (
            "tests/learner/test_item_aware.py::test_rollout_ranks_each_sample_with_its_per_item_weights",
        ),
        "item-aware samples rewarded as if item-agnostic",
    ),
    Mutation(
        "default-rollout-takes-item-path",
        "rollout/worker.py",
        "if s.item_aware else (w, None)",
        "if True else (w, None)",
        ("tests/learner/test_item_aware.py::test_option_off_leaves_the_default_run_unchanged",),
        "the default (item-agnostic) rollout runs item-aware code",
    ),
    Mutation(
        "export-accepts-item-aware",
        "serving/export.py",
        'if getattr(policy, "item_aware", False):',
        "if False:",
        (
            "tests/learner/test_item_aware.py::test_tiny_item_aware_run_trains_evaluates_and_refuses_export",
        ),
        "an item-aware policy exported as context -> one weight vector",
    ),
]


def check_texts(root: Path, mutations: list[Mutation]) -> dict[str, str]:
    """Mutation name -> problem, for mutations whose original text is not found exactly once
    (or that change nothing)."""
    problems = {}
    for m in mutations:
        path = root / "grade_ray" / m.file
        if not path.exists():
            problems[m.name] = f"file grade_ray/{m.file} does not exist"
            continue
        n = path.read_text().count(m.old)
        if n != 1:
            what = "NOT FOUND" if n == 0 else f"found {n} times"
            problems[m.name] = f"original text {what} in grade_ray/{m.file}: {m.old!r}"
        elif m.old == m.new:
            problems[m.name] = "replacement equals the original"
    return problems


def make_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="grade_ray_mutants_"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for d in COPY:
        shutil.copytree(ROOT / d, tmp / d, ignore=ignore, symlinks=True)
    for f in COPY_FILES:
        shutil.copy2(ROOT / f, tmp / f)
    return tmp


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated file must never be read from a stale .pyc
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def run_tests(copy: Path, tests: list[str], timeout: int) -> tuple[int | None, float, str]:
    """(pytest exit code or None on timeout, seconds, output tail)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", ""]
    cmd += ["--timeout", str(timeout), *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            cwd=copy,
            env=env_for(copy),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout + 120,
        )
        return p.returncode, time.perf_counter() - t0, p.stdout.decode(errors="replace")[-3000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")[-3000:]
        return None, time.perf_counter() - t0, out


def check_import(copy: Path) -> None:
    """The copy's package is the one tests import (not the working tree's)."""
    out = subprocess.run(
        [sys.executable, "-c", "import grade_ray; print(grade_ray.__file__)"],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"mutants: the copy at {copy} imports grade_ray from {out}; refusing to run")


def short(tests: tuple[str, ...]) -> str:
    return ", ".join(t.replace("tests/", "", 1) for t in tests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--timeout", type=int, default=300, help="per-test timeout (s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("-v", "--verbose", action="store_true", help="show why each was caught")
    args = ap.parse_args(argv)

    mutations = MUTATIONS
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        sys.exit("mutants: duplicate mutation names")
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"mutants: unknown mutation(s) {unknown}; see --list")
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:36s} grade_ray/{m.file:22s} {short(m.tests)}")
            if m.why:
                print(f"{'':36s} {m.why}")
        return 0

    t_start = time.perf_counter()
    problems = check_texts(ROOT, mutations)
    for name, why in problems.items():
        print(f"!!! ERROR {name}: {why}", file=sys.stderr)
        print("!!!       the code moved: update scripts/mutants.py", file=sys.stderr)

    copy = make_copy()
    try:
        check_import(copy)
        if not args.no_baseline:
            tests = sorted({t for m in mutations if m.name not in problems for t in m.tests})
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            rc, secs, out = run_tests(copy, tests, args.timeout)
            if rc != 0:
                print(out)
                print(
                    f"mutants: the covering tests fail WITHOUT a mutation (exit {rc}); fix them "
                    "first",
                    file=sys.stderr,
                )
                return 2
            print(f"baseline passed in {secs:.0f}s", flush=True)

        rows = []
        for i, m in enumerate(mutations, 1):
            if m.name in problems:
                rows.append((m, "ERROR", 0.0))
                continue
            path = copy / "grade_ray" / m.file
            original = path.read_text()
            mutated = original.replace(m.old, m.new, 1)
            try:
                compile(mutated, str(path), "exec")
            except SyntaxError as e:
                print(f"!!! ERROR {m.name}: mutated source does not compile: {e}", file=sys.stderr)
                rows.append((m, "ERROR", 0.0))
                continue
            path.write_text(mutated)
            try:
                rc, secs, out = run_tests(copy, list(m.tests), args.timeout)
            finally:
                path.write_text(original)
            if rc is None:
                result = "caught (timeout)"
            elif rc in (1, 2):
                result = "caught"
            elif rc == 0:
                result = "MISSED"
            else:  # 3 internal error, 4 usage error (bad test id), 5 no tests collected
                result = "ERROR"
                print(f"!!! ERROR {m.name}: pytest exit {rc}\n{out[-1500:]}", file=sys.stderr)
            rows.append((m, result, secs))
            print(f"[{i}/{len(mutations)}] {m.name}: {result} ({secs:.0f}s)", flush=True)
            if args.verbose:
                why = [ln for ln in out.splitlines() if ln.startswith(("E ", "FAILED", "ERROR"))]
                print("\n".join("    " + ln[:160] for ln in why[:4]), flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    w_name = max([len("mutation")] + [len(m.name) for m, _, _ in rows])
    w_file = max([len("file")] + [len(m.file) + len("grade_ray/") for m, _, _ in rows])
    print()
    print(f"| {'mutation':{w_name}} | {'file':{w_file}} | result | s | tests |")
    print(f"|{'-' * (w_name + 2)}|{'-' * (w_file + 2)}|---|---:|---|")
    for m, result, secs in rows:
        print(
            f"| {m.name:{w_name}} | {'grade_ray/' + m.file:{w_file}} | {result} | {secs:.0f} "
            f"| {short(m.tests)} |"
        )
    caught = sum(r.startswith("caught") for _, r, _ in rows)
    errors = sum(r == "ERROR" for _, r, _ in rows)
    missed = sum(r == "MISSED" for _, r, _ in rows)
    total = len(rows)
    print()
    print(
        f"score: {caught}/{total} caught ({100 * caught / max(total, 1):.0f}%), "
        f"{missed} missed, {errors} errors; {time.perf_counter() - t_start:.0f}s in all"
    )
    return 0 if caught == total else 1


if __name__ == "__main__":
    sys.exit(main())
