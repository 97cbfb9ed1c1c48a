"""Synthetic regression data (y = x·w + noise) for the toy experiment and the runner's tests."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader


class RegressionDataModule(L.LightningDataModule):
    """Fixed random train/val sets; the train loader is stateful so `--resume` continues mid-epoch exactly."""

    @dataclass
    class Config:
        name: str = "synthetic_regression"
        in_dim: int = 8  # input features
        num_train: int = 4096  # training samples
        num_val: int = 512  # validation samples
        noise: float = 0.05  # std of the additive label noise
        batch_size: int = 64  # per-device batch size
        num_workers: int = 0  # dataloader worker processes
        seed: int = 1234  # seed of the data itself (independent of the experiment seed)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        w = torch.randn(c.in_dim, generator=g)  # (D,)
        x = torch.randn(c.num_train + c.num_val, c.in_dim, generator=g)  # (N, D)
        y = x @ w + c.noise * torch.randn(x.shape[0], generator=g)  # (N,)
        self.train_set = TensorDataset(x[: c.num_train], y[: c.num_train])
        self.val_set = TensorDataset(x[c.num_train :], y[c.num_train :])

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.train_set, batch_size=self.config.batch_size, shuffle=True, num_workers=self.config.num_workers
        )

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(self.val_set, batch_size=self.config.batch_size, num_workers=self.config.num_workers)
