"""In-process critic: a transformers vision-language model (the Qwen3-VL family) loaded from a local directory.

Batched greedy generation with left padding; bf16 on GPU (fp32 on CPU); FlashAttention-2 when ``flash_attn`` is
importable on a GPU, PyTorch SDPA otherwise. Optional *expected-score mode*: besides the greedy score, read the
model's next-token distribution at the position where it wrote the score digit and return the probability-weighted
mean over the five score tokens, ``sum_k k * p(k) / sum_k p(k)``, a continuous and less noisy reward signal.

The directory is what ``save_pretrained`` writes (``config.json``, weights, tokenizer, image processor, chat
template). Prompts are encoded by :class:`datamodules.chat.ChatEncoder`, the same code that encodes critic SFT
examples, so a critic sees at inference exactly the tokens it was trained on (``ChatEncoder`` and
``split_images`` are importable from here too).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.chat import ChatEncoder, split_images
from firm.critics.base import Completion, Job, PromptedCritic, now
from firm.critics.prompts import PromptConfig, PromptSet
from firm.critics.types import CriticRequest, CriticResult

__all__ = ["ChatEncoder", "Generation", "LocalCritic", "split_images"]

log = logging.getLogger(__name__)

SCORE_DIGITS = "12345"


class _CandidateRecorder:
    """Logits processor that keeps, at every step, the logits of the tokens that can spell a score digit."""

    def __init__(self, candidate_ids: torch.Tensor) -> None:
        self.ids = candidate_ids
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores[:, self.ids.to(scores.device)].float())  # (B, n_candidates)
        return scores


@dataclass
class Generation:
    text: str
    ids: list[int]
    candidate_logits: torch.Tensor | None = None  # (steps, n_candidates) when recorded


class LocalCritic(PromptedCritic):
    """A critic running a local ``AutoModelForImageTextToText`` checkpoint in this process."""

    @dataclass
    class Config:
        name: str = "local"
        model: str = ""  # directory with config.json, weights, tokenizer, image processor and chat template
        device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
        dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
        attn_implementation: str = "auto"  # auto (flash_attention_2 if flash_attn is installed on GPU, else sdpa)
        batch_size: int = 8  # conversations per generate() call
        max_new_tokens: int = 1024  # generation budget per judgement (reasoning included)
        expected_score: bool = False  # also return the probability-weighted mean score (details.expected_scores)
        parse_retries: int = 0  # re-generate (sampling) an unparseable answer up to this many times
        retry_temperature: float = 0.7  # sampling temperature of those retries
        max_image_pixels: int | None = None  # downscale larger images to this many pixels before encoding
        prompts: PromptConfig = field(default_factory=PromptConfig)  # template files replacing the built-in ones
        progress: bool = False  # show a progress bar over batches

    def __init__(self, config: Config | None = None, *, model: Any = None, encoder: ChatEncoder | None = None):
        """Load the model named by ``config.model`` (or use a given ``model`` and ``encoder``)."""
        config = config or self.Config()
        super().__init__(PromptSet(config.prompts), config.max_image_pixels)
        self.config = config
        if config.batch_size < 1 or config.max_new_tokens < 1 or config.parse_retries < 0:
            raise ValueError("local critic: batch_size and max_new_tokens must be >= 1, parse_retries >= 0")
        if model is None:
            if not config.model:
                raise ValueError("local critic: set `model:` to a directory written by save_pretrained")
            path = Path(config.model).expanduser()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"local critic: {path} has no config.json; give a save_pretrained directory")
            self.device = self._pick_device(config.device)
            self.dtype = self._pick_dtype(config.dtype, self.device)
            attn = self._pick_attention(config.attn_implementation, self.device)
            from transformers import AutoModelForImageTextToText

            log.info("loading critic %s on %s (%s, attention: %s)", path, self.device, self.dtype, attn)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype, attn_implementation=attn)
            model.to(self.device)
            encoder = encoder or ChatEncoder(path, config.max_image_pixels)
        else:
            if encoder is None:
                raise ValueError("local critic: pass `encoder` together with `model`")
            self.device = next(model.parameters()).device
            self.dtype = next(model.parameters()).dtype
        self.model = model.eval()
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self._candidates: torch.Tensor | None = None

    # ---- device / precision / attention choices

    @staticmethod
    def _pick_device(device: str) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        d = torch.device(device)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"local critic: device {device!r} requested but CUDA is not available")
        return d

    @staticmethod
    def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
        if dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in table:
            raise ValueError(f"local critic: dtype {dtype!r} unknown; use auto, {', '.join(table)}")
        return table[dtype]

    @staticmethod
    def _pick_attention(attn: str, device: torch.device) -> str:
        if attn != "auto":
            return attn
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"

    # ---- generation

    def _candidate_ids(self) -> torch.Tensor:
        """Ids of tokens containing exactly one digit, 1..5, and nothing numeric else (e.g. "4", " 4", "4\"")."""
        if self._candidates is None:
            vocab = self.tokenizer.get_vocab()
            ids = [
                i
                for tok, i in vocab.items()
                if len(tok) <= 4 and sum(ch.isdigit() for ch in tok) == 1 and any(d in tok for d in SCORE_DIGITS)
            ]
            self._candidates = torch.tensor(sorted(ids), dtype=torch.long)
        return self._candidates

    @torch.inference_mode()
    def generate(
        self,
        conversations: Sequence[list[dict]],
        *,
        temperature: float = 0.0,
        max_new_tokens: int | None = None,
        record_scores: bool = False,
    ) -> list[Generation]:
        """Generate one answer per conversation (one ``generate`` call; batch the input yourself).

        Args:
            conversations: neutral chat messages with PIL images inline.
            temperature: 0 for greedy decoding, > 0 to sample.
            max_new_tokens: generation budget (default: the config's).
            record_scores: keep the logits of score-digit tokens at every step (expected-score mode).
        """
        if not conversations:
            return []
        enc = self.encoder(conversations)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        recorder = _CandidateRecorder(self._candidate_ids()) if record_scores else None
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or self.config.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:  # unset the sampling knobs a checkpoint's generation_config may carry, so greedy is plain greedy
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if recorder is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([recorder])
        out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :].cpu()  # (B, steps)
        stops = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        stops.update(eos if isinstance(eos, list) else [eos])
        stops.discard(None)
        logits = torch.stack(recorder.steps, dim=1).cpu() if recorder and recorder.steps else None  # (B, steps, C)
        gens = []
        for b, row in enumerate(new.tolist()):
            n = next((j for j, t in enumerate(row) if t in stops), len(row))
            ids = row[:n]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(text, ids, logits[b, :n] if logits is not None else None))
        return gens

    def generate_texts(
        self, conversations: Sequence[list[dict]], *, temperature: float = 0.0, max_new_tokens: int | None = None
    ) -> list[str]:
        """Answers to ``conversations`` in batches of ``config.batch_size`` (the curation ``local`` teacher uses it;
        `firm serve-critic` calls :meth:`generate` on the batches LitServe forms)."""
        out: list[str] = []
        bs = self.config.batch_size
        for s in range(0, len(conversations), bs):
            gens = self.generate(conversations[s : s + bs], temperature=temperature, max_new_tokens=max_new_tokens)
            out.extend(g.text for g in gens)
        return out

    # ---- expected-score mode

    def _token_at(self, ids: list[int], char_pos: int) -> int | None:
        """Index of the generated token covering character ``char_pos`` of the decoded text."""
        lo, hi = 1, len(ids)
        if hi == 0:
            return None
        while lo < hi:  # smallest prefix length whose decoding extends past char_pos
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) > char_pos:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def _expected(self, gen: Generation, span: tuple[int, int]) -> tuple[float | None, str | None]:
        if gen.candidate_logits is None:
            return None, "no logits recorded"
        digit = gen.text[span[0] : span[1]]
        j = self._token_at(gen.ids, span[0])
        if j is None or j >= gen.candidate_logits.shape[0]:
            return None, "score token not found"
        tok = self.tokenizer.convert_ids_to_tokens(gen.ids[j])
        if sum(ch.isdigit() for ch in tok) != 1 or digit not in tok:
            return None, f"score {digit!r} is not a token of its own ({tok!r})"
        variants = [self.tokenizer.convert_tokens_to_ids(tok.replace(digit, k)) for k in SCORE_DIGITS]
        cand = self._candidate_ids().tolist()
        col = {t: c for c, t in enumerate(cand)}
        if any(v is None or v not in col for v in variants):
            return None, f"the vocabulary lacks a score-token variant of {tok!r}"
        logits = gen.candidate_logits[j, [col[v] for v in variants]]  # (5,)
        p = torch.softmax(logits.double(), dim=0)
        value = float((p * torch.arange(1, 6, dtype=torch.float64)).sum())
        return (value, None) if math.isfinite(value) else (None, "non-finite logits")

    # ---- scoring

    def _complete(self, jobs: list[Job]) -> list[Completion]:
        """Generate and parse every job (batched, longest prompts first), retrying unparseable answers."""
        comps: list[Completion | None] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda i: -sum(len(str(m["content"])) for m in jobs[i].messages))
        bs = self.config.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        record = self.config.expected_score
        for attempt in range(1 + self.config.parse_retries):
            temperature = 0.0 if attempt == 0 else self.config.retry_temperature
            if attempt > 0:
                todo = [i for i in order if not comps[i].parsed.ok]
                if not todo:
                    break
                self.stats["parse_retries"] += len(todo)
                batches = [todo[s : s + bs] for s in range(0, len(todo), bs)]
            it = batches
            if self.config.progress:
                from tqdm.auto import tqdm

                it = tqdm(batches, desc="critic" if attempt == 0 else f"critic retry {attempt}", unit="batch")
            for batch in it:
                t0 = now()
                gens = self.generate([jobs[i].messages for i in batch], temperature=temperature, record_scores=record)
                t1 = now()
                self.stats["generations"] += len(batch)
                for i, gen in zip(batch, gens):
                    parsed = jobs[i].parser(gen.text)
                    prev = comps[i]
                    comp = Completion(gen.text, parsed, attempt + 1, prev.start if prev else t0, t1)
                    if record and parsed.ok and jobs[i].dimension != "plan":
                        for key, span in parsed.spans.items():
                            value, why = self._expected(gen, span)
                            if value is not None:
                                comp.expected[key] = value
                            else:
                                comp.notes.append(f"no expected score for {key}: {why}")
                    comps[i] = comp
        self.stats["jobs"] += len(jobs)
        return comps  # type: ignore[return-value]

    def score(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """Judge every request on its dimensions; unparseable answers give ``None`` scores (see ``errors``)."""
        requests = list(requests)
        plan_jobs = self.plan_jobs(requests)
        plans = dict(zip((j.index for j in plan_jobs), self._complete(plan_jobs)))
        jobs = self.judgement_jobs(requests, plans)
        return self.assemble(requests, jobs, self._complete(jobs), plans)
