"""Config: YAML round trip, overrides, clear errors, configs/ files load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grade_ray.config import Config, ConfigError, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_base_yaml_mirrors_defaults():
    base = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    assert base == to_dict(Config())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=str)
def test_every_config_file_loads(path):
    if "tune" in path.parts:
        pytest.skip("tune spaces are read by grade_ray.jobs.tune")
    if "suite" in path.parts:
        from grade_ray.jobs.suite import load_suite

        spec = load_suite(path)  # and every world and arm it names loads as a config
        for world in spec.worlds.values():
            for arm in spec.arms:
                load_config([world, *arm.configs], list(spec.shared + arm.overrides))
        return
    load_config([path])


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(
        [ROOT / "configs" / "smoke.yaml"],
        ["exploration.group_size=10", "grpo.lr=3e-4", "reward.format_rules=[]"],
    )
    assert cfg.exploration.group_size == 10 and cfg.grpo.lr == pytest.approx(3e-4)
    assert cfg.reward.format_rules == () and cfg.simulator.num_requests == 2000
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config([tmp_path / "c.yaml"]) == cfg


def test_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match="valid keys here"):
        load_config([], ["exploration.group_sise=3"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config([], ["exploration.group_size=1"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config([], ["grpo.rounds=two"])
    with pytest.raises(ConfigError, match="on_error"):
        load_config([], ["data.on_error=skip"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_config([], ["grpo.rounds=3", "grpo.data_passes=2"])
