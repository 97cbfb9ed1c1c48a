"""A tiny random Qwen2-VL checkpoint in the hub layout, built locally (no downloads).

``build_tiny_qwen2vl(dir)`` writes what ``Qwen/Qwen2-VL-7B-Instruct`` ships, at toy size: ``config.json`` and
``model.safetensors`` of a ``Qwen2VLForConditionalGeneration`` (the real architecture: a ViT over 14 px patches with 2D
rotary positions, 2x2 patch merging, multimodal RoPE in the language model), a byte-level BPE tokenizer with Qwen's
control tokens, the Qwen2-VL image processor with that model's settings, and a chat template that lays a conversation
out as Qwen2-VL-Instruct's does. Everything loads back with ``from_pretrained`` / ``AutoProcessor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

# Qwen2-VL's control tokens (its tokenizer's added tokens, in id order after the BPE merges).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Written for these tests. For text, image and video parts it renders what Qwen2-VL-7B-Instruct's chat_template.json
# renders: a "You are a helpful assistant." system turn when the conversation does not open with one, each turn as
# "<|im_start|>{role}\n...<|im_end|>\n", one "<|vision_start|><|image_pad|><|vision_end|>" per image (a part whose type
# is "image" or that carries an "image" / "image_url" key), "<|vision_start|><|video_pad|><|vision_end|>" per video,
# the text parts verbatim, and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ m['role'] }}\n"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'video' or 'video' in c -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in c -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_DEFAULT_CORPUS = ("You are a helpful assistant.", "Please describe the picture.", "A red square on a blue sky.")


def _tokenizer(corpus: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def build_tiny_qwen2vl(
    path: str | Path,
    *,
    corpus: Sequence[str] = (),
    vocab_size: int = 1000,
    hidden_size: int = 32,
    num_layers: int = 2,
    vision_depth: int = 1,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2-VL checkpoint (model, tokenizer with chat template, image processor) to ``path``.

    Args:
        corpus: extra texts the BPE tokenizer is trained on (texts a test will encode become few tokens).
        vocab_size: BPE vocabulary size (control tokens included).
        hidden_size, num_layers: the language model's width and depth; the vision tower is as wide and its merger
            outputs this width.
        vision_depth: vision transformer blocks.
        seed: torch seed of the random weights.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = _tokenizer(corpus, vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Qwen2-VL-7B-Instruct's preprocessor_config.json: 14 px patches, 2x2 merge, 2-frame temporal patches, the CLIP
    # mean / std (the processor's defaults), images kept between 3136 (56*56) and 12845056 (28*28*16384) pixels.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056
    )
    heads = 2
    head_dim = hidden_size // heads
    half = head_dim // 2
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                # the rotary half-dimension split over (time, height, width) in Qwen2-VL-7B's proportions [16, 24, 24]
                "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8],
            },
            pad_token_id=None,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=hidden_size,
            hidden_size=hidden_size,
            mlp_ratio=2,
            num_heads=heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def flat_key(key: str) -> str:
    """transformers 5's Qwen2-VL weight name in transformers 4.45's flat layout (the released HPSv3.safetensors')."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def hpsv3_head(hidden: int) -> torch.nn.Sequential:
    """HPSv3's reward head: qwen2vl_trainer.py, rm_head_type "ranknet" without rm_head_kwargs, output_dim 2."""
    layers = [torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05)]
    layers += [torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)]
    return torch.nn.Sequential(*layers)


def build_tiny_hpsv3(
    root: str | Path, *, corpus: Sequence[str] = (), qk_scale: float = 1.0, head_scale: float = 1.0, seed: int = 0
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny HPSv3 release: ``root/base`` (a tiny Qwen2-VL, as Qwen2-VL-7B-Instruct ships) and
    ``root/HPSv3.safetensors`` (the whole fine-tuned model, as MizzenAI/HPSv3 ships it: ``<|Reward|>`` added to the
    vocabulary, embeddings resized, the float32 ``rm_head``, keys in the transformers 4.45 layout).

    Args:
        corpus: texts the tokenizer is trained on.
        qk_scale: multiplies the language model's query / key weights (sharper attention: positions matter more).
        head_scale: multiplies the head's last layer (outputs of order 1 rather than 0.01).

    Returns:
        ``(base dir, checkpoint file, the state dict in transformers 5's layout)``.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    root = Path(root)
    base = build_tiny_qwen2vl(root / "base", corpus=corpus, vocab_size=600, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1].normal_(0.0, 0.02)  # the learnt <|Reward|> embedding
        for name, p in model.named_parameters():
            if name.startswith("model.language_model.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    head = hpsv3_head(model.config.text_config.hidden_size)
    with torch.no_grad():
        head[5].weight.mul_(head_scale)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.update({f"rm_head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    ckpt = root / "HPSv3.safetensors"
    save_file({flat_key(k): v.contiguous() for k, v in sd.items()}, str(ckpt))
    return base, ckpt, sd
