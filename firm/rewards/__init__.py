"""Rewards: score normalisation, Base-and-Bonus combiners (CME, QMA), baselines, critic reward functions, the scorers
(firm.rewards.scorers: FIRM critics, PickScore, CLIP score, HPSv3, OCR, EditReward, VLM judges) and their mix."""

from firm.rewards.combine import base_and_bonus, cme, normalize_score, qma, weighted_sum
from firm.rewards.combiners import (
    CMEReward,
    Combiner,
    ExecutionOnlyReward,
    InstructionOnlyReward,
    QMAReward,
    WeightedSumReward,
)
from firm.rewards.functions import FirmEditReward, FirmGenReward, RewardOutput, build_combiner
from firm.rewards.mix import RewardMix, RewardStopped, gdpo_advantages
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, build_scorer

__all__ = [
    "CMEReward",
    "Combiner",
    "ExecutionOnlyReward",
    "FirmEditReward",
    "FirmGenReward",
    "InstructionOnlyReward",
    "QMAReward",
    "RewardMix",
    "RewardOutput",
    "RewardStopped",
    "Scorer",
    "ScorerConfig",
    "Scores",
    "WeightedSumReward",
    "base_and_bonus",
    "build_combiner",
    "build_scorer",
    "gdpo_advantages",
    "cme",
    "normalize_score",
    "qma",
    "weighted_sum",
]
