"""Teachers: anything that answers text prompts over images, used by the curation pipelines.

A teacher implements the small :class:`Teacher` protocol: ``teacher_id`` and ``generate(requests) -> texts``.
Each :class:`TeacherRequest` carries the rendered chat ``messages`` (what a model reads) *and* the structured
``task`` / ``fields`` / ``images`` they were rendered from (what a rule-based teacher reads), so the same pipeline
runs on:

- ``local``: a vision-language checkpoint in this process (the critics' local transformers backend);
- ``http``: OpenAI-compatible endpoints such as vLLM (the critics' HTTP client, :meth:`HTTPCritic.complete
  <firm.critics.http.HTTPCritic.complete>`: retries, endpoint balancing, bounded concurrency);
- ``shapes_rule``: the shapes world's rule teacher (:mod:`firm.synthetic.curation`), exact and CPU-only.

Teachers are registered in the ``teachers`` registry and built with :func:`build_teacher`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

# What a request asks for (the template it was rendered from).
TEACHER_TASKS = (
    "difference_report",
    "edit_evaluation",
    "plan",
    "checklist_score",
    "quality",
    "rewrite_instruction",
    "rewrite_prompt",
)


@dataclass
class TeacherRequest:
    """One prompt for a teacher.

    Attributes:
        task: which template it was rendered from (one of :data:`TEACHER_TASKS`).
        messages: neutral chat messages (``{"type": "image", "image": PIL}`` / ``{"type": "text", ...}`` parts).
        images: the images shown, in order (also inside ``messages``).
        fields: the values the template was filled with (instruction, prompt, report, checklist, ...).
        key: the sample's key (for logs).
    """

    task: str
    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    key: str | None = None


@runtime_checkable
class Teacher(Protocol):
    """Answers prompts; transport failures raise, an unusable answer is just text the pipeline will reject."""

    teacher_id: str

    def generate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        """One answer text per request, in order."""
        ...


class LocalTeacher:
    """A local vision-language checkpoint (loaded once) answering with greedy or sampled decoding."""

    @dataclass
    class Config:
        name: str = "local"
        model: str = ""  # checkpoint directory written by save_pretrained
        device: str = "auto"  # auto | cpu | cuda | cuda:N
        dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
        batch_size: int = 8  # conversations per generate() call
        max_new_tokens: int = 1024  # generation budget per answer
        temperature: float = 0.0  # 0: greedy
        max_image_pixels: int | None = None  # downscale larger images before encoding

    def __init__(self, config: Config | None = None) -> None:
        from firm.critics.local import LocalCritic

        self.config = config or self.Config()
        c = self.config
        self.critic = LocalCritic(
            LocalCritic.Config(
                model=c.model,
                device=c.device,
                dtype=c.dtype,
                batch_size=c.batch_size,
                max_new_tokens=c.max_new_tokens,
                max_image_pixels=c.max_image_pixels,
            )
        )
        self.teacher_id = f"local:{Path(c.model).name}"
        self._lock = threading.Lock()  # one generate() at a time on the model

    def generate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        # the critic's encoder prepares the images (RGB, max_image_pixels) exactly as for critic inference
        with self._lock:
            return self.critic.generate_texts([r.messages for r in requests], temperature=self.config.temperature)


class HTTPTeacher:
    """OpenAI-compatible chat endpoints (vLLM, SGLang, ...), called concurrently with retries."""

    @dataclass
    class Config:
        name: str = "http"
        endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])  # API base URLs
        model: str | None = None  # model name; None: the first one GET /models lists
        api_key_env: str = "FIRM_TEACHER_API_KEY"  # environment variable holding the API key (if any)
        max_concurrency: int = 32  # HTTP requests in flight at once per generate() call
        timeout_s: float = 300.0  # limit for one request
        max_retries: int = 3  # retries after connection errors, timeouts, HTTP 408/429/5xx
        max_tokens: int = 2048  # generation budget per answer
        temperature: float = 0.0  # 0: greedy
        image_format: str = "png"  # png | jpeg (smaller requests)
        max_image_pixels: int | None = None  # downscale larger images before sending
        extra_body: dict[str, Any] = field(default_factory=dict)  # merged into each request body

    def __init__(self, config: Config | None = None) -> None:
        from firm.critics.http import HTTPCritic

        self.config = config or self.Config()
        c = self.config
        self.client = HTTPCritic(
            HTTPCritic.Config(
                endpoints=list(c.endpoints),
                model=c.model,
                api_key_env=c.api_key_env,
                max_concurrency=c.max_concurrency,
                timeout_s=c.timeout_s,
                max_retries=c.max_retries,
                max_tokens=c.max_tokens,
                temperature=c.temperature,
                image_format=c.image_format,
                max_image_pixels=c.max_image_pixels,
                extra_body=dict(c.extra_body),
            )
        )

    @property
    def teacher_id(self) -> str:
        return f"http:{self.client.model or self.config.model or '?'}@{self.client.endpoints[0]}"

    async def agenerate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        """Coroutine version of :meth:`generate`."""
        return await self.client.acomplete([r.messages for r in requests], temperature=self.config.temperature)

    def generate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        """Blocking (also from inside an event loop); raises ``CriticEndpointError`` / ``CriticTimeoutError`` when
        endpoints stay unreachable. Safe to call from several threads at once (the runner's chunks)."""
        return self.client.complete([r.messages for r in requests], temperature=self.config.temperature)


def build_teacher(config: Any) -> Teacher:
    """A teacher from its config (a registered teacher's ``Config`` or a mapping with ``name:``)."""
    from firm.config import build_component

    cls, conf = build_component("teachers", config, source="teacher")
    teacher = cls(conf)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"teacher {conf.name!r} ({cls.__name__}) does not implement generate() and teacher_id")
    return teacher
