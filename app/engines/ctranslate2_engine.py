"""faster-whisper on CTranslate2: int8 on CPU, float16 on GPU."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from app.engines.base import DecodeOptions, Segment, Transcript, SAMPLE_RATE

_DEFAULT_COMPUTE = {"cpu": "int8", "cuda": "float16"}


class CTranslate2Engine:
    name = "ctranslate2"

    def __init__(self, model, model_name: str, device: str, compute_type: str):
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self._model = model
        self.model_name = model_name
        self.device = device
        self.compute_type = compute_type
        self.multilingual = bool(model.model.is_multilingual)
        self.languages = frozenset(_LANGUAGE_CODES) if self.multilingual else frozenset({"en"})

    @classmethod
    def load(cls, model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0):
        from faster_whisper import WhisperModel

        compute_type = _DEFAULT_COMPUTE[device] if compute_type == "auto" else compute_type
        # A directory loads as is; a name such as "large-v3" or "Systran/faster-whisper-large-v3"
        # resolves from the local Hugging Face cache only: instances never download at start.
        whisper = WhisperModel(model, device=device, compute_type=compute_type,
                               cpu_threads=cpu_threads, num_workers=1, local_files_only=True)
        return cls(whisper, model, device, compute_type)

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        segments, info = self._model.transcribe(
            audio,
            language=options.language if self.multilingual else "en",
            task=options.task,
            beam_size=options.beam_size,
            temperature=options.temperature,   # one temperature: no sampling fallback, same as transformers
            condition_on_previous_text=False,  # transformers' long-form default
            vad_filter=False,
        )
        parts = [Segment(round(s.start, 3), round(s.end, 3), s.text.strip()) for s in segments]
        return Transcript(
            text=" ".join(p.text for p in parts if p.text),
            language=info.language,
            language_probability=round(float(info.language_probability), 4),
            duration=len(audio) / SAMPLE_RATE,
            segments=parts,
        )

    def transcribe_batch(self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions]) -> list[Transcript]:
        return [self.transcribe(a, o) for a, o in zip(audios, options)]
