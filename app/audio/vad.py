"""``vad_filter``: cut the audio down to its speech before an engine sees it, then put times back.

The detector is Silero VAD, the ONNX model faster-whisper ships, with faster-whisper's defaults
(speech padded by 400 ms, pauses under 2 s kept). Doing it here rather than inside one engine gives
both engines the same audio, keeps the batched CTranslate2 path usable, and lets a request with no
speech at all skip the model. Segment and word times come back on the original timeline, mapped the
way faster-whisper's own ``vad_filter`` maps them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from app.engines.base import SAMPLE_RATE, Transcript


@dataclass(frozen=True)
class Speech:
    samples: np.ndarray   # the speech chunks, back to back
    chunks: list[dict]    # {"start", "end"}: where each chunk lies in the original audio, in samples

    @property
    def found(self) -> bool:
        return bool(self.chunks)


def keep_speech(samples: np.ndarray) -> Speech:
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    chunks = get_speech_timestamps(samples, VadOptions(), sampling_rate=SAMPLE_RATE)
    kept = [samples[c["start"]:c["end"]] for c in chunks]
    return Speech(np.concatenate(kept) if kept else np.zeros(0, np.float32), chunks)


def speech_stretches(samples: np.ndarray, min_pause_ms: int = 300) -> list[dict]:
    """Where Silero VAD hears speech, ``{"start", "end"}`` in samples, with pauses as short as
    ``min_pause_ms`` kept apart: the places a long recording may be cut (``app.audio.chunking``)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(min_silence_duration_ms=min_pause_ms, speech_pad_ms=100)
    return get_speech_timestamps(samples, options, sampling_rate=SAMPLE_RATE)


def restore_times(transcript: Transcript, speech: Speech, duration: float) -> Transcript:
    """The transcript of ``speech.samples`` with its times moved back onto the original audio."""
    from faster_whisper.vad import SpeechTimestampsMap

    timeline = SpeechTimestampsMap(speech.chunks, SAMPLE_RATE, time_precision=3)
    segments = []
    for segment in transcript.segments:
        if segment.words:
            # A word's two ends are mapped through the same chunk: the one holding its middle.
            words = tuple(replace(w, start=timeline.get_original_time(w.start, chunk),
                                  end=timeline.get_original_time(w.end, chunk))
                          for w in segment.words
                          for chunk in [timeline.get_chunk_index((w.start + w.end) / 2)])
            segments.append(replace(segment, start=words[0].start, end=words[-1].end, words=words))
        else:
            segments.append(replace(segment, start=timeline.get_original_time(segment.start),
                                    end=timeline.get_original_time(segment.end, is_end=True)))
    return replace(transcript, segments=segments, duration=duration)


def silent(duration: float, language: str) -> Transcript:
    """What a clip with no speech transcribes to."""
    return Transcript(text="", language=language, duration=duration, segments=[])

