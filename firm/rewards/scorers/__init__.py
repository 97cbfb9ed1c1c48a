"""Scorers: reward models behind one contract (:mod:`.base`), registered in the ``scorers`` registry.

Heavy scorers are imported lazily through the registry (``firm.registry.SCORERS``); this package imports only the
contract.
"""

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, build_scorer

__all__ = ["Scorer", "ScorerConfig", "Scores", "build_scorer"]
