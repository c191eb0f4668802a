"""``vad_filter``: cut the audio down to its speech before an engine sees it, then put times back.

The detector is Silero VAD, the ONNX model faster-whisper ships, with faster-whisper's defaults
(speech padded by 400 ms, pauses under 2 s kept). Doing it here rather than inside one engine gives
both engines the same audio, keeps the batched CTranslate2 path usable, and lets a request with no
speech at all skip the model. Segment and word times come back on the original timeline, mapped the
way faster-whisper's own ``vad_filter`` maps them.

A long recording is cut at Silero's speech stretches (``speech_stretches``), found here block by
block (``hear_stretches``) with faster-whisper's rules, so chunks can be cut and decoded while the
scan goes on; tests hold them equal to faster-whisper's ``get_speech_timestamps``. Spans, cut near
set points, need only the audio around each (``stretches_between``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from app.engines.base import SAMPLE_RATE, Transcript


STRETCH_PAUSE_MS = 300   # the shortest pause between two stretches a long recording may be cut in
_STRETCH_PAD_MS = 100
_FRAME, _CONTEXT = 512, 64   # Silero's frame, and the samples of the frame before it that it also sees
WARMUP_SECONDS = 2.0         # Silero heard this long before a stretch of audio scanned alone (``stretches_between``)
_THRESHOLD, _NEG_THRESHOLD = 0.5, 0.35   # faster-whisper's defaults: speech starts above, a pause below


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


def speech_stretches(samples: np.ndarray, min_pause_ms: int = STRETCH_PAUSE_MS) -> list[dict]:
    """Where Silero VAD hears speech, ``{"start", "end"}`` in samples, with pauses as short as
    ``min_pause_ms`` kept apart: the places a long recording may be cut (``app.audio.chunking``)."""
    *_, (stretches, _) = hear_stretches(samples, min_pause_ms)   # the last answer: the whole file's
    return stretches


def stretches_between(samples: np.ndarray, low: int, high: int, min_pause_ms: int = STRETCH_PAUSE_MS) -> list[dict]:
    """``speech_stretches`` of ``samples[low:high]`` alone, on the whole recording's timeline: Silero
    listens from ``WARMUP_SECONDS`` before ``low`` (on the whole recording's frame grid) so its state has
    settled by ``low``. Not the same to the frame as a scan of the whole recording: the recurrent state
    differs a little, and a stretch edge can move by a frame or two."""
    start = max(0, low - int(WARMUP_SECONDS * SAMPLE_RATE))
    start -= start % _FRAME
    return [{"start": s["start"] + start, "end": s["end"] + start}
            for s in speech_stretches(samples[start:high], min_pause_ms)]


def hear_stretches(samples: np.ndarray, min_pause_ms: int = STRETCH_PAUSE_MS,
                   block_seconds: float = 16.0) -> Iterator[tuple[list[dict], int]]:
    """``speech_stretches`` as Silero scans the audio, a block at a time: yields ``(stretches, known)``
    after each block, where ``stretches`` is final before sample ``known`` (a stretch still open is
    cut off there), so a long recording can be cut and decoded before VAD has heard all of it.
    The last yield has ``known == len(samples)`` and the same stretches as faster-whisper's
    ``get_speech_timestamps`` with ``min_silence_duration_ms=min_pause_ms`` and ``speech_pad_ms=100``:
    Silero's threshold 0.5 starts speech, a frame under 0.35 starts a pause, a pause of
    ``min_pause_ms`` ends the stretch at the pause's first frame, and each stretch is padded by 100 ms.
    """
    from faster_whisper.vad import get_vad_model

    total = len(samples)
    pad = SAMPLE_RATE * _STRETCH_PAD_MS // 1000
    min_pause = SAMPLE_RATE * min_pause_ms / 1000
    if min_pause < 2 * pad:
        raise ValueError("pauses shorter than twice the padding would merge stretches")
    # The frames Silero sees, as faster-whisper gives them: padded with zeros to a whole frame (a whole
    # frame of zeros where the audio fills its last one), the last frame's final context samples zeroed.
    frames = np.pad(np.asarray(samples, np.float32), (0, _FRAME - total % _FRAME)).reshape(-1, _FRAME)
    frames[-1, -_CONTEXT:] = 0
    count = len(frames)
    block = max(1, int(block_seconds * SAMPLE_RATE) // _FRAME)
    # faster-whisper's Silero model: each row is a frame after the end of the frame before it, and the
    # recurrent state carries from one call to the next, so blocks give the whole file's probabilities.
    session = get_vad_model().session
    state = np.zeros((2, 1, 1, 128), np.float32)
    closed: list[dict] = []
    start, pause = None, 0   # the open stretch's first frame (samples); where its pause began, 0 for none
    for first in range(0, count, block):
        last = min(count, first + block)
        context = frames[first - 1:last - 1, -_CONTEXT:] if first else np.concatenate(
            [np.zeros((1, _CONTEXT), np.float32), frames[:last - 1, -_CONTEXT:]])
        probabilities, state[0], state[1] = session.run(
            None, {"input": np.concatenate([context, frames[first:last]], axis=1), "h": state[0], "c": state[1]})
        for i, p in enumerate(probabilities.ravel(), start=first):
            at = i * _FRAME
            if p >= _THRESHOLD:
                pause = 0
                if start is None:
                    start = at
            elif p < _NEG_THRESHOLD and start is not None:
                pause = pause or at
                if at - pause >= min_pause:
                    closed.append({"start": max(0, start - pad), "end": min(total, pause + pad)})
                    start, pause = None, 0
        if last == count:
            break
        heard = last * _FRAME
        if start is None:   # silence so far; speech found next would begin ``pad`` earlier
            yield list(closed), max(0, min(total, heard - pad))
        else:               # speech until here, or until its pause's padding
            known = min(total, heard, pause + pad) if pause else min(total, heard)
            yield closed + [{"start": max(0, start - pad), "end": known}], known
    if start is not None and start < total:
        closed.append({"start": max(0, start - pad), "end": total})
    yield closed, total


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

