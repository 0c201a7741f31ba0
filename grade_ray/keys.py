"""Batch column and metric names, defined once and imported everywhere."""

# Rollout batch columns (numpy arrays, leading dim B = requests in the batch).
CONTEXT = "context"  # (B, D) float32
WEIGHTS = "weights"  # (B, G, K) float32 sampled weight vectors
OLD_LOGP = "old_logp"  # (B, G) float32 log-density of WEIGHTS under the rollout policy
ADVANTAGES = "advantages"  # (B, G) float32 group-relative advantages
REWARD = "reward"  # (B, G) float32 composite reward
R_POST = "r_post"  # (B, G)
R_PRIOR = "r_prior"  # (B, G)
R_FORMAT = "r_format"  # (B, G)
ZERO_VAR = "zero_var"  # (B,) bool: group with no reward variance
REQUEST_ID = "request_id"  # (B,) int64
POLICY_VERSION = "policy_version"  # int: version of the weights that sampled this batch
ALPHA_HAT = "alpha_hat"  # float: concentration used for this batch

# Metric names (flat "section/name" keys in metrics.csv and TensorBoard).
ROUND = "round"
STEP = "step"
ROLLOUT_REWARD = "rollout/reward"
ROLLOUT_R_POST = "rollout/r_post"
ROLLOUT_R_PRIOR = "rollout/r_prior"
ROLLOUT_R_FORMAT = "rollout/r_format"
ROLLOUT_ZERO_VAR_FRAC = "rollout/zero_var_frac"
ROLLOUT_GROUP_REWARD_STD = "rollout/group_reward_std"  # mean over requests of the G rewards' std
ROLLOUT_NEAR_ZERO_ADV_FRAC = (
    "rollout/near_zero_adv_frac"  # share of samples with |A| < NEAR_ZERO_ADV
)
ROLLOUT_ALPHA_HAT = "rollout/alpha_hat"
ROLLOUT_REQUESTS = "rollout/requests"
LEARNER_LOSS = "learner/loss"
LEARNER_PG_LOSS = "learner/pg_loss"
LEARNER_KL = "learner/kl"
LEARNER_CLIP_FRAC = "learner/clip_frac"
LEARNER_GRAD_NORM = "learner/grad_norm"
LEARNER_RATIO_MEAN = "learner/ratio_mean"
POLICY_ENTROPY = "policy/weight_entropy"
POLICY_POLARIZED = "policy/polarized_frac"
POLICY_SPREAD = "policy/user_spread"
POLICY_MEAN_W = "policy/mean_w"  # + "/<task>"
SEGMENT_MEAN_W = "segment"  # "segment/<name>/w_<task>"
PERF_REQUESTS_PER_S = "perf/requests_per_s"
PERF_ROUND_S = "perf/round_s"
PRETRAIN_LOSS = "pretrain/loss"
PRETRAIN_NDCG = "pretrain/ndcg"
PRETRAIN_ENTROPY = "pretrain/weight_entropy"
PRETRAIN_REQUESTS = "pretrain/requests"
PRETRAIN_WORKER_PID = "pretrain/worker_pid"  # the process of (rank 0 of) Stage 1's epoch
PERF_STAGE1_REQUESTS_PER_S = "perf/stage1_requests_per_s"
EVAL_NDCG = "eval/ndcg"
EVAL_REWARD = "eval/reward"
