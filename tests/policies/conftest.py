"""Shared fixtures for the RL tests: tiny policy configs and a tiny SD3 checkpoint with real CLIP / T5 encoders."""

from __future__ import annotations

from pathlib import Path

import pytest

from firm.policies.policy import LoRAConfig, PolicyConfig, TinyConfig

WORDS = "a an the red blue green yellow circle square triangle top left right bottom centre big small and of".split()


def tiny_policy_config(family: str = "sd3", **kw) -> PolicyConfig:
    tiny = kw.pop("tiny", {})
    return PolicyConfig(
        family=family,
        resolution=kw.pop("resolution", 16),
        lora=LoRAConfig(rank=4, alpha=8.0, init=kw.pop("lora_init", "default")),
        tiny=TinyConfig(**tiny),
        **kw,
    )


def _word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )


@pytest.fixture(scope="session")
def tiny_sd3_checkpoint(tmp_path_factory) -> Path:
    """A diffusers-layout SD3 checkpoint: tiny transformer, tiny VAE, two tiny CLIPs and a tiny T5, all random."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("tiny_sd3")
    torch.manual_seed(0)
    vocab = len(WORDS) + 4
    for sub, (hidden, proj) in {"text_encoder": (16, 8), "text_encoder_2": (16, 8)}.items():
        cfg = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=proj,
            max_position_embeddings=16,
            eos_token_id=2,
            pad_token_id=0,
        )
        CLIPTextModelWithProjection(cfg).save_pretrained(root / sub)
    T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    ).save_pretrained(root / "text_encoder_3")
    for sub, n in (("tokenizer", 16), ("tokenizer_2", 16), ("tokenizer_3", 8)):
        _word_tokenizer(n).save_pretrained(root / sub)
    # transformer: joint dim = T5 width (32) >= CLIP-L + CLIP-G widths (16 + 16); pooled = 8 + 8 projections
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from firm.policies.families.base import tiny_kl_vae

    SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    ).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    tiny_kl_vae(4).save_pretrained(root / "vae")  # 16 px images <-> 8x8 latents
    return root
