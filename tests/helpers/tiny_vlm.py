"""A tiny Qwen3-VL-architecture critic built locally (no downloads): random weights, a BPE tokenizer trained on the
critic prompts, a Qwen2-VL image processor and a chat template, saved with ``save_pretrained``.

``build_tiny_vlm(dir)`` writes the checkpoint; ``LocalCritic`` (and `firm critic serve`) load it back with the
regular ``from_pretrained`` path. ``teach_answer`` fine-tunes the tiny model for a few steps to always answer a
fixed text, so that tests can also exercise the path where the critic's output parses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from firm.synthetic.tiny_critic import SPECIAL_TOKENS

# Written for these tests: roles, then text and image parts in order, Qwen-style image placeholders. Not the
# template of firm.synthetic.tiny_critic: this one keeps a newline after each <|im_end|> and after the generation
# prompt's "assistant"; kept so that the prompts these tests encode stay exactly as they were.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    from firm.critics.prompts import DEFAULT_TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [*DEFAULT_TEMPLATES.values(), '{"reasoning": "the change is there", "score": 4}'] * 3
    tok.train_from_iterator(corpus, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL checkpoint (model, tokenizer, image processor, chat template) to ``path``."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # 16 px patches merged 2x2: a 32..64 px image becomes 1..4 visual tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
            max_position_embeddings=4096,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def teach_answer(path: str | Path, answer: str, conversations: list[list[dict]], steps: int = 60) -> Path:
    """Fine-tune the checkpoint at ``path`` (in place) to answer ``answer`` to the given conversations."""
    from transformers import AutoModelForImageTextToText

    from firm.critics.local import ChatEncoder

    path = Path(path)
    encoder = ChatEncoder(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    tok = encoder.tokenizer
    target = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    enc = encoder(conversations)  # left-padded prompts
    n, p = enc["input_ids"].shape
    ans = torch.tensor(target).expand(n, -1)
    input_ids = torch.cat([enc["input_ids"], ans], dim=1)  # (N, P + A)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(ans)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, p:] = ans
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # answer tokens are text
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ans)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels, **extra).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    return path
