"""The job runner: a program of its own under supervisord (``python -m app.jobs.runner``), not a
thread of any request handler, so jobs outlive every instance restart and the runner's own.

It takes one job at a time (one already running first: a resumed job, else the oldest queued),
cuts its audio at pauses once and records the chunks, then decodes the chunks left over the pool's
ready instances (``run/upstream.json``), each instance holding at most its fair share of the job's
chunks at once (``Settings.chunk_slots``), through the same scheduler and chunk requests a long
``/asr`` request uses (``app.audio.longform``, ``app.audio.peers``). Each chunk's transcript is stored the moment
it arrives, so a restart of anything loses at most the chunks in flight, which are decoded again.

It cannot hang on one job:

* An instance that is full, draining or gone (503, no connection) is not the chunk's fault: the chunk
  goes back and the runner tries again on whatever is ready a moment later.
* An instance that took the chunk and failed on it (5xx, a timeout, died or was killed decoding it)
  counts against the chunk. It is tried again after ``job_retry_seconds``, doubled each time; after
  ``job_chunk_attempts`` failures the job fails, naming the chunk's time range and the last error,
  and the runner goes on with the next job. A failed job keeps its audio: ``asrctl jobs retry``.
* A chunk under 100 ms (what a cut can leave at the end) is silence: /asr would refuse it, and no word
  fits in it.
* The store failing (SQLite locked past its timeout, a full disk) is not the job's fault either: the
  round ends, the chunk stays undecoded, and the runner tries again after a pause, for as long as it
  takes. Any other error fails the job (its audio kept, for a retry).
* It writes a heartbeat (``app.jobs.beat``) before and after every chunk request and every pass of
  its loop; the liveness watcher restarts a runner whose heartbeat is older than
  ``Settings.runner_stall_seconds`` through supervisord.

On SIGTERM it takes no new chunk, lets those in flight finish and stores them, then exits. It also
removes jobs past ``job_retention_seconds`` (finished ones, and ones stuck that long since they were
submitted) and any stored audio no job keeps. Logs name a job by ``app.jobs.ref``, never its id.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from app.audio import chunking, longform, peers, vad
from app import formats, jobs
from app.audio.decode import MIN_SECONDS
from app.audio.chunking import Chunk
from app.config import Settings, load_settings
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.jobs.store import CANCELLED, Job

log = logging.getLogger("asr.jobs")

HOUSEKEEPING_SECONDS = 30
ORPHAN_AUDIO_SECONDS = 300   # a file this old with no live job is left over (an instance writes it first)
STORE_TIMEOUT_SECONDS = 10   # the runner retries a locked store itself, and beats meanwhile
MAX_RETRY_SECONDS = 60.0
MIN_SAMPLES = int(MIN_SECONDS * SAMPLE_RATE)
STORE_ERRORS = (sqlite3.Error,)


class ChunkGaveUp(Exception):
    """A chunk failed ``job_chunk_attempts`` times, or was refused for what it is: the job fails."""


@dataclass
class _Round:
    """What the lanes of one round report back to the runner."""
    gave_up: ChunkGaveUp | None = None


class Runner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = jobs.JobStore(jobs.db_path(settings), timeout=STORE_TIMEOUT_SECONDS)
        self.stopping = threading.Event()
        self._housekept = 0.0
        self._heartbeat = jobs.heartbeat_path(settings)
        self._beaten = 0.0
        self._beat_lock = threading.Lock()

    def run(self) -> None:
        log.info("job runner started on %s", jobs.db_path(self.settings))
        store_failures = 0
        while not self.stopping.is_set():
            self.beat()
            try:
                self.step()
                store_failures = 0
            except STORE_ERRORS as e:  # transient (locked, disk full): nothing is lost, try again
                store_failures += 1
                pause = backoff(self.settings.job_retry_seconds or 1.0, store_failures)
                log.warning("job store failed (%s: %s); trying again in %.1f s", type(e).__name__, e, pause)
                self.wait(pause)
            except Exception:  # noqa: BLE001 - outside any job (housekeeping): the runner must go on
                log.exception("job runner step failed; trying again in %.1f s", HOUSEKEEPING_SECONDS / 10)
                self.wait(HOUSEKEEPING_SECONDS / 10)
        log.info("job runner stopped")

    def step(self) -> None:
        """Housekeeping when due, then one job (or a short wait for one)."""
        self.housekeeping(due_only=True)
        job = self.store.next_job()
        if job is None:
            self.wait(1.0)
            return
        try:
            self.work(job)
        except STORE_ERRORS:
            raise
        except ChunkGaveUp as e:
            self._fail(job, str(e))
        except Exception as e:  # noqa: BLE001 - one bad job must not stop the others
            log.exception("job %s failed", jobs.ref(job.id))
            self._fail(job, f"{type(e).__name__}: {e}")

    def beat(self) -> None:
        """The heartbeat the watcher reads; at most one write a second, from any thread."""
        now = time.monotonic()
        with self._beat_lock:
            if now - self._beaten < 1.0:
                return
            self._beaten = now
        try:
            jobs.beat(self._heartbeat)
        except OSError as e:  # a full disk: the watcher will see it stall, and say so
            log.warning("could not write the heartbeat: %s", e)

    def wait(self, seconds: float) -> None:
        """Sleep, beating, until ``seconds`` pass or the runner is stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self.beat()
            self.stopping.wait(min(left, 1.0))

    def work(self, job: Job) -> None:
        s = self.settings
        name = jobs.ref(job.id)
        try:
            samples = jobs.load_audio(jobs.audio_path(s, job.id))
        except (OSError, RuntimeError) as e:
            self._fail(job, f"its audio is gone ({type(e).__name__})")
            return
        params = job.params
        speech = _speech(samples, job, params.get("vad_filter", False))
        timeline = samples if speech is None else speech.samples
        if speech is not None and not speech.found:
            self._complete(job, vad.silent(len(samples) / SAMPLE_RATE, params.get("language") or "und"), params)
            return
        if not self.store.chunks(job.id):
            # As many parts as a multiple of the ready instances' slots, where chunks are longer than a window.
            ready = peers.ready_peers(s.peers_file)
            slots = sum(s.chunk_slots(peer.max_batch) for peer in ready)
            one_language = bool(params.get("language")) or bool(ready) and not any(p.multilingual for p in ready)
            plan = longform.split(timeline, longform.longest_chunk(s, one_language), longform.times_words(s),
                                  max(1, slots))
            self.store.start(job.id, [(c.start, c.end, c.speech) for c in plan],
                             speech.chunks if speech is not None else None, SAMPLE_RATE)
            log.info("job %s: %.0f s of audio in %d chunks", name, job.duration, len(plan))
        else:
            self.store.start(job.id, [], None, SAMPLE_RATE)  # resumed: keeps its plan and its chunks
            log.info("job %s resumed", name)
        rows = self.store.chunks(job.id)
        chunks = [Chunk(r.start, r.end, r.speech) for r in rows]
        options = DecodeOptions(language=params.get("language") or None, task=params.get("task", "transcribe"),
                                beam_size=int(params.get("beam_size", s.beam_size)),
                                temperature=float(params.get("temperature", 0.0)),
                                fallback=s.temperature_fallback,
                                condition_on_previous_text=s.condition_on_previous_text,
                                initial_prompt=params.get("initial_prompt", ""),
                                word_timestamps=bool(params.get("word_timestamps", False)))
        not_before: dict[int, float] = {}   # chunk -> when it may be tried again (monotonic)

        def failed(index: int, error: Exception) -> None:
            """Count a failed attempt; past the limit, the chunk gives up (and so the job)."""
            count = self.store.chunk_failed(job.id, index, str(error))
            not_before[index] = time.monotonic() + backoff(s.job_retry_seconds, count)
            log.warning("job %s: chunk %d (%s) failed (%d of %d): %s", name, index,
                        _span(chunks[index], speech), count, s.job_chunk_attempts, error)
            if count >= s.job_chunk_attempts:
                raise ChunkGaveUp(f"chunk {index} ({_span(chunks[index], speech)}) failed {count} times; "
                                  f"last error: {error}")

        while not self.stopping.is_set():
            self.beat()
            self.housekeeping(due_only=True)
            if self._cancelled(job):
                return
            pending = [r.idx for r in rows if r.result is None and _long_enough(chunks[r.idx])]
            if not pending:
                break
            now = time.monotonic()
            due = [i for i in pending if not_before.get(i, 0.0) <= now]
            if not due:
                self.wait(min(not_before[i] for i in pending) - now)
                continue
            ready = peers.ready_peers(s.peers_file)
            if not ready:
                self.wait(s.retry_after_seconds)
                continue
            round_ = _Round()
            lanes = self._lanes(job, ready, timeline, chunks, options, speech, round_, failed, not_before)
            # A store error (finishing a chunk, counting an attempt) ends the round and reaches run().
            done = longform.decode_chunks(
                due, lanes, time.monotonic() + s.request_timeout_seconds,
                on_done=lambda i, t, lane: self.store.finish_chunk(
                    job.id, i, formats.to_dict(t, words=True), lane,
                    longform.progress_seconds(chunks, i, job.duration)),
                cancelled=lambda: self.stopping.is_set() or round_.gave_up is not None or self._cancelled(job, True))
            if round_.gave_up is not None:
                raise round_.gave_up
            if not done and all(not_before.get(i, 0.0) <= time.monotonic() for i in due):
                self.wait(s.retry_after_seconds)  # every lane busy: a moment for one to free up
            rows = self.store.chunks(job.id)
        if self.stopping.is_set() or self._cancelled(job):
            return
        # Every chunk was decoded (VAD's silence too: app.audio.longform) but one too short for any word.
        transcripts = [formats.from_dict(r.result) if r.result else longform.silent(c, options.language or "und")
                       for r, c in zip(rows, chunks)]
        transcript = chunking.join(transcripts, chunks, len(timeline) / SAMPLE_RATE)
        if speech is not None:
            transcript = vad.restore_times(transcript, speech, len(samples) / SAMPLE_RATE)
        self._complete(job, transcript, params)

    def _lanes(self, job: Job, ready: list[peers.Peer], timeline: np.ndarray, chunks: list[Chunk],
               options: DecodeOptions, speech: vad.Speech | None, round_: _Round, failed,
               not_before: dict[int, float]) -> list[longform.Lane]:
        """One lane per ready instance, named ``name:port``, holding at most its fair share of slots."""
        s = self.settings
        name = jobs.ref(job.id)

        def decoder(port: int):
            def decode(index: int) -> Transcript:
                if not_before.get(index, 0.0) > time.monotonic():
                    raise peers.Busy("waiting before its next try")   # back to the list; a later round takes it
                self.beat()
                self.store.attempt(job.id, index)
                chunk = chunks[index]
                try:
                    return peers.decode_on(port, timeline[chunk.start:chunk.end],
                                           longform.chunk_options(options, chunks, index),
                                           s.request_timeout_seconds, f"job-{name}-{index}")
                except peers.ChunkFailed as e:
                    try:
                        failed(index, e)
                    except ChunkGaveUp as gave_up:
                        round_.gave_up = gave_up
                    raise
                except peers.ChunkRefused as e:
                    round_.gave_up = ChunkGaveUp(f"chunk {index} ({_span(chunk, speech)}) was refused by an "
                                                 f"instance: {e}")
                    raise peers.Busy(str(e)) from None
                finally:
                    self.beat()
            return decode

        return [longform.Lane(f"{peer.name}:{peer.port}", s.chunk_slots(peer.max_batch), decoder(peer.port))
                for peer in ready]

    def _cancelled(self, job: Job, quiet: bool = False) -> bool:
        """Whether the job was cancelled or removed. ``quiet`` (asked from a lane): a store that cannot
        answer means take no more chunks now, rather than an error in a lane."""
        try:
            current = self.store.get(job.id)
        except STORE_ERRORS:
            if quiet:
                return True
            raise
        return current is None or current.state == CANCELLED

    def _complete(self, job: Job, transcript: Transcript, params: dict) -> None:
        self.store.complete(job.id, formats.to_dict(transcript, words=bool(params.get("word_timestamps"))))
        jobs.remove_audio(self.settings, job.id)
        log.info("job %s done: %.0f s of audio in %.1f s", jobs.ref(job.id), job.duration, time.time() - job.created)

    def _fail(self, job: Job, error: str) -> None:
        """The job fails; its audio stays until it expires, so that it can be retried."""
        self.store.fail(job.id, error)
        log.warning("job %s failed: %s", jobs.ref(job.id), error)

    def housekeeping(self, due_only: bool = False) -> None:
        """Remove jobs past their retention, and audio files no job keeps."""
        if due_only and time.monotonic() - self._housekept < HOUSEKEEPING_SECONDS:
            return
        self._housekept = time.monotonic()
        for job_id in self.store.expire(self.settings.job_retention_seconds):
            jobs.remove_audio(self.settings, job_id)
            log.info("job %s expired", jobs.ref(job_id))
        live = self.store.live_ids()
        folder = self.settings.jobs_dir / "audio"
        for path in folder.glob("*.flac*") if folder.exists() else ():
            job_id = path.name.split(".")[0]
            if job_id not in live and time.time() - path.stat().st_mtime > ORPHAN_AUDIO_SECONDS:
                path.unlink(missing_ok=True)


def backoff(first: float, failures: int) -> float:
    """The wait after the ``failures``-th failure: ``first``, doubled each time, at most a minute."""
    return min(MAX_RETRY_SECONDS, first * 2 ** max(0, failures - 1))


def _long_enough(chunk: Chunk) -> bool:
    """A chunk under MIN_SECONDS is silence: no word fits in it, and /asr refuses audio that short."""
    return chunk.end - chunk.start >= MIN_SAMPLES


def _span(chunk: Chunk, speech: vad.Speech | None) -> str:
    """The chunk's time range on the recording as uploaded (through the VAD map where it was cut)."""
    start, end = chunk.start / SAMPLE_RATE, chunk.end / SAMPLE_RATE
    if speech is not None and speech.chunks:
        from faster_whisper.vad import SpeechTimestampsMap

        timeline = SpeechTimestampsMap(speech.chunks, SAMPLE_RATE, time_precision=3)
        start, end = timeline.get_original_time(start), timeline.get_original_time(end, is_end=True)
    return f"{start:.1f}-{end:.1f} s"


def _speech(samples: np.ndarray, job: Job, vad_filter: bool) -> vad.Speech | None:
    """With vad_filter, the speech the job was planned on (the stored map once planned)."""
    if not vad_filter:
        return None
    if job.speech is not None:
        kept = [samples[c["start"]:c["end"]] for c in job.speech]
        return vad.Speech(np.concatenate(kept) if kept else np.zeros(0, np.float32), job.speech)
    return vad.keep_speech(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.jobs.runner", description="run queued transcription jobs")
    parser.add_argument("--config", help="the run directory's asr.toml (default: $ASR_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    runner = Runner(load_settings(args.config))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runner.stopping.set())
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
