"""A tiny random GOT-OCR-2.0 checkpoint in the ``-hf`` hub layout, built locally (no downloads).

``build_tiny_got_ocr(dir)`` writes what ``stepfun-ai/GOT-OCR-2.0-hf`` ships, at toy size: a
``GotOcr2ForConditionalGeneration`` (SAM-style ViT encoder, conv projector, Qwen2 decoder), a ``GotOcr2Processor``
(GOT image processor + a byte-level BPE tokenizer with GOT's special tokens), all saved with ``save_pretrained`` so the
scorer loads it through the regular ``from_pretrained`` path.

The geometry keeps the real checkpoint's token count: the real one turns a 1024 px image into a 64 x 64 grid of 16 px
patches, which the projector's two stride-2 convolutions reduce to 16 x 16 = 256 image tokens, the processor's default
``num_image_tokens``. Here a 64 px image and 1 px patches give the same 64 x 64 grid, so the processor's
unmodified call (``processor(images, return_tensors="pt")``, as on the model card) matches the model.

Tests and the tiny CPU twins of the OCR experiments build it (``${tiny_reward:got_ocr}`` in a YAML).
"""

from __future__ import annotations

from pathlib import Path

import torch

# GOT's chat and image markers (the processor builds its prompt from them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]
IMAGE_SIZE = 64  # px; the real checkpoint uses 1024
WEIGHT_STD = 0.3


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    # The processor's fixed prompt and some sign-like text, so common words become single tokens.
    corpus = [
        "system\nYou should follow the instructions carefully and explain your answers in detail.",
        "user\n OCR: assistant\n",
        "Hello World OPEN 24 HOURS Coffee Shop Sale 50% off Welcome Home FIRM Flow GRPO",
    ] * 3
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )


def build_tiny_got_ocr(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random GOT-OCR-2.0 checkpoint (model, processor, tokenizer) to ``path``."""
    from transformers import (
        GotOcr2Config,
        GotOcr2ForConditionalGeneration,
        GotOcr2ImageProcessorPil,
        GotOcr2Processor,
    )

    path = Path(path)
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # The hub checkpoint's preprocessing (CLIP mean/std, bicubic resize to a square), at 64 px.
    image_processor = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = GotOcr2Config(
        vision_config=dict(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=1,
            mlp_dim=32,
            window_size=8,
            global_attn_indexes=[],
            initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_index=ids["<imgpad>"],
        image_seq_length=256,
    )
    torch.manual_seed(seed)
    model = GotOcr2ForConditionalGeneration(config)
    # The default init (tiny std, zero position and relative-position tables) makes a random model's greedy output
    # the same token whatever the image; larger random weights make each image read differently.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or "pos" in name:
                p.normal_(std=WEIGHT_STD)
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
