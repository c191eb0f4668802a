"""Whisper's guards against hallucination, as faster-whisper and openai-whisper apply them by default.

A window decoded at one temperature is decoded again at the next temperature of the ladder when its
text is too repetitive (gzip compression ratio above 2.4: a repetition loop) or the model was unsure
of it (average log-probability below -1.0); not when it is silence (no-speech probability above 0.6
with that low log-probability), which the engine then skips. When every temperature fails, the result
with the highest average log-probability among those that are not repetitive (else among all) is
kept. The Whisper engines run this over a batch: the windows that fail are decoded again together,
in a batch of their own, at the next temperature.

Policy only: the engines decode (``decode_with_fallback``'s callback) and skip silent windows.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

LADDER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)   # faster-whisper's default temperatures
COMPRESSION_RATIO_THRESHOLD = 2.4
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
BEST_OF = 5     # candidates sampled per window above temperature 0; the likeliest is kept
SEED = 0        # transformers' sampling is seeded per call (CTranslate2's cannot be: see its engine)


def temperatures(requested: float, fallback: bool = True) -> tuple[float, ...]:
    """What the API's ``temperature`` means (app.routes.params): 0, the default, is the whole ladder, as
    OpenAI's API and faster-whisper's defaults do (unless ``fallback`` is off: the operator's
    ``temperature_fallback``); a value above 0 is that temperature only."""
    return LADDER if requested == 0 and fallback else (float(requested),)


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of it gzip-compressed: a loop compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


@dataclass(frozen=True)
class Attempt:
    """One window decoded at one temperature; ``result`` is whatever the engine needs back."""

    text: str
    avg_logprob: float      # log-probability of its tokens (end of text included) over their count
    no_speech_prob: float   # probability of <|nospeech|> right after <|startoftranscript|>
    temperature: float
    result: object = None

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text.strip())


def is_silence(attempt: Attempt) -> bool:
    """A window to skip rather than transcribe (faster-whisper's no-speech check)."""
    return attempt.no_speech_prob > NO_SPEECH_THRESHOLD and not attempt.avg_logprob > LOG_PROB_THRESHOLD


def needs_retry(attempt: Attempt) -> bool:
    """Too repetitive or too unlikely, and not silence."""
    if attempt.no_speech_prob > NO_SPEECH_THRESHOLD and attempt.avg_logprob < LOG_PROB_THRESHOLD:
        return False
    return attempt.compression_ratio > COMPRESSION_RATIO_THRESHOLD or attempt.avg_logprob < LOG_PROB_THRESHOLD


def best(attempts: Sequence[Attempt]) -> Attempt:
    """What to keep when every temperature failed."""
    plain = [a for a in attempts if a.compression_ratio <= COMPRESSION_RATIO_THRESHOLD]
    return max(plain or attempts, key=lambda a: a.avg_logprob)


def decode_with_fallback(count: int, decode: Callable[[list[int], float], list[Attempt]],
                         ladder: Sequence[float]) -> list[Attempt]:
    """The attempt kept for each of ``count`` windows; ``decode(indices, temperature)`` decodes those
    windows together at that temperature, one attempt each in order."""
    tried: list[list[Attempt]] = [[] for _ in range(count)]
    todo = list(range(count))
    for temperature in ladder:
        for i, attempt in zip(todo, decode(todo, temperature), strict=True):
            tried[i].append(attempt)
        todo = [i for i in todo if needs_retry(tried[i][-1])]
        if not todo:
            break
    return [attempts[-1] if not needs_retry(attempts[-1]) else best(attempts) for attempts in tried]
