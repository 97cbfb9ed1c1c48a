"""Builders of tiny random checkpoints with the real classes and the real hub layout, for the family parity tests.

Each builder writes what the hub repository of the model holds (``model_index.json``, one folder per component,
tokenizer / processor files), at a tiny size with random weights, so that both FIRM and the official diffusers
pipeline load it with ``from_pretrained``. Tokenizers are built here (no downloads): a byte-level BPE with the
special tokens the Qwen templates use, and word-level tokenizers for CLIP / T5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PROMPTS = ["a red circle at the top left", "turn the square blue", "a small green triangle", "add a yellow star"]


def write_model_index(root: Path, pipeline: str, components: dict[str, tuple[str, str] | None]) -> None:
    """``model_index.json`` as diffusers writes it: the pipeline class and each component's (library, class)."""
    import diffusers

    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) if v else [None, None] for k, v in components.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def qwen_tokenizer(corpus: list[str], vocab_size: int = 400, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on ``corpus`` (the templates and prompts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 3, trainer)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        **kwargs,
    )


def qwen25_vl(tokenizer: Any, *, hidden: int = 32, layers: int = 2, vision_hidden: int = 16) -> Any:
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` whose special-token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    heads = 2
    section = hidden // heads // 2  # the rotary half-dimension, split over (time, height, width)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [section - 2 * (section // 4), section // 4, section // 4],
            },
            max_position_embeddings=8192,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
            out_hidden_size=hidden,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_qwen_vl_processor(directory: Path, tokenizer: Any) -> None:
    """``processor/`` as the Qwen-Image-Edit repos hold it: a Qwen2-VL image processor (patch 14, merge 2), the
    tokenizer, a chat template and the processor class, plus the video processor config the hub ships."""
    from transformers import Qwen2VLImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(directory)
    cfg = json.loads((directory / "preprocessor_config.json").read_text())
    cfg.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(directory)
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))


def tiny_qwen_image_vae(z_dim: int = 4) -> Any:
    """``AutoencoderKLQwenImage`` with three temporal-free downsamplings (8x, like the real one), tiny widths."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, False, False],
        latents_mean=[0.1 * i for i in range(z_dim)],
        latents_std=[1.0 + 0.2 * i for i in range(z_dim)],
    )


def tiny_qwen_transformer(z_dim: int = 4, text_dim: int = 32) -> Any:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        axes_dims_rope=(4, 6, 6),
    )


def flow_scheduler(**kw: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def qwen_image_scheduler() -> Any:
    """The Qwen-Image repos' scheduler config: dynamic exponential shifting between shifts 0.5 and 0.9."""
    return flow_scheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        invert_sigmas=False,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        stochastic_sampling=False,
        time_shift_type="exponential",
        use_beta_sigmas=False,
        use_dynamic_shifting=True,
        use_exponential_sigmas=False,
        use_karras_sigmas=False,
    )


def advantages(run_dir: Path) -> list[float]:
    """``adv/abs_mean`` of every RL step a run logged (the LoRA tests check that their runs really trained)."""
    import csv

    rows = csv.DictReader(open(next(run_dir.glob("csv/**/metrics.csv"))))
    return [float(r["adv/abs_mean"]) for r in rows if r.get("adv/abs_mean")]


def trained_policy(yaml: str, checkpoint: Path, tmp_path: Path, overrides: list[str]) -> tuple[Any, Path]:
    """A short RL run of ``yaml`` on ``checkpoint``, checked to have trained (nonzero advantages), exported with
    ``export_lora``; returns the run's policy with its trained adapters loaded and the exported LoRA's directory."""
    import torch

    from firm.config import load_experiment, to_object
    from firm.policies.export import export_lora
    from firm.policies.policy import FlowPolicy
    from firm.runner import run

    run_dir = run(yaml, [f"output_root={tmp_path}", f"module.policy.pretrained={checkpoint}", *overrides])
    adv = advantages(run_dir)
    assert adv and max(adv) > 0  # the run really trained (an update with nonzero advantages)
    out = export_lora(run_dir, tmp_path / "lora")
    cfg = to_object(load_experiment(run_dir / "config.yaml"))
    cfg.module.policy.condition_area = None  # compare at the pipeline's default source size
    policy = FlowPolicy(cfg.module.policy, old_adapter=True).eval()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sd = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert not policy.load_state_dict(sd, strict=False).unexpected_keys
    return policy, out.parent
