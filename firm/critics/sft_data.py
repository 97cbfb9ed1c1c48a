"""Critic SFT data: curated edit / generation shards -> chat-formatted, tokenised examples with answer-only labels.

Each sample yields one training example per judgement it carries a label for (edit: Execution and Consistency;
generation: Instruction and Quality), because the critic makes each judgement in its own conversation. An example
is the critic's prompt (the images and the judgement's template) followed by the critic's answer; labels are -100
everywhere except on the answer's tokens (and the end-of-turn token that closes it), so the loss teaches the answer
only.

**Rendering is pluggable.** What the prompt says and how the answer is written belong to the critic. The DataModule
takes a *renderer*, a callable ``render(sample, dimension) -> (messages, answer) | None`` (None: no usable label).
Give it as an object (``CriticSFTDataModule(config, render=...)``) or in the config as an import string
``"package.module:Factory"`` called with ``renderer_options`` (default:
:class:`firm.critics.sft_render.CriticSFTRenderer`, which uses the critic's own prompt templates and answer
formats). ``messages`` use the neutral chat format of the critics: ``[{"role": ...,
"content": [{"type": "image", "image": PIL.Image} | {"type": "text", "text": ...}]}]``.

**Tokenisation** uses the critic checkpoint's processor (``processor:`` a directory written by
``save_pretrained``): the prompt goes through the chat template with the generation prompt appended, exactly as at
inference, and its image placeholders are expanded by the processor; the answer is the text the chat template writes
for the assistant turn, up to and including its end-of-turn token, tokenised on its own and appended.

Batches are what a Qwen-VL-style ``...ForConditionalGeneration.forward`` takes: ``input_ids``, ``attention_mask``,
``labels`` (B, T), right-padded; ``pixel_values`` (all images' patches concatenated) and ``image_grid_thw``
(images, 3); ``mm_token_type_ids`` (B, T) when the processor makes them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from firm.data.chat import ChatProcessor
from firm.data.reader import ReaderConfig, ShardDataset, make_loader

DEFAULT_RENDERER = "firm.critics.sft_render:CriticSFTRenderer"
MOVED_RENDERERS = {"firm.curation.sft:CriticSFTRenderer": DEFAULT_RENDERER}  # its place until 2026-12

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
EDIT_JUDGEMENTS = ("execution", "consistency")
GEN_JUDGEMENTS = ("instruction", "quality")

Renderer = Callable[[dict, str], "tuple[list[dict], str] | None"]


def resolve_callable(spec: str) -> Any:
    """The object named by ``"package.module:attr"``."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"expected 'package.module:Attr', got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r}: {type(e).__name__}: {e}") from None


class ChatExampleEncoder:
    """Tokenises (messages, answer) pairs with a vision-language checkpoint's processor; labels only the answer.

    The prompt is encoded by :class:`firm.data.chat.ChatProcessor`, the very code the local critic encodes its
    prompts with at inference, so training and inference prompts are the same tokens.

    Args:
        path: checkpoint directory (tokenizer with chat template, image processor; ``save_pretrained`` layout).
        max_length: examples longer than this many tokens are dropped (truncating would cut images or the answer).
        max_image_pixels: downscale larger images (keeping the aspect ratio) before encoding.
    """

    def __init__(self, path: str, max_length: int = 4096, max_image_pixels: int | None = None) -> None:
        self.path = str(path)
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self._loaded = False

    # Loaded lazily, so that the encoder pickles cheaply into DataLoader workers (each loads its own copy).
    def __getstate__(self) -> dict:
        return {"path": self.path, "max_length": self.max_length, "max_image_pixels": self.max_image_pixels}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _load(self) -> None:
        if self._loaded:
            return
        self.chat = ChatProcessor(self.path, self.max_image_pixels)
        self.processor = self.chat.processor
        self.tokenizer = self.chat.tokenizer
        self.image_processor = self.chat.image_processor
        self.image_token = self.chat.image_token
        self.eos_token = self.chat.eos_token
        self._loaded = True

    @property
    def pad_token_id(self) -> int:
        self._load()
        return int(self.tokenizer.pad_token_id)

    def answer_text(self, messages: list[dict], answer: str) -> tuple[str, str]:
        """``(prompt text, answer text)``: the chat template's rendering of the prompt (with the generation prompt)
        and of the assistant turn that follows it, cut after the end-of-turn token."""
        self._load()
        msgs, _ = self.chat.split(messages)
        prompt = self.chat.render(msgs)
        full = self.chat.render(
            [*msgs, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], add_generation_prompt=False
        )
        if full.startswith(prompt) and answer in full[len(prompt) :]:
            tail = full[len(prompt) :]
            end = tail.find(self.eos_token, tail.index(answer) + len(answer)) if self.eos_token else -1
            tail = tail[: end + len(self.eos_token)] if end != -1 else tail
        else:  # a template that rewrites earlier turns when an answer follows: fall back to answer + end token
            tail = answer + (self.eos_token or "")
        return prompt, tail

    def encode(self, messages: list[dict], answer: str) -> dict[str, torch.Tensor] | None:
        """One example: ``input_ids``, ``attention_mask``, ``labels`` (T,), plus image tensors; None if too long."""
        self._load()
        _, images = self.chat.split(messages)
        prompt, tail = self.answer_text(messages, answer)
        enc = self.chat.encode([prompt], images)
        prompt_ids = enc.pop("input_ids")[0]  # (P,)
        enc.pop("attention_mask", None)
        answer_ids = torch.tensor(self.tokenizer(tail, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (A,)
        n = prompt_ids.numel() + answer_ids.numel()
        if n > self.max_length:
            return None
        out = {
            "input_ids": torch.cat([prompt_ids, answer_ids]),  # (P + A,)
            "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
        }
        for k, v in enc.items():
            if k in ("mm_token_type_ids", "token_type_ids"):  # per token: answer tokens are text (0)
                out[k] = torch.cat([v[0], torch.zeros_like(answer_ids)])
            else:  # image tensors: pixel_values (patches, D), image_grid_thw (images, 3)
                out[k] = v
        return out


PER_TOKEN = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


def collate_examples(examples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad per-token tensors to (B, T_max); concatenate image tensors along their first dim."""
    if not examples:
        raise ValueError("empty batch")
    t = max(e["input_ids"].numel() for e in examples)
    pad_value = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch: dict[str, Any] = {}
    for k in examples[0]:
        if k.startswith("__"):
            batch[k] = [e[k] for e in examples]
        elif k in PER_TOKEN:
            out = torch.full((len(examples), t), pad_value.get(k, 0), dtype=examples[0][k].dtype)  # (B, T)
            for i, e in enumerate(examples):
                out[i, : e[k].numel()] = e[k]
            batch[k] = out
        else:
            batch[k] = torch.cat([e[k] for e in examples], dim=0)
    return batch


class ExampleBuilder:
    """Sample -> list of tokenised examples (one per judgement with a label); runs in the DataLoader workers."""

    def __init__(self, render: Renderer, encoder: ChatExampleEncoder, dimensions: tuple[str, ...]) -> None:
        self.render = render
        self.encoder = encoder
        self.dimensions = dimensions
        self.dropped_too_long = 0  # in this process

    def __call__(self, sample: dict) -> list[dict] | None:
        judgements = EDIT_JUDGEMENTS if sample.get("__schema__") == "edit" else GEN_JUDGEMENTS
        out = []
        for dim in judgements:
            if dim not in self.dimensions:
                continue
            rendered = self.render(sample, dim)
            if rendered is None:
                continue
            messages, answer = rendered
            ex = self.encoder.encode(messages, answer)
            if ex is None:
                self.dropped_too_long += 1
                log.warning(
                    "dropping %s/%s: longer than max_length=%d tokens", sample["key"], dim, self.encoder.max_length
                )
                continue
            ex["__key__"] = sample["key"]
            ex["__judgement__"] = dim
            out.append(ex)
        return out or None


class CriticSFTDataModule(L.LightningDataModule):
    """Streams curated shards as tokenised critic SFT examples (answer-only labels), split across ranks/workers.

    Args:
        config: see :class:`CriticSFTDataModule.Config`.
        render: the renderer object (overrides ``config.renderer``).
    """

    @dataclass
    class Config:
        name: str = "critic_sft"
        train_shards: str = "???"  # edit and/or generation shards: a folder, glob, brace pattern or list (a::b)
        val_shards: str | None = None  # validation shards (None: no validation loader)
        processor: str = "???"  # critic checkpoint directory whose tokenizer/image processor/chat template to use
        renderer: str = DEFAULT_RENDERER  # "module:Factory" building render(sample, judgement)
        renderer_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
        judgements: list[str] = field(
            default_factory=lambda: ["execution", "consistency", "instruction", "quality"]
        )  # which judgements become examples
        max_length: int = 4096  # drop examples longer than this many tokens (counted in the log)
        max_image_pixels: int | None = None  # downscale larger images before the processor
        batch_size: int = 4  # examples per device batch
        num_workers: int = 2  # DataLoader worker processes (each tokenises its share)
        reader: ReaderConfig = field(default_factory=ReaderConfig)  # shuffle buffer, split, corrupt policy

    def __init__(self, config: Config, render: Renderer | None = None) -> None:
        super().__init__()
        self.config = config
        bad = [j for j in config.judgements if j not in EDIT_JUDGEMENTS + GEN_JUDGEMENTS]
        if bad or not config.judgements:
            raise ValueError(
                f"critic_sft: unknown judgement(s) {bad or '(none)'}; choose from {EDIT_JUDGEMENTS + GEN_JUDGEMENTS}"
            )
        self._render = render
        self.encoder = ChatExampleEncoder(config.processor, config.max_length, config.max_image_pixels)
        self.train_set: ShardDataset | None = None
        self.val_set: ShardDataset | None = None

    def renderer(self) -> Renderer:
        if self._render is None:
            spec = self.config.renderer
            if spec in MOVED_RENDERERS:  # run directories written before the move name the old place
                warnings.warn(f"critic_sft: renderer {spec!r} is now {MOVED_RENDERERS[spec]!r}", stacklevel=2)
                spec = MOVED_RENDERERS[spec]
            factory = resolve_callable(spec)
            self._render = factory(**dict(self.config.renderer_options))
        return self._render

    def builder(self) -> ExampleBuilder:
        return ExampleBuilder(self.renderer(), self.encoder, tuple(self.config.judgements))

    def _dataset(self, shards: str, shuffle: bool) -> ShardDataset:
        reader = self.config.reader
        if not shuffle:
            reader = ReaderConfig(**{**reader.__dict__, "shuffle_buffer": 0, "shuffle_shards": False})
        return ShardDataset(shards, None, reader, transform=self.builder())

    def setup(self, stage: str | None = None) -> None:
        for what in ("train_shards", "processor"):
            if getattr(self.config, what) in (None, "", "???"):
                raise ValueError(f"critic_sft: set data.{what}")
        self.train_set = self._dataset(self.config.train_shards, shuffle=True)
        if self.config.val_shards:
            self.val_set = self._dataset(self.config.val_shards, shuffle=False)

    def _loader(self, dataset: ShardDataset) -> Any:
        collate = functools.partial(collate_examples, pad_token_id=self.encoder.pad_token_id)
        return make_loader(dataset, self.config.batch_size, num_workers=self.config.num_workers, collate_fn=collate)

    def train_dataloader(self) -> Any:
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set)

    def val_dataloader(self) -> Any:
        return self._loader(self.val_set) if self.val_set is not None else []
