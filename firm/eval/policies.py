"""The policies `firm eval` compares: a base model, base + LoRA of a FIRM run, or an exported LoRA, of any family.

Every kind becomes a :class:`~firm.policies.policy.FlowPolicy` plus the adapter to sample with (``None``: adapters
off, the base model; ``"default"``: the loaded LoRA). The family is whatever the config or the export names; nothing
here asks which family it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from firm.config import ConfigError


@dataclass
class PolicySpec:
    """One policy to evaluate; set exactly one of ``policy`` (with ``lora``/``run`` optional on top)."""

    policy: dict[str, Any] = field(default_factory=dict)  # PolicyConfig fields of the base model (family, pretrained)
    lora: str | None = None  # an exported LoRA folder (`firm policy export`: firm_export.json + safetensors)
    run: str | None = None  # a FIRM RL run folder (config.yaml + checkpoints/last.ckpt)
    checkpoint: str | None = None  # with `run`: this checkpoint instead of checkpoints/last.ckpt


def policy_config(fields: dict[str, Any], where: str) -> Any:
    """A validated :class:`PolicyConfig` from a mapping (unknown keys and wrong types fail naming ``where``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from firm.policies.policy import PolicyConfig

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyConfig), fields))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def resolve_spec(
    spec: PolicySpec, label: str, resolution: int | None = None, *, check_files: bool = True
) -> tuple[Any, dict[str, Any]]:
    """``(PolicyConfig, description)`` of ``spec`` without loading weights (``--dry-run`` checks this; with
    ``check_files=False`` a LoRA or run folder that does not exist yet is not read)."""
    where = f"policies.{label}"
    if spec.lora and spec.run:
        raise ConfigError(f"{where}: set `lora` or `run`, not both")
    fields = dict(spec.policy)
    desc: dict[str, Any] = {"kind": "base"}
    if spec.lora:
        info_path = Path(spec.lora) / "firm_export.json"
        if not info_path.is_file() and not check_files:
            info_path = None
        elif not info_path.is_file():
            raise ConfigError(f"{where}.lora: {spec.lora} has no firm_export.json (write it with `firm policy export`)")
        info = json.loads(info_path.read_text()) if info_path else {}
        meta = info.get("lora") or {}
        for key, value in (("family", info.get("family")), ("pretrained", info.get("base_model"))):
            if value is not None:
                fields.setdefault(key, value)
        if meta:
            fields["lora"] = {
                **dict(fields.get("lora") or {}),
                "rank": int(meta["r"]),
                "alpha": float(meta["lora_alpha"]),
                "target_modules": list(meta["target_modules"]),
            }
        desc = {"kind": "exported_lora", "lora": str(spec.lora), "rl_step": info.get("rl_step")}
    elif spec.run:
        cfg_path = Path(spec.run) / "config.yaml"
        if not cfg_path.is_file() and not check_files:
            fields = fields or {}
        elif not cfg_path.is_file():
            raise ConfigError(f"{where}.run: {spec.run} has no config.yaml (is it a FIRM run directory?)")
        else:
            from omegaconf import OmegaConf

            run_cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
            run_policy = (run_cfg.get("module") or {}).get("policy")
            if not isinstance(run_policy, dict):
                raise ConfigError(f"{where}.run: {cfg_path} has no module.policy (is it an RL run?)")
            fields = {**run_policy, **fields}
        ckpt = spec.checkpoint or str(Path(spec.run) / "checkpoints" / "last.ckpt")
        desc = {"kind": "run", "run": str(spec.run), "checkpoint": ckpt}
    if not fields:
        raise ConfigError(f"{where}: give `policy:` (the base model), `lora:` or `run:`")
    if resolution is not None:
        fields["resolution"] = resolution
    cfg = policy_config(fields, where)
    desc.update(family=cfg.family, pretrained=cfg.pretrained, resolution=cfg.resolution)
    return cfg, desc


def _load_lora_dir(policy: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors LoRA file")
    state = load_file(str(files[0]))
    mapped = {}
    for k, v in state.items():
        name = k.split(".", 1)[1] if k.startswith("transformer.") else k
        mapped[
            name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        ] = v
    _assign(policy, mapped, str(files[0]))


def _load_run(policy: Any, ckpt: Path) -> None:
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "policy.transformer."
    mapped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and ".default." in k}
    _assign(policy, mapped, str(ckpt))


def _assign(policy: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = policy.named_adapter_parameters("default")
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors))
    if unknown or missing:
        raise ValueError(
            f"{source}: the LoRA does not fit the policy ({len(unknown)} unexpected tensors, e.g. {unknown[:2]}; "
            f"{len(missing)} missing, e.g. {missing[:2]}): check family, base model and LoRA targets"
        )
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, the policy's {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def load_policy(spec: PolicySpec, label: str, resolution: int | None = None) -> tuple[Any, str | None]:
    """``(FlowPolicy, adapter)``: the policy of ``spec`` with its LoRA loaded, and the adapter to sample with."""
    from firm.policies.policy import FlowPolicy

    cfg, desc = resolve_spec(spec, label, resolution)
    policy = FlowPolicy(cfg)
    policy.eval()
    if desc["kind"] == "exported_lora":
        _load_lora_dir(policy, Path(spec.lora))
        return policy, "default"
    if desc["kind"] == "run":
        _load_run(policy, Path(desc["checkpoint"]))
        return policy, "default"
    return policy, None
