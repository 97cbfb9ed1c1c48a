"""A tiny regression LightningModule: the smallest end-to-end experiment, and the runner's test subject."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from firm.module import FirmModule


class ToyRegressionModule(FirmModule):
    """An MLP fitted to a noisy linear map (see ``firm.data.toy.RegressionDataModule``)."""

    @dataclass
    class Config:
        name: str = "toy_regression"
        in_dim: int = 8  # input features; must match data.in_dim (YAML: `in_dim: ${data.in_dim}`)
        hidden: int = 32  # hidden width of the MLP
        lr: float = 1e-2  # AdamW learning rate
        weight_decay: float = 0.0  # AdamW weight decay

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B,)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return self.finite_or_skip(loss)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self(x), y), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
