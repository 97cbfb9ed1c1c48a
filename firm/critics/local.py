"""In-process critic: a transformers vision-language model (the Qwen3-VL family) loaded from a local directory.

Batched greedy generation with left padding; bf16 on GPU (fp32 on CPU); FlashAttention-2 when ``flash_attn`` is
importable on a GPU, PyTorch SDPA otherwise. Optional *expected-score mode*: besides the greedy score, read the
model's next-token distribution at the position where it wrote the score digit and return the probability-weighted
mean over the five score tokens, ``sum_k k * p(k) / sum_k p(k)``, a continuous and less noisy reward signal.

The directory is what ``save_pretrained`` writes (``config.json``, weights, tokenizer, image processor, chat
template). Prompts are encoded by :class:`firm.data.chat.ChatEncoder`, the same code that encodes critic SFT
examples, so a critic sees at inference exactly the tokens it was trained on (``ChatEncoder`` and
``split_images`` are importable from here too).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from firm.critics.base import Completion, Job, PromptedCritic, now
from firm.critics.expected import SCORE_DIGITS, expected_score
from firm.critics.prompts import PromptConfig, PromptSet
from firm.critics.types import CriticRequest, CriticResult
from firm.data.chat import ChatEncoder, split_images
from firm.devices import process_device

__all__ = ["ChatEncoder", "Generation", "LocalCritic", "TokenLogprob", "critic_checkpoint", "split_images"]

log = logging.getLogger(__name__)


class _CandidateRecorder:
    """Logits processor that keeps, at every step, the logits of the tokens that can spell a score digit."""

    def __init__(self, candidate_ids: torch.Tensor) -> None:
        self.ids = candidate_ids
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores[:, self.ids.to(scores.device)].float())  # (B, n_candidates)
        return scores


class _LogprobRecorder:
    """Logits processor that keeps, at every step, the log-probability of the token chosen and of the ``top`` most
    likely tokens (the model's distribution before any temperature: HF applies its warpers after custom processors).

    Only one step's full distribution is held at a time: the token chosen at step t is read from ``input_ids`` at
    step t + 1 (and from the output sequences for the last step, in :meth:`finish`).
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self.chosen: list[torch.Tensor] = []  # per step: (B,) log-probability of the chosen token
        self.top_ids: list[torch.Tensor] = []  # per step: (B, top)
        self.top_lps: list[torch.Tensor] = []  # per step: (B, top)
        self._last: torch.Tensor | None = None  # (B, V) log-probabilities of the previous step
        self._calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.chosen.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1).cpu())  # (B,)
        lp = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
        if self.top:
            vals, ids = lp.topk(min(self.top, lp.shape[-1]), dim=-1)  # (B, top)
            self.top_ids.append(ids.cpu())
            self.top_lps.append(vals.cpu())
        self._last = lp
        return scores

    def finish(self, new_tokens: torch.Tensor) -> None:
        """Read the last step's chosen tokens from the generated ids ``(B, steps)``."""
        if self._last is not None and len(self.chosen) < new_tokens.shape[1]:
            last = new_tokens[:, len(self.chosen) : len(self.chosen) + 1].to(self._last.device)
            self.chosen.append(self._last.gather(1, last).squeeze(1).cpu())
        self._last = None


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives at its position."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-probability), most likely first


@dataclass
class Generation:
    text: str
    ids: list[int]
    candidate_logits: torch.Tensor | None = None  # (steps, n_candidates) when recorded
    finish_reason: str = "stop"  # stop (end of sequence or a stop string) | length (cut at the token budget)
    prompt_tokens: int = 0  # tokens of the encoded prompt (text and image tokens)
    logprobs: list[TokenLogprob] | None = None  # per kept token, when asked for


# Files of a critic checkpoint fetched from the hub: weights, configs, tokenizer and processor files, chat template.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def critic_checkpoint(model: str, revision: str | None = None, who: str = "critic") -> Path:
    """The local directory of a critic checkpoint: ``model`` itself when it is a directory, else a hub id
    (``org/name``) fetched once into the Hugging Face cache (only the files above; ``HF_HUB_OFFLINE=1`` uses the
    cache alone). Weights are read as safetensors only.

    Raises:
        FileNotFoundError: ``model`` is neither a checkpoint directory nor a hub id, the hub id cannot be fetched
            (the message says why), or the directory has no ``config.json``.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        looks_like_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and all(model.split("/"))
        if not looks_like_id:
            raise FileNotFoundError(f"{who}: {model} is not a directory (nor a hub id like org/name)")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
        except Exception as e:  # noqa: BLE001 - the hub raises many types (offline, not found, gated, network)
            raise FileNotFoundError(f"{who}: hub id {model} could not be fetched: {type(e).__name__}: {e}") from e
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{who}: {path} has no config.json; give a save_pretrained directory or a hub id")
    return path


class LocalCritic(PromptedCritic):
    """A critic running a local ``AutoModelForImageTextToText`` checkpoint in this process."""

    @dataclass
    class Config:
        name: str = "local"
        model: str = ""  # save_pretrained directory (config.json, weights, processor files), or a hub id org/name
        revision: str | None = None  # hub revision (branch, tag or commit) when `model` is a hub id
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
        super().__init__(PromptSet(config.prompts), config.max_image_pixels, expected_score=config.expected_score)
        self.config = config
        if config.batch_size < 1 or config.max_new_tokens < 1 or config.parse_retries < 0:
            raise ValueError("local critic: batch_size and max_new_tokens must be >= 1, parse_retries >= 0")
        if model is None:
            if not config.model:
                raise ValueError("local critic: set `model:` to a directory written by save_pretrained, or a hub id")
            path = critic_checkpoint(config.model, config.revision, "local critic")
            self.device = self._pick_device(config.device)
            self.dtype = self._pick_dtype(config.dtype, self.device)
            attn = self._pick_attention(config.attn_implementation, self.device)
            from transformers import AutoModelForImageTextToText

            log.info("loading critic %s on %s (%s, attention: %s)", path, self.device, self.dtype, attn)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=self.dtype, attn_implementation=attn, use_safetensors=True
            )
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
        """``auto``, ``cpu``, ``cuda`` (this process's GPU) or ``cuda:N`` (:func:`firm.devices.process_device`)."""
        return process_device(device, "local critic: device")

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
        logprobs: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """Generate one answer per conversation (one ``generate`` call; batch the input yourself).

        Args:
            conversations: neutral chat messages with PIL images inline.
            temperature: 0 for greedy decoding, > 0 to sample.
            max_new_tokens: generation budget (default: the config's).
            record_scores: keep the logits of score-digit tokens at every step (expected-score mode).
            logprobs: None: none; N >= 0: the log-probability of every generated token and of the N most likely
                alternatives at its position (``Generation.logprobs``).
            top_p: nucleus sampling mass when sampling (None: 1.0).
            stop: strings that end an answer; the answer is cut before the first one (which is not returned).
            seed: seeds the sampler, so that the same request in the same batch gives the same answer.
        """
        if not conversations:
            return []
        enc = self.encoder(conversations)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        budget = max_new_tokens or self.config.max_new_tokens
        recorder = _CandidateRecorder(self._candidate_ids()) if record_scores else None
        lp_recorder = _LogprobRecorder(logprobs) if logprobs is not None else None
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=0)
        else:  # unset the sampling knobs a checkpoint's generation_config may carry, so greedy is plain greedy
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        processors = [r for r in (recorder, lp_recorder) if r is not None]
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        stop = [x for x in (stop or []) if x]
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if seed is not None and temperature > 0:
            torch.manual_seed(seed)
        out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :].cpu()  # (B, steps)
        if lp_recorder is not None:
            lp_recorder.finish(new)
        stops = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        stops.update(eos if isinstance(eos, list) else [eos])
        stops.discard(None)
        logits = torch.stack(recorder.steps, dim=1).cpu() if recorder and recorder.steps else None  # (B, steps, C)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist() if "attention_mask" in enc else None
        gens = []
        for b, row in enumerate(new.tolist()):
            n = next((j for j, t in enumerate(row) if t in stops), None)
            finish = "stop" if n is not None else ("length" if len(row) >= budget else "stop")
            ids = row[: len(row) if n is None else n]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(x) for x in stop) if i >= 0), default=None)
            if cut is not None:  # cut before the first stop string; keep the tokens that spell the kept text
                text, finish = text[:cut], "stop"
                ids = ids[: self._tokens_for(ids, cut)]
            gen = Generation(text, ids, logits[b, : len(ids)] if logits is not None else None, finish)
            gen.prompt_tokens = int(prompt_lens[b]) if prompt_lens is not None else len(enc["input_ids"][b])
            if lp_recorder is not None:
                gen.logprobs = [
                    TokenLogprob(
                        tok,
                        float(lp_recorder.chosen[t][b]),
                        list(zip(lp_recorder.top_ids[t][b].tolist(), lp_recorder.top_lps[t][b].tolist()))
                        if lp_recorder.top
                        else [],
                    )
                    for t, tok in enumerate(ids)
                ]
            gens.append(gen)
        return gens

    def _tokens_for(self, ids: list[int], n_chars: int) -> int:
        """The fewest leading tokens of ``ids`` whose decoding covers the first ``n_chars`` characters."""
        if n_chars <= 0:
            return 0
        j = self._token_at(ids, n_chars - 1)
        return len(ids) if j is None else j + 1

    def generate_texts(
        self, conversations: Sequence[list[dict]], *, temperature: float = 0.0, max_new_tokens: int | None = None
    ) -> list[str]:
        """Answers to ``conversations`` in batches of ``config.batch_size`` (the curation ``local`` teacher uses it;
        `firm critic serve` calls :meth:`generate` on the batches LitServe forms)."""
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
        logits = gen.candidate_logits[j, [col[v] for v in variants]].double().tolist()  # (5,)
        value = expected_score({int(k): lg for k, lg in zip(SCORE_DIGITS, logits)})  # the HTTP critic's formula too
        return (value, None) if value is not None else (None, "non-finite logits")

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
