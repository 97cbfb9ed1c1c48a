"""Shared behaviour of FIRM's LightningModules: never let a non-finite loss reach the optimizer."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch


class FirmModule(L.LightningModule):
    """A LightningModule base that skips optimizer steps whose loss is NaN or inf, on every rank at once.

    Subclasses using automatic optimization return ``self.finite_or_skip(loss)`` from ``training_step``
    (with manual optimization it returns ``None`` for a non-finite loss and the caller skips its own step). When the
    loss is non-finite on *any* rank, every rank backpropagates an exactly-zero loss instead (so DDP's gradient
    all-reduce still happens in lockstep), and the following optimizer step is skipped and its gradients dropped.
    A warning is issued and ``train/skipped_nonfinite`` is logged. The skipped step still counts as a global step.
    Checkpoints holding non-finite weights are refused separately (:func:`firm.runner._checkpoint_io`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped_nonfinite = 0
        self._skip_optimizer_step = False

    def finite_or_skip(self, loss: torch.Tensor) -> torch.Tensor | None:
        """``loss`` if finite on every rank. Otherwise: with automatic optimization, an exactly-zero-gradient loss
        (and the next optimizer step is skipped); with manual optimization, ``None`` (the caller skips its step)."""
        finite = torch.isfinite(loss.detach()).all().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if finite.item() >= 1.0:
            return loss
        self.skipped_nonfinite += 1
        self._skip_optimizer_step = self.automatic_optimization
        if self.global_rank == 0:
            warnings.warn(
                f"non-finite loss at step {self.global_step}: optimizer step skipped "
                f"({self.skipped_nonfinite} skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), rank_zero_only=True)
        if not self.automatic_optimization:
            return None
        # A loss with exactly zero gradient for every trainable parameter, detached from the non-finite graph.
        return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), loss.new_zeros(()))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()  # forward + backward of the last micro-batch
        if self._skip_optimizer_step:
            self._skip_optimizer_step = False
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step(closure=lambda: result)
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["firm_skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_nonfinite = int(checkpoint.get("firm_skipped_nonfinite", 0))
