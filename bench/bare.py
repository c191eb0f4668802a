"""The bare engine: the same model, settings, clips, cores and threads as an instance, with no HTTP,
no nginx, no gunicorn and no queue. It runs in a child process pinned the way an instance pins itself
(``app.runtime.instance.pin_to_cores``), so the load generator's own threads stay unpinned."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from app.selfcheck.speech import Clip


@dataclass
class BareResult:
    clip: str
    audio_s: float
    latency: float     # seconds inside engine.transcribe / transcribe_batch (share of the batch)
    text: str


class BareEngine:
    """A pinned child process holding one engine; ask it to transcribe clips, one call at a time."""

    def __init__(self, name: str, clips: list[Clip], cores: str, threads: int, engine: str, model: str,
                 compute_type: str, beam_size: int, model_cache: str, max_audio_seconds: float,
                 device: str = "cpu", gpu: str = ""):
        self.name = name
        self.cores, self.threads = cores, threads
        self._index = {c.name: i for i, c in enumerate(clips)}
        self._clips = clips
        if device == "cuda":
            # The child's dynamic loader reads LD_LIBRARY_PATH when it starts: CTranslate2 opens
            # libcublas.so.12 from pip's nvidia-* wheels as a served instance does.
            from app.hardware import cuda

            os.environ["LD_LIBRARY_PATH"] = cuda.library_path(os.environ.get("LD_LIBRARY_PATH", ""))
        from app.hardware.devices import parse_cores

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name=f"bare-{name}", daemon=True, args=(
            child, [c.data for c in clips], cores, threads, engine, model, compute_type, beam_size,
            model_cache, max_audio_seconds, device, gpu))
        with child_environment(OMP_NUM_THREADS=str(len(parse_cores(cores)))):
            self._process.start()
        child.close()
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"bare engine {name} failed to load") from reply
        self.load_seconds, self.decode_seconds = reply   # per clip: decode_audio() of its upload

    def transcribe(self, clips: list[Clip], batch: int = 1) -> tuple[list[BareResult], float, float]:
        """Transcribe ``clips`` back to back (in groups of ``batch``); return the results, the wall
        seconds and the CPU seconds the child spent (all its threads)."""
        self._conn.send(("run", [self._index[c.name] for c in clips], batch))
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        latencies, texts, wall, cpu = reply
        results = [BareResult(c.name, c.duration, lat, text) for c, lat, text in zip(clips, latencies, texts)]
        return results, wall, cpu

    def close(self) -> None:
        stop_child(self._process, self._conn, ("stop",))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def child_environment(**variables: str) -> Iterator[None]:
    """``os.environ`` with ``variables`` while the block starts spawned children, which inherit them.

    A child must have ``OMP_NUM_THREADS`` from its first instruction, as an instance has it from
    asrctl: numpy's OpenBLAS sizes its thread pool from it when numpy loads, which the child's module
    imports do before its own code runs, and the pool splits the sums of the mel filter bank. With two
    threads instead of one the features differ in their last bits, and on some CPUs (a Zen 5) Whisper
    then decodes another word ("Claflin" against "Klafflin" in English set A). One block at a time
    in a process: two threads starting children at once would each restore the environment under the
    other's child."""
    with _ENVIRONMENT:
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_ENVIRONMENT = threading.Lock()


def _serve(conn, datas, cores, threads, engine_name, model, compute_type, beam_size, model_cache, max_seconds,
           device="cpu", gpu=""):
    """The child: pin, load, warm up exactly as an instance does, then answer requests until told to stop.
    On ``cuda`` it is pinned to the served instance's GPU the way asrctl pins an instance."""
    try:
        import numpy as np

        from app.audio.decode import decode_audio
        from app.engines import load_engine
        from app.engines.base import SAMPLE_RATE, DecodeOptions
        from app.engines.models import resolve_model
        from app.runtime.instance import pin_to_cores

        from app.hardware.devices import gpu_environment

        t0 = time.monotonic()
        # What asrctl puts in an instance's environment (OMP_NUM_THREADS came with the child:
        # child_environment), then the instance's own pinning, before the engine loads: its threads
        # inherit both.
        if device == "cuda":
            os.environ.update(gpu_environment((0,), (gpu,)))
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        threads = pin_to_cores(cores, threads) if device == "cpu" else 0
        engine = load_engine(engine_name, resolve_model(engine_name, model, model_cache), device, compute_type, threads)
        options = DecodeOptions(beam_size=beam_size)
        engine.transcribe(np.zeros(SAMPLE_RATE, np.float32), options)
        samples, decode_seconds = [], []
        for data in datas:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                audio = decode_audio(data, max_seconds)
                best = min(best, time.perf_counter() - start)
            samples.append(audio.samples)
            decode_seconds.append(best)
        engine.transcribe(samples[0], options)  # warm as a served instance is after its first request
        conn.send((time.monotonic() - t0, decode_seconds))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(e)
        return
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        _, indices, batch = message
        try:
            latencies, texts = [], []
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for i in range(0, len(indices), batch):
                group = [samples[k] for k in indices[i:i + batch]]
                start = time.perf_counter()
                if len(group) == 1:
                    transcripts = [engine.transcribe(group[0], options)]
                else:
                    transcripts = engine.transcribe_batch(group, [options] * len(group))
                elapsed = time.perf_counter() - start
                latencies += [elapsed] * len(group)
                texts += [t.text for t in transcripts]
            conn.send((latencies, texts, time.perf_counter() - wall0, time.process_time() - cpu0))
        except BaseException as e:  # noqa: BLE001
            conn.send(e)


def stop_child(process, conn, message) -> None:
    """Ask a child over its pipe to stop (``message``), then terminate it if it has not in 10 s."""
    if process.is_alive():
        try:
            conn.send(message)
        except OSError:
            pass
        process.join(10)
    if process.is_alive():
        process.terminate()
        process.join(5)
    conn.close()
