"""Critics and rewards chosen from YAML through the registries (as the RL experiments will do)."""

from dataclasses import dataclass
from typing import Any

import pytest

from firm.config import ConfigError, component_field, load_experiment, to_object
from firm.critics import build_critic
from firm.critics.http import HTTPCritic
from firm.rewards import CMEReward, FirmEditReward, build_combiner


@dataclass
class RewardSection:
    name: str = "probe"
    critic: Any = component_field("critics")
    reward: Any = component_field("rewards", default_name="cme")


def test_yaml_picks_critic_and_reward_by_name(tmp_path):
    (tmp_path / "exec.txt").write_text("Did this happen: {instruction}?")
    (tmp_path / "exp.yaml").write_text(
        f"""
critic:
  name: http
  endpoints: [http://10.0.0.1:8000/v1, http://10.0.0.2:8000/v1]
  max_concurrency: 64
  extra_body: {{top_k: 1}}
  prompts: {{edit_execution: {tmp_path / "exec.txt"}}}
reward: {{name: cme, w1: 0.7, w2: 0.3}}
"""
    )
    cfg = to_object(load_experiment(tmp_path / "exp.yaml", ["critic.timeout_s=30"], schema=RewardSection))
    critic = build_critic(cfg.critic)
    assert isinstance(critic, HTTPCritic) and critic.endpoints[1] == "http://10.0.0.2:8000/v1"
    assert critic.config.timeout_s == 30 and critic.config.extra_body == {"top_k": 1}
    assert critic.prompts.templates["edit_execution"] == "Did this happen: {instruction}?"
    combiner = build_combiner(cfg.reward)
    assert isinstance(combiner, CMEReward) and (combiner.config.w1, combiner.config.w2) == (0.7, 0.3)
    assert isinstance(FirmEditReward(critic, combiner).combiner, CMEReward)


def test_yaml_typos_fail_loudly(tmp_path):
    (tmp_path / "bad.yaml").write_text("critic: {name: http, timeout: 30}\n")
    with pytest.raises(ConfigError, match="critic.timeout"):
        load_experiment(tmp_path / "bad.yaml", schema=RewardSection)
    (tmp_path / "bad2.yaml").write_text("critic: {name: htp}\n")
    with pytest.raises(ConfigError, match="Did you mean 'http'"):
        load_experiment(tmp_path / "bad2.yaml", schema=RewardSection)


def test_components_built_in_code_are_validated_like_yaml(tmp_path):
    """build_component (firm.config) gives the same errors for a mapping as load_experiment for the YAML section."""
    from firm.config import build_component
    from firm.critics.factory import build_component as reexported

    assert reexported is build_component
    cls, conf = build_component("critics", {"name": "http", "timeout_s": "30", "prompts": {"planner": None}})
    assert cls is HTTPCritic and conf.timeout_s == 30.0 and conf.prompts.planner is None  # typed, nested Config
    assert build_component("rewards", "qma")[1].w2 == 0.6
    (tmp_path / "bad.yaml").write_text("critic: {name: http, timeout: 30}\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_experiment(tmp_path / "bad.yaml", schema=RewardSection)
    with pytest.raises(ConfigError) as from_code:
        build_critic({"name": "http", "timeout": 30})
    assert "unknown key 'critic.timeout'" in str(from_yaml.value) and "unknown key 'timeout'" in str(from_code.value)
    with pytest.raises(ConfigError, match="invalid value for 'max_retries'"):
        build_critic({"name": "http", "max_retries": "many"})
    with pytest.raises(ConfigError, match=r"unknown key 'prompts.edit_executio'.*Did you mean"):
        build_critic({"name": "http", "prompts": {"edit_executio": "x.txt"}})
    with pytest.raises(ConfigError, match="Did you mean 'http'"):
        build_critic({"name": "htp"})
    with pytest.raises(ConfigError, match="mapping with a `name:` key"):
        build_critic({"endpoints": []})
