"""The shapes critic behind FIRM's reward functions, as an RL module uses it (through the registries)."""

import random

import torch

from firm.critics.factory import build_critic
from firm.rewards import FirmEditReward, FirmGenReward
from firm.synthetic import (
    ShapesRuleCritic,
    edit_tasks,
    gen_tasks,
    render,
    simulate_edit,
    simulate_generation,
    tasks_to_requests,
)


def test_build_critic_by_registry_name_with_settings():
    critic = build_critic({"name": "shapes_rule", "shapes": ["circle", "square", "triangle"]})
    assert isinstance(critic, ShapesRuleCritic) and critic.config.shapes == ["circle", "square", "triangle"]


def _edit_rewards(combiner: str, mode: str) -> torch.Tensor:
    tasks = list(edit_tasks("test", limit=24))
    rng = random.Random(0)
    images = [render(simulate_edit(t, mode, rng)) for t in tasks]
    reward = FirmEditReward(build_critic({"name": "shapes_rule"}), {"name": combiner})
    out = reward(tasks_to_requests(tasks, images))
    assert out.num_missing == 0 and set(out.components) == {"execution", "consistency"}
    return out.rewards


def test_cme_punishes_the_lazy_editor_and_the_plain_sum_does_not():
    perfect, lazy = _edit_rewards("cme", "perfect"), _edit_rewards("cme", "copy")
    assert torch.allclose(perfect, torch.ones_like(perfect)) and torch.allclose(lazy, torch.zeros_like(lazy))
    # With the plain sum, copying the source still earns half of the maximum reward.
    lazy_sum = _edit_rewards("weighted_sum", "copy")
    assert torch.allclose(lazy_sum, torch.full_like(lazy_sum, 0.5))
    over = _edit_rewards("cme", "overedit_n")
    assert over.mean() < 0.95 and (over >= 0.6).all()  # execution done, consistency bonus partly lost


def test_qma_on_generation():
    tasks = list(gen_tasks("test", limit=16))
    rng = random.Random(0)
    good = [render(simulate_generation(t, "perfect", rng)) for t in tasks]
    empty = [render(simulate_generation(t, "empty", rng)) for t in tasks]
    reward = FirmGenReward(build_critic({"name": "shapes_rule"}), {"name": "qma"})
    assert torch.allclose(reward(tasks_to_requests(tasks, good)).rewards, torch.ones(16))
    assert torch.allclose(reward(tasks_to_requests(tasks, empty)).rewards, torch.zeros(16))
