"""The job runner: a program of its own under supervisord (``python -m app.jobs.runner``), not a
thread of any request handler, so jobs outlive every instance restart and the runner's own.

It takes one job at a time (one already running first: a resumed job, else the oldest queued),
cuts its audio at pauses once and records the chunks, then decodes the chunks left over the pool's
ready instances (``run/upstream.json``), each instance holding at most its fair share of the job's
chunks at once (``Settings.chunk_slots``), through the same scheduler and chunk requests a long
``/asr`` request uses (``app.longform``, ``app.peers``). Each chunk's transcript is stored the moment
it arrives, so a restart of anything loses at most the chunks in flight, which are decoded again.
An instance that is full, draining or gone answers 503 or nothing: its chunk goes back and the
runner tries again on whatever is ready a moment later. On SIGTERM it takes no new chunk, lets those
in flight finish and stores them, then exits. It also removes finished jobs past
``job_retention_seconds`` and any stored audio no live job owns.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import replace

import numpy as np

from app import chunking, formats, jobs, longform, peers, vad
from app.chunking import Chunk
from app.config import Settings, load_settings
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.jobs.store import CANCELLED, Job

log = logging.getLogger("asr.jobs")

HOUSEKEEPING_SECONDS = 30
ORPHAN_AUDIO_SECONDS = 300   # a file this old with no live job is left over (an instance writes it first)


class Runner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = jobs.store(settings)
        self.stopping = threading.Event()
        self._housekept = 0.0

    def run(self) -> None:
        log.info("job runner started on %s", jobs.db_path(self.settings))
        while not self.stopping.is_set():
            if time.monotonic() - self._housekept > HOUSEKEEPING_SECONDS:
                self.housekeeping()
            job = self.store.next_job()
            if job is None:
                self.stopping.wait(1.0)
                continue
            try:
                self.work(job)
            except Exception as e:  # noqa: BLE001 - one bad job must not stop the others
                log.exception("job %s failed", job.id)
                self._fail(job, f"{type(e).__name__}: {e}")
        log.info("job runner stopped")

    def work(self, job: Job) -> None:
        s = self.settings
        try:
            samples = jobs.load_audio(jobs.audio_path(s, job.id))
        except (OSError, RuntimeError) as e:
            self._fail(job, f"its audio is gone: {e}")
            return
        params = job.params
        speech = _speech(samples, job, params.get("vad_filter", False))
        timeline = samples if speech is None else speech.samples
        if speech is not None and not speech.found:
            self._complete(job, vad.silent(len(samples) / SAMPLE_RATE, params.get("language") or "und"), params)
            return
        if not self.store.chunks(job.id):
            plan = longform.split(timeline, s.chunk_seconds)
            self.store.start(job.id, [(c.start, c.end, c.speech) for c in plan],
                             speech.chunks if speech is not None else None, SAMPLE_RATE)
            log.info("job %s: %.0f s of audio in %d chunks", job.id, job.duration, len(plan))
        else:
            self.store.start(job.id, [], None, SAMPLE_RATE)  # resumed: keeps its plan and its chunks
            log.info("job %s resumed", job.id)
        rows = self.store.chunks(job.id)
        chunks = [Chunk(r.start, r.end, r.speech) for r in rows]
        options = DecodeOptions(language=params.get("language") or None, task=params.get("task", "transcribe"),
                                beam_size=int(params.get("beam_size", s.beam_size)),
                                temperature=float(params.get("temperature", 0.0)),
                                fallback=s.temperature_fallback,
                                initial_prompt=params.get("initial_prompt", ""),
                                word_timestamps=bool(params.get("word_timestamps", False)))
        while not self.stopping.is_set():
            pending = [r.idx for r in rows if r.speech and r.result is None]
            if not pending:
                break
            if self._cancelled(job):
                return
            ready = peers.ready_peers(s.peers_file)
            lanes = self._lanes(job, ready, timeline, chunks, options)
            if not lanes:
                self.stopping.wait(s.retry_after_seconds)
                continue
            try:
                if options.language is None:
                    first = chunks[next(i for i, c in enumerate(chunks) if c.speech)]
                    options = replace(options, language=peers.detect_on(
                        ready[0].port, timeline[first.start:first.end], s.request_timeout_seconds))
                done = longform.decode_chunks(
                    pending, lanes, time.monotonic() + s.request_timeout_seconds,
                    on_done=lambda i, t, lane: self.store.finish_chunk(
                        job.id, i, formats.to_dict(t, words=True), lane, (chunks[i].end - chunks[i].start) / SAMPLE_RATE),
                    cancelled=lambda: self.stopping.is_set() or self._cancelled(job))
            except peers.ChunkRefused as e:
                self._fail(job, f"an instance refused a chunk: {e}")
                return
            except peers.Busy:
                done = {}
            if not done:
                self.stopping.wait(s.retry_after_seconds)
            rows = self.store.chunks(job.id)
        if self.stopping.is_set() or self._cancelled(job):
            return
        language = options.language or "und"
        transcripts = [formats.from_dict(r.result) if r.result else longform.silent(c, language)
                       for r, c in zip(rows, chunks)]
        transcript = chunking.join(transcripts, chunks, len(timeline) / SAMPLE_RATE)
        if speech is not None:
            transcript = vad.restore_times(transcript, speech, len(samples) / SAMPLE_RATE)
        self._complete(job, transcript, params)

    def _lanes(self, job: Job, ready: list[peers.Peer], timeline: np.ndarray, chunks: list[Chunk],
               options: DecodeOptions) -> list[longform.Lane]:
        """One lane per ready instance, named ``name:port``, holding at most its fair share of slots."""
        s = self.settings

        def decoder(port: int):
            def decode(index: int) -> Transcript:
                self.store.attempt(job.id, index)
                chunk = chunks[index]
                return peers.decode_on(port, timeline[chunk.start:chunk.end],
                                       longform.chunk_options(options, chunks, index),
                                       s.request_timeout_seconds, f"job-{job.id}-{index}")
            return decode

        return [longform.Lane(f"{peer.name}:{peer.port}", s.chunk_slots(peer.max_batch), decoder(peer.port))
                for peer in ready]

    def _cancelled(self, job: Job) -> bool:
        current = self.store.get(job.id)
        return current is None or current.state == CANCELLED

    def _complete(self, job: Job, transcript: Transcript, params: dict) -> None:
        self.store.complete(job.id, formats.to_dict(transcript, words=bool(params.get("word_timestamps"))))
        jobs.remove_audio(self.settings, job.id)
        log.info("job %s done: %.0f s of audio in %.1f s", job.id, job.duration, time.time() - job.created)

    def _fail(self, job: Job, error: str) -> None:
        self.store.fail(job.id, error)
        jobs.remove_audio(self.settings, job.id)
        log.warning("job %s failed: %s", job.id, error)

    def housekeeping(self) -> None:
        """Remove finished jobs past their retention, and audio files no live job owns."""
        self._housekept = time.monotonic()
        for job_id in self.store.expire(self.settings.job_retention_seconds):
            jobs.remove_audio(self.settings, job_id)
        live = self.store.live_ids()
        folder = self.settings.jobs_dir / "audio"
        for path in folder.glob("*.flac*") if folder.exists() else ():
            job_id = path.name.split(".")[0]
            if job_id not in live and time.time() - path.stat().st_mtime > ORPHAN_AUDIO_SECONDS:
                path.unlink(missing_ok=True)


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
