"""Export a run's trained LoRA in the format diffusers' ``load_lora_weights`` reads.

``firm policy export RUN_DIR OUT_DIR`` reads ``RUN_DIR/checkpoints/last.ckpt`` (or ``--checkpoint``) and the run's
``config.yaml``, and writes ``OUT_DIR/pytorch_lora_weights.safetensors``: the adapter's tensors keyed
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` with the LoRA config (rank, alpha, targets) as metadata, so
that ``alpha / rank`` scaling survives. Load it with::

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_lora_weights("OUT_DIR")

(or the pipeline of the run's family: each family names its diffusers LoRA loader). ``--ema`` exports the EMA
weights when the run kept them, ``--adapter old`` the DiffusionNFT sampling adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_PREFIX = "policy.transformer."
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def adapter_state_dict(
    checkpoint: dict[str, Any], adapter: str = "default", ema: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter's tensors with peft / diffusers names (``<module>.lora_A.weight``) from a FIRM RL checkpoint."""
    tag = f".{adapter}."
    if ema:
        state = (checkpoint.get("firm_rl") or {}).get("ema")
        if not state:
            raise ValueError("this run kept no EMA of the adapter (module.ema_decay was null); export without --ema")
        if adapter != "default":
            raise ValueError("--ema exports the EMA of the trained (default) adapter only")
        items = dict(state)
    else:
        items = {
            k[len(ADAPTER_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(ADAPTER_PREFIX)
        }
    out = {}
    for name, tensor in items.items():
        if "lora_" not in name or tag not in name:
            continue
        out[name.replace(tag, ".")] = tensor.detach().to(torch.float32).contiguous()
    if not out:
        raise ValueError(f"no `{adapter}` adapter tensors in the checkpoint (is it a FIRM RL run?)")
    return out


def lora_metadata(state: dict[str, torch.Tensor], lora: dict[str, Any]) -> dict[str, Any]:
    """peft ``LoraConfig`` fields diffusers needs to rebuild the adapter (rank, alpha, exact target modules)."""
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"the adapter has several ranks {sorted(ranks)}; expected one")
    return {
        "r": ranks.pop(),
        "lora_alpha": float(lora.get("alpha", 0)) or None,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "init_lora_weights": True,
        "bias": "none",
    }


def export_lora(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    adapter: str = "default",
    ema: bool = False,
) -> Path:
    """Write the run's LoRA for diffusers; returns the weights file.

    Raises:
        FileNotFoundError: no checkpoint / config in ``run_dir``.
        ValueError: the checkpoint holds no such adapter (or no EMA with ``ema=True``).
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    ckpt_path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path} (is {run_dir} a FIRM run directory?)")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml (is it a FIRM run directory?)")
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    policy_cfg = (cfg.get("module") or {}).get("policy") or {}
    family = policy_cfg.get("family", "sd3")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = adapter_state_dict(ckpt, adapter=adapter, ema=ema)
    meta = lora_metadata(state, policy_cfg.get("lora") or {})
    if meta["lora_alpha"] is None:
        meta["lora_alpha"] = float(meta["r"])
    layers = state
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from firm.policies.policy import PolicyConfig, get_family

    saver = get_family(PolicyConfig(family=family)).lora_saver()
    saver.save_lora_weights(out_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    info = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": str(ckpt_path.resolve()),
        "global_step": ckpt.get("global_step"),
        "rl_step": (ckpt.get("firm_rl") or {}).get("rl_step"),
        "adapter": adapter,
        "ema": ema,
        "family": family,
        "base_model": policy_cfg.get("pretrained"),
        "lora": meta,
    }
    (out_dir / "firm_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir / WEIGHT_NAME
