"""The other instances of the pool, as seen from the data path: who they are, whether they are idle,
and decoding one chunk of a long recording on one of them over loopback.

Who they are: ``asrctl`` writes the instances nginx sends traffic to into ``run/upstream.json``
(``Settings.peers_file``) on every change, so an instance or the job runner reads the current pool
without importing the control path. A chunk travels as a 16 kHz mono float32 WAV (the samples
exactly) in an ordinary ``POST /asr`` on the instance's own port, marked ``X-ASR-Chunk`` so that the
instance counts its audio once (the request that was cut counts it) and refuses it while draining.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import soundfile

from app import formats
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript

log = logging.getLogger(__name__)

CHUNK_HEADER = "X-ASR-Chunk"


class Busy(Exception):
    """The instance cannot take this chunk now (full, draining, gone): try elsewhere or later."""


class ChunkFailed(Busy):
    """The instance took the chunk and failed on it (a 5xx other than 503, a timeout, the connection
    lost mid-request: it died or was killed decoding it). Still ``Busy`` to the long-form scheduler;
    the job runner counts these against the chunk (``job_chunk_attempts``)."""


class ChunkRefused(Exception):
    """The instance refused the chunk for what it is (a 4xx other than 503): no retry will help."""


@dataclass(frozen=True)
class Peer:
    port: int
    name: str
    health: dict

    @property
    def idle(self) -> bool:
        queue = self.health.get("queue", {})
        return queue.get("running", 1) + queue.get("waiting", 1) == 0

    @property
    def multilingual(self) -> bool:
        """Whether its model knows more than one language (unknown: assumed so)."""
        return self.health.get("model_config", {}).get("multilingual") is not False

    @property
    def max_batch(self) -> int:
        return int(self.health.get("model_config", {}).get("max_batch", 1))


def upstream_ports(peers_file: Path) -> list[int]:
    """The instances' loopback ports as asrctl last published them ([] before the first publish)."""
    try:
        return [int(entry["port"]) for entry in json.loads(peers_file.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def ready_peers(peers_file: Path, exclude: int | None = None, timeout: float = 1.0) -> list[Peer]:
    """The listed instances that answer ``/health`` as ready now (``exclude``: the caller's own port)."""
    peers = []
    for port in upstream_ports(peers_file):
        if port == exclude:
            continue
        try:
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=timeout).json()
        except (requests.RequestException, ValueError):
            continue
        if health.get("state") == "ready":
            peers.append(Peer(port, str(health.get("instance", port)), health))
    return peers


def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(samples, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def decode_on(port: int, samples: np.ndarray, options: DecodeOptions, timeout: float,
              request_id: str = "") -> Transcript:
    """One chunk through the instance on ``port``; raises ``Busy`` or ``ChunkRefused``."""
    fields = {"output": "json", "task": options.task, "beam_size": str(options.beam_size),
              "temperature": str(options.temperature), "word_timestamps": str(options.word_timestamps).lower(),
              "vad_filter": "false"}
    if options.language:
        fields["language"] = options.language
    if options.initial_prompt:
        fields["initial_prompt"] = options.initial_prompt
    headers = {CHUNK_HEADER: "1", **({"X-Request-ID": request_id} if request_id else {})}
    try:
        response = requests.post(f"http://127.0.0.1:{port}/asr", files={"audio": ("chunk.wav", wav(samples))},
                                 data=fields, headers=headers, timeout=timeout)
    except requests.RequestException as e:
        raise _unreached(port, e) from None
    if response.status_code == 200:
        return formats.from_dict(response.json())
    message = _error_message(response)
    if response.status_code in (429, 503):
        raise Busy(f"instance on port {port}: {response.status_code} {message}")
    if response.status_code >= 500:
        raise ChunkFailed(f"instance on port {port}: {response.status_code} {message}")
    raise ChunkRefused(message)


def _unreached(port: int, e: requests.RequestException) -> Busy:
    """No connection at all (refused, or no connect in time) is ``Busy``: the chunk never got there.
    Anything after it was sent (a read timeout, the connection dropped) is ``ChunkFailed``."""
    never_sent = isinstance(e, requests.ConnectTimeout) or (
        isinstance(e, requests.ConnectionError) and "NewConnectionError" in repr(e.args[0] if e.args else e))
    return (Busy if never_sent else ChunkFailed)(f"instance on port {port}: {type(e).__name__}")


def _error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
