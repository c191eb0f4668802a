"""The client-facing API for real, through nginx: /asr parameters and output formats (json, txt, srt,
vtt, tsv), and the OpenAI-compatible /v1/audio endpoints driven by the official ``openai`` package."""
import ast
import csv
import io
import json

import openai
import pytest
import requests
import soundfile
import srt
import webvtt

from app import formats
from app.engines.base import Segment, Transcript
from support import REPO, SPOKEN, bring_up, clip_bytes, english_set_a, normalize, spoken_file, wer

# A sentence espeak-ng speaks (the one the README's first request sends): what the API makes of a
# transcript is checked on it; how well real recordings are heard, on the shared set A.
SPEECH = spoken_file()
SPEECH_SECONDS = soundfile.info(str(SPEECH)).duration


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("api"), 1)
    yield svc
    svc.asrctl("down")


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)


def asr(service, data=None, **params):
    return requests.post(f"{service.url}/asr", files={"audio_file": ("speech.wav", data or SPEECH.read_bytes())},
                         data=params, timeout=120)


# Writers, without the service -----------------------------------------------------------------------

SAMPLE = Transcript(text="One. Two --> three.", language="en", duration=3725.5, segments=[
    Segment(0.0, 1.5, "One."), Segment(1.5, 1.5, " "), Segment(3661.001, 3725.499, "Two --> three."),
    Segment(3725.0, 3727.0, "Past the end.")])


def test_writers_format_times_like_whisper():
    assert formats.srt_time(3661.001) == "01:01:01,001" and formats.vtt_time(0.0006) == "00:00:00.001"
    subs = list(srt.parse(formats.to_srt(SAMPLE)))
    assert [s.index for s in subs] == [1, 2, 3] and [s.content for s in subs][:2] == ["One.", "Two -> three."]
    assert subs[2].end.total_seconds() == 3725.5  # clamped to the audio's duration
    assert subs[1].start.total_seconds() == pytest.approx(3661.001) and subs[1].end.total_seconds() == 3725.499
    vtt = formats.to_vtt(SAMPLE)
    assert vtt.startswith("WEBVTT\n\n")
    cues = webvtt.from_string(vtt).captions
    assert [c.start for c in cues][:2] == ["00:00:00.000", "01:01:01.001"] and cues[1].text == "Two -> three."
    rows = formats.to_tsv(SAMPLE).splitlines()
    assert rows[0] == "start\tend\ttext" and rows[3] == "3661001\t3725499\tTwo --> three."
    assert rows[4] == "3725000\t3725500\tPast the end."


# /asr -----------------------------------------------------------------------------------------------

def _check_cues(cues: list[tuple[float, float, str]], duration: float) -> str:
    """Cue times increase and lie within the audio; returns the cues' text."""
    assert cues
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:] + [(duration, None, None)]):
        assert 0 <= start <= end <= duration + 0.01 and start <= next_start
    return " ".join(text for _, _, text in cues)


def _srt_cues(body: str):
    return [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in srt.parse(body)]


def _vtt_cues(body: str):
    return [(c.start_in_seconds + c.start_time.milliseconds / 1000, c.end_in_seconds + c.end_time.milliseconds / 1000,
             c.text) for c in webvtt.from_string(body).captions]


def test_every_output_format(service):
    responses = {output: asr(service, output=output) for output in formats.OUTPUTS}
    assert all(r.status_code == 200 for r in responses.values()), {k: r.text for k, r in responses.items()}
    types = {o: r.headers["Content-Type"].split(";")[0] for o, r in responses.items()}
    assert types == {"json": "application/json", "txt": "text/plain", "srt": "application/x-subrip",
                     "vtt": "text/vtt", "tsv": "text/tab-separated-values"}
    body = responses["json"].json()
    assert normalize(body["text"]) == normalize(SPOKEN)
    assert normalize(responses["txt"].text) == normalize(SPOKEN)
    json_cues = [(s["start"], s["end"], s["text"]) for s in body["segments"]]
    for output, parse in (("srt", _srt_cues), ("vtt", _vtt_cues)):
        cues = parse(responses[output].text)
        assert normalize(_check_cues(cues, SPEECH_SECONDS)) == normalize(SPOKEN), output
        assert [(round(a, 3), round(b, 3)) for a, b, _ in cues] == [(a, b) for a, b, _ in json_cues], output
    assert responses["vtt"].text.startswith("WEBVTT\n")
    rows = list(csv.reader(io.StringIO(responses["tsv"].text), delimiter="\t"))
    assert rows[0] == ["start", "end", "text"] and all(len(r) == 3 for r in rows)
    assert [(int(r[0]), int(r[1])) for r in rows[1:]] == [(round(a * 1000), round(b * 1000)) for a, b, _ in json_cues]
    assert normalize(" ".join(r[2] for r in rows[1:])) == normalize(SPOKEN)


def test_subtitles_for_the_shared_set_a(service):
    rows = english_set_a()
    texts = []
    for i, row in enumerate(rows):
        output, parse = (("srt", _srt_cues), ("vtt", _vtt_cues))[i % 2]
        response = asr(service, clip_bytes(row), output=output)
        assert response.status_code == 200, response.text
        texts.append(_check_cues(parse(response.text), row["duration_s"]))
    assert wer([r["reference"] for r in rows], texts) < 0.15


def test_decoding_parameters_are_read_from_the_form_and_the_query_string(service):
    # Whether beam_size and temperature change what is decoded shows only on a model where they
    # matter (tests/test_multilingual.py, tests/test_qwen3_asr_engine.py); here: both ways of sending them.
    greedy = asr(service, beam_size="1", temperature="0", task="transcribe", language="en", output="txt")
    assert greedy.status_code == 200 and normalize(greedy.text) == normalize(SPOKEN)
    # The Qwen3-ASR recipes' stress client sends language=auto; other clients send names.
    for language in ("auto", "English", "EN"):
        named = requests.post(f"{service.url}/asr", files={"audio": ("speech.wav", SPEECH.read_bytes())},
                              data={"language": language}, timeout=120)
        assert named.status_code == 200 and named.json()["language"] == "en", (language, named.text)
    query = requests.post(f"{service.url}/asr?output=txt&beam_size=1&encode=true",
                          data=SPEECH.read_bytes(), headers={"Content-Type": "audio/wav"}, timeout=120)
    assert query.status_code == 200 and normalize(query.text) == normalize(SPOKEN)


BAD_PARAMETERS = {
    "task": "summarise", "output": "pdf", "language": "de", "beam_size": "11", "temperature": "1.5",
    "colour": "blue", "initial_prompt": "Kennedy " * 300, "word_timestamps": "maybe", "vad_filter": "2",
    "encode": "false", "diarize": "true",
}
MORE_BAD = [("beam_size", "0"), ("beam_size", "two"), ("temperature", "-0.1"), ("temperature", "nan"),
            ("task", "translate")]  # translate: the embedded model is English-only


@pytest.mark.parametrize("name, value", list(BAD_PARAMETERS.items()) + MORE_BAD)
def test_each_bad_parameter_gets_422_naming_it(service, name, value):
    for where in ("form", "query"):
        if where == "form":
            response = asr(service, **{name: value})
        else:
            response = requests.post(f"{service.url}/asr", params={name: value},
                                     files={"audio": SPEECH.read_bytes()}, timeout=60)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_parameter" and error["message"].startswith(f"{name}: ")
    if name in ("encode", "diarize"):
        assert "not supported" in error["message"]


# OpenAI-compatible ----------------------------------------------------------------------------------

def test_openai_client_every_response_format(client):
    with SPEECH.open("rb") as f:
        default = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert normalize(default.text) == normalize(SPOKEN)
    with SPEECH.open("rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text", language="en")
    assert isinstance(text, str) and normalize(text) == normalize(SPOKEN)
    with SPEECH.open("rb") as f:
        subs = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f, response_format="srt")
    assert normalize(_check_cues(_srt_cues(subs), SPEECH_SECONDS)) == normalize(SPOKEN)
    with SPEECH.open("rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt", temperature=0)
    assert normalize(_check_cues(_vtt_cues(vtt), SPEECH_SECONDS)) == normalize(SPOKEN)
    with SPEECH.open("rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert verbose.task == "transcribe" and verbose.language == "english"
    assert verbose.duration == pytest.approx(SPEECH_SECONDS, abs=1e-3) and normalize(verbose.text) == normalize(SPOKEN)
    segments = verbose.segments
    assert [s.id for s in segments] == list(range(len(segments)))
    assert _check_cues([(s.start, s.end, s.text) for s in segments], SPEECH_SECONDS)
    assert all(0 < s.compression_ratio < 2.4 for s in segments)  # computed from each segment's text


def test_openai_client_translation_on_english_only_model_is_refused(client):
    with SPEECH.open("rb") as f, pytest.raises(openai.UnprocessableEntityError) as raised:
        client.audio.translations.create(model="whisper-1", file=f)
    assert raised.value.status_code == 422
    assert raised.value.body["param"] == "model" and "English only" in raised.value.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": "Kennedy " * 300}, "prompt"),
    ({"timestamp_granularities": ["word"], "response_format": "json"}, "timestamp_granularities[]"),
    ({"timestamp_granularities": ["sentence"], "response_format": "verbose_json"}, "timestamp_granularities[]"),
    ({"response_format": "pdf"}, "response_format"),
    ({"language": "de"}, "language"),
    ({"temperature": 3}, "temperature"),
    ({"extra_body": {"colour": "blue"}}, "colour"),
])
def test_openai_errors_name_the_parameter(client, kwargs, param):
    with SPEECH.open("rb") as f, pytest.raises(openai.APIStatusError) as raised:
        client.audio.transcriptions.create(model="whisper-1", file=f, **kwargs)
    assert raised.value.status_code == 422
    assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"
    assert raised.value.body["code"] == "invalid_parameter" and raised.value.body["message"]


def test_openai_error_shape_with_curl_like_requests(service):
    missing = requests.post(f"{service.url}/v1/audio/transcriptions", files={"audio": SPEECH.read_bytes()},
                            data={"model": "whisper-1"}, timeout=60)
    assert missing.status_code == 400
    assert missing.json() == {"error": {"message": missing.json()["error"]["message"], "type": "invalid_request_error",
                                        "param": "file", "code": "missing_audio"}}
    ok = requests.post(f"{service.url}/v1/audio/transcriptions", files={"file": ("speech.wav", SPEECH.read_bytes())},
                       data={"model": "whisper-1", "response_format": "text"}, timeout=120)
    assert ok.status_code == 200 and normalize(ok.text) == normalize(SPOKEN)


# The documented examples, run as written (only the URL changes) ------------------------------------

def _doc_blocks(language: str) -> list[str]:
    """Code blocks of the API page (docs/api.md): what users copy is what the tests run."""
    text = (REPO / "docs" / "api.md").read_text()
    return [block.split("\n```")[0] for block in text.split(f"```{language}\n")[1:]]


def test_documented_curl_examples_work(service, tmp_path):
    import shlex
    import subprocess
    # Every example on the API page's hello.wav runs as written; the jobs examples (a meeting.m4a and a
    # placeholder job id) are run in spirit by tests/test_long_recordings.py.
    (tmp_path / "hello.wav").write_bytes(SPEECH.read_bytes())
    commands = [line for block in _doc_blocks("bash") for line in block.splitlines()
                if line.startswith("curl ") and ("hello.wav" in line or "/v1/jobs" not in line)]
    assert len(commands) == 7, commands
    for command in commands:
        argv = shlex.split(command.replace("http://127.0.0.1:7860", service.url))
        result = subprocess.run([*argv, "--fail-with-body"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        if "/detect-language" in command:
            body = json.loads(result.stdout)
            assert set(body) == {"language", "confidence", "detected_language", "language_code"}
        else:
            assert "ask what you can do for your country" in result.stdout.lower(), command
        if "word_timestamps=true" in command:
            assert all(s["words"] for s in json.loads(result.stdout)["segments"])


def test_documented_openai_example_works(service, capsys, tmp_path):
    (code,) = [block for block in _doc_blocks("python") if "client.realtime" not in block]  # that one: test_realtime
    import os
    (tmp_path / "hello.wav").write_bytes(SPEECH.read_bytes())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code.replace("http://127.0.0.1:7860", service.url), "docs/api.md", "exec"), {})
    finally:
        os.chdir(cwd)
    subtitles, words = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert normalize(_check_cues(_srt_cues(subtitles), SPEECH_SECONDS)) == normalize(SPOKEN)
    timed = ast.literal_eval(words)
    assert normalize(" ".join(word for word, _, _ in timed)) == normalize(SPOKEN)
    assert all(0 <= start <= end <= SPEECH_SECONDS for _, start, end in timed)
