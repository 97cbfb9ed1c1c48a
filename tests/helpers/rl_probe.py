"""A DiffusionNFT module that records, per rank, what it computes: rewards, group labels, advantages (each RL step)
and the final LoRA weights. Registered as `probe_nft` through an experiment's `imports:`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from firm.algorithms.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from firm.policies.sharding import full, is_sharded
from firm.registry import register


@dataclass
class ProbeNFTConfig(DiffusionNFTConfig):
    name: str = "probe_nft"


class ProbeNFTModule(DiffusionNFT):
    Config = ProbeNFTConfig

    def _probe_dir(self) -> Path:
        d = Path(self.trainer.default_root_dir) / "probe"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def advantages(self, rewards, groups, terms=None):
        out = super().advantages(rewards, groups, terms)
        record = {"rewards": rewards.cpu(), "groups": groups.cpu(), "adv": out.adv.cpu(), "keep": out.keep.cpu()}
        torch.save(record, self._probe_dir() / f"adv_step{self.rl_step}_rank{self.global_rank}.pt")
        return out

    def on_train_end(self) -> None:
        super().on_train_end()
        # whole tensors (a collective when sharded: every rank gathers; each writes its own file)
        adapters = self.policy.named_adapter_parameters("default").items()
        weights = {k: full(v.detach()).contiguous() for k, v in adapters}
        save_file(weights, str(self._probe_dir() / f"lora_rank{self.global_rank}.safetensors"))
        # how the policy was laid out: what configure_model sharded, and whether the weights are DTensors
        layout = {
            "sharded": self._sharded,
            "block_weights_sharded": any(is_sharded(p) for n, p in self.policy.transformer.named_parameters()),
            "encoder_sharded": any(is_sharded(p) for p in self.policy.text_encoder.parameters()),
            "encoder_freed": self.policy.text_encoder_freed,
        }
        (self._probe_dir() / f"layout_rank{self.global_rank}.json").write_text(json.dumps(layout))


register("modules", "probe_nft", ProbeNFTModule, overwrite=True)
