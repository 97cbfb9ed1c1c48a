"""Shared behaviour of FIRM's LightningModules: skipping non-finite losses on every rank at once."""

from __future__ import annotations

import warnings

import lightning as L
import torch


class FirmModule(L.LightningModule):
    """A LightningModule base that never lets a non-finite loss reach the optimizer.

    Subclasses return ``self.finite_or_skip(loss)`` from ``training_step``: when the loss is NaN or inf on any rank,
    every rank returns ``None`` (Lightning then skips backward and the optimizer step), a warning is issued and the
    ``train/skipped_nonfinite`` counter is logged. Checkpoints are separately refused when weights are non-finite
    (see :class:`firm.runner.SafeCheckpointIO`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped_nonfinite = 0

    def finite_or_skip(self, loss: torch.Tensor) -> torch.Tensor | None:
        finite = torch.isfinite(loss.detach()).all().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if finite.item() < 1.0:
            self.skipped_nonfinite += 1
            if self.global_rank == 0:
                warnings.warn(
                    f"non-finite loss at step {self.global_step}: optimizer step skipped "
                    f"({self.skipped_nonfinite} skipped so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), rank_zero_only=True)
            return None
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["firm_skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_nonfinite = int(checkpoint.get("firm_skipped_nonfinite", 0))
