"""Fused Triton kernels for diffusion RL, with pure-torch references. See docs/kernels.md.

Public ops (all math in float32 whatever the input dtype; outputs float32):
  * :func:`group_advantages` -- per-group normalised advantages (forward only).
  * :func:`step_log_prob` -- Gaussian log-prob of a sampler step (+ optional squared velocity distance), grad w.r.t.
    the velocity.
  * :func:`clipped_surrogate` -- PPO-style clipped per-sample loss with clip fraction and approximate KL.
  * :func:`nft_loss` -- the DiffusionNFT objective, grad w.r.t. ``v_theta``.

Dispatch: CUDA tensors run Triton; CPU tensors run the torch reference unless ``TRITON_INTERPRET=1`` was set before
triton was imported; ``FIRM_KERNELS=torch`` forces the reference.
This package imports nothing else of ``firm`` (tests/test_layering.py checks it).
"""

from firm.kernels.clipped_surrogate import SurrogateOutput, clipped_surrogate, clipped_surrogate_reference
from firm.kernels.group_advantages import GroupStats, group_advantages, group_advantages_reference
from firm.kernels.nft_loss import nft_loss, nft_loss_reference
from firm.kernels.step_log_prob import step_log_prob, step_log_prob_reference

__all__ = [
    "GroupStats",
    "SurrogateOutput",
    "clipped_surrogate",
    "clipped_surrogate_reference",
    "group_advantages",
    "group_advantages_reference",
    "nft_loss",
    "nft_loss_reference",
    "step_log_prob",
    "step_log_prob_reference",
]
