"""Long recordings: cut at quiet points, chunks decoded side by side where capacity is idle.

A recording longer than ``chunk_seconds`` is cut into chunks at pauses (``app.audio.chunking`` on Silero
VAD's stretches), overlapping where a cut has to fall inside speech. Where the engine conditions each
window on the text before it (faster-whisper, ``condition_on_previous_text``), the chunks are *spans*
of up to ``span_seconds`` instead (``longest_chunk``): equal parts, as many as a multiple of the
lanes' slots, so each lane decodes the same share window after window with that context, which
chunks of one window lose (about 0.8 points of WER on long read speech, docs/performance.md).
Every chunk is decoded, also one in which VAD heard nothing (unless ``vad_filter`` removed the silence first), and each detects
its own language unless the request named one, so a recording that changes language keeps both.
Chunks go to *lanes*: the instance's own queue and, where ``chunk_fanout`` is on, the sibling
instances that are ready and idle when the request starts (``app.audio.peers``), each lane taking chunks
in order from one shared list. The list fills as VAD listens: a chunk is decoded as soon as its cut
is planned, while the request's thread goes on scanning the rest (VAD is about 1 s of one core for 7
minutes of audio, which the other lanes no longer wait for); spans listen only near their cuts
(``chunking.plan_parts``). The job runner uses the same scheduler with one lane per ready instance,
on a plan it stores whole first.

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
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from app.audio import chunking, peers, vad
from app.audio.chunking import Chunk
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.audio.peers import Busy
from app.runtime.queue import QueueFull, result_within

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


def split(samples: np.ndarray, chunk_seconds: float, times_words: bool = False, parts: int = 1) -> list[Chunk]:
    """Chunks of at most ``chunk_seconds`` cut at pauses; one chunk when the audio is that short.
    A cut inside speech overlaps its chunks only where the engine can time words (``times_words``):
    the overlap is merged by word times (``chunking.join``). Chunks longer than one window are
    equal parts, as many as a multiple of ``parts`` (the slots of the lanes that will decode them)."""
    return list(split_as_heard(samples, chunk_seconds, times_words, parts))


def split_as_heard(samples: np.ndarray, chunk_seconds: float, times_words: bool = False,
                   parts: int = 1) -> Iterator[Chunk]:
    """``split``'s chunks one by one, each as soon as VAD has heard as far as its cut: the first
    chunks can be decoding while VAD still listens to the rest of the recording."""
    # One chunk, without listening, where the planner could not cut: no longer than a chunk and only one
    # lane, or no longer than a window (``chunking.plan_parts`` cuts longer spans for several lanes).
    whole = chunk_seconds if parts <= 1 else min(chunk_seconds, chunking.WINDOW_SECONDS)
    if len(samples) <= whole * SAMPLE_RATE:
        yield Chunk(0, len(samples), True)
        return
    overlap = chunking.OVERLAP_SECONDS if times_words else 0.0
    seconds, count = chunking.equal_parts(len(samples), chunk_seconds, parts)
    if count:   # spans: VAD listens only near each cut
        yield from chunking.plan_parts(samples, seconds, count,
                                       lambda low, high: vad.stretches_between(samples, low, high), overlap)
    else:
        yield from chunking.plan_as_heard(samples, seconds, vad.hear_stretches(samples), overlap)


def published(planned: Iterable[Chunk], chunks: list[Chunk]) -> Iterator[int]:
    """Appends ``planned``'s chunks to ``chunks`` and yields each one's index as soon as its options are
    known (``chunk_options``): at once for a chunk cut in a pause or the last, once the next chunk is
    known too for one cut inside speech (it overlaps that neighbour). A lane starts a span the moment
    its cut is planned, not when VAD has heard as far as the next cut."""
    held = None
    for chunk in planned:
        chunks.append(chunk)
        if held is not None:
            yield held
        held = len(chunks) - 1 if chunk.overlaps_next else None
        if held is None:
            yield len(chunks) - 1
    if held is not None:
        yield held


def longest_chunk(settings, one_language: bool) -> float:
    """How long a chunk may be: a span of ``span_seconds`` where faster-whisper conditions each window
    on the text before it (a span keeps that context over several windows; measured in
    docs/performance.md), else ``chunk_seconds``. Spans only where the recording's language is known
    (``one_language``: the request named it, or the model knows only one): a span detects its language
    once, on its first window, where chunks of one window each detect their own, so a recording that
    changes language keeps both. No span is longer than an instance takes (``max_audio_seconds``): the
    job runner's spans go to instances as requests."""
    conditions = settings.engine == "ctranslate2" and settings.condition_on_previous_text and one_language
    if not (conditions and settings.span_seconds):
        return settings.chunk_seconds
    return max(settings.chunk_seconds, min(settings.span_seconds, settings.max_audio_seconds))


def times_words(settings) -> bool:
    """Whether the pool's engine can time words, from configuration alone (the job runner loads no
    model): faster-whisper always, Qwen3-ASR with a forced aligner. The transformers engine times
    words only for Whisper models, which its configuration does not tell, so it is not assumed."""
    return settings.engine == "ctranslate2" or (settings.engine == "qwen3-asr" and bool(settings.aligner_model))


def chunk_options(options: DecodeOptions, chunks: Sequence[Chunk], index: int) -> DecodeOptions:
    """Each chunk is decoded alone, so an initial prompt primes only the first window with speech, as
    in window-after-window decoding without conditioning on previous text: it goes to the first chunk
    with speech only (none where VAD heard none), which ``chunks[:index + 1]`` tells, so chunks planned
    later change nothing. (A span, ``longest_chunk``, carries it on within itself, conditioned on the
    text before each window.) A chunk that
    ends in a pause or at the recording's end lets a Whisper engine finish it in one window; one that
    overlaps a neighbour (a cut inside speech) asks for word times, which place each word of the
    overlap in one chunk (``chunking.join``; the words reach the caller only if it asked for them).
    The language is the request's, else each chunk detects its own."""
    first = next((i for i, c in enumerate(chunks[:index + 1]) if c.speech), None)
    overlaps = chunking.overlapping(chunks, index)
    ends_in_pause = index + 1 == len(chunks) or chunks[index].end <= chunks[index + 1].start
    return replace(options, ends_in_pause=ends_in_pause, word_timestamps=options.word_timestamps or overlaps,
                   initial_prompt=options.initial_prompt if index == first else "")


def progress_seconds(chunks: Sequence[Chunk], index: int, duration: float) -> float:
    """Chunk ``index``'s share of a recording of ``duration`` seconds: its length against all chunks'
    (overlaps and a VAD-shortened timeline included), so the shares add up to ``duration``."""
    total = sum(c.end - c.start for c in chunks)
    return duration * (chunks[index].end - chunks[index].start) / total if total else duration


def words_requested(transcript: Transcript, options: DecodeOptions) -> Transcript:
    """The transcript with word times only where the caller asked for them (chunks around a cut
    inside speech were decoded with them for the join)."""
    if options.word_timestamps:
        return transcript
    return replace(transcript, segments=[replace(s, words=()) for s in transcript.segments])


def decode_chunks(indices: Iterable[int], lanes: Sequence[Lane], deadline: float,
                  on_done: Callable[[int, Transcript, str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> dict[int, tuple[Transcript, str]]:
    """Decode the chunks ``indices`` on ``lanes``: {index: (transcript, lane name)} for those done.

    ``indices`` may come one at a time as chunks are planned (``published``): the lanes start on the
    first while the caller's thread goes on planning the rest. Chunks left over (every lane busy,
    ``cancelled()`` turned true) are simply missing from the result; the first error that is not
    ``Busy`` (in a lane or in planning) stops the others and is raised.
    """
    todo: deque[int] = deque()
    done: dict[int, tuple[Transcript, str]] = {}
    errors: list[BaseException] = []
    state = threading.Condition()
    in_flight = [0]
    planning = [True]

    def take() -> int | None:
        with state:
            # Wait while chunks are out on other lanes (one may come back: its lane was busy) or
            # still being planned.
            while not todo and (in_flight[0] or planning[0]) and not errors:
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
    try:
        for index in indices:
            with state:
                if errors or not any(thread.is_alive() for thread in threads):
                    break   # nothing will take it: stop planning
                todo.append(index)
                state.notify_all()
    except BaseException as e:  # noqa: BLE001 - planning failed: raised below, after the lanes stop
        with state:
            errors.append(e)
    finally:
        with state:
            planning[0] = False
            state.notify_all()
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
    chunks: list[Chunk] = []
    # Every chunk is decoded, silent to VAD or not: with vad_filter the silence is already gone
    # (app.routes.asr), and without it quiet speech VAD misses is the model's to hear (its no-speech check).
    # No language is forced: each chunk detects its own unless the request named one.

    def audio(index: int) -> np.ndarray:
        return samples[chunks[index].start:chunks[index].end]

    def local(index: int) -> Transcript:
        try:
            future = inst.queue.submit(audio(index), chunk_options(options, chunks, index))
        except QueueFull:
            raise Busy("local queue full") from None
        return result_within(future, max(0.0, deadline - time.monotonic()))

    lanes = [Lane(inst.id, settings.chunk_slots(inst.queue.max_batch), local, patient=True)]
    if settings.chunk_fanout and len(samples) > settings.chunk_seconds * SAMPLE_RATE:  # more than one chunk
        for peer in peers.ready_peers(settings.peers_file, exclude=inst.port):
            if peer.idle:
                lanes.append(Lane(peer.name, settings.chunk_slots(peer.max_batch),
                                  _remote(peer.port, audio, options, chunks, deadline, request_id)))
    # Chunks are planned as VAD listens (this thread), as many as a multiple of the lanes' slots where
    # they are longer than a window, and decoded as soon as they are planned.
    one_language = options.language is not None or not inst.engine.multilingual
    planned = published(split_as_heard(samples, longest_chunk(settings, one_language), inst.engine.word_timestamps,
                                       sum(lane.slots for lane in lanes)), chunks)
    done = decode_chunks(planned, lanes, deadline)
    indices = range(len(chunks))
    missing = [i for i in indices if i not in done]
    if missing or not chunks or chunks[-1].end < len(samples):
        raise QueueFull(f"{len(missing)} of {len(chunks)} chunks found no room")
    placed: dict[str, int] = {}
    for _, lane in done.values():
        placed[lane] = placed.get(lane, 0) + 1
    joined = chunking.join([done[i][0] for i in indices], chunks, len(samples) / SAMPLE_RATE)
    return words_requested(joined, options), placed


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
