"""The multilingual paths the English-only embedded model never takes: language detection, a requested
language, translate, on both engines, in-process and through nginx.

No multilingual weights can be had offline, so these tests run a small Whisper with random weights
(app/selfcheck/random_whisper.py), converted for both engines. It says nothing meaningful about the
speech; what the tests check is what crosses the interfaces: both engines, given the same weights,
detect the same language with the same probability and decode the same tokens, and the task and
language a request names reach the model (changing either changes the tokens decoded).
"""
from dataclasses import replace

import numpy as np
import openai
import pytest
import requests

from app.selfcheck import random_whisper as random_multilingual
from app.audio import longform
from app.config import load_settings
from app.engines import load_engine
from app.runtime.instance import ModelInstance
from app.engines.base import DecodeOptions
from app.languages import LANGUAGE_NAMES
from support import shared_audio, bring_up, manifest, read_16k_mono

pytestmark = pytest.mark.integration

GERMAN = next(r for r in manifest("de"))
MANDARIN = next(r for r in manifest("zh"))
# Random weights fail Whisper's checks in every window: with the temperature fallback every window
# would be sampled, so these tests of what reaches the model decode at temperature 0 only.
GREEDY = DecodeOptions(beam_size=1, fallback=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf, ct2 = random_multilingual.build(tmp_path_factory.mktemp("multilingual"))
    return {"transformers": hf, "ctranslate2": ct2}


@pytest.fixture(scope="module")
def engines(model):
    return {name: load_engine(name, str(path), "cpu", "float32", cpu_threads=1) for name, path in model.items()}


@pytest.fixture(scope="module")
def clips():
    return [read_16k_mono(shared_audio(row["file"])) for row in (GERMAN, MANDARIN)]


def compact(text: str) -> str:
    """The text without spaces: the engines join segments differently, the tokens are what count."""
    return text.replace(" ", "")


# In-process: the two engines agree ----------------------------------------------------------------

def test_both_engines_are_multilingual_and_detect_alike(engines, clips):
    ct2, hf = engines["ctranslate2"], engines["transformers"]
    assert ct2.multilingual and hf.multilingual and {"de", "zh", "fr"} <= ct2.languages & hf.languages
    detected = {name: engine.detect_language(clips) for name, engine in engines.items()}
    for (ct2_code, ct2_p), (hf_code, hf_p) in zip(detected["ctranslate2"], detected["transformers"]):
        assert ct2_code == hf_code and ct2_code in LANGUAGE_NAMES
        assert 0 < ct2_p <= 1 and ct2_p == pytest.approx(hf_p, abs=1e-3)
    # A transcription that names no language detects the same one on the first window.
    transcript = ct2.transcribe(clips[0], GREEDY)
    assert (transcript.language, transcript.language_probability) == detected["ctranslate2"][0]


def test_task_and_language_reach_the_model_on_both_engines(engines, clips):
    german = clips[0]
    decoded = {}
    for name, engine in engines.items():
        runs = {(language, task): engine.transcribe(german, DecodeOptions(beam_size=1, language=language, task=task,
                                                                              fallback=False))
                for language, task in [("de", "transcribe"), ("de", "translate"), ("fr", "transcribe")]}
        assert {t.language for t in runs.values()} == {"de", "fr"}
        assert all(t.language_probability == 1.0 for t in runs.values())
        texts = {key: compact(t.text) for key, t in runs.items()}
        assert all(texts.values()) and len(set(texts.values())) == 3, texts  # each prompt decodes its own way
        decoded[name] = texts
    # Same weights, same prompt, greedy: the same first tokens on both engines.
    for key in decoded["ctranslate2"]:
        assert decoded["ctranslate2"][key][:12] == decoded["transformers"][key][:12], key


def test_ctranslate2_lockstep_batch_detects_per_clip_like_one_by_one(engines, clips):
    ct2 = engines["ctranslate2"]
    long_german = np.concatenate([clips[0]] * 5)  # over 30 s: more lockstep rounds
    audios = [clips[0], clips[1], long_german, clips[1]]
    options = [GREEDY, GREEDY, GREEDY, DecodeOptions(beam_size=1, language="zh", task="translate", fallback=False)]
    batched = ct2.transcribe_batch(audios, options)
    assert batched == [ct2.transcribe(a, o) for a, o in zip(audios, options)]
    assert batched[3].language == "zh"


def test_each_chunk_of_a_long_recording_detects_its_own_language(model, clips, tmp_path, monkeypatch):
    """English, then German, in two chunks: each chunk's decode detects its own language (none is
    forced from the first chunk, ``und`` never); a language the request names reaches every chunk.
    The random weights detect the same guess on any audio, so which language each half gets cannot
    be shown here: what is checked is the path (every chunk decoded with the language left open, and
    the recording's language the majority of what the chunks detected; the majority rule itself is
    tested in test_chunking)."""
    settings = load_settings(env={}, overrides={"model": str(model["ctranslate2"]), "compute_type": "float32",
                                                "beam_size": 1, "chunk_seconds": 15, "run_dir": str(tmp_path)})
    inst = ModelInstance(settings)
    inst.load_now()
    asked: list[str | None] = []
    one, batch = inst.engine.transcribe, inst.engine.transcribe_batch  # what the queue calls, one or several
    monkeypatch.setattr(inst.engine, "transcribe", lambda audio, o: asked.append(o.language) or one(audio, o))
    monkeypatch.setattr(inst.engine, "transcribe_batch",
                        lambda audios, options: asked.extend(o.language for o in options) or batch(audios, options))
    try:
        english = read_16k_mono(shared_audio("setA/jfk.flac"))
        samples = np.concatenate([english, np.zeros(3 * 16000, np.float32), clips[0]])
        chunks = longform.split(samples, settings.chunk_seconds, inst.engine.word_timestamps)
        detected = [code for code, _ in inst.engine.detect_language([samples[c.start:c.end] for c in chunks])]
        transcript, _ = longform.transcribe_long(inst, samples, GREEDY)
        # The language left open on a multilingual model: chunks (of chunk_seconds), not a span, even
        # with faster-whisper's spans on (the default span_seconds).
        assert len(chunks) == 2 and asked == [None, None]
        assert transcript.language in detected and transcript.language != "und"
        asked.clear()
        named, placed = longform.transcribe_long(inst, samples, replace(GREEDY, language="de"))
        # Named: one language for the whole recording, which goes in one span, in that language.
        assert placed == {inst.id: 1} and asked == ["de"] and named.language == "de"
    finally:
        inst.queue.stop()


# Through nginx ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["ctranslate2", "transformers"])
def service(request, model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"ml-{request.param}")
    svc = bring_up(tmp, 1, "--engine", request.param, "--model", str(model[request.param]),
                   "--compute-type", "float32", "--beam-size", "1", env={"ASR_TEMPERATURE_FALLBACK": "false"})
    yield svc
    svc.asrctl("down")


def post(service, path: str, row: dict, **params) -> requests.Response:
    return requests.post(f"{service.url}{path}", files={"audio_file": (row["file"], shared_audio(row["file"]).read_bytes())},
                         data=params, timeout=120)


def test_detection_translation_and_languages_through_nginx(service):
    detected = post(service, "/detect-language", GERMAN)
    assert detected.status_code == 200, detected.text
    body = detected.json()
    assert body["language"] in LANGUAGE_NAMES and 0 < body["confidence"] <= 1
    assert body["detected_language"] == LANGUAGE_NAMES[body["language"]] and body["language_code"] == body["language"]

    auto = post(service, "/asr", GERMAN, output="json")
    assert auto.status_code == 200 and auto.json()["language"] == body["language"]
    assert auto.json()["language_probability"] == pytest.approx(body["confidence"], abs=1e-3)

    transcribed = post(service, "/asr", GERMAN, output="json", language="de")
    translated = post(service, "/asr", GERMAN, output="json", language="de", task="translate")
    assert transcribed.status_code == translated.status_code == 200, translated.text
    assert translated.json()["language"] == "de" and translated.json()["text"] != transcribed.json()["text"]

    unknown = post(service, "/asr", GERMAN, language="xx")
    assert unknown.status_code == 422 and "not a language the model knows" in unknown.json()["error"]["message"]


def test_beam_size_temperature_and_language_names_reach_the_model_through_nginx(service):
    # Random weights make every decoding choice a close call, so each option shows in the words.
    def text(**params) -> str:
        response = post(service, "/asr", GERMAN, output="json", **params)
        assert response.status_code == 200, response.text
        return response.json()["text"]

    greedy = text(language="de", beam_size="1")
    assert text(language="de", beam_size="5") != greedy
    assert {text(language="de", beam_size="1", temperature="1.0") for _ in range(3)} - {greedy}
    # The recipes' clients name languages, or ask for detection with "auto".
    assert text(language="German", beam_size="1") == greedy
    detected = post(service, "/detect-language", GERMAN).json()["language"]
    assert post(service, "/asr", GERMAN, language="auto").json()["language"] == detected


def test_openai_translation_endpoint(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)
    with shared_audio(MANDARIN["file"]).open("rb") as f:
        verbose = client.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json")
    assert verbose.task == "translate" and verbose.duration == pytest.approx(MANDARIN["duration_s"], abs=0.05)
    with shared_audio(GERMAN["file"]).open("rb") as f:
        german = client.audio.transcriptions.create(model="whisper-1", file=f, language="de",
                                                   response_format="verbose_json")
    assert german.language == "german"
