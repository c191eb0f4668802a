"""Every request option beyond plain transcription, on both engines, through nginx, on the shared real
speech: word timestamps, initial prompts, VAD, language detection, long audio with absolute times, the
OpenAI client's prompt and word granularity, and a model configuration file both engines honour."""
import json

import numpy as np
import openai
import pytest
import requests
import srt

from support import JFK_REFERENCE, bring_up, english_set_a, normalize, read_16k_mono, set_a_sequence, shared_audio, \
    wav_bytes, wer

pytestmark = pytest.mark.integration

RATE = 16_000
JFK_SECONDS = 11.0
# Casual, lowercase and unpunctuated: Whisper continues a prompt's style, so this one shows in the output.
PLAIN_PROMPT = "um so yeah we were like talking about it you know"

# The model configuration the service starts with: one file, the same keys for both engines.
MODEL_CONFIG = """\
compute_type = "{precision}"
beam_size = 5
max_batch = 2
max_audio_seconds = 120.0
output = "srt"
"""
PRECISION = {"ctranslate2": "int8", "transformers": "float32"}


@pytest.fixture(scope="module", params=["ctranslate2", "transformers"])
def service(request, tmp_path_factory, model_cache):
    engine = request.param
    tmp = tmp_path_factory.mktemp(engine)
    config = tmp / "asr.toml"
    config.write_text(MODEL_CONFIG.format(precision=PRECISION[engine]))
    svc = bring_up(tmp, 1, "--engine", engine, "--config", str(config), env={"ASR_MODEL_CACHE": str(model_cache)})
    svc.engine = engine
    yield svc
    svc.asrctl("down")


def post(service, data: bytes, path: str = "/asr", **params) -> requests.Response:
    return requests.post(f"{service.url}{path}", files={"audio_file": ("clip", data)}, data=params, timeout=300)


def asr_json(service, data: bytes, **params) -> dict:
    response = post(service, data, output="json", **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["engine"] == service.engine
    return body


def words_of(body: dict) -> list[dict]:
    return [w for s in body["segments"] for w in s["words"]]


def check_times(body: dict, duration: float) -> None:
    """Segments and words move forward in time, inside the audio, each word inside its segment."""
    assert body["duration"] == pytest.approx(duration, abs=0.01)
    previous = 0.0
    for segment in body["segments"]:
        assert previous - 0.01 <= segment["start"] <= segment["end"] <= duration + 0.01, segment
        previous = segment["start"]
        for word in segment.get("words", []):
            assert segment["start"] - 0.01 <= word["start"] <= word["end"] <= segment["end"] + 0.01, (word, segment)


def jfk_path():
    """The real recording (../shared/audio): these checks hold words to where JFK speaks them."""
    return shared_audio("setA/jfk.flac")


def jfk() -> bytes:
    return jfk_path().read_bytes()


# The model configuration file ---------------------------------------------------------------------

def test_the_model_configuration_file_is_honoured(service):
    health = requests.get(f"{service.url}/health", timeout=5).json()
    assert health["engine"] == service.engine
    assert health["model_config"] == {
        "compute_type": PRECISION[service.engine], "beam_size": 5, "max_batch": 2, "max_audio_seconds": 120.0,
        "multilingual": False, "language": None, "detect_language": True, "output": "srt", "word_timestamps": False, "vad_filter": False}
    default = post(service, jfk())  # no output asked for: the configured SRT
    assert default.status_code == 200 and default.headers["Content-Type"].startswith("application/x-subrip")
    assert normalize(" ".join(s.content for s in srt.parse(default.text))) == normalize(JFK_REFERENCE)
    samples, _ = set_a_sequence()
    too_long = post(service, wav_bytes(np.concatenate([samples, samples]), RATE), output="json")
    assert too_long.status_code == 413 and too_long.json()["error"]["code"] == "audio_too_long"


# word_timestamps ------------------------------------------------------------------------------------

def test_word_timestamps_on_set_a(service):
    rows = [r for r in english_set_a() if r["duration_s"] <= 11]
    hypotheses = []
    for row in rows:
        body = asr_json(service, shared_audio(row["file"]).read_bytes(), word_timestamps="true")
        check_times(body, row["duration_s"])
        for segment in body["segments"]:
            assert segment["words"], segment
            assert normalize("".join(w["word"] for w in segment["words"])) == normalize(segment["text"])
            assert all(w["end"] - w["start"] < 3.0 for w in segment["words"])
            if service.engine == "ctranslate2":
                assert all(0 < w["probability"] <= 1 for w in segment["words"])
        hypotheses.append(" ".join(w["word"] for w in words_of(body)))
    assert wer([r["reference"] for r in rows], hypotheses) < 0.15
    plain = asr_json(service, jfk())
    assert all("words" not in s for s in plain["segments"])


def test_jfk_words_sit_where_they_are_spoken(service):
    words = words_of(asr_json(service, jfk(), word_timestamps="true"))
    assert normalize(" ".join(w["word"] for w in words)) == normalize(JFK_REFERENCE)
    assert words[0]["start"] < 1.0                   # "And" opens the clip
    assert 9.5 < words[-1]["end"] <= JFK_SECONDS     # "country." ends about 10.5 s in, then silence
    ask = [w for w in words if normalize(w["word"]) == "ask"]
    assert len(ask) == 2 and ask[0]["end"] < 5.0 < 7.5 < ask[1]["start"]  # "ask not ..." / "... ask what"


# initial_prompt -------------------------------------------------------------------------------------

def test_initial_prompt_conditions_the_transcript(service):
    plain = asr_json(service, jfk())["text"]
    prompted = asr_json(service, jfk(), initial_prompt=PLAIN_PROMPT)["text"]
    # The prompt's style, not its words: lower case and no punctuation. (Whether the plain text has a
    # comma after "so" differs between CPUs' int8 kernels; its capital and full stop do not.)
    assert plain.startswith("And") and plain.endswith(".")
    assert prompted.startswith("and") and not any(mark in prompted for mark in ",.?!")
    assert normalize(prompted) == normalize(plain) == normalize(JFK_REFERENCE)
    longest = asr_json(service, jfk(), initial_prompt="Kennedy. " * 220)  # past the kept 223 tokens
    assert longest["segments"]


# vad_filter -----------------------------------------------------------------------------------------

def test_vad_filter_drops_silence_and_keeps_times_absolute(service):
    # Two different recordings, each after 12 s of silence. (One sentence twice would make the speech VAD
    # keeps repeat itself: the window fails Whisper's compression-ratio check at every temperature and
    # comes back sampled, other words on every run, as from faster-whisper itself.)
    wizard = next(r for r in english_set_a() if r["file"].endswith("fw_stereo_diarization_left.wav"))
    clips = [read_16k_mono(shared_audio(wizard["file"])), read_16k_mono(jfk_path())]
    references = [wizard["reference"], JFK_REFERENCE]
    silence = np.zeros(12 * RATE, np.float32)
    offsets = [12.0, 24.0 + len(clips[0]) / RATE]
    duration = offsets[1] + len(clips[1]) / RATE
    with_vad = asr_json(service, wav_bytes(np.concatenate([silence, clips[0], silence, clips[1]]), RATE),
                        vad_filter="true", word_timestamps="true")
    check_times(with_vad, duration)
    assert wer([" ".join(references)], [with_vad["text"]]) <= 0.1, with_vad["text"]
    words = words_of(with_vad)
    stretches = [[w for w in words if w["end"] <= offsets[1]], [w for w in words if w["start"] >= offsets[1] - 1]]
    assert len(stretches[0]) + len(stretches[1]) == len(words), words
    for clip, reference, offset, stretch in zip(clips, references, offsets, stretches):
        # Each recording heard whole on its own stretch of audio (losing one would cost half the words),
        # its words where the same recording decoded alone has them, moved by where it lies.
        assert wer([reference], ["".join(w["word"] for w in stretch)]) <= 0.15, stretch
        alone = words_of(asr_json(service, wav_bytes(clip, RATE), word_timestamps="true"))
        assert abs(stretch[0]["start"] - (offset + alone[0]["start"])) < 0.7, (stretch[0], alone[0], offset)
        assert abs(stretch[-1]["end"] - (offset + alone[-1]["end"])) < 0.7, (stretch[-1], alone[-1], offset)


def test_vad_filter_on_audio_without_speech_skips_the_model(service):
    quiet = wav_bytes(np.random.default_rng(0).normal(0, 1e-4, 20 * RATE).astype(np.float32), RATE)
    response = post(service, quiet, output="json", vad_filter="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "" and body["segments"] == [] and body["duration"] == pytest.approx(20.0)
    assert "inference;dur=0.00" in response.headers["Server-Timing"]


# /detect-language -----------------------------------------------------------------------------------

def test_detect_language(service):
    for row in english_set_a()[:3]:
        response = post(service, shared_audio(row["file"]).read_bytes(), path="/detect-language")
        assert response.status_code == 200, response.text
        # The embedded model is English-only, so what it detects is a foregone "en": detection itself is
        # tested on models that can tell languages apart (test_multilingual.py, test_service_qwen3_asr.py).
        assert set(response.json()) == {"language", "confidence", "detected_language", "language_code"}
        assert response.headers["Server-Timing"].startswith("queue;dur=")
    samples, _ = set_a_sequence()  # longer than 30 s: only the start is looked at
    assert post(service, wav_bytes(samples, RATE), path="/detect-language").json()["language"] == "en"
    bad = post(service, jfk(), path="/detect-language", language="en")
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("language: ")
    quiet = wav_bytes(np.zeros(5 * RATE, np.float32), RATE)
    none = post(service, quiet, path="/detect-language", vad_filter="true")
    assert none.status_code == 422 and none.json()["error"]["code"] == "no_speech"
    text = post(service, b"language: en\n" * 100, path="/detect-language")
    damaged = post(service, jfk()[:2000], path="/detect-language")
    assert (text.status_code, damaged.status_code) == (415, 422)
    assert requests.get(f"{service.url}/ready", timeout=5).status_code == 200


# Long audio -----------------------------------------------------------------------------------------

def test_long_audio_is_transcribed_whole_with_absolute_times(service):
    samples, places = set_a_sequence()
    duration = len(samples) / RATE
    assert duration > 60
    body = asr_json(service, wav_bytes(samples, RATE), word_timestamps="true")
    check_times(body, duration)
    assert body["segments"][-1]["end"] > duration - 5
    references = [reference for _, _, reference in places]
    assert wer([" ".join(references)], [body["text"]]) < 0.15
    # Every clip's words are found on that clip's own stretch of the timeline (windows past 30 s too).
    words = words_of(body)
    heard = [" ".join(w["word"] for w in words if start - 0.5 <= (w["start"] + w["end"]) / 2 <= end + 0.5)
             for start, end, _ in places]
    assert wer(references, heard) < 0.2, list(zip(references, heard))


# OpenAI client: prompt and word timestamps ----------------------------------------------------------

def test_openai_client_prompt_and_word_granularity(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=300)
    with jfk_path().open("rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"], prompt=PLAIN_PROMPT)
    assert "," not in verbose.text and normalize(verbose.text) == normalize(JFK_REFERENCE)
    assert verbose.segments and verbose.words
    assert [w.word for w in verbose.words] == [w.word.strip() for w in verbose.words]
    assert normalize(" ".join(w.word for w in verbose.words)) == normalize(JFK_REFERENCE)
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and verbose.words[-1].end <= JFK_SECONDS
    with jfk_path().open("rb") as f:
        words_only = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                        timestamp_granularities=["word"])
    assert words_only.words and not words_only.segments
    assert json.loads(words_only.to_json())["text"] == words_only.text


def test_language_detection_switched_off_by_configuration(qwen_models):
    """detect_language = false: /detect-language answers 403, /asr uses the configured language even
    when a client asks for detection. On the tiny Qwen3-ASR, which would detect English here."""
    import io

    from app.routes import create_app
    from app.config import load_settings

    settings = load_settings(env={}, overrides={"detect_language": False, "language": "de", "max_queue": 2,
                                                "engine": "qwen3-asr", "model": str(qwen_models[0])})
    client = create_app(settings, load_in_background=False).test_client()
    upload = {"content_type": "multipart/form-data"}
    off = client.post("/detect-language", data={"audio_file": (io.BytesIO(jfk()), "jfk.flac")}, **upload)
    assert off.status_code == 403 and off.json["error"]["code"] == "language_detection_disabled"
    for asked in ({}, {"language": "auto"}):
        served = client.post("/asr", data={"audio_file": (io.BytesIO(jfk()), "jfk.flac"), **asked}, **upload)
        assert served.status_code == 200 and served.json["language"] == "de", asked
    named = client.post("/asr", data={"audio_file": (io.BytesIO(jfk()), "jfk.flac"), "language": "en"}, **upload)
    assert named.json["language"] == "en"  # a language the client names still wins
