"""Decoding: every shared clip and every container format becomes 16 kHz mono; bad input is refused by kind.
Formats and rates are checked on speech espeak-ng makes, turned into 44.1 kHz stereo."""
import numpy as np
import pytest
import soxr

from app.audio.decode import decode_audio
from app.errors import ApiError
from support import clip_bytes, encode, espeak, manifest_params, wav_bytes

RATE = 44100


@pytest.mark.parametrize("row", manifest_params())
def test_every_shared_clip_decodes(row):
    audio = decode_audio(clip_bytes(row), max_seconds=600)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.duration == pytest.approx(row["duration_s"], abs=0.01)
    assert audio.source_rate == row["sample_rate"] and audio.source_channels == row["channels"]
    assert np.abs(audio.samples).max() > 0.01  # speech, not silence


@pytest.fixture(scope="module")
def jfk():
    """JFK's sentence spoken by espeak-ng as 44.1 kHz stereo (the channels differ in loudness)."""
    mono = soxr.resample(espeak("And so, my fellow Americans, ask not what your country can do for you."), 16000, RATE)
    return np.stack([mono, 0.7 * mono], axis=1).astype(np.float32), RATE


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
    seconds = len(jfk[0]) / RATE
    assert audio.duration == pytest.approx(seconds, abs=0.1)
    assert audio.source_rate == rate and audio.source_channels == 2
    reference = decode_audio(wav_bytes(*jfk), 600).samples
    n = min(len(reference), len(audio.samples)) - 640
    # Lossy codecs shift the audio by up to a few tens of ms (AAC's encoder delay: about 20 ms here);
    # at the best shift within 40 ms the loudness envelope over 100 ms windows still matches.
    env = lambda x: np.sqrt(np.mean(x[: n // 1600 * 1600].reshape(-1, 1600) ** 2, axis=1))  # noqa: E731
    assert max(np.corrcoef(env(reference), env(audio.samples[lag:]))[0, 1] for lag in range(0, 641, 80)) > 0.95


@pytest.mark.parametrize("rate, channels", [(8000, 1), (11025, 2), (96000, 6)])
def test_any_rate_and_channel_count_becomes_16k_mono(jfk, rate, channels):
    samples, source_rate = jfk
    mono = soxr.resample(samples.mean(axis=1), source_rate, rate)
    audio = decode_audio(wav_bytes(np.repeat(mono[:, None], channels, axis=1), rate), 600)
    assert audio.source_rate == rate and audio.source_channels == channels
    assert len(audio.samples) == pytest.approx(len(samples) / source_rate * 16000, abs=16)


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
    assert _code(good, max_seconds=2) == (413, "audio_too_long")
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
