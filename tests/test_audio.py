"""Decoding: every shared clip and every container format becomes 16 kHz mono; bad input is refused by kind."""
import numpy as np
import pytest
import soundfile
import soxr

from app.audio import decode_audio
from app.errors import ApiError
from support import shared_audio, clip_bytes, encode, manifest, wav_bytes


@pytest.mark.parametrize("row", manifest(), ids=lambda r: r["file"])
def test_every_shared_clip_decodes(row):
    audio = decode_audio(clip_bytes(row), max_seconds=600)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.duration == pytest.approx(row["duration_s"], abs=0.01)
    assert audio.source_rate == row["sample_rate"] and audio.source_channels == row["channels"]
    assert np.abs(audio.samples).max() > 0.01  # speech, not silence


@pytest.fixture(scope="module")
def jfk():
    samples, rate = soundfile.read(str(shared_audio("setA/jfk.flac")), dtype="float32", always_2d=True)
    return samples, rate


@pytest.mark.parametrize("container, codec, rate", [
    ("mp3", "libmp3lame", 44100),
    ("ipod", "aac", 44100),        # .m4a
    ("webm", "libopus", 48000),
    ("ogg", "libopus", 48000),
    ("flac", "flac", 22050),
])
def test_containers_and_codecs_decode_to_the_same_audio(jfk, container, codec, rate):
    samples, source_rate = jfk
    if rate != source_rate:
        samples = soxr.resample(samples, source_rate, rate)
    audio = decode_audio(encode(samples, rate, container, codec), max_seconds=600)
    assert audio.duration == pytest.approx(11.0, abs=0.1)
    assert audio.source_rate == rate and audio.source_channels == 2
    reference = decode_audio(shared_audio("setA/jfk.flac").read_bytes(), 600).samples
    n = min(len(reference), len(audio.samples))
    # Lossy codecs shift a few ms; the loudness envelope over 100 ms windows still matches.
    env = lambda x: np.sqrt(np.mean(x[: n // 1600 * 1600].reshape(-1, 1600) ** 2, axis=1))  # noqa: E731
    assert np.corrcoef(env(reference), env(audio.samples))[0, 1] > 0.95


@pytest.mark.parametrize("rate, channels", [(8000, 1), (11025, 2), (96000, 6)])
def test_any_rate_and_channel_count_becomes_16k_mono(jfk, rate, channels):
    samples, source_rate = jfk
    mono = soxr.resample(samples.mean(axis=1), source_rate, rate)
    audio = decode_audio(wav_bytes(np.repeat(mono[:, None], channels, axis=1), rate), 600)
    assert audio.source_rate == rate and audio.source_channels == channels
    assert len(audio.samples) == pytest.approx(11.0 * 16000, abs=16)


def _code(data: bytes, max_seconds: float = 60) -> tuple[int, str]:
    with pytest.raises(ApiError) as e:
        decode_audio(data, max_seconds)
    return e.value.status, e.value.code


def test_bad_inputs_are_refused_by_kind(jfk):
    samples, rate = jfk
    good = wav_bytes(samples, rate)
    assert _code(b"") == (400, "empty_audio")
    assert _code(b"this is a text file, not a wav\n" * 10) == (415, "unsupported_media_type")
    assert _code(b"PK\x03\x04" + bytes(200)) == (415, "unsupported_media_type")  # a zip archive
    assert _code(good[:44]) == (422, "audio_too_short")                        # header, no samples
    assert _code(good, max_seconds=5) == (413, "audio_too_long")
    assert _code(wav_bytes(np.full(16000, np.nan, np.float32), 16000, "FLOAT")) == (422, "invalid_samples")
    assert _code(wav_bytes(np.zeros(1, np.float32), 16000)) == (422, "audio_too_short")
    assert _code(wav_bytes(np.zeros(100, np.float32), 500)) == (422, "unsupported_sample_rate")
    # A header that claims an hour of data it does not hold: only the real second is decoded.
    lying = bytearray(wav_bytes(np.full(16000, 0.1, np.float32), 16000))
    lying[40:44] = (3600 * 16000 * 2).to_bytes(4, "little")
    assert decode_audio(bytes(lying), 60).duration == pytest.approx(1.0)
    # A FLAC stream whose header declares an hour is refused from the header, before decoding.
    flac = bytearray(encode(np.full((16000, 1), 0.1, np.float32), 16000, "flac", "flac"))
    at = flac.index(b"fLaC") + 8 + 13  # STREAMINFO: total samples in the low 36 bits at bytes 13..17
    total = (3600 * 16000).to_bytes(5, "big")
    flac[at] = (flac[at] & 0xF0) | total[0]
    flac[at + 1:at + 5] = total[1:]
    assert _code(bytes(flac)) == (413, "audio_too_long")
