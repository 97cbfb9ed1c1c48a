"""Tiny random Qwen-VL checkpoints in the hub layout, and the reward-model releases built on them (no downloads).

* :func:`build_tiny_qwen2vl` writes what ``Qwen/Qwen2-VL-7B-Instruct`` ships, at toy size: ``config.json`` and
  ``model.safetensors`` of a ``Qwen2VLForConditionalGeneration`` (the real architecture: a ViT over 14 px patches with
  2D rotary positions, 2x2 patch merging, multimodal RoPE in the language model);
* :func:`build_tiny_qwen25vl` the same for ``Qwen/Qwen2.5-VL-*-Instruct``: a ``Qwen2_5_VLForConditionalGeneration``
  (windowed + full-attention vision blocks, 14 px patches merged 2x2, multimodal RoPE);
* :func:`build_tiny_hpsv3` and :func:`build_tiny_editreward`: a tiny backbone plus the fine-tuned whole-model state
  dict its reward model releases (``MizzenAI/HPSv3``, ``TIGER-Lab/EditReward-Qwen2.5-VL-7B``).

Both backbones get the same tokenizer (:func:`qwen_tokenizer`: a byte-level BPE with Qwen's control tokens and
Qwen2's ``tokenizer.json`` pipeline), the Qwen2-VL image processor with 14 px patches merged 2x2, and a chat template
that lays a conversation out as Qwen2-VL-Instruct's and Qwen2.5-VL-Instruct's do. Everything loads back with
``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from firm.rewards.scorers.qwen_vl import REWARD_TOKEN, reward_head

# Qwen2-VL's and Qwen2.5-VL's first control tokens (their tokenizers' added tokens, in id order after the BPE merges).
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

# Written for these checkpoints. For text, image and video parts it renders what the Qwen2-VL-7B-Instruct and
# Qwen2.5-VL-Instruct chat templates render: a "You are a helpful assistant." system turn when the conversation does
# not open with one, each turn as "<|im_start|>{role}\n...<|im_end|>\n", one
# "<|vision_start|><|image_pad|><|vision_end|>" per image (a part whose type is "image" or that carries an "image" /
# "image_url" key), "<|vision_start|><|video_pad|><|vision_end|>" per video, the text parts verbatim, and
# "<|im_start|>assistant\n" as the generation prompt. (No whitespace control: transformers renders chat templates with
# trim_blocks and lstrip_blocks, and "{%-" would eat the newlines the real templates write.)
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_CORPUS = (
    "You are a helpful assistant.",
    "Please describe the picture.",
    "A red square on a blue sky.",
    "Make the sky blue.",
)


def qwen_tokenizer(corpus: Sequence[str] = (), vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on ``corpus`` (and a few chat texts), with :data:`SPECIAL_TOKENS` first,
    Qwen's pad / end tokens and :data:`CHAT_TEMPLATE`, as a ``Qwen2TokenizerFast``."""
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


def _image_processor(max_pixels: int):
    """The Qwen2-VL image processor (used by both families): 14 px patches, 2x2 merge, 2-frame temporal patches, the
    CLIP mean / std (its defaults), images kept between 3136 (56*56) and ``max_pixels`` pixels."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    )


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_config(tokenizer: Any, hidden_size: int, num_layers: int, rope_theta: float, **extra: Any) -> dict:
    """The language model's config: 2 heads sharing one KV head, the rotary half-dimension split over (time, height,
    width) in the 7B models' proportions [16, 24, 24]."""
    ids = _token_ids(tokenizer)
    half = hidden_size // 2 // 2
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
        **extra,
    )


def _save(model_class: Any, config: Any, tokenizer: Any, image_processor: Any, path: Path, seed: int) -> Path:
    """Draw the model's weights (seeded) and write model, tokenizer and image processor to ``path``."""
    ids = _token_ids(tokenizer)
    config.image_token_id = ids["<|image_pad|>"]
    config.video_token_id = ids["<|video_pad|>"]
    config.vision_start_token_id = ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


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
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = qwen_tokenizer(corpus, vocab_size)
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, hidden_size, num_layers, rope_theta=1000000.0, pad_token_id=None),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=hidden_size,
            hidden_size=hidden_size,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )
    # Qwen2-VL-7B-Instruct's preprocessor_config.json: max_pixels 12845056 (28*28*16384)
    return _save(Qwen2VLForConditionalGeneration, config, tokenizer, _image_processor(12845056), Path(path), seed)


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
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer with chat template, image processor) to ``path``;
    the arguments are :func:`build_tiny_qwen2vl`'s, and

    Args:
        vision_depth: vision blocks; the last one attends over the whole image, the others within 112 px windows,
            as in Qwen2.5-VL (the tower's output matches the language model's width).
        init_std: standard deviation of the random weights (Qwen2.5-VL's ``initializer_range`` is 0.02; larger makes
            a toy model's output depend more on its input).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(corpus, vocab_size)
    pad = _token_ids(tokenizer)["<|endoftext|>"]
    config = Qwen2_5_VLConfig(
        text_config=_text_config(
            tokenizer, hidden_size, num_layers, rope_theta=10000.0, pad_token_id=pad, initializer_range=init_std
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
            initializer_range=init_std,
        ),
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    # Qwen2.5-VL's processor keeps images under 28*28*1280 pixels
    return _save(
        Qwen2_5_VLForConditionalGeneration, config, tokenizer, _image_processor(28 * 28 * 1280), Path(path), seed
    )


def flat_key(key: str) -> str:
    """transformers 5's Qwen-VL weight name in transformers 4.45's flat layout (the released HPSv3.safetensors')."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def _fine_tuned(base: Path, model_class: Any, *, seed: int, reward_std: float) -> Any:
    """The backbone at ``base`` as the reward trainers set it up (``<|Reward|>`` added to the tokenizer, embeddings
    resized to it), its ``<|Reward|>`` row drawn as training would have learnt one; the torch seed is then ``seed``'s
    stream, for the heads that follow."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model = model_class.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1].normal_(0.0, reward_std)
    return model


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
    from transformers import Qwen2VLForConditionalGeneration

    root = Path(root)
    base = build_tiny_qwen2vl(root / "base", corpus=corpus, vocab_size=600, seed=seed)
    model = _fine_tuned(base, Qwen2VLForConditionalGeneration, seed=seed + 1, reward_std=0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.language_model.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    head = reward_head(model.config.text_config.hidden_size)
    with torch.no_grad():
        head[5].weight.mul_(head_scale)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.update({f"rm_head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    ckpt = root / "HPSv3.safetensors"
    save_file({flat_key(k): v.contiguous() for k, v in sd.items()}, str(ckpt))
    return base, ckpt, sd


def build_tiny_editreward(
    root: str | Path, *, corpus: Sequence[str] = (), init_std: float = 0.3, head_gain: float = 1.5, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny EditReward release: ``root/base`` (a tiny Qwen2.5-VL, as Qwen2.5-VL-7B-Instruct ships) and
    ``root/release/model.safetensors`` (the whole fine-tuned model, as TIGER-Lab/EditReward-Qwen2.5-VL-7B ships it:
    ``<|Reward|>`` added, embeddings resized, the heads ``rm_heads.head_0`` / ``head_1``, transformers 5's keys).

    Args:
        corpus: texts the tokenizer is trained on.
        init_std: the backbone's weight scale (a random model this small with Qwen's 0.02 barely looks at its input).
        head_gain: the heads' weights are drawn with std ``head_gain / sqrt(fan_in)`` (outputs of order 1).

    Returns:
        ``(base dir, release dir)``.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = Path(root)
    base = build_tiny_qwen25vl(root / "base", corpus=corpus, init_std=init_std, seed=seed)
    model = _fine_tuned(base, Qwen2_5_VLForConditionalGeneration, seed=seed + 1, reward_std=0.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(2):
        head = reward_head(model.config.text_config.hidden_size)
        for layer in (head[0], head[3], head[5]):
            torch.nn.init.normal_(layer.weight, std=head_gain / layer.in_features**0.5)
        state.update({f"rm_heads.head_{i}.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    release = root / "release"
    release.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(release / "model.safetensors"))
    return base, release
