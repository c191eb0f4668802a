"""Decode any upload into what every engine takes: 16 kHz mono float32.

``decode_audio`` (``/asr``) works in memory: nothing derived from the upload (bytes or filename)
touches the filesystem. ``decode_to_flac`` (``/v1/jobs``, uploads of up to hours) reads an upload
already streamed to a file and writes 16 kHz mono FLAC block by block, so memory stays a few blocks
whatever the upload's length, rate or channels; it refuses what ``decode_audio`` refuses, with the
same errors. libsndfile (soundfile) reads WAV/FLAC/OGG/MP3 and tells the length from the header
before anything is decoded; PyAV (FFmpeg) reads the containers libsndfile cannot (m4a, webm, ...),
decoding frame by frame so a stream longer than allowed stops early.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import soundfile
import soxr

from app.engines.base import SAMPLE_RATE
from app.errors import ApiError

MIN_SECONDS = 0.1
MAX_CHANNELS = 32
MIN_RATE, MAX_RATE = 1_000, 384_000
BLOCK_SECONDS = 10   # what decode_to_flac holds at once, at the source's rate and channels


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

    with _pyav_audio(io.BytesIO(data), lambda: data[:12], max_seconds) as (container, stream):
        rate, channels = stream.rate or 0, stream.channels or 0
        blocks, total, limit = [], 0, int(max_seconds * SAMPLE_RATE) + 1
        try:
            for block in _pyav_blocks(container, stream):
                blocks.append(block)
                total += len(block)
                if total > limit:
                    break
        except (av.error.FFmpegError, ValueError) as e:
            raise ApiError(422, "undecodable_audio", f"the audio data is damaged: {e}") from None
    return rate, channels, np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)


@contextmanager
def _pyav_audio(source: BinaryIO, head: Callable[[], bytes], max_seconds: float) -> Iterator[tuple]:
    """FFmpeg's first audio stream in ``source``, its format checked: ``(container, stream)``.
    ``head()`` gives the first bytes, to tell damaged audio (422) from what is not audio (415)."""
    import av

    try:
        container = av.open(source, mode="r")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError):
        if looks_like_audio(head()):
            raise ApiError(422, "undecodable_audio", "the audio file is damaged and cannot be decoded") from None
        raise ApiError(415, "unsupported_media_type", "the upload is not audio in a format we can read") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise ApiError(415, "unsupported_media_type", "the upload has no audio stream")
        stream = streams[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for it (e.g. a bogus WAV format tag)
            raise ApiError(415, "unsupported_media_type", "the audio codec is not one we can decode")
        _check_format(stream.rate or 0, stream.channels or 0, 0.0, max_seconds)
        yield container, stream


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


# Streamed: an upload on disk to 16 kHz mono FLAC -------------------------------------------------

@dataclass(frozen=True)
class DecodedFile:
    samples: int         # 16 kHz mono samples written
    source_rate: int
    source_channels: int
    bytes: int           # the FLAC file's size

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE


def resampler_from(rate: int) -> soxr.ResampleStream:
    """Mono float32 audio at ``rate`` to 16 kHz, block by block: the filter ``decode_audio`` uses in one
    call, for audio that arrives in pieces (a job's upload, a live stream)."""
    return soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")


def decode_to_flac(upload: BinaryIO, destination: Path, max_seconds: float) -> DecodedFile:
    """Decode the upload (a seekable file) into ``destination`` as 16 kHz mono 16-bit FLAC, atomically.

    Block by block: the source is mixed to mono and resampled as it is read (soxr's streaming
    resampler, the same filter ``decode_audio`` uses in one call), so memory does not grow with the
    upload. Refuses with ``decode_audio``'s errors, in the same order; nothing is left on error.
    """
    upload.seek(0, os.SEEK_END)
    if upload.tell() == 0:
        raise ApiError(400, "empty_audio", "the uploaded audio is empty")
    upload.seek(0)
    tmp = destination.with_name(destination.name + ".tmp")
    destination.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        try:
            source = soundfile.SoundFile(upload)
        except soundfile.LibsndfileError:
            upload.seek(0)
            written = _pyav_to_flac(upload, tmp, max_seconds)
        else:
            with source:
                written = _soundfile_to_flac(source, tmp, max_seconds)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return DecodedFile(written[0], written[1], written[2], destination.stat().st_size)


class _MonoFlacWriter:
    """Source blocks in (frames, channels) at ``rate``; 16 kHz mono FLAC out, with decode_audio's checks."""

    def __init__(self, path: Path, rate: int, max_seconds: float):
        self.rate, self.max_seconds = rate, max_seconds
        self.frames = 0              # source frames seen
        self.written = 0             # 16 kHz samples written
        self.finite = True
        self.resampler = resampler_from(rate) if rate != SAMPLE_RATE else None
        self.out = soundfile.SoundFile(str(path), "w", SAMPLE_RATE, 1, format="FLAC", subtype="PCM_16")

    def add(self, block: np.ndarray, last: bool = False) -> None:
        self.frames += len(block)
        self.finite = self.finite and bool(np.isfinite(block).all())
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        if self.resampler is not None:
            mono = self.resampler.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32), last=last)
        if len(mono) and self.finite:   # once not finite it is refused: only the length checks go on
            self.out.write(np.clip(mono, -1.0, 1.0))
            self.written += len(mono)

    def finish(self) -> int:
        """Flush and check what ``_finish`` checks, in its order; the samples written."""
        self.add(np.zeros((0, 1), np.float32), last=True)
        self.out.close()
        seconds = self.frames / self.rate
        if seconds > self.max_seconds:
            raise ApiError(413, "audio_too_long", f"audio is longer than the limit of {self.max_seconds:g} s")
        if seconds < MIN_SECONDS:
            raise ApiError(422, "audio_too_short", f"audio is {seconds:.3f} s long; at least {MIN_SECONDS} s is needed")
        if not self.finite:
            raise ApiError(422, "invalid_samples", "the audio holds NaN or infinite samples")
        return self.written

    def abort(self) -> None:
        if not self.out.closed:
            self.out.close()


def _soundfile_to_flac(f: soundfile.SoundFile, path: Path, max_seconds: float) -> tuple[int, int, int]:
    _check_format(f.samplerate, f.channels, f.frames / f.samplerate if f.frames > 0 else 0.0, max_seconds)
    limit = int(max_seconds * f.samplerate) + 1
    block = max(1, BLOCK_SECONDS * f.samplerate)
    writer = _MonoFlacWriter(path, f.samplerate, max_seconds)
    try:
        while writer.frames < limit:
            try:
                samples = f.read(frames=min(block, limit - writer.frames), dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as e:
                raise ApiError(422, "undecodable_audio", f"the audio data is damaged: {e}") from None
            if not len(samples):
                break
            writer.add(samples)
        if f.frames > 0 and writer.frames < min(f.frames, limit) * 0.99:
            raise ApiError(422, "truncated_audio", "the audio ends before the length its header declares")
        return writer.finish(), f.samplerate, f.channels
    finally:
        writer.abort()


def _pyav_to_flac(upload: BinaryIO, path: Path, max_seconds: float) -> tuple[int, int, int]:
    import av

    def head() -> bytes:
        upload.seek(0)
        return upload.read(12)

    with _pyav_audio(upload, head, max_seconds) as (container, stream):
        writer = _MonoFlacWriter(path, SAMPLE_RATE, max_seconds)  # FFmpeg resamples to 16 kHz mono
        limit = int(max_seconds * SAMPLE_RATE) + 1
        try:
            try:
                for block in _pyav_blocks(container, stream):
                    writer.add(block)
                    if writer.frames > limit:
                        break
            except (av.error.FFmpegError, ValueError) as e:
                raise ApiError(422, "undecodable_audio", f"the audio data is damaged: {e}") from None
            return writer.finish(), stream.rate or 0, stream.channels or 0
        finally:
            writer.abort()


def _pyav_blocks(container, stream) -> Iterator[np.ndarray]:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(-1, 1)
    for out in resampler.resample(None):
        yield out.to_ndarray().reshape(-1, 1)
