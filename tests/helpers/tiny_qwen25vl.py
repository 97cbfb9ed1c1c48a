"""A tiny random Qwen2.5-VL checkpoint in the hub layout, built locally (no downloads).

``build_tiny_qwen25vl(dir)`` writes what ``Qwen/Qwen2.5-VL-*-Instruct`` ships, at toy size: ``config.json`` and
``model.safetensors`` of a ``Qwen2_5_VLForConditionalGeneration`` (the real architecture: windowed + full-attention
vision blocks, 14 px patches merged 2x2, multimodal RoPE), a byte-level BPE tokenizer with Qwen's special tokens, a
Qwen2-VL image processor and a chat template that lays a conversation out as Qwen2.5-VL's does (a default system
turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per image, the generation prompt). Everything loads back with
``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

# Qwen2.5-VL's control tokens (a subset of its added tokens: those a chat with images uses).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Written for these tests. It renders what Qwen2.5-VL-Instruct's template renders for text and image parts: a
# "You are a helpful assistant." system turn when the conversation has none, one vision block per image, the text
# parts in order, then "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_CORPUS = ("You are a helpful assistant.", "Please describe the picture.", "Make the sky blue.")


def _tokenizer(corpus: Sequence[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # Qwen2's tokenizer.json pipeline (NFC, its split regex, byte-level without GPT-2's regex), so that any
    # transformers version that reads tokenizer.json as it is splits text as one that rebuilds Qwen2's pipeline.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*_DEFAULT_CORPUS, *corpus] * 2, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen25vl(
    path: str | Path,
    *,
    corpus: Sequence[str] = (),
    vocab_size: int = 1000,
    hidden_size: int = 32,
    num_layers: int = 2,
    vision_depth: int = 2,
    init_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer with chat template, image processor) to ``path``.

    Args:
        corpus: extra texts the BPE tokenizer is trained on (texts a test will encode become few tokens).
        vocab_size: BPE vocabulary size (special tokens included).
        hidden_size, num_layers: the language model's width and depth (the vision tower's output matches the width).
        vision_depth: vision blocks; the last one attends over the whole image, the others within 112 px windows,
            as in Qwen2.5-VL.
        init_std: standard deviation of the random weights (Qwen2.5-VL's ``initializer_range`` is 0.02; larger makes
            a toy model's output depend more on its input).
        seed: torch seed of the random weights.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = _tokenizer(corpus, vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Qwen2.5-VL's image processor settings: 14 px patches, 2x2 merge, 2-frame temporal patches, CLIP mean / std,
    # images kept between 56*56 and 28*28*1280 pixels.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    )
    heads = 2
    head_dim = hidden_size // heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            initializer_range=init_std,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                # split of the rotary half-dimension over (time, height, width), as Qwen2.5-VL's [16, 24, 24]
                "mrope_section": [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16],
            },
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_heads=heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
            initializer_range=init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path
