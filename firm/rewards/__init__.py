"""Rewards: score normalisation, Base-and-Bonus combiners (CME, QMA), baselines, and critic reward functions."""

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

__all__ = [
    "CMEReward",
    "Combiner",
    "ExecutionOnlyReward",
    "FirmEditReward",
    "FirmGenReward",
    "InstructionOnlyReward",
    "QMAReward",
    "RewardOutput",
    "WeightedSumReward",
    "base_and_bonus",
    "build_combiner",
    "cme",
    "normalize_score",
    "qma",
    "weighted_sum",
]
