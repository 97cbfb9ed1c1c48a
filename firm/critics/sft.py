"""Supervised fine-tuning of a vision-language critic (the FIRM-Edit-8B / FIRM-Gen-8B recipe) as a LightningModule.

The model is any ``AutoModelForImageTextToText`` checkpoint (Qwen3-VL-8B-Instruct in the paper). Batches come from
``CriticSFTDataModule``: chat-formatted examples tokenised by the model's processor, with ``labels`` equal to
``input_ids`` on the answer tokens and ``-100`` everywhere else (system prompt, user turn, images, padding).

Loss: answer-only cross-entropy, i.e. the mean over answer tokens of ``-log p(token | everything before it)``.
Logits are computed only at the positions that predict an answer token (``logits_to_keep`` as a boolean mask), which
keeps the ``(tokens, vocab)`` logits small when the prompt holds thousands of image tokens.

Paper settings: full fine-tuning, AdamW, lr 1e-5, cosine schedule with 10% linear warmup, 1 epoch, bf16. LoRA (peft)
is an option. Multi-GPU: ``trainer.strategy: fsdp2`` (FSDP2) shards the model's decoder layers and vision blocks
(:attr:`CriticSFTModule.fsdp_wrap_modules`) in ``configure_model``; ddp otherwise.

Validation logs the answer-token loss, and on the first ``val_generate_batches`` batches it also generates answers
greedily from the prompt part of each example, parses a score from them (the critics' JSON / ``\\boxed{}`` parsers)
and compares it with the score in the reference answer: ``val/parse_rate`` and ``val/mae``. A few generations are
written as text to TensorBoard and to ``<run>/val_generations/step*.jsonl``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from firm.module import FirmModule

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Batch entries passed to the model's forward / generate; anything else in a batch (keys, scores, texts) is metadata.
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
    "pixel_values_videos",
    "video_grid_thw",
)
LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------------------------
# Pure functions (tested alone)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, L)`` mask of the positions whose *next* token is an answer token (the causal-LM shift).

    Position ``t`` predicts token ``t + 1``; the last position predicts nothing.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens from full logits.

    Args:
        logits: ``(B, L, V)`` next-token logits.
        labels: ``(B, L)`` token ids on answer tokens, ``-100`` elsewhere.

    Returns:
        ``(loss, number of answer tokens)``; the loss is computed in float32.
    """
    shift_logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, L-1)
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )  # fmt: skip
    return loss / max(n, 1), n


def kept_answer_loss(kept_logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same loss from logits computed only at ``keep`` positions (``(N, V)``, row-major over ``(B, L)``)."""
    targets = labels[:, 1:][keep[:, :-1]]  # (N,)
    n = int(targets.numel())
    loss = F.cross_entropy(kept_logits.float().reshape(-1, kept_logits.shape[-1]), targets, reduction="sum")
    return loss / max(n, 1), n


def prompt_batch(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The prompt part of each example (everything before its first answer token), left-padded for generation.

    Works for left- or right-padded batches (padding is found through ``attention_mask``). Image inputs are kept
    as they are: every image placeholder lies in the prompt part, in the same order.

    Returns:
        ``(model inputs, index of the first answer token of each row in the original batch)``.
    """
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, starts = [], []
    for i in range(ids.shape[0]):
        answer = (labels[i] != IGNORE_INDEX).nonzero()
        start = int(answer[0]) if len(answer) else int(att[i].sum())
        starts.append(start)
        real = att[i, :start].bool()
        rows.append(torch.arange(start, device=ids.device)[real])  # indices of real prompt tokens
    width = max(len(r) for r in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype, device=ids.device)
    out_att = torch.zeros((len(rows), width), dtype=att.dtype, device=ids.device)
    tt = batch.get("mm_token_type_ids")
    out_tt = torch.zeros((len(rows), width), dtype=tt.dtype, device=ids.device) if tt is not None else None
    for i, r in enumerate(rows):
        out_ids[i, width - len(r) :] = ids[i, r]
        out_att[i, width - len(r) :] = 1
        if out_tt is not None:
            out_tt[i, width - len(r) :] = tt[i, r]
    inputs = {"input_ids": out_ids, "attention_mask": out_att}
    if out_tt is not None:
        inputs["mm_token_type_ids"] = out_tt
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if batch.get(k) is not None:
            inputs[k] = batch[k]
    return inputs, starts


def read_score(text: str, answer_format: str = "auto", judgement: str | None = None) -> int | None:
    """A 1..5 score from an answer, read with the parser of its format.

    Args:
        text: the answer.
        answer_format: ``json`` (``{"score": N}``), ``boxed`` (``\\boxed{N}``) or ``auto``: by ``judgement`` when given
            (execution / consistency: json, instruction: boxed, quality: the minimum of the three aspect scores),
            else json then boxed.
        judgement: which judgement the answer is for (the batch's ``__judgement__``), if known.
    """
    from firm.critics.parsing import parse_boxed_score, parse_json_score, parse_quality_scores

    if answer_format == "json":
        return parse_json_score(text)
    if answer_format == "boxed":
        return parse_boxed_score(text)
    if judgement in ("execution", "consistency"):
        return parse_json_score(text)
    if judgement == "instruction":
        return parse_boxed_score(text)
    if judgement == "quality":
        aspects = parse_quality_scores(text)
        return min(aspects.values()) if aspects else None
    score = parse_json_score(text)
    return score if score is not None else parse_boxed_score(text)


def decoder_layer_classes(model_path: str) -> set[type]:
    """The transformer block classes of a checkpoint (its ``_no_split_modules``), found from ``config.json`` alone.

    Used as the FSDP auto-wrap policy before the weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    model_cls = AutoModelForImageTextToText._model_mapping[type(config)]
    module = sys.modules.get(model_cls.__module__) or importlib.import_module(model_cls.__module__)
    names = getattr(model_cls, "_no_split_modules", None) or []
    classes = {getattr(module, n) for n in names if hasattr(module, n)}
    if not classes:
        raise ValueError(f"{model_path}: cannot find the decoder layer classes of {model_cls.__name__} for FSDP")
    return classes


def pick_attention(requested: str, on_gpu: bool) -> str:
    """``flash_attention_2`` when requested as ``auto`` on a GPU with flash-attn importable, else ``sdpa``."""
    if requested != "auto":
        return requested
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------------------------------------------------
# The LightningModule


class CriticSFTModule(FirmModule):
    """Fine-tunes a vision-language critic on answer tokens (full or LoRA)."""

    @dataclass
    class Config:
        name: str = "critic_sft"
        model: str = "Qwen/Qwen3-VL-8B-Instruct"  # save_pretrained directory (or hub id when downloads are possible)
        random_init: bool = False  # build the architecture from config.json with random weights (throughput tests)
        dtype: str = "float32"  # weight dtype: float32 (use trainer.precision bf16-mixed on GPU) | bfloat16
        attn_implementation: str = "auto"  # auto: flash_attention_2 when flash-attn is importable on GPU, else sdpa
        gradient_checkpointing: bool = True  # recompute decoder activations in backward (memory for compute)
        finetune: str = "full"  # full | lora
        freeze_vision: bool = False  # keep the vision encoder (and its merger) frozen
        lora_r: int = 32  # LoRA rank (finetune: lora)
        lora_alpha: int = 64  # LoRA alpha
        lora_dropout: float = 0.0  # LoRA dropout
        lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))  # LoRA targets
        lr: float = 1.0e-5  # AdamW peak learning rate
        weight_decay: float = 0.0  # AdamW weight decay
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
        warmup_ratio: float = 0.1  # linear warmup over this fraction of all optimizer steps
        min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
        answer_format: str = "auto"  # how scores are written in answers: json | boxed | auto (either)
        val_generate_batches: int = 4  # validation batches on which answers are generated and parsed (0: none)
        val_max_new_tokens: int = 256  # generation budget per validation answer
        val_log_samples: int = 4  # generations written as text per validation run

    fsdp_checkpoint = False  # gradient checkpointing is done by transformers, not by the FSDP strategy
    supports_fsdp2 = True  # trainer.strategy: fsdp2 shards decoder layers and vision blocks in configure_model

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.finetune not in ("full", "lora"):
            raise ValueError(f"module.finetune must be 'full' or 'lora', got {config.finetune!r}")
        if config.answer_format not in ("auto", "json", "boxed"):
            raise ValueError(f"module.answer_format must be auto, json or boxed, got {config.answer_format!r}")
        if not 0 <= config.warmup_ratio < 1:
            raise ValueError(f"module.warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None
        self.strict_loading = config.finetune == "full"  # LoRA checkpoints hold only the adapter weights
        self._val_rows: list[dict[str, Any]] = []

    # ---- model construction (lazy: `firm run --dry-run` and the FSDP policy need no weights)

    @property
    def fsdp_wrap_modules(self) -> set[type]:
        """Decoder layers and vision blocks: the units FSDP shards and gathers one at a time."""
        return decoder_layer_classes(self.config.model)

    def build_model(self, device: torch.device | None = None) -> Any:
        """Load (or randomly initialise) the model and apply LoRA / freezing / gradient checkpointing."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        c = self.config
        on_gpu = (device is not None and device.type == "cuda") or (device is None and torch.cuda.is_available())
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
        attn = pick_attention(c.attn_implementation, on_gpu)
        if c.random_init:
            hf_config = AutoConfig.from_pretrained(c.model)
            model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForImageTextToText.from_pretrained(c.model, dtype=dtype, attn_implementation=attn)
        log.info("critic %s loaded (%s, attention: %s)", c.model, dtype, attn)
        if c.freeze_vision:
            for n, p in model.named_parameters():
                if ".visual." in f".{n}" or n.startswith("visual."):
                    p.requires_grad_(False)
        if c.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        if c.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                target_modules=list(c.lora_target_modules), bias="none",
            )  # fmt: skip
            if c.gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, lora)
        self.tokenizer = AutoTokenizer.from_pretrained(c.model)
        return model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model(self.device)
        mesh = self._device_mesh  # trainer.strategy: fsdp2 (firm.runner): shard layer by layer, then the root
        if mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            dp = mesh["data_parallel"] if mesh.ndim > 1 else mesh
            reshard = getattr(self.trainer.strategy, "reshard_after_forward", True)
            layers = tuple(self.fsdp_wrap_modules)
            for m in list(self.model.modules()):
                if isinstance(m, layers):
                    fully_shard(m, mesh=dp, reshard_after_forward=reshard)
            fully_shard(self.model, mesh=dp, reshard_after_forward=reshard)
            self._sharded = True

    # ---- steps

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}

    def answer_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Answer-only cross-entropy of a batch (logits computed only where an answer token is predicted)."""
        labels = batch["labels"]
        keep = answer_positions(labels)  # (B, L)
        if not keep.any():
            raise ValueError("a batch has no answer tokens (every label is -100): check the data's label masking")
        out = self.model(**self._model_inputs(batch), logits_to_keep=keep, use_cache=False)
        logits = out.logits
        if logits.dim() == 3:  # a model that ignores boolean logits_to_keep returns (B, L, V)
            return answer_only_loss(logits, labels)
        return kept_answer_loss(logits, labels, keep)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, n = self.answer_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/answer_tokens", float(n), batch_size=bs, reduce_fx="sum")
        return self.finite_or_skip(loss)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, n = self.answer_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=max(n, 1))
        if batch_idx < self.config.val_generate_batches:
            self._val_rows += self.generate_and_score(batch)

    @torch.no_grad()
    def generate_and_score(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Greedy answers to the prompt part of each example, with parsed and reference scores."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        inputs, starts = prompt_batch(batch, pad)
        sharded = self.trainer is not None and self.trainer.world_size > 1 and "fsdp" in type(
            self.trainer.strategy
        ).__name__.lower()  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **inputs, max_new_tokens=self.config.val_max_new_tokens, do_sample=False, pad_token_id=pad,
                use_cache=True, synced_gpus=sharded,
            )  # fmt: skip
        finally:
            self.model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, T) generated tokens
        judgements = batch.get("__judgement__") or [None] * new.shape[0]
        keys = batch.get("__key__") or [None] * new.shape[0]
        fmt = self.config.answer_format
        rows = []
        for i in range(new.shape[0]):
            text = tok.decode(new[i], skip_special_tokens=True)
            ref_ids = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
            reference = tok.decode(ref_ids, skip_special_tokens=True)
            rows.append(
                {
                    "key": keys[i],
                    "judgement": judgements[i],
                    "generated": text,
                    "reference": reference,
                    "score": read_score(text, fmt, judgements[i]),
                    "reference_score": read_score(reference, fmt, judgements[i]),
                    "prompt_tokens": starts[i],
                }
            )
        return rows

    def on_validation_epoch_end(self) -> None:
        rows = [r for r in self._val_rows if r["reference_score"] is not None]
        n = torch.tensor(float(len(rows)), device=self.device)
        parsed = [r for r in rows if r["score"] is not None]
        k = torch.tensor(float(len(parsed)), device=self.device)
        abs_err = torch.tensor(float(sum(abs(r["score"] - r["reference_score"]) for r in parsed)), device=self.device)
        if self.trainer.world_size > 1:
            n, k, abs_err = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in (n, k, abs_err))
        if n > 0:
            self.log("val/parse_rate", k / n, prog_bar=True, rank_zero_only=True)
            self.log("val/generated", n, rank_zero_only=True)
        if k > 0:
            self.log("val/mae", abs_err / k, prog_bar=True, rank_zero_only=True)
        if self.global_rank == 0 and self._val_rows:
            self._write_samples(self._val_rows[: self.config.val_log_samples])
        self._val_rows = []

    def _write_samples(self, rows: list[dict[str, Any]]) -> None:
        root = Path(self.trainer.default_root_dir) / "val_generations"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"step{self.global_step:07d}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        text = "\n\n".join(
            f"**reference** ({r['reference_score']}): `{r['reference'][:500]}`  \n"
            f"**generated** ({r['score']}): `{r['generated'][:500]}`"
            for r in rows
        )
        for lg in self.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_text"):
                exp.add_text("val/generations", text, global_step=self.global_step)

    # ---- optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.config
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=tuple(c.betas))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the training data is a stream of unknown length, so the cosine schedule cannot be laid out: set "
                "trainer.max_steps to the optimizer steps of one epoch (examples / (batch_size * devices * "
                "accumulate_grad_batches))"
            )
        total = max(int(total), 1)
        warmup = int(math.ceil(c.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup, c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints: LoRA runs keep only the adapter (the base weights are reloaded from `model`)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["firm_critic"] = {"model": self.config.model, "finetune": self.config.finetune}
        if self.config.finetune == "lora":
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
