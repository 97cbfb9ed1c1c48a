"""`firm critic export RUN_DIR OUT_DIR`: a trained critic run -> a ``save_pretrained`` directory.

The output has the layout of a hub checkpoint such as Qwen3-VL-8B-Instruct: the model weights (safetensors),
``config.json``, ``generation_config.json``, the tokenizer with its chat template (``chat_template.jinja`` and the
``chat_template.json`` older loaders read), the image processor, ``video_preprocessor_config.json`` and
``processor_class`` in the processor configs: what the local critic backend (``critics: {name: local, model:
OUT_DIR}``), ``AutoProcessor`` and vLLM load. LoRA adapters are merged into the base weights unless
``merge_lora=False``, in which case the adapter is written with peft's ``save_pretrained`` next to the processor
(load it on top of the base model).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from firm.config import ConfigError

log = logging.getLogger(__name__)


# Video processors of the model types whose hub checkpoints ship a video_preprocessor_config.json. Their classes
# need torchvision, which CPU installs here lack, so the config is written from the image processor's settings.
VIDEO_PROCESSORS = {
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "qwen3_vl_moe": "Qwen3VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen2_vl": "Qwen2VLVideoProcessor",
}
# Image-processor settings a Qwen-VL video processor shares (patching, normalisation, resizing).
_VIDEO_KEYS = (
    "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size", "resample",
    "rescale_factor", "do_rescale", "do_normalize", "do_resize", "do_convert_rgb",
)  # fmt: skip
# Files of a hub checkpoint's processor besides the tokenizer's and the image processor's.
PROCESSOR_FILES = ("video_preprocessor_config.json", "chat_template.json")


def _update_json(path: Path, **values: object) -> None:
    """Add ``values`` to the JSON object in ``path`` (keys already there are kept)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for k, v in values.items():
        data.setdefault(k, v)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def complete_processor_layout(source: str | Path, out: Path, model_type: str | None) -> list[str]:
    """Give ``out`` the processor files a hub checkpoint has (what vLLM and ``AutoProcessor`` look for):
    ``video_preprocessor_config.json``, ``chat_template.json`` and ``processor_class`` in the image-processor and
    tokenizer configs. Files the source has are copied; missing ones are written from what ``out`` holds. Returns
    the files written."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    written = []
    src = Path(source)
    for name in PROCESSOR_FILES:
        if not (out / name).is_file() and (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            written.append(name)
    processor_class = PROCESSOR_MAPPING_NAMES.get(model_type or "")
    image_cfg = out / "preprocessor_config.json"
    video_cfg = out / "video_preprocessor_config.json"
    if not video_cfg.is_file() and image_cfg.is_file() and model_type in VIDEO_PROCESSORS:
        image = json.loads(image_cfg.read_text(encoding="utf-8"))
        video = {k: image[k] for k in _VIDEO_KEYS if k in image}
        video["video_processor_type"] = VIDEO_PROCESSORS[model_type]
        video_cfg.write_text(json.dumps(video, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(video_cfg.name)
    template = out / "chat_template.jinja"
    if not (out / "chat_template.json").is_file() and template.is_file():
        text = template.read_text(encoding="utf-8")
        (out / "chat_template.json").write_text(json.dumps({"chat_template": text}, indent=2) + "\n", encoding="utf-8")
        written.append("chat_template.json")
    if processor_class:
        for cfg in (image_cfg, video_cfg, out / "tokenizer_config.json"):
            if cfg.is_file():
                _update_json(cfg, processor_class=processor_class)
    return written


def save_processor(source: str | Path, out: Path, model_type: str | None = None) -> None:
    """Copy the processor files (tokenizer + chat template + image and video processor) of ``source`` into ``out``,
    in the layout of a hub checkpoint (see :func:`complete_processor_layout`)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        AutoProcessor.from_pretrained(source).save_pretrained(out)
    except (ImportError, ValueError, OSError, TypeError, AttributeError, KeyError) as e:
        # e.g. Qwen-VL video processors need torchvision; the critic backend falls back to these two parts too.
        log.info("AutoProcessor unavailable for %s (%s); saving tokenizer and image processor", source, e)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        AutoImageProcessor.from_pretrained(source).save_pretrained(out)
    complete_processor_layout(source, out, model_type)


def export_critic(
    run_dir: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None, merge_lora: bool = True
) -> Path:
    """Write the critic of a ``critic_sft`` run as a ``save_pretrained`` directory.

    Args:
        run_dir: the run directory (holds ``config.yaml`` and ``checkpoints/last.ckpt``).
        out_dir: where to write the model.
        checkpoint: a specific checkpoint file instead of ``last.ckpt``.
        merge_lora: merge LoRA adapters into the weights (a plain model any loader can read).

    Raises:
        ConfigError: the run is not a critic_sft run, or its checkpoint is missing or does not fit the model.
        ValueError: the weights hold NaN or inf (nothing is written).
    """
    from firm.config import load_experiment, to_object
    from firm.critics.sft import CriticSFTModule
    from firm.paths import LAST_CKPT

    run_dir, out = Path(run_dir), Path(out_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (is it a `firm run` directory?)")
    cfg = to_object(load_experiment(cfg_path))
    if cfg.module.name != "critic_sft":
        raise ConfigError(f"{run_dir}: module is {cfg.module.name!r}, not a critic_sft run")
    ckpt_path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / LAST_CKPT
    if not ckpt_path.is_file():
        raise ConfigError(f"checkpoint not found: {ckpt_path}")

    conf = cfg.module
    conf.gradient_checkpointing = False
    module = CriticSFTModule(conf)
    module.model = module.build_model(torch.device("cpu"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{ckpt_path}: {len(result.unexpected_keys)} weights do not fit the model, "
                          f"e.g. {result.unexpected_keys[:3]}")  # fmt: skip
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    expected = set(module.state_dict()) if conf.finetune == "full" else trainable
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"{ckpt_path}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}")

    model = module.model
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"refusing to export: non-finite weights in {len(bad)} tensors, e.g. {bad[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    if conf.finetune == "lora" and merge_lora:
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out)
    save_processor(conf.model, out, getattr(model.config, "model_type", None))
    meta = {
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(run_dir.resolve()),
        "checkpoint": str(ckpt_path.resolve()),
        "global_step": ckpt.get("global_step"),
        "base_model": conf.model,
        "finetune": conf.finetune,
        "lora_merged": conf.finetune == "lora" and merge_lora,
    }
    (out / "firm_export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
