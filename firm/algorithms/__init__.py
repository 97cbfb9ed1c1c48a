"""RL algorithms over one shared RL step (:mod:`firm.algorithms.base`), one file per algorithm.

=================  ==========================================  =====================================
registry name      class                                       reference
=================  ==========================================  =====================================
``flow_grpo``      :class:`~firm.algorithms.flow_grpo.FlowGRPO`      Flow-GRPO (+ Fast window, CPS)
``diffusion_nft``  :class:`~firm.algorithms.diffusion_nft.DiffusionNFT`  DiffusionNFT
``mix_grpo``       :class:`~firm.algorithms.mix_grpo.MixGRPO`        MixGRPO (+ Flash solver)
``grpo_guard``     :class:`~firm.algorithms.grpo_guard.GRPOGuard`    GRPO-Guard (regulated clipping)
=================  ==========================================  =====================================

Adding one is a file with its ``Config`` and hooks, a line in :data:`firm.registry.MODULES` and a YAML
(docs/rl.md, "Adding an algorithm").
"""

from firm.algorithms.base import RLAlgorithm
from firm.algorithms.config import RLConfig, SamplerConfig

__all__ = ["RLAlgorithm", "RLConfig", "SamplerConfig"]
