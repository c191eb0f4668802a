"""Decode any upload into what every engine takes: 16 kHz mono float32.

Everything happens in memory: nothing derived from the upload (bytes or filename) touches the
filesystem. libsndfile (soundfile) reads WAV/FLAC/OGG/MP3 and tells the length from the header
before anything is decoded; PyAV (FFmpeg) reads the containers libsndfile cannot (m4a, webm, ...),
decoding frame by frame so a stream longer than allowed stops early.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from app.engines.base import SAMPLE_RATE
from app.errors import ApiError

MIN_SECONDS = 0.1
MAX_CHANNELS = 32
MIN_RATE, MAX_RATE = 1_000, 384_000


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, 16 kHz, mono
    source_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(data: bytes, max_seconds: float) -> DecodedAudio:
    if not data:
        raise ApiError(400, "empty_audio", "the uploaded audio is empty")
    try:
        source_rate, channels, samples = _read_with_soundfile(data, max_seconds)
        rate = source_rate
    except soundfile.LibsndfileError:
        source_rate, channels, samples = _read_with_pyav(data, max_seconds)
        rate = SAMPLE_RATE  # FFmpeg already resampled to 16 kHz mono
    return _finish(samples, rate, source_rate, channels, max_seconds)


def _check_format(rate: int, channels: int, seconds: float, max_seconds: float) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ApiError(422, "unsupported_sample_rate", f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ApiError(422, "unsupported_channels", f"{channels} channels; at most {MAX_CHANNELS} are accepted")
    if seconds > max_seconds:
        raise ApiError(413, "audio_too_long", f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s")


def _read_with_soundfile(data: bytes, max_seconds: float) -> tuple[int, int, np.ndarray]:
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        # Known length from the header: refuse before decoding a claimed hour of audio.
        if f.frames > 0:
            _check_format(f.samplerate, f.channels, f.frames / f.samplerate, max_seconds)
        else:
            _check_format(f.samplerate, f.channels, 0.0, max_seconds)
        limit = int(max_seconds * f.samplerate) + 1
        try:
            samples = f.read(frames=limit, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise ApiError(422, "undecodable_audio", f"the audio data is damaged: {e}") from None
        if f.frames > 0 and len(samples) < min(f.frames, limit) * 0.99:
            raise ApiError(422, "truncated_audio", "the audio ends before the length its header declares")
        return f.samplerate, f.channels, samples


def _read_with_pyav(data: bytes, max_seconds: float) -> tuple[int, int, np.ndarray]:
    import av  # FFmpeg's demuxers and decoders; imported only for formats libsndfile lacks

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError):
        if looks_like_audio(data):
            raise ApiError(422, "undecodable_audio", "the audio file is damaged and cannot be decoded") from None
        raise ApiError(415, "unsupported_media_type", "the upload is not audio in a format we can read") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise ApiError(415, "unsupported_media_type", "the upload has no audio stream")
        stream = streams[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for it (e.g. a bogus WAV format tag)
            raise ApiError(415, "unsupported_media_type", "the audio codec is not one we can decode")
        rate, channels = stream.rate or 0, stream.channels or 0
        _check_format(rate, channels, 0.0, max_seconds)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, total, limit = [], 0, int(max_seconds * SAMPLE_RATE) + 1
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if total > limit:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except (av.error.FFmpegError, ValueError) as e:
            raise ApiError(422, "undecodable_audio", f"the audio data is damaged: {e}") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return rate, channels, samples[:, None]


def looks_like_audio(data: bytes) -> bool:
    """Whether the bytes start like an audio container: tells damaged audio (422) from non-audio (415)."""
    head = data[:12]
    return (
        (head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE")
        or head[:4] in (b"fLaC", b"OggS", b"FORM", b"\x1aE\xdf\xa3", b"caff")
        or head[:3] == b"ID3"
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # MPEG audio frame sync
        or head[4:8] == b"ftyp"                                            # MP4 / M4A
    )


def _finish(samples: np.ndarray, rate: int, source_rate: int, channels: int, max_seconds: float) -> DecodedAudio:
    seconds = len(samples) / rate
    if seconds > max_seconds:  # a stream whose header did not tell its length
        raise ApiError(413, "audio_too_long", f"audio is longer than the limit of {max_seconds:g} s")
    if seconds < MIN_SECONDS:
        raise ApiError(422, "audio_too_short", f"audio is {seconds:.3f} s long; at least {MIN_SECONDS} s is needed")
    if not np.isfinite(samples).all():
        raise ApiError(422, "invalid_samples", "the audio holds NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE:
        # The resampler librosa.resample(res_type="soxr_hq") calls, without librosa's seconds-long lazy
        # imports on the first request of every process.
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)
    return DecodedAudio(samples=np.ascontiguousarray(mono), source_rate=source_rate, source_channels=channels)
