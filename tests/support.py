"""Shared test helpers: the real speech clips, speech espeak-ng makes, text normalisation and WER, audio
encoding, a service runner."""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import jiwer
import numpy as np
import pytest
import requests
import soundfile
import soxr

from app.control.act.processes import free_ports  # noqa: F401  (the bench and the tests pick ports alike)
from app.selfcheck.speech import SENTENCES, SPEECH, espeak_wav  # the bench and the tests read the same clips, speak alike
from app.selfcheck.wer import normalize  # the bench and the tests compare words alike

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JFK_REFERENCE = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
# The sentence the project's own speech says (espeak-ng, voice "en" at 150 words a minute, which the
# embedded tiny.en transcribes word for word): the README's first request and every test that needs
# some speech, not a particular recording.
SPOKEN = JFK_REFERENCE
SECOND_SENTENCE = "Please call me back tomorrow morning, after the meeting."  # tiny.en: word for word


def shared_audio(name: str = "") -> Path:
    """A file of the real speech with references in ../shared/audio (``ASR_SHARED_AUDIO`` moves it). That
    speech comes from public repositories and is never copied into the project, so a test that needs it
    skips where it is absent."""
    path = SPEECH / name
    if not path.exists():
        pytest.skip(f"real speech not found: {path} (../shared/audio beside the checkout; "
                    "ASR_SHARED_AUDIO points elsewhere)", allow_module_level=True)
    return path


def manifest(language: str | None = None, set_name: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in shared_audio("manifest.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows
            if (language is None or r["language"] == language) and (set_name is None or r.get("set") == set_name)]


def manifest_params(language: str | None = None, set_name: str | None = None) -> list:
    """``manifest()``'s rows as parameters named by file, for a parametrize that must not skip its whole
    module where ../shared/audio is absent: there, one parameter that skips with the reason."""
    if not (SPEECH / "manifest.jsonl").exists():
        return [pytest.param(None, id="no-shared-audio", marks=pytest.mark.skip(reason=f"real speech not found: {SPEECH} "
                             "(../shared/audio beside the checkout; ASR_SHARED_AUDIO points elsewhere)"))]
    return [pytest.param(row, id=row["file"]) for row in manifest(language, set_name)]


def english_set_a() -> list[dict]:
    return manifest(language="en", set_name="A")


def set_a_sequence(gap: float = 1.0, rows: list[dict] | None = None) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """English set A (or ``rows``) back to back, ``gap`` seconds of silence apart: (16 kHz samples,
    [(start, end, reference)]) with each clip's place on the timeline."""
    pieces, places, at = [], [], 0.0
    for row in english_set_a() if rows is None else rows:
        samples = read_16k_mono(shared_audio(row["file"]))
        places.append((at, at + len(samples) / 16000, row["reference"]))
        pieces += [samples, np.zeros(int(gap * 16000), np.float32)]
        at += len(samples) / 16000 + gap
    return np.concatenate(pieces), places


@functools.cache
def espeak(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng (scripts/setup.sh installs it), as 16 kHz mono, made once per run.
    Without punctuation it speaks without a pause: speech a chunker has to cut inside."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)", allow_module_level=True)
    samples, rate = soundfile.read(io.BytesIO(espeak_wav(text, voice, speed)), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    samples = soxr.resample(mono, rate, 16000, quality="HQ").astype(np.float32)
    samples.flags.writeable = False  # shared by every caller of the cache
    return samples


def speech_with_pauses(*texts: str, pause: float = 1.5) -> tuple[np.ndarray, list[float]]:
    """The sentences spoken one after another, ``pause`` s of silence after each (16 kHz), and where
    each sentence's speech ends (seconds)."""
    pieces, ends, at = [np.zeros(8000, np.float32)], [], 0.5
    for text in texts:
        speech = espeak(text, voice="en", speed=150)
        at += len(speech) / 16000
        ends.append(at)
        pieces += [speech, np.zeros(int(pause * 16000), np.float32)]
        at += pause
    return np.concatenate(pieces), ends


def spoken_wav(text: str = SPOKEN) -> bytes:
    """``text`` (by default the sentence of ``SPOKEN``) as a 16 kHz mono 16-bit WAV file made by
    espeak-ng: speech for tests that need some speech with a known transcript, not a recording."""
    return wav_bytes(espeak(text, voice="en", speed=150), 16000)


@functools.cache
def spoken_file(text: str = SPOKEN) -> Path:
    """``spoken_wav(text)`` in a file of its own (removed when the run ends), for what wants a path."""
    import atexit

    folder = Path(tempfile.mkdtemp(prefix="asr-spoken-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "speech.wav"
    path.write_bytes(spoken_wav(text))
    return path


def short_clips(max_seconds: float = 5.0) -> list[bytes]:
    """Short speech for load: the English set-A clips up to ``max_seconds`` where ../shared/audio is
    present, else the benchmark's sentences, spoken by espeak-ng."""
    if (SPEECH / "manifest.jsonl").exists():
        return [clip_bytes(r) for r in english_set_a() if r["duration_s"] <= max_seconds]
    return [spoken_wav(t) for t in SENTENCES if len(espeak(t, voice="en", speed=150)) <= max_seconds * 16000]


def clip_bytes(row: dict) -> bytes:
    return shared_audio(row["file"]).read_bytes()


def wer(references: list[str], hypotheses: list[str]) -> float:
    return jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses])


def as_an_instance(script: str, *args: str, timeout: float = 300):
    """What ``script`` prints as JSON, run with ``args`` in a child that decodes as an instance does:
    OMP_NUM_THREADS=1 from its start (numpy's BLAS sizes its pool from it when it loads, and on some
    CPUs the mel features' last bits then decide a word), pinned to core 0 with one thread before the
    script runs (``threads`` holds that count). The tests' helpers import as ``support``."""
    prelude = "from app.runtime.instance import pin_to_cores\nthreads = pin_to_cores('0', 1)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return json.loads(subprocess.run([sys.executable, "-c", prelude + script, *args], env=env, cwd=REPO,
                                     capture_output=True, text=True, check=True, timeout=timeout).stdout)


def read_16k_mono(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return soxr.resample(mono, rate, 16000, quality="HQ").astype(np.float32) if rate != 16000 else mono


def encode(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode (frames, channels) float32 audio in memory with FFmpeg through PyAV."""
    if samples.ndim == 1:
        samples = samples[:, None]
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@dataclass
class Service:
    """A service brought up with the real asrctl: supervisord, gunicorn instances, nginx."""

    run_dir: Path
    port: int
    instance_ports: list[int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def asrctl(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_asrctl(*args, "--run-dir", str(self.run_dir), check=check, timeout=timeout)

    def transcribe(self, data: bytes, field: str = "audio", filename: str = "clip.wav", **params) -> requests.Response:
        return requests.post(f"{self.url}/asr", files={field: (filename, data)}, data=params, timeout=120)

    def instance_ready(self, port: int) -> int:
        return requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code


def run_asrctl(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "asrctl"), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"asrctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def bring_up(tmp: Path, instances: int, *flags: str, env: dict | None = None) -> Service:
    ports = free_ports(instances + 1)
    run_dir = tmp / "run"
    run_asrctl("up", "--run-dir", str(run_dir), "--instances", str(instances), "--host", "127.0.0.1",
               "--port", str(ports[0]), "--base-port", str(ports[1]), *flags, env=env)
    return Service(run_dir, ports[0], ports[1:])


class SteadyLoad:
    """Clients sending real clips to the service in a loop, bounded in count and time (loopback only).

    Each result is (HTTP status or the exception's name, instance that served it, seconds).
    """

    def __init__(self, url: str, clips: list[bytes], concurrency: int, max_requests: int = 2000,
                 max_seconds: float = 240):
        import threading
        self.url, self.clips, self.concurrency = url, clips, concurrency
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.results: list[tuple[object, str | None, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def __enter__(self):
        import time
        self._deadline = time.monotonic() + self.max_seconds
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.max_seconds)

    def _client(self, index: int) -> None:
        import time
        session = requests.Session()
        n = index
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if len(self.results) >= self.max_requests:
                    return
            clip = self.clips[n % len(self.clips)]
            n += 1
            started = time.monotonic()
            try:
                r = session.post(f"{self.url}/asr", files={"audio": ("clip.wav", clip)}, timeout=120)
                instance = r.json().get("instance") if r.status_code == 200 else None
                result = (r.status_code, instance, time.monotonic() - started)
            except requests.RequestException as e:
                result = (type(e).__name__, None, time.monotonic() - started)
            with self._lock:
                self.results.append(result)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for(self, more: int, timeout: float = 60) -> None:
        """Block until ``more`` further requests have completed (so a phase really ran under load)."""
        import time
        target, deadline = self.count() + more, time.monotonic() + timeout
        while self.count() < target and time.monotonic() < deadline:
            time.sleep(0.05)

    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200]

    def served_by(self) -> set[str]:
        return {r[1] for r in self.results if r[1]}


def metric(port: int, name: str) -> float:
    """One value of an instance's /metrics (its loopback port)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def poll(condition, seconds: float, step: float = 0.25):
    """``condition()`` until it is truthy (returned) or ``seconds`` pass (None)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def vllm_python() -> Path:
    """The vllm environment's interpreter (scripts/setup.sh --engine vllm; scripts/test.sh makes it).
    Where it is absent a test skips, saying so; in CI (``CI`` set) it fails instead: CI must run them."""
    from app.engines import engine_bin_dir

    bin_dir = engine_bin_dir("vllm")
    if bin_dir is None:
        message = "vLLM not installed (scripts/setup.sh --engine vllm makes .venv-vllm)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI runs the vllm engine's tests", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return bin_dir / "python"
