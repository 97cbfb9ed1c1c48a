"""Expected-score mode: the probability-weighted mean score at the token where the critic wrote its score digit.

A critic answers with an integer 1..5, but its next-token distribution at that position says more: a critic torn
between 3 and 4 writes one of them, yet the weighted mean ``sum_k k * p(k) / sum_k p(k)`` (k over the score tokens
1..5) is a continuous reward, less noisy for RL than the integer. This is the score-token expectation used by
reward models that read a judge's logits (e.g. the "G-Eval" weighting of score tokens, Liu et al. 2023); FIRM's
own reward code takes the integer, so this is an option, off by default.

One formula for every backend (:func:`expected_score`), fed by two sources:

- the local critic records the logits of the five score tokens at every generated position (``local.py``);
- the HTTP critic asks the server for ``logprobs`` / ``top_logprobs`` and reads the alternatives listed at the score
  token (:func:`expected_from_logprobs`). A server lists only the ``top_logprobs`` most likely tokens, so the mean
  is renormalised over the score tokens that are listed; the written score's own token is always among them.

When the score token cannot be found (no logprobs in the reply, a score that is not a token of its own, token
texts that do not spell the answer), the result is ``None`` with the reason: the critic then falls back to the
parsed integer and counts the fallback (``stats["expected_fallbacks"]``).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Mapping, Sequence
from typing import Any

from firm.vocab import SCORE_MAX, SCORE_MIN

SCORE_DIGITS = "".join(str(k) for k in range(SCORE_MIN, SCORE_MAX + 1))  # "12345": each score is one digit


def expected_score(logits: Mapping[int, float]) -> float | None:
    """``sum_k k * p(k) / sum_k p(k)`` with ``p(k) = exp(logits[k])``, over the scores given (None if none is finite).

    ``logits`` may be log-probabilities or raw logits of the score tokens (the result is the same: the softmax over
    the given scores is unchanged by a constant shift). Computed in double precision, shifted by the maximum.
    """
    finite = {k: float(v) for k, v in logits.items() if v is not None and math.isfinite(float(v))}
    if not finite:
        return None
    top = max(finite.values())
    weights = {k: math.exp(v - top) for k, v in finite.items()}
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total


def _logaddexp(a: float | None, b: float) -> float:
    if a is None:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _entry_bytes(entry: Mapping[str, Any]) -> bytes | None:
    """The UTF-8 bytes of one logprob entry: its ``bytes`` list when given (exact, also for pieces of a multi-byte
    character), else its token text encoded."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    token = entry.get("token")
    return token.encode("utf-8") if isinstance(token, str) else None


def expected_from_logprobs(
    content: Sequence[Mapping[str, Any]] | None, text: str, span: tuple[int, int]
) -> tuple[float | None, str | None]:
    """The expected score at the score digit ``text[span[0]:span[1]]`` from OpenAI-format ``logprobs.content``.

    Args:
        content: ``choices[0].logprobs.content`` of a chat completion: one entry per generated token,
            ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}``.
        text: the answer text (the message content).
        span: character span of the score number in ``text`` (from the parser).

    Returns:
        ``(value, None)``, or ``(None, why)`` when the score token cannot be located or read.
    """
    if not content:
        return None, "the reply has no logprobs"
    if not isinstance(content, (list, tuple)) or not all(isinstance(e, Mapping) for e in content):
        return None, "the reply's logprobs are not a list of token entries"
    digit = text[span[0] : span[1]]
    if len(digit) != 1 or digit not in SCORE_DIGITS:
        return None, f"score {digit!r} is not a single digit"
    # Locate the token covering the digit: decode the tokens' bytes incrementally (the token texts of byte-level
    # vocabularies may be pieces of a character; a piece that never completes one reads as U+FFFD, as in the answer).
    pieces = [_entry_bytes(e) for e in content]
    if any(p is None for p in pieces):
        return None, "a logprob entry has neither token text nor bytes"
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    written, ends, n = [], [], 0  # ends[i]: characters of the answer written once token i is read
    for p in pieces:
        written.append(decoder.decode(p))
        n += len(written[-1])
        ends.append(n)
    written.append(decoder.decode(b"", final=True))
    # Tokens after the answer are allowed: servers list the end-of-turn token the answer text does not show (vLLM
    # does: `<|im_end|>`), and a stop string cuts the text inside the last token.
    if not "".join(written).startswith(text) or not ends:
        return None, "the logprob tokens do not spell the answer"
    j = next((i for i, e in enumerate(ends) if e > span[0]), None)
    if j is None:
        return None, "score token not found"
    entry = content[j]
    token = entry.get("token")
    if not isinstance(token, str) or sum(ch.isdigit() for ch in token) != 1 or digit not in token:
        return None, f"score {digit!r} is not a token of its own ({token!r})"
    variants = {token.replace(digit, k): int(k) for k in SCORE_DIGITS}
    logprobs: dict[int, float | None] = {}
    seen: set[tuple[str, float]] = set()
    alternatives = entry.get("top_logprobs") or []
    if not isinstance(alternatives, list):
        return None, "top_logprobs is not a list"
    own = {"token": token, "logprob": entry.get("logprob")}
    for alt in [own, *alternatives]:
        if not isinstance(alt, Mapping):
            continue
        tok, lp = alt.get("token"), alt.get("logprob")
        if tok not in variants or isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            continue
        if (tok, float(lp)) in seen:  # the written token is listed both as the entry and among its alternatives
            continue
        seen.add((tok, float(lp)))
        k = variants[tok]
        logprobs[k] = _logaddexp(logprobs.get(k), float(lp))  # distinct token ids spelling the same score add up
    value = expected_score(logprobs)
    if value is None:
        return None, "no finite logprob for the score token"
    return value, None
