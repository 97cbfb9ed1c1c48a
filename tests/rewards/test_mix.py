"""The reward mix: weighted sums as the peers' multi-reward dicts, GDPO advantages as Flow-Factory's, failure policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from firm.critics.stats import ImageStatsCritic
from firm.critics.types import EditRequest, GenRequest
from firm.rewards import FirmGenReward, RewardMix, RewardStopped, gdpo_advantages
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores
from firm.rewards.scorers.critic import CriticScorer, DelayedScorer


class Redness(Scorer):
    """Mean red channel in [0, 1]; NaN for images whose key says 'bad'; raises when told to."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "redness"
        fail: bool = False
        out: str = "red"

    def __init__(self, config):
        super().__init__(config)
        self.outputs = (config.out,)

    def score_batch(self, requests):
        if self.config.fail:
            raise ConnectionError("endpoint down")
        vals = []
        for r in requests:
            img = np.asarray(r.image.convert("RGB"), dtype=np.float32) / 255
            vals.append(math.nan if r.key == "bad" else float(img[..., 0].mean()))
        return Scores({self.config.out: torch.tensor(vals)})


def gen_requests(n=6, bad=()):
    rng = np.random.default_rng(0)
    return [
        GenRequest(
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
            "a red square",
            key="bad" if i in bad else f"k{i}",
        )
        for i in range(n)
    ]


def critic_scorer(**kw):
    return CriticScorer(CriticScorer.Config(task="gen", critic=ImageStatsCritic.Config(), **kw))


def test_a_critic_alone_gives_the_critic_reward_exactly():
    reqs = gen_requests()
    ref = FirmGenReward(ImageStatsCritic())(reqs)
    out = RewardMix({"critic": critic_scorer()})(reqs)
    assert torch.equal(out.rewards, ref.rewards)
    for k, v in ref.components.items():
        assert torch.equal(out.components[k], v)
    assert torch.equal(out.components["qma"], ref.rewards)
    assert [r.scores for r in out.results] == [r.scores for r in ref.results]  # the critic's results are kept


def test_weighted_mix_is_the_peers_multi_score():
    reqs = gen_requests()
    red = Redness(Redness.Config(weight=0.5, scale=1 / 26, shift=0.1))
    mix = RewardMix({"critic": critic_scorer(weight=2.0), "red": red})
    out = mix(reqs)
    crit, r = out.components["qma"].tolist(), out.components["red"].tolist()
    # flow_grpo/rewards.py multi_score (yifan123/flow_grpo@ac4c86e, DiffusionNFT@24af555): the reward ("avg") is the
    # sum over rewards of weight * score, each score in its own scorer's normalisation (PickScore's / 26 is inside
    # its scorer there; here it is the YAML's scale).
    scores = {"critic": crit, "red": [x / 26 + 0.1 for x in r]}
    weights = {"critic": 2.0, "red": 0.5}
    total = []
    for name, w in weights.items():
        weighted = [w * s for s in scores[name]]
        total = weighted if not total else [a + b for a, b in zip(total, weighted)]
    assert out.rewards.tolist() == pytest.approx(total, abs=1e-6)
    assert set(out.terms) == {"critic", "red"} and out.results[0].keys() == {"critic", "red"}
    assert out.rewards.std() > 0


def flow_factory_gdpo(rewards: dict[str, np.ndarray], groups: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """Flow-Factory's compute_gdpo (X-GenGroup/Flow-Factory@a0b2bc5, src/flow_factory/advantage/
    advantage_processor.py), transcribed: per reward and group a z-score with np.std floored at 1e-6, times the weight,
    summed, then a z-score over the batch (global mean and std, floored at 1e-6)."""
    parts = []
    for key, arr in rewards.items():
        z = np.zeros_like(arr, dtype=np.float64)
        for gid in np.unique(groups):
            m = groups == gid
            z[m] = (arr[m] - arr[m].mean()) / max(arr[m].std(), 1e-6)
        parts.append(z * weights[key])
    comb = np.sum(parts, axis=0)
    return (comb - comb.mean()) / max(comb.std(), 1e-6)


def test_gdpo_advantages_equal_flow_factory():
    g = torch.Generator().manual_seed(0)
    n, k = 24, 3
    terms = torch.rand(n, k, generator=g) * torch.tensor([1.0, 30.0, 0.01])  # very different scales
    groups = torch.arange(n) // 4
    weights = torch.tensor([1.0, 0.5, 2.0])
    ours = gdpo_advantages(terms, groups, weights)
    ref = flow_factory_gdpo(
        {str(j): terms[:, j].double().numpy() for j in range(k)},
        groups.numpy(),
        {str(j): float(weights[j]) for j in range(k)},
    )
    assert np.allclose(ours.numpy(), ref, atol=1e-5)
    # the bug GDPO fixes: a summed reward is dominated by the large-scale term; GDPO's advantages are not
    summed = (terms * weights).sum(1)
    grpo = (summed - summed.view(-1, 4).mean(1).repeat_interleave(4)) / summed.view(-1, 4).std(
        1, unbiased=False
    ).repeat_interleave(4)
    assert not torch.allclose(ours, grpo, atol=1e-2)
    # a sample with a missing term is left out of every statistic and gets 0
    terms[5, 1] = math.nan
    ours = gdpo_advantages(terms, groups, weights)
    keep = np.arange(n) != 5
    ref = flow_factory_gdpo(
        {str(j): terms[keep, j].double().numpy() for j in range(k)},
        groups.numpy()[keep],
        {str(j): float(weights[j]) for j in range(k)},
    )
    assert ours[5] == 0 and np.allclose(ours.numpy()[keep], ref, atol=1e-5)


def test_failed_scores_skip_or_stop():
    reqs = gen_requests(bad=(2,))
    out = RewardMix({"critic": critic_scorer(), "red": Redness(Redness.Config())})(reqs)
    assert math.isnan(out.rewards[2]) and not torch.isnan(out.rewards[[0, 1, 3, 4, 5]]).any()
    assert out.missing == {"qma": 0, "instruction": 0, "quality": 0, "red": 1}
    assert not math.isnan(out.components["qma"][2])  # the critic's own scores of that sample are kept
    with pytest.raises(RewardStopped, match=r"1 of 6 rewards failed \(request 2: red: redness: no score"):
        RewardMix({"red": Redness(Redness.Config())}, on_failure="stop")(reqs)


def test_a_failed_call_raises_for_the_rl_step_to_handle():
    mix = RewardMix({"critic": critic_scorer(), "red": Redness(Redness.Config(fail=True))})
    with pytest.raises(RuntimeError, match="scorer 'red' failed: redness: ConnectionError: endpoint down"):
        mix(gen_requests())


def test_mix_checks():
    with pytest.raises(ValueError, match="both output 'red'"):
        RewardMix({"a": Redness(Redness.Config()), "b": Redness(Redness.Config())})
    with pytest.raises(ValueError, match="every weight is 0"):
        RewardMix({"a": Redness(Redness.Config(weight=0))})
    with pytest.raises(ValueError, match="reward_mix"):
        RewardMix({"a": Redness(Redness.Config())}, mode="mean")
    with pytest.raises(ValueError, match="not one of its outputs"):
        RewardMix({"a": Redness(Redness.Config(score="blue"))})
    with pytest.raises(TypeError, match="scores gen requests; request 0 is a edit one"):
        critic_scorer()([EditRequest(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), "x")])
    with pytest.raises(ValueError, match="set task"):
        CriticScorer(CriticScorer.Config(critic=ImageStatsCritic.Config()))


def test_delayed_scorer_and_parallel_mix_keep_the_scores():
    reqs = gen_requests()
    plain = RewardMix({"critic": critic_scorer(), "red": Redness(Redness.Config())})(reqs)
    slow = DelayedScorer(DelayedScorer.Config(inner=Redness(Redness.Config()), seconds=0.01))
    out = RewardMix({"critic": critic_scorer(), "red": slow}, parallel=True)(reqs)
    assert torch.equal(out.rewards, plain.rewards)


def test_gdpo_gives_exact_zeros_to_constant_groups():
    # judges with discrete scores (0.8 = 4 / 5 is not exact in binary) often give a whole group one value
    groups = torch.arange(48) // 16
    terms = torch.tensor([[0.8, 0.7]] * 16 + [[0.3, 0.7]] * 16 + [[0.8, 0.1]] * 16)
    assert torch.equal(gdpo_advantages(terms, groups, torch.tensor([1.0, 1.0])), torch.zeros(48))
    terms[40, 0] = 0.81  # one real preference: only its group moves
    adv = gdpo_advantages(terms, groups, torch.tensor([1.0, 1.0]))
    assert torch.equal(adv[:32], torch.zeros(32)) and adv[40] > 0 and (adv[32:48] != 0).all()


def test_a_weight_zero_scorer_is_logged_only():
    reqs = gen_requests(bad=(2,))
    out = RewardMix({"critic": critic_scorer(), "red": Redness(Redness.Config(weight=0.0))})(reqs)
    assert not torch.isnan(out.rewards).any() and torch.equal(out.rewards, out.components["qma"])
    assert math.isnan(out.components["red"][2]) and set(out.terms) == {"critic"}


def test_world_advantages_with_gdpo_over_two_ranks_equal_gdpo_of_the_whole_batch():
    from firm.algorithms.advantages import world_advantages
    from firm.algorithms.config import RLConfig

    g = torch.Generator().manual_seed(1)
    terms = torch.rand(16, 2, generator=g) * torch.tensor([1.0, 26.0])
    groups = torch.arange(16) // 4
    weights = torch.tensor([1.0, 0.5])
    rewards = (terms * weights).sum(1)
    cfg = RLConfig(adv_clip_max=5.0)
    ranks = {r: (slice(8 * r, 8 * r + 8)) for r in (0, 1)}

    whole = gdpo_advantages(terms, groups, weights)
    mix = lambda t, gr: gdpo_advantages(t, gr, weights)  # noqa: E731
    for r, sl in ranks.items():

        def gather(x, r=r):  # what all_gather gives every rank: rank 0's tensor, then rank 1's
            if x.dim() == 2:
                return torch.cat([terms[ranks[q]] for q in (0, 1)])
            src = rewards if x.is_floating_point() else groups
            return torch.cat([src[ranks[q]] for q in (0, 1)]).to(x.dtype)

        out = world_advantages(rewards[sl], groups[sl], cfg, gather=gather, rank=r, terms=terms[sl], mix=mix)
        assert torch.allclose(out.adv, whole[sl]) and out.keep.all()
    plain = world_advantages(rewards[:8], groups[:8], cfg, gather=lambda x: x)
    assert not torch.allclose(plain.adv, whole[:8], atol=1e-2)  # the weighted path gives other advantages
