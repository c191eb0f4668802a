"""Long recordings: cut at quiet points, chunks decoded side by side where capacity is idle.

A recording longer than ``chunk_seconds`` is cut into chunks at pauses (``app.chunking`` on Silero
VAD's stretches). Chunks go to *lanes*: the instance's own queue and, where ``chunk_fanout`` is on,
the sibling instances that are ready and idle when the request starts (``app.peers``), each lane
taking chunks in order from one shared list. The job runner uses the same scheduler with one lane
per ready instance.

Fairness (a busy pool is never starved by one long file):

* In its own instance a request holds at most ``Settings.chunk_slots(max_batch)`` queue slots at
  once: a whole batch on a GPU (where one batched call decodes them together), one on CPU, never more
  than half of ``max_queue``. Each chunk queues FIFO behind what is already waiting, so short
  requests that arrive meanwhile interleave with the chunks instead of waiting for all of them.
* On a sibling it holds the same number of slots, and only siblings with an empty queue are asked.
  A sibling that answers 503 (full, draining) or fails is not asked again for this request: its
  chunk goes back to the list and the other lanes take it.
* Nothing ever waits for a queue slot. A chunk that finds the local queue full is retried after a
  short pause only while the request already holds work somewhere (a finished chunk or one in
  flight); with nothing held it is a fast 503, as for any request. So request threads cannot
  deadlock waiting on each other's chunks, and a chunk occupies exactly one slot where it runs
  (``max_queue`` counts each chunk once, the request that was cut holds none of its own).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from app import chunking, peers, vad
from app.chunking import Chunk
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.peers import Busy
from app.queue import QueueFull, result_within

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.2   # pause before a chunk that found the local queue full tries again


class Overloaded(Exception):
    """No lane could take the chunks that are left."""


@dataclass
class Lane:
    """Somewhere chunks can be decoded: ``slots`` chunks at a time, ``decode(index)`` each.

    ``decode`` raises ``Busy`` when the lane takes no more now; a ``patient`` lane (the instance's own
    queue) then retries while the request holds other work, any other lane gives the chunk back.
    """
    name: str
    slots: int
    decode: Callable[[int], Transcript]
    patient: bool = False


def split(samples: np.ndarray, chunk_seconds: float) -> list[Chunk]:
    """Chunks of at most ``chunk_seconds`` cut at pauses; one chunk when the audio is that short."""
    if len(samples) <= chunk_seconds * SAMPLE_RATE:
        return [Chunk(0, len(samples), True)]
    return chunking.plan_chunks(samples, chunk_seconds, vad.speech_stretches(samples))


def chunk_options(options: DecodeOptions, chunks: Sequence[Chunk], index: int) -> DecodeOptions:
    """An initial prompt primes only the first window with speech, as in window-after-window decoding
    (no conditioning on previous text): it goes to the first chunk with speech only. Each chunk ends
    in a pause or at the recording's end, which lets a Whisper engine finish it in one window."""
    first = next((i for i, c in enumerate(chunks) if c.speech), 0)
    return replace(options, ends_in_pause=True, initial_prompt=options.initial_prompt if index == first else "")


def silent(chunk: Chunk, language: str) -> Transcript:
    return vad.silent((chunk.end - chunk.start) / SAMPLE_RATE, language)


def decode_chunks(indices: Sequence[int], lanes: Sequence[Lane], deadline: float,
                  on_done: Callable[[int, Transcript, str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> dict[int, tuple[Transcript, str]]:
    """Decode the chunks ``indices`` on ``lanes``: {index: (transcript, lane name)} for those done.

    Chunks left over (every lane busy, ``cancelled()`` turned true) are simply missing from the
    result; the first error that is not ``Busy`` stops the others and is raised.
    """
    todo = deque(indices)
    done: dict[int, tuple[Transcript, str]] = {}
    errors: list[BaseException] = []
    state = threading.Condition()
    in_flight = [0]

    def take() -> int | None:
        with state:
            # Wait while chunks are out on other lanes: one may come back (its lane was busy).
            while not todo and in_flight[0] and not errors:
                state.wait()
            if errors or not todo or (cancelled and cancelled()):
                return None
            in_flight[0] += 1
            return todo.popleft()

    def give_back(index: int, error: BaseException | None = None) -> None:
        with state:
            todo.appendleft(index)
            if error is not None:
                errors.append(error)
            in_flight[0] -= 1
            state.notify_all()

    def work(lane: Lane) -> None:
        while (index := take()) is not None:
            while True:
                try:
                    transcript = lane.decode(index)
                    break
                except Busy:
                    with state:
                        holds_work = bool(done) or in_flight[0] > 1
                    if lane.patient and holds_work and not errors and time.monotonic() < deadline:
                        time.sleep(RETRY_SECONDS)
                        continue
                    give_back(index)
                    return
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    give_back(index, e)
                    return
            if on_done is not None:
                try:
                    on_done(index, transcript, lane.name)
                except BaseException as e:  # noqa: BLE001 - e.g. the store failed: the chunk is not done
                    give_back(index, e)
                    return
            with state:
                done[index] = (transcript, lane.name)
                in_flight[0] -= 1
                state.notify_all()

    threads = [threading.Thread(target=work, args=(lane,), name=f"chunks-{lane.name}", daemon=True)
               for lane in lanes for _ in range(max(1, lane.slots))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return done


# Inside an instance --------------------------------------------------------------------------------

def transcribe_long(inst, samples: np.ndarray, options: DecodeOptions, request_id: str = "") -> tuple[Transcript, dict]:
    """A recording longer than one chunk, decoded chunk by chunk here and on idle siblings.

    Returns the joined transcript and where its chunks went ({lane name: chunks}). Raises
    ``QueueFull`` when nothing could take the chunks, ``TimeoutError`` past the request's deadline.
    """
    settings = inst.settings
    deadline = time.monotonic() + settings.request_timeout_seconds
    chunks = split(samples, settings.chunk_seconds)
    speech = [i for i, c in enumerate(chunks) if c.speech]
    if speech and options.language is None and inst.engine.multilingual:
        # One language for the whole recording, from its first speech, as window-after-window decoding does.
        first = chunks[speech[0]]
        code, _ = result_within(inst.queue.submit_language_detection(samples[first.start:first.end]),
                                settings.request_timeout_seconds)
        options = replace(options, language=code)

    def audio(index: int) -> np.ndarray:
        return samples[chunks[index].start:chunks[index].end]

    def local(index: int) -> Transcript:
        try:
            future = inst.queue.submit(audio(index), chunk_options(options, chunks, index))
        except QueueFull:
            raise Busy("local queue full") from None
        return result_within(future, max(0.0, deadline - time.monotonic()))

    lanes = [Lane(inst.id, settings.chunk_slots(inst.queue.max_batch), local, patient=True)]
    if settings.chunk_fanout and len(speech) > 1:
        for peer in peers.ready_peers(settings.peers_file, exclude=inst.port):
            if peer.idle:
                lanes.append(Lane(peer.name, settings.chunk_slots(peer.max_batch),
                                  _remote(peer.port, audio, options, chunks, deadline, request_id)))
    done = decode_chunks(speech, lanes, deadline)
    missing = [i for i in speech if i not in done]
    if missing:
        raise QueueFull(f"{len(missing)} of {len(speech)} chunks found no room")
    own = next(iter(inst.engine.languages)) if len(inst.engine.languages) == 1 else "und"
    language = options.language or own
    transcripts = [done[i][0] if i in done else silent(c, language) for i, c in enumerate(chunks)]
    placed: dict[str, int] = {}
    for _, lane in done.values():
        placed[lane] = placed.get(lane, 0) + 1
    return chunking.join(transcripts, chunks, len(samples) / SAMPLE_RATE), placed


def _remote(port: int, audio: Callable[[int], np.ndarray], options: DecodeOptions, chunks: Sequence[Chunk],
            deadline: float, request_id: str) -> Callable[[int], Transcript]:
    def decode(index: int) -> Transcript:
        remaining = deadline - time.monotonic()
        if remaining <= 1:
            raise Busy("no time left for a remote chunk")
        try:
            return peers.decode_on(port, audio(index), chunk_options(options, chunks, index), remaining,
                                   f"{request_id}-{index}" if request_id else "")
        except peers.ChunkRefused as e:  # decoded here instead: a refusal there is one here too
            log.warning("instance on port %d refused a chunk: %s", port, e)
            raise Busy(str(e)) from None
    return decode
