"""Test-only components, registered through an experiment's `imports:` list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from firm.registry import register
from firm.toy import ToyRegressionModule


class ProbeModule(ToyRegressionModule):
    """The toy module, plus: each rank saves its final weights; an optional NaN loss at one step."""

    @dataclass
    class Config(ToyRegressionModule.Config):
        name: str = "probe"
        nan_at_step: int = -1  # make the loss NaN at this global step (-1: never)
        nan_rank: int = -1  # ... only on this rank (-1: on every rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.global_step == self.config.nan_at_step and self.config.nan_rank in (-1, self.global_rank):
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return self.finite_or_skip(loss)

    def on_train_start(self) -> None:
        if self.global_step == 0:
            out = Path(self.trainer.default_root_dir) / f"init_rank{self.global_rank}.safetensors"
            save_file({k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}, str(out))

    def on_train_end(self) -> None:
        out = Path(self.trainer.default_root_dir) / f"weights_rank{self.global_rank}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(out))


register("modules", "probe", ProbeModule, overwrite=True)
