"""Config values are validated when loaded (issue 14, finding 7): learning rates, batch sizes,
non-finite numbers, a ``base:`` cycle and YAML syntax give a ConfigError naming the key or
file, never a crash later."""

from __future__ import annotations

import pytest

from grade_ray.config import ConfigError, UserError, load_config


@pytest.mark.parametrize(
    "override, match",
    [
        ("pretrain.lr=0", "pretrain.lr=0.0 must be > 0"),
        ("pretrain.lr=-1e-3", "pretrain.lr"),
        ("pretrain.batch_size=0", "pretrain.batch_size must be >= 1"),
        ("pretrain.epochs=-1", "pretrain.epochs"),
        ("pretrain.temperature=0", "pretrain.temperature"),
        ("grpo.lr=0", "grpo.lr=0.0 must be > 0"),
        ("grpo.lr=.nan", "grpo.lr must be a finite number"),
        ("grpo.lr=.inf", "grpo.lr must be a finite number"),
        ("reward.l1=.nan", "reward.l1 must be a finite number"),
        ("reward.post_gains={click: .inf}", "reward.post_gains.click must be a finite number"),
        ("grpo.grad_clip=0", "grpo.grad_clip"),
        ("grpo.requests_per_round=-5", "grpo.requests_per_round"),
        ("data.max_candidates=0", "data.max_candidates must be >= 1"),
        ("policy.fusion_eps=0", "policy.fusion_eps"),
        ("eval.bootstrap=0", "eval.ab_requests/bootstrap"),
        ("eval.static_grid_step=0", "eval.static_grid_step"),
        ("learner.max_failures=-1", "learner.max_failures"),
        ("grpo.lr=[1", "not valid YAML"),
        ("simulator.num_eval_requests=-5", "simulator.num_eval_requests"),
        ("data.max_candidates=50", "simulator.num_candidates=100 exceeds data.max_candidates=50"),
        ("exploration.schedule=cosin", "exploration.schedule='cosin': use one of"),
        ("exploration.kind=bogus", "exploration.kind='bogus': use one of"),
        ("policy.fusion=product", "policy.fusion='product': use one of"),
        ("grpo={1: 2}", r"unknown config key\(s\) \['grpo.1'\]"),
        ("grpo={rounds: 3, nope: 1}", r"\['grpo.nope'\]"),
    ],
)
def test_bad_values_are_refused_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


def test_base_cycle_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="base: chain loops") as e:
        load_config([tmp_path / "a.yaml"])
    assert "a.yaml -> " in str(e.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config([tmp_path / "self.yaml"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("seed: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("base: 3\n", "base: must name a YAML file"),
        ("base: 0\n", "base: must name a YAML file"),
        ("base: ''\n", "base: must name a YAML file"),
        ("grpo: {1: 2}\n", r"unknown config key\(s\) \['grpo.1'\]"),
        ("null: 3\n", r"unknown config key\(s\) \['None'\]"),
        ("seed: 1\nseed: 2\n", "key 'seed' given twice"),
        ("grpo:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' given twice"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_bad_files_are_named(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config([p])
    assert str(p) in str(e.value)


def test_max_candidates_default_and_error_family():
    assert load_config([], []).data.max_candidates == 1000
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_option_names_match_the_registries():
    """The names a config accepts are the implementations that exist (no drift)."""
    from grade_ray import config
    from grade_ray.algos.exploration import EXPLORATIONS, SCHEDULES
    from grade_ray.algos.fusion import FUSIONS
    from grade_ray.algos.rewards import FORMATS

    assert sorted(config.FUSION_FORMS) == FUSIONS.names()
    assert sorted(config.EXPLORATION_KINDS) == EXPLORATIONS.names()
    assert sorted(config.ALPHA_SCHEDULES) == SCHEDULES.names()
    assert sorted(config.FORMAT_KINDS) == FORMATS.names()


def test_a_section_override_sets_only_the_keys_it_names(tmp_path):
    """`--set 'grpo={rounds: 3}'` changes rounds and keeps the file's other grpo values."""
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  minibatch_size: 256\n  rounds: 5\n")
    cfg = load_config([p], ["grpo={rounds: 3}"])
    assert (cfg.grpo.rounds, cfg.grpo.minibatch_size) == (3, 256)
