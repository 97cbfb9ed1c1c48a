"""A hallucinating critic: the shapes rule critic's scores passed through a seeded noise and bias model.

It stands in for a *general* vision-language judge (an off-the-shelf VLM asked to score edits) in the critic
faithfulness experiment (``firm shapes faithfulness``, docs/faithfulness.md): the same RL is run under the rule critic
(the truth), a trained critic and this one, and the held-out outputs are scored by the rule critic.

Why it is a fair stand-in. The FIRM paper motivates fine-tuned critics by the ways general VLM judges fail on
editing, and this model reproduces those failure modes, on top of scores that are otherwise right:

- **Consistency is hallucinated high.** General judges often do not notice changes that were not asked for (a
  recoloured bystander, a moved or redrawn object) and call the output consistent. Here, with probability ``p_miss``
  a true Consistency below 5 is reported as 5. Under RL this rewards over-editing and redrawing the whole image.
- **Execution is lenient.** General judges credit edits that are partly done or done to the wrong object, and even
  credit an output that did nothing (the source copied) with a middling score, which is what lets a "lazy editor"
  collect reward. Here, with probability ``p_lenient`` a true Execution of 2 or 3 is raised by 1 or 2 (equally
  likely), and with probability ``p_copy_credit`` an unchanged output (see ``copy_pixel_fraction``) whose true
  Execution is 1 gets ``copy_score``.
- **Scores are noisy.** Repeated or rephrased judgements of the same pair disagree by about a point. Here, with
  probability ``p_noise`` every score (any dimension) moves by +1 or -1 (equally likely).

All scores are clipped to 1..5. A missing rule-critic score stays missing. The noise is deterministic per request
*content*: each (request, dimension) draws from a generator seeded by a hash of the image bytes, the instruction (or
prompt), the dimension and ``seed``, so the same request gets the same score in any batch, order or process — a
stable bias the policy can learn to exploit, as it would a real judge's. Generation requests only get the noise (the
bias model is about editing). With every probability 0 the critic is the rule critic.

Each judgement's ``reasoning`` says what the rule critic saw and what the noise model did; ``details["noise"]``
records the changes per dimension (``{"execution": "lenient +2", ...}``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from firm.critics.types import CONSISTENCY, EXECUTION, CriticRequest, CriticResult, EditRequest, GenRequest
from firm.synthetic.critic import ShapesRuleCritic


class ShapesHallucinatingCritic:
    """The rule critic's scores with a general VLM's failure modes: blind to unrequested changes, lenient, noisy."""

    @dataclass
    class Config(ShapesRuleCritic.Config):  # the rule critic's settings (shapes, perception) plus the noise model
        name: str = "shapes_hallucinating"
        p_miss: float = 0.6  # P(a true Consistency < 5 is reported as 5): unrequested changes not seen
        p_lenient: float = 0.5  # P(a true Execution of 2 or 3 is raised by 1 or 2): partial / wrong edits credited
        p_copy_credit: float = 0.5  # P(an unchanged output with true Execution 1 is given `copy_score`)
        copy_score: int = 3  # the middling Execution a credited copy gets
        copy_pixel_fraction: float = 0.01  # "unchanged": at most this share of pixels differ by more than 32 / 255
        p_noise: float = 0.2  # P(a score moves by +-1, either sign equally likely), every dimension
        seed: int = 0  # mixed into the per-request hash: another seed, another (equally biased) judge

        def validate(self) -> None:
            for k in ("p_miss", "p_lenient", "p_copy_credit", "p_noise", "copy_pixel_fraction"):
                v = getattr(self, k)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"shapes_hallucinating: {k} must be in [0, 1], got {v}")
            if not 1 <= self.copy_score <= 5:
                raise ValueError(f"shapes_hallucinating: copy_score must be in 1..5, got {self.copy_score}")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.config.validate()
        rule_fields = {f: getattr(self.config, f) for f in ShapesRuleCritic.Config.__dataclass_fields__}
        self.rule = ShapesRuleCritic(ShapesRuleCritic.Config(**{**rule_fields, "name": "shapes_rule"}))

    def score(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """One result per request, in order: the rule critic's, with the noise model applied to each score."""
        results = self.rule.score(requests)
        for req, res in zip(requests, results):
            self._distort(req, res)
        return results

    # ----------------------------------------------------------------------------------------------------------------

    def _rng(self, req: CriticRequest, dim: str) -> np.random.Generator:
        h = hashlib.sha256(f"{self.config.seed}|{dim}|".encode())
        if isinstance(req, EditRequest):
            images, text = (req.source, req.edited), req.instruction
        else:
            images, text = (req.image,), f"{req.prompt}|{req.checklist}"
        for img in images:
            arr = np.asarray(img)
            h.update(f"{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(str(text).encode())
        return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))

    def _unchanged(self, req: EditRequest) -> bool:
        src = np.asarray(req.source.convert("RGB"), dtype=np.int16)
        out = np.asarray(req.edited.convert("RGB"), dtype=np.int16)
        if src.shape != out.shape:
            return False
        return float((np.abs(src - out).max(axis=-1) > 32).mean()) <= self.config.copy_pixel_fraction

    def _distort(self, req: CriticRequest, res: CriticResult) -> None:
        c = self.config
        notes: dict[str, str] = {}
        unchanged = isinstance(req, EditRequest) and self._unchanged(req)
        for dim, true in list(res.scores.items()):
            if true is None:
                continue
            rng = self._rng(req, dim)
            # Fixed order of draws, whatever applies: the same request gets the same numbers in every config.
            u_bias, u_lift, u_noise, u_sign = rng.random(4)
            score, what = int(true), []
            if isinstance(req, EditRequest) and dim == CONSISTENCY and score < 5 and u_bias < c.p_miss:
                score, what = 5, [f"unrequested changes missed ({true} -> 5)"]
            elif isinstance(req, EditRequest) and dim == EXECUTION:
                if score in (2, 3) and u_bias < c.p_lenient:
                    lift = 1 if u_lift < 0.5 else 2
                    score, what = score + lift, [f"lenient +{lift}"]
                elif score == 1 and unchanged and u_bias < c.p_copy_credit:
                    score, what = c.copy_score, [f"unchanged output credited with {c.copy_score}"]
            if u_noise < c.p_noise:
                step = 1 if u_sign < 0.5 else -1
                score, what = score + step, [*what, f"noise {step:+d}"]
            score = min(5, max(1, score))
            res.scores[dim] = score
            if what:
                notes[dim] = ", ".join(what)
            said = res.reasoning.get(dim, "")
            did = f"; noise model: {notes[dim]} -> {score}" if what else "; noise model: unchanged"
            res.reasoning[dim] = f"rule critic: {dim} {true}" + (f" ({said})" if said else "") + did
        res.details["noise"] = notes
        if isinstance(req, GenRequest):
            res.details["noise_model"] = "generation: noise only"
