"""The one small interface every engine implements, and the values that cross it.

The API layer never imports an engine module directly: it gets an ``Engine`` from
``app.engines.load_engine`` and speaks only in these types, so engines stay swappable
by configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

SAMPLE_RATE = 16_000  # every engine receives 16 kHz mono float32 in [-1, 1]


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings, explicit so that both engines decode the same way.

    ``language=None`` means: detect where the model is multilingual, else the model's own.
    """

    language: str | None = None
    task: str = "transcribe"
    beam_size: int = 5
    temperature: float = 0.0
    fallback: bool = True          # at temperature 0: Whisper's temperature fallback (app.engines.fallback)
    initial_prompt: str = ""       # text the first window is conditioned on: names, spelling, style
    # Each window primed with the text of the windows before it (and the initial prompt), as faster-whisper
    # and whisper decode by default; False: every window after the first alone. Engines that cannot
    # (transformers, Qwen3-ASR) decode each window alone.
    condition_on_previous_text: bool = True
    word_timestamps: bool = False  # align each word to the audio (cross-attention DTW)
    # The clip is a chunk of a longer recording, cut in a pause (app.audio.longform): no speech runs on past
    # its end, so a Whisper window that reaches its end can be its last one.
    ends_in_pause: bool = False
    # The clip opens with speech already transcribed as ``prefix`` (a live stream's previous turns, before
    # the turn to decode): the decode continues that text, without timestamps, and returns only what
    # follows it. Set only where the engine's ``continues_prefix`` is True.
    prefix: str = ""


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str                          # as the model wrote it, leading space included
    probability: float | None = None   # None where the engine does not report one


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()       # filled when word timestamps were asked for
    temperature: float | None = None   # what its window was decoded at (app.engines.fallback); None: not reported


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    language_probability: float | None = None


class Engine(Protocol):
    """A loaded model instance. ``transcribe`` is called from one inference thread at a time."""

    name: str            # "ctranslate2" | "transformers" | "qwen3-asr"
    model_name: str      # what the operator configured, for responses and metrics
    device: str          # "cpu" | "cuda"
    compute_type: str    # e.g. "int8", "float16", "bfloat16", "float32"
    multilingual: bool
    languages: frozenset[str]  # language codes the model accepts
    can_translate: bool        # whether task="translate" means anything to the model
    word_timestamps: bool      # whether words can be timed (Qwen3-ASR: only with a forced aligner)
    continues_prefix: bool     # whether DecodeOptions.prefix is understood

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript: ...

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions]
    ) -> list[Transcript]: ...

    def detect_language(self, audios: Sequence[np.ndarray]) -> list[tuple[str, float | None]]:
        """(language code, probability) per clip, from its first 30 s. An English-only model
        answers ("en", 1.0): it knows no other language to tell apart. The probability is None where
        the model names a language without one (Qwen3-ASR); "und" where it names none it knows."""
        ...
