"""Live audio: where turns start and stop (server VAD on Silero's frame probabilities), and which words
of an open turn have settled (LocalAgreement-2).

``TurnDetector`` and ``LocalAgreement`` are pure policy, tested without a model; ``SpeechProbabilities``
runs the same Silero VAD model ``app.audio.vad`` uses, frame by frame as audio arrives.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import numpy as np

from app.engines.base import SAMPLE_RATE

FRAME = 512  # Silero VAD's window at 16 kHz: 32 ms
# Speech ends when the probability falls this far below the threshold (Silero's own hysteresis), so a
# frame that hovers at the threshold neither starts nor ends a turn.
_HYSTERESIS = 0.15


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's ``server_vad`` turn detection, with its defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


class TurnDetector:
    """Turn starts and stops from frame probabilities, as sample positions on the stream's timeline
    (16 kHz samples since it began). A start is moved back by ``prefix_padding_ms``; a stop is where
    ``silence_duration_ms`` of silence after the speech ends, that silence included.

    Speech that never pauses that long is cut after ``max_turn_seconds`` at its quietest frame of the
    last ``CUT_WINDOW_SECONDS`` (a stop and a start at the same place): a turn stays short enough to be
    decoded again and again while it is spoken."""

    CUT_WINDOW_SECONDS = 3.0

    def __init__(self, vad: ServerVad, start_frame: int = 0, max_turn_seconds: float = 30.0):
        self.vad = vad
        self.frame = start_frame   # frames seen
        self.in_speech = False
        self._silent_frames = 0
        self._turn_start = 0       # the frame the open turn's speech began at (or was cut at)
        self._max_turn_frames = max(1, round(max_turn_seconds * SAMPLE_RATE / FRAME))
        self._recent: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=max(1, round(self.CUT_WINDOW_SECONDS * SAMPLE_RATE / FRAME)))

    def feed(self, probabilities) -> list[tuple[str, int]]:
        events: list[tuple[str, int]] = []
        silence_frames = max(1, round(self.vad.silence_duration_ms * SAMPLE_RATE / 1000 / FRAME))
        off = max(0.01, self.vad.threshold - _HYSTERESIS)
        for p in probabilities:
            position = self.frame * FRAME
            if not self.in_speech:
                if p >= self.vad.threshold:
                    self.in_speech, self._silent_frames, self._turn_start = True, 0, self.frame
                    self._recent.clear()
                    padding = self.vad.prefix_padding_ms * SAMPLE_RATE // 1000
                    events.append(("start", max(0, position - padding)))
            else:
                self._silent_frames = self._silent_frames + 1 if p < off else 0
                if self._silent_frames >= silence_frames:
                    self.in_speech = False
                    events.append(("stop", position + FRAME))
                elif self.frame - self._turn_start >= self._max_turn_frames and self._recent:
                    # The lowest probability; of equals the latest, so the turn cut off is as long as can be.
                    _, quietest = min(self._recent, key=lambda pf: (pf[0], -pf[1]))
                    events += [("stop", quietest * FRAME), ("start", quietest * FRAME)]
                    self._turn_start = quietest
                    self._recent.clear()
            self._recent.append((float(p), self.frame))
            self.frame += 1
        return events

    def reset(self) -> None:
        """The buffer was cleared or committed by hand: no turn is open any more."""
        self.in_speech, self._silent_frames = False, 0


class SpeechProbabilities:
    """Silero VAD's speech probability for each 512-sample frame of a stream, as its audio arrives.

    The model is the one ``app.audio.vad`` uses (faster-whisper's ONNX Silero), run here frame after
    frame with its recurrent state and the last 64 samples before each frame carried from one call to
    the next: the same probabilities as one pass over the whole recording. (faster-whisper's own call
    starts from a blank state each time: fed 100 ms at a time, a stream's probabilities came out
    up to 0.95 away from one pass's, and server VAD cut long1.wav into 87 turns instead of 71.)"""

    CONTEXT = 64   # samples of the previous frame the model sees before each frame, as in faster-whisper

    def __init__(self):
        from faster_whisper.vad import get_vad_model

        self._session = get_vad_model().session
        self._pending = np.zeros(0, np.float32)
        self._context = np.zeros(self.CONTEXT, np.float32)
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)

    def add(self, samples: np.ndarray) -> np.ndarray:
        pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(pending) // FRAME * FRAME
        self._pending = pending[whole:]
        if not whole:
            return np.zeros(0, np.float32)
        frames = pending[:whole].reshape(-1, FRAME)
        contexts = np.concatenate([self._context[None], frames[:-1, -self.CONTEXT:]])
        batch = np.concatenate([contexts, frames], axis=1)
        out, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        self._context = frames[-1, -self.CONTEXT:].copy()
        return np.asarray(out, np.float32).reshape(-1)


def _key(word: str) -> str:
    """A word as two decodes are compared: case and punctuation aside."""
    return re.sub(r"[^\w']", "", word.lower())


class LocalAgreement:
    """Words of an open turn that two successive decodes agree on, each given out once
    (the LocalAgreement-2 policy of whisper_streaming). The words are the latest decode's spelling.

    Decodes of the whole turn so far come in order; a word is settled when the decode before and this
    one begin with the same words up to it. Settled words are never taken back: if a later decode
    revises one, nothing more settles until decodes agree with them again (the turn's final decode,
    not the deltas, is the turn's transcript)."""

    def __init__(self):
        self.settled: list[str] = []
        self._previous: list[str] = []

    def update(self, hypothesis: str) -> list[str]:
        current = hypothesis.split()
        agreed = 0
        for a, b in zip(self._previous, current):
            if _key(a) != _key(b):
                break
            agreed += 1
        self._previous = current
        done = len(self.settled)
        if agreed <= done or [_key(w) for w in current[:done]] != [_key(w) for w in self.settled]:
            return []
        new = current[done:agreed]
        self.settled.extend(new)
        return new
