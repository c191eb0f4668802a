"""Live transcription for real: the official ``openai`` client's realtime connection through nginx to
gunicorn instances with the embedded model, espeak-ng speech paced at real time; /v1/models; the
stream limit at the handshake. The turn detector and LocalAgreement are checked as pure policy too."""
from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import threading
import time

import numpy as np
import openai
import pytest
import requests
import soxr
import websockets.exceptions
import websockets.sync.client as ws_client
from websockets.exceptions import InvalidStatus

from app.audio.live import FRAME, LocalAgreement, ServerVad, SpeechProbabilities, TurnDetector
from support import (SECOND_SENTENCE, SPOKEN, bring_up, espeak, metric, normalize, poll, read_16k_mono, set_a_sequence,
                     shared_audio, speech_with_pauses, wav_bytes, wer)

pytestmark = pytest.mark.integration

CHUNK_SECONDS = 0.1   # the size of each append, as a microphone would send it


# Pure policy --------------------------------------------------------------------------------------

def test_turns_start_with_their_prefix_padding_and_stop_after_the_silence():
    detector = TurnDetector(ServerVad(threshold=0.5, prefix_padding_ms=64, silence_duration_ms=96))
    frames = [0.1] * 10 + [0.9] * 5 + [0.5] * 2 + [0.1] * 2 + [0.9] + [0.1] * 3 + [0.1] * 2
    events = detector.feed(frames)
    # Speech from frame 10, moved back 64 ms (2 frames); a dip shorter than the silence keeps the turn;
    # 3 frames (96 ms) below threshold - 0.15 end it, the silence included.
    assert events == [("start", 8 * FRAME), ("stop", 23 * FRAME)]


def test_speech_without_a_pause_is_cut_at_its_quietest_frame_after_max_turn_seconds():
    seconds_per_frame = FRAME / 16000
    detector = TurnDetector(ServerVad(prefix_padding_ms=0), max_turn_seconds=40 * seconds_per_frame)
    frames = [0.9] * 30 + [0.4] + [0.9] * 60          # a dip too short to end the turn, at frame 30
    events = detector.feed(frames)
    # 40 frames in, the turn is cut where it was quietest; the next cut comes 40 frames after that one.
    assert events[:3] == [("start", 0), ("stop", 30 * FRAME), ("start", 30 * FRAME)]
    assert [kind for kind, _ in events] == ["start", "stop", "start", "stop", "start"]
    assert all(b - a <= 40 * FRAME for (_, a), (_, b) in zip(events[::2], events[1::2]))


def test_speech_probabilities_fed_100_ms_at_a_time_are_one_pass_over_the_recording():
    """A stream's VAD hears audio as the client sends it (100 ms appends, here in uneven pieces), with the
    model's state carried between them: the probabilities of faster-whisper's Silero model run once over
    the whole audio, and so the same turns."""
    from faster_whisper.vad import get_vad_model

    samples, _ = speech_with_pauses(SPOKEN, SECOND_SENTENCE, pause=0.7)
    samples = np.asarray(samples[:len(samples) // FRAME * FRAME])
    whole = np.asarray(get_vad_model()(samples)).reshape(-1)
    live, pieces = SpeechProbabilities(), []
    for at in range(0, len(samples), 1700):   # not a multiple of a frame
        pieces.append(live.add(samples[at:at + 1700]))
    fed = np.concatenate(pieces)
    assert len(fed) == len(whole) and np.allclose(fed, whole, atol=1e-4), float(np.abs(fed - whole).max())
    assert whole.max() > 0.9 and whole.min() < 0.1
    assert TurnDetector(ServerVad()).feed(fed) == TurnDetector(ServerVad()).feed(whole)


def test_local_agreement_gives_out_only_words_two_decodes_share_and_each_once():
    agreement = LocalAgreement()
    assert agreement.update("And so my") == []
    assert agreement.update("And so, my fellow Amer") == ["And", "so,", "my"]
    assert agreement.update("and so my fellow Americans ask") == ["fellow"]
    assert agreement.update("And so my fellow Americans, ask not") == ["Americans,", "ask"]
    assert agreement.update("Hand so my fellow Americans ask not what") == []   # a settled word revised
    assert agreement.settled == ["And", "so,", "my", "fellow", "Americans,", "ask"]


def test_a_turn_is_decoded_after_the_last_turns_that_fit_with_it_in_one_window():
    """The context policy of a stream's decodes, on a stand-in instance whose queue records what it is
    given: the last turns' audio before the turn's and their transcripts as the prefix, as many as fit
    in CONTEXT_SECONDS and, with the turn, in one window; a turn heard as nothing ends the context; an
    engine that does not continue a prefix gets the transcript so far as the prompt instead."""
    from types import SimpleNamespace

    from app.config import load_settings
    from app.routes.realtime import CONTEXT_SECONDS, WINDOW_SECONDS, Stream

    submitted = []
    queue = SimpleNamespace(submit=lambda audio, options, low_priority: submitted.append((audio, options)))
    engine = SimpleNamespace(continues_prefix=True)
    stream = Stream(SimpleNamespace(settings=load_settings({}), model_name="m", engine=engine, queue=queue), ws=None, url_model="")
    second = lambda n, value=0.0: np.full(int(n * 16000), value, np.float32)  # noqa: E731
    stream.heard.extend([(second(1, 1), "one"), (second(5, 2), "two"), (second(0.5, 3), ""), (second(6, 4), "three"),
                         (second(5, 5), "four")])
    stream.prompt, stream.said = "Zed.", "two three four"
    assert CONTEXT_SECONDS == 12 and WINDOW_SECONDS == 30
    for turn, prefix, before in ((3, "three four", [4] * 96000 + [5] * 80000),   # 11 s, and "" stops it (0.5 s would fit)
                                 (20, "four", [5] * 80000),                       # 10 s of room
                                 (28, "", [])):                                   # 2 s: none fits
        stream.submit(second(turn, 9), final=True)
        audio, options = submitted.pop()
        assert options.prefix == prefix and audio[:len(before)].tolist() == before
        assert len(audio) == len(before) + turn * 16000 and audio[len(before):].min() == 9
        assert options.initial_prompt == ("Zed." if prefix else "Zed. two three four")
    engine.continues_prefix = False
    stream.submit(second(3, 9), final=False)
    audio, options = submitted.pop()
    assert len(audio) == 3 * 16000 and options.prefix == "" and options.initial_prompt == "Zed. two three four"


# Through nginx ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("realtime"), 2)
    yield svc
    svc.asrctl("down")


@pytest.fixture(scope="module")
def model(service) -> str:
    listed = requests.get(f"{service.url}/v1/models", timeout=30)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    return body["data"][0]["id"]


def test_models_lists_the_served_model_as_openai_does(service, model):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [model] == ["whisper-tiny.en"]
    assert client.models.retrieve(model).id == model
    missing = requests.get(f"{service.url}/v1/models/gpt-4o-transcribe", timeout=30)
    assert missing.status_code == 404 and model in missing.json()["error"]["message"]


def pcm24k(samples16k: np.ndarray) -> bytes:
    return (np.clip(soxr.resample(samples16k, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


def session_update(model: str, silence_ms: int = 500) -> dict:
    return {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": model, "language": "en"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": silence_ms, "prefix_padding_ms": 300}}}}


class Recorder:
    """Streams audio paced at ``speed`` x real time on one thread, records every server event with its
    arrival time on another."""

    def __init__(self, connection, samples16k: np.ndarray, speed: float = 1.0):
        self.connection, self.speed = connection, speed
        self.pcm = pcm24k(samples16k)
        self.events: list[tuple[float, object]] = []
        self.started: float | None = None

    def send_audio(self) -> None:
        step = int(24000 * CHUNK_SECONDS) * 2
        self.started = time.monotonic()
        for i, at in enumerate(range(0, len(self.pcm), step)):
            delay = self.started + i * CHUNK_SECONDS / self.speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.connection.input_audio_buffer.append(audio=base64.b64encode(self.pcm[at:at + step]).decode())
        # An event the server answers (session.updated, nothing changed): a reader blocked in recv()
        # after the last turn's transcript wakes up and sees that the audio is all sent.
        self.connection.send_raw(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))

    def run(self, turns: int, timeout: float) -> None:
        sender = threading.Thread(target=self.send_audio, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout
        while self.count("conversation.item.input_audio_transcription.completed") < turns:
            assert time.monotonic() < deadline, [e.type for _, e in self.events]
            event = self.connection.recv()
            self.events.append((time.monotonic(), event))
            assert event.type != "error", event
        sender.join(timeout=timeout)

    def run_all_turns(self, timeout: float) -> None:
        """Stream everything, then wait until every turn server VAD opened has its transcript."""
        sender = threading.Thread(target=self.send_audio, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout
        while sender.is_alive() or not self.count("input_audio_buffer.speech_started") \
                or self.count("conversation.item.input_audio_transcription.completed") < self.count("input_audio_buffer.speech_started"):
            assert time.monotonic() < deadline, [e.type for _, e in self.events]
            event = self.connection.recv()
            self.events.append((time.monotonic(), event))
            assert event.type != "error", event

    def count(self, kind: str) -> int:
        return sum(1 for _, e in self.events if e.type == kind)

    def of(self, kind: str) -> list[tuple[float, object]]:
        return [(t, e) for t, e in self.events if e.type == kind]


def connect(service, api_key: str = "unused"):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    return client.realtime.connect(model="whisper-tiny.en", extra_query={"intent": "transcription"})


def stream_sentences(service, model, texts, speed=1.0, timeout=120) -> Recorder:
    samples, _ = speech_with_pauses(*texts)
    with connect(service) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session=session_update(model))
        updated = connection.recv()
        assert updated.type == "session.updated", updated
        recorder = Recorder(connection, samples, speed)
        recorder.run(len(texts), timeout)
    return recorder


def batch_transcript(service, text: str) -> str:
    """What /asr makes of the same sentence: the bar a turn's final transcript must meet."""
    r = service.transcribe(wav_bytes(espeak(text, voice="en", speed=150), 16000), language="en")
    assert r.status_code == 200, r.text
    return normalize(r.json()["text"])


def test_the_openai_client_streams_speech_and_gets_deltas_then_each_turns_transcript(service, model):
    texts = [SPOKEN, SECOND_SENTENCE]
    samples, ends = speech_with_pauses(*texts)
    recorder = stream_sentences(service, model, texts)
    completed = recorder.of("conversation.item.input_audio_transcription.completed")
    # The first turn has no context: /asr's transcript of the sentence, word for word. The second is decoded
    # after the first's audio and transcript, where tiny.en may hear "call me back" otherwise than /asr,
    # depending on details (resampling, padding) that differ from it.
    assert normalize(completed[0][1].transcript) == batch_transcript(service, texts[0]) == normalize(texts[0])
    assert len(completed) == 2 and wer([normalize(texts[1])], [completed[1][1].transcript]) <= 0.15, completed
    started, stopped = recorder.of("input_audio_buffer.speech_started"), recorder.of("input_audio_buffer.speech_stopped")
    committed = recorder.of("input_audio_buffer.committed")
    items = [e.item_id for _, e in completed]
    assert [e.item_id for _, e in started] == [e.item_id for _, e in stopped] == [e.item_id for _, e in committed] == items
    assert committed[1][1].previous_item_id == items[0]
    for (_, start), (_, stop), end in zip(started, stopped, ends):
        assert start.audio_start_ms < stop.audio_end_ms and abs(stop.audio_end_ms / 1000 - end) < 1.5
    # The long first turn gets deltas while it is still spoken: settled words, the sentence's first ones.
    deltas = [(t, e) for t, e in recorder.of("conversation.item.input_audio_transcription.delta") if e.item_id == items[0]]
    said = normalize("".join(e.delta for _, e in deltas)).split()
    assert len(said) >= 3 and said == normalize(SPOKEN).split()[:len(said)], said
    assert deltas[0][0] < stopped[0][0], "the first delta came only after the turn ended"
    lags = [t - (recorder.started + end) for (t, _), end in zip(completed, ends)]
    first_words = deltas[0][0] - (recorder.started + 0.5)   # the speech begins 0.5 s into the audio
    print(f"end of speech -> completed: {', '.join(f'{lag:.2f} s' for lag in lags)}; "
          f"speech began -> first delta: {first_words:.2f} s; words in deltas before the turn ended: "
          f"{len(normalize(''.join(e.delta for t, e in deltas if t < stopped[0][0])).split())} of {len(said)}")
    assert all(lag < 10 for lag in lags), lags   # tolerant: the machine is shared


def test_the_documented_example_works(service, capsys, tmp_path, monkeypatch):
    """The live-transcription example of docs/api.md, run as written (only the URL changes)."""
    from support import REPO, spoken_file

    text = (REPO / "docs" / "api.md").read_text()
    (code,) = [b.split("\n```")[0] for b in text.split("```python\n")[1:] if "client.realtime" in b]
    (tmp_path / "hello.wav").write_bytes(spoken_file().read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860", service.url), "docs/api.md", "exec"), {})
    assert normalize(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[-1]) == normalize(SPOKEN)


def test_bad_events_get_error_events_and_the_stream_goes_on(service, model):
    with connect(service) as connection:
        assert connection.recv().type == "session.created"
        sent = [
            ("not json {", "invalid_json"),
            (b"\x00\x01 binary", "invalid_event"),
            (json.dumps([1, 2]), "invalid_event"),
            (json.dumps({"type": "response.create"}), "unknown_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64"}), "invalid_base64"),
            (json.dumps({"type": "input_audio_buffer.commit", "event_id": "mine"}), "input_audio_buffer_commit_empty"),
            (json.dumps({"type": "session.update", "session": session_update("whisper-1")}), "model_not_found"),
            (json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "threshold": 7}}}}}), "invalid_value"),
        ]
        for raw, code in sent:
            connection.send_raw(raw)
            event = connection.recv()
            assert event.type == "error" and event.error.code == code, (raw, event)
        assert event.error.param == "session.audio.input.turn_detection.threshold"
        connection.send_raw(sent[5][0])
        assert connection.recv().error.event_id == "mine"
        connection.send_raw(sent[6][0])
        assert model in connection.recv().error.message   # names the served model
        # Still usable: a good update, then speech that is transcribed.
        connection.session.update(session=session_update(model))
        assert connection.recv().type == "session.updated"
        recorder = Recorder(connection, speech_with_pauses(SECOND_SENTENCE)[0], speed=4.0)
        recorder.run(1, 120)
        assert normalize(recorder.of("conversation.item.input_audio_transcription.completed")[0][1].transcript) \
            == batch_transcript(service, SECOND_SENTENCE)
        # A client that leaves right after an event the server answers: while the server is still busy
        # with 20 s of audio, the answer to the next event meets a closed socket, which ends the stream
        # quietly (test_streams_leave_no_error_in_the_instance_logs reads the logs).
        connection.input_audio_buffer.append(audio=base64.b64encode(bytes(24000 * 2 * 20)).decode())
        connection.send_raw(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))


def test_a_manual_commit_without_server_vad_transcribes_the_buffer(service, model):
    with connect(service) as connection:
        assert connection.recv().type == "session.created"
        session = session_update(model)
        session["audio"]["input"]["turn_detection"] = None
        connection.session.update(session=session)
        assert connection.recv().session.audio.input.turn_detection is None
        connection.input_audio_buffer.append(audio=base64.b64encode(pcm24k(espeak(SECOND_SENTENCE, "en", 150))).decode())
        connection.input_audio_buffer.commit()
        kinds = []
        while "conversation.item.input_audio_transcription.completed" not in kinds:
            event = connection.recv()
            kinds.append(event.type)
        assert "input_audio_buffer.speech_started" not in kinds and "input_audio_buffer.committed" in kinds
        assert normalize(event.transcript) == batch_transcript(service, SECOND_SENTENCE)


def test_four_streams_at_once_each_get_the_whole_transcript(service, model):
    results: dict[int, Recorder | BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = stream_sentences(service, model, [SPOKEN], timeout=180)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert all(isinstance(r, Recorder) for r in results.values()) and len(results) == 4, results
    _, ends = speech_with_pauses(SPOKEN)
    lags, after_turn = [], []
    for recorder in results.values():
        (t, event), = recorder.of("conversation.item.input_audio_transcription.completed")
        assert normalize(event.transcript) == normalize(SPOKEN)
        lags.append(t - (recorder.started + ends[0]))
        (_, stopped), = recorder.of("input_audio_buffer.speech_stopped")
        after_turn.append(t - (recorder.started + stopped.audio_end_ms / 1000))
    # End of speech -> completed includes the silence server VAD waits for (silence_duration_ms); the
    # turn's audio (audio_end_ms) ends after it.
    print(f"4 streams, end of speech -> completed: median {statistics.median(lags):.2f} s, max {max(lags):.2f} s; "
          f"end of the turn's audio -> completed: median {statistics.median(after_turn):.2f} s")
    assert statistics.median(lags) < 10, lags   # tolerant: the machine is shared


# Server VAD closes a turn at every pause this long; OpenAI's default.
SILENCE_MS = 500
# Measured: 4.5 % streamed against 1.8 % through /asr. Turns cut at 500 ms pauses are sentence fragments,
# which tiny.en hears worse ("And so, my fellow Americans" -> "And so am I fellow Americans" both streamed
# and when the fragment is posted to /asr). Set A is 111 words of unrelated clips back to back, where the
# context of the turns before misleads as often as it helps: 3.6 % with each turn decoded alone. Three
# words over /asr; the long recordings below meet the 1.5-point bar.
WER_MARGIN = 0.03


def stream_at_four_times(service, model, samples: np.ndarray, reference: str, timeout: float) -> tuple[float, float, list[str], str]:
    """Stream a recording at 4x real time, then post it to /asr: both word error rates against
    ``reference``, the turns' transcripts and /asr's."""
    with connect(service) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session=session_update(model, SILENCE_MS))
        assert connection.recv().type == "session.updated"
        recorder = Recorder(connection, samples, speed=4.0)
        recorder.run_all_turns(timeout=timeout)
    turns = [e.transcript for _, e in recorder.of("conversation.item.input_audio_transcription.completed")]
    batch = service.transcribe(wav_bytes(samples, 16000), language="en")
    assert batch.status_code == 200, batch.text
    stream_wer, batch_wer = wer([reference], [" ".join(turns)]), wer([reference], [batch.json()["text"]])
    print(f"{len(samples) / 16000:.0f} s at 4x real time in {len(turns)} turns: WER {stream_wer:.3%} streamed, "
          f"{batch_wer:.3%} through /asr")
    return stream_wer, batch_wer, turns, batch.json()["text"]


def test_a_recording_streamed_at_four_times_real_time_is_heard_nearly_as_well_as_through_asr(service, model):
    """Real speech (English set A, back to back with 1 s pauses; skipped where ../shared/audio is absent):
    the joined turns' word error rate against /asr's on the very same audio."""
    samples, places = set_a_sequence(gap=1.0)
    samples = np.concatenate([samples, np.zeros(32000, np.float32)])
    reference = " ".join(text for _, _, text in places)
    stream_wer, batch_wer, turns, batch_text = stream_at_four_times(service, model, samples, reference, timeout=300)
    assert stream_wer <= batch_wer + WER_MARGIN, (turns, batch_text)


# The bar for a whole recording streamed at 4x: its joined turns within 1.5 points of /asr's WER. Measured on
# long2.wav (411 s, 88 turns), the harder of the two: 12.24 % streamed against 11.05 % through /asr (each
# turn decoded alone: 16.36 %; after the transcript so far as a prompt, without the audio: 14.19 %); on
# long1.wav 12.07 against 14.04 % (`python -m bench streaming --whole` streams both).
LONG_MARGIN = 0.015


def test_a_long_recording_streamed_at_four_times_real_time_is_heard_within_a_point_and_a_half_of_asr(service, model):
    """long2.wav from ../shared/audio/longform (skipped where absent): 50 read utterances of five readers,
    each turn heard after the audio and transcripts of the turns before it."""
    samples = np.concatenate([read_16k_mono(shared_audio("longform/long2.wav")), np.zeros(16000, np.float32)])
    reference = shared_audio("longform/long2.txt").read_text()
    stream_wer, batch_wer, turns, batch_text = stream_at_four_times(service, model, samples, reference, timeout=400)
    assert stream_wer <= batch_wer + LONG_MARGIN, (stream_wer, batch_wer, turns)


def test_streams_leave_no_error_in_the_instance_logs(service):
    """Runs after the other streams on ``service``: however a stream ended (the client closing it first,
    mostly), its instance logged it as a 101 and no traceback."""
    assert poll(lambda: all(metric(port, "asr_streams_open") == 0 for port in service.instance_ports), 60)
    logs = [p.read_text(errors="replace") for p in sorted(service.run_dir.rglob("asr-*.log"))]
    assert logs and all("Traceback" not in text and "Socket error" not in text for text in logs), \
        [line for text in logs for line in text.splitlines() if "rror" in line][:5]
    assert any('"GET /v1/realtime 101"' in text for text in logs)


# The stream limit ---------------------------------------------------------------------------------

API_KEY = "rt-key-0123456789abcdef"


@pytest.fixture(scope="module")
def one_stream_service(tmp_path_factory):
    """One instance holding one stream, behind API keys; a turn that never pauses is cut after 4 s; a
    stream is closed after 5 s without a message, or 20 s in all."""
    tmp = tmp_path_factory.mktemp("realtime-one")
    keys = tmp / "keys"
    keys.write_text(API_KEY + "\n")
    svc = bring_up(tmp, 1, env={"ASR_MAX_STREAMS": "1", "ASR_API_KEYS_FILE": str(keys),
                                     "ASR_CHUNK_SECONDS": "4", "ASR_STREAM_IDLE_SECONDS": "5",
                                     "ASR_STREAM_MAX_SECONDS": "20"})
    yield svc
    svc.asrctl("down")


def test_a_stream_needs_an_api_key_as_asr_does(one_stream_service):
    with pytest.raises(InvalidStatus) as refused:
        with connect(one_stream_service, api_key="wrong"):
            pass
    assert refused.value.response.status_code == 401
    with connect(one_stream_service, api_key=API_KEY) as connection:
        assert connection.recv().type == "session.created"


def test_a_browser_offers_its_api_key_as_a_subprotocol(one_stream_service):
    """A browser cannot set Authorization on a WebSocket: it offers ``openai-insecure-api-key.<key>``
    beside ``realtime``, which the server must name in its answer (the browser drops the socket else)."""
    url = f"ws://127.0.0.1:{one_stream_service.port}/v1/realtime?intent=transcription"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, subprotocols=["realtime", "openai-insecure-api-key.wrong-key-0123456789"], open_timeout=30)
    assert refused.value.response.status_code == 401

    def opened():
        try:
            with ws_client.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"],
                                   open_timeout=30) as browser_like:
                return browser_like.subprotocol == "realtime" and \
                    json.loads(browser_like.recv(timeout=30))["type"] == "session.created"
        except InvalidStatus as e:   # 503 while the test before's stream still holds the only slot
            assert e.response.status_code == 503
            return False
    assert poll(opened, 30, step=0.5)


def test_an_instance_refuses_one_stream_more_than_max_streams_at_the_handshake(one_stream_service):
    svc = one_stream_service
    direct = f"ws://127.0.0.1:{svc.instance_ports[0]}/v1/realtime?intent=transcription"
    assert poll(lambda: svc.instance_ready(svc.instance_ports[0]) == 200, 120)
    with ws_client.connect(direct) as first:
        assert json.loads(first.recv(timeout=30))["type"] == "session.created"
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(direct, open_timeout=30)
        response = refused.value.response
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert json.loads(response.body)["error"]["code"] == "streams_full"
        # A plain GET tells why a browser's handshake (which shows no status) would be refused.
        plain = requests.get(f"{svc.url}/v1/realtime?intent=transcription", timeout=30,
                             headers={"Authorization": f"Bearer {API_KEY}"})
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "streams_full"
        with pytest.raises(InvalidStatus) as through_nginx:   # the pool's only instance is full
            ws_client.connect(f"ws://127.0.0.1:{svc.port}/v1/realtime?intent=transcription", open_timeout=30,
                              additional_headers={"Authorization": f"Bearer {API_KEY}"})
        assert through_nginx.value.response.status_code == 503
    # The slot is free again once the stream closed.
    def reopened():
        try:
            with ws_client.connect(direct, open_timeout=10) as again:
                return json.loads(again.recv(timeout=30))["type"] == "session.created"
        except InvalidStatus:
            return False
    assert poll(reopened, 30, step=0.5)


def test_a_plain_get_is_told_to_upgrade(service):
    r = requests.get(f"{service.url}/v1/realtime?intent=transcription", timeout=30)
    assert r.status_code == 426 and r.json()["error"]["code"] == "upgrade_required"
    bad = requests.get(f"{service.url}/v1/realtime?intent=conversation", timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("intent")


def test_stream_decodes_go_through_the_queue_and_streams_are_counted(one_stream_service):
    port = one_stream_service.instance_ports[0]
    assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)   # the stream of the test before has closed
    batches_before = metric(port, "asr_batch_size_count")
    turns_before = metric(port, "asr_stream_turn_latency_seconds_count")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    with client.realtime.connect(model="whisper-tiny.en", extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        assert metric(port, "asr_streams_open") == 1 and metric(port, "asr_streams_capacity") == 1
        connection.session.update(session=session_update("whisper-tiny.en"))
        assert connection.recv().type == "session.updated"
        recorder = Recorder(connection, speech_with_pauses(SPOKEN)[0], speed=1.0)   # real time: deltas settle even on a loaded machine
        recorder.run_all_turns(120)
    deltas = recorder.count("conversation.item.input_audio_transcription.delta")
    assert deltas >= 1
    # Every delta came from a decode of its own, and the turn from one more: all through the queue.
    assert metric(port, "asr_batch_size_count") - batches_before >= deltas + 1
    turns = recorder.count("conversation.item.input_audio_transcription.completed")
    assert metric(port, "asr_stream_turn_latency_seconds_count") - turns_before == turns
    assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)


def test_speech_longer_than_a_turn_may_be_is_cut_between_words(one_stream_service):
    """The sentence runs 6.5 s without a pause as long as silence_duration_ms; with chunk_seconds = 4 it
    is cut at a quiet frame, and the turns' transcripts still make up the sentence."""
    port = one_stream_service.instance_ports[0]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)
    with client.realtime.connect(model="whisper-tiny.en", extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session=session_update("whisper-tiny.en"))
        assert connection.recv().type == "session.updated"
        recorder = Recorder(connection, speech_with_pauses(SPOKEN)[0], speed=4.0)
        recorder.run_all_turns(120)
    completed = [e for _, e in recorder.of("conversation.item.input_audio_transcription.completed")]
    assert len(completed) >= 2 and all(e.usage.seconds <= 4 + 0.3 + 0.1 for e in completed), completed
    joined = " ".join(e.transcript for e in completed)
    print(f"cut into {len(completed)} turns: {[e.transcript for e in completed]}")
    assert wer([SPOKEN], [joined]) <= 0.15, joined


def test_a_quiet_stream_and_a_long_one_are_told_why_then_closed(one_stream_service):
    port = one_stream_service.instance_ports[0]
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)
    with ws_client.connect(url) as quiet:
        started = time.monotonic()
        assert json.loads(quiet.recv(timeout=30))["type"] == "session.created"
        event = json.loads(quiet.recv(timeout=30))
        assert event["type"] == "error" and event["error"]["code"] == "idle_timeout"
        assert 4.5 < time.monotonic() - started < 20
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            quiet.recv(timeout=30)
    assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)
    silence = base64.b64encode(bytes(4800)).decode()
    with ws_client.connect(url) as busy:
        started = time.monotonic()
        assert json.loads(busy.recv(timeout=30))["type"] == "session.created"
        while True:   # 100 ms of silence a second: never idle
            busy.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
            try:
                event = json.loads(busy.recv(timeout=1))
                break
            except TimeoutError:
                assert time.monotonic() - started < 60
        assert event["type"] == "error" and event["error"]["code"] == "session_expired"
        assert 19 < time.monotonic() - started < 45
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            busy.recv(timeout=30)


def test_a_stream_owed_a_transcript_is_not_idle_however_long_its_decode_takes(tmp_path):
    """The client commits a 20 s turn and waits, silent. Its instance is frozen (SIGSTOP) mid-decode for
    longer than ``stream_idle_seconds``, as a host stalls: once it runs again the client gets the turn's
    transcript, not ``idle_timeout`` (the idle clock runs only while the stream is owed nothing)."""
    svc = bring_up(tmp_path, 1, env={"ASR_STREAM_IDLE_SECONDS": "2"})
    try:
        sentence = espeak(SECOND_SENTENCE, "en", 150)
        turn = np.tile(np.concatenate([sentence, np.zeros(8000, np.float32)]), 4)
        worker = health(svc.instance_ports[0])["pid"]
        with connect(svc) as connection:
            assert connection.recv().type == "session.created"
            session = session_update("whisper-tiny.en")
            session["audio"]["input"]["turn_detection"] = None
            connection.session.update(session=session)
            assert connection.recv().type == "session.updated"
            connection.input_audio_buffer.append(audio=base64.b64encode(pcm24k(turn)).decode())
            connection.input_audio_buffer.commit()
            event = connection.recv()
            while event.type != "input_audio_buffer.committed":
                assert event.type != "error", event
                event = connection.recv()
            os.kill(worker, signal.SIGSTOP)   # the turn's final decode (about a second here) is in flight
            try:
                time.sleep(3)
            finally:
                os.kill(worker, signal.SIGCONT)
            while event.type != "conversation.item.input_audio_transcription.completed":
                event = connection.recv()
                assert event.type != "error", event
        heard = normalize(event.transcript)
        assert wer([normalize(" ".join([SECOND_SENTENCE] * 4))], [heard]) <= 0.15, heard
    finally:
        svc.asrctl("down")


# Faults: a drained instance, a killed one -----------------------------------------------------------

@pytest.fixture(scope="module")
def fault_pool(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("realtime-faults"), 2)
    yield svc
    svc.asrctl("down")


def health(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()


def open_raw(svc):
    """A stream through nginx (plain websockets), configured for server VAD; returns it and the port of
    the instance holding it."""
    before = {port: health(port)["streams_open"] for port in svc.instance_ports}
    connection = ws_client.connect(f"ws://127.0.0.1:{svc.port}/v1/realtime?intent=transcription", open_timeout=30)
    assert json.loads(connection.recv(timeout=30))["type"] == "session.created"
    connection.send(json.dumps({"type": "session.update", "session": session_update("whisper-tiny.en")}))
    assert json.loads(connection.recv(timeout=30))["type"] == "session.updated"
    holder = poll(lambda: [p for p in svc.instance_ports if health(p)["streams_open"] > before[p]], 10)
    assert holder, "no instance counts the new stream"
    return connection, holder[0]


def send_paced(connection, samples16k: np.ndarray, speed: float = 1.0) -> threading.Thread:
    """Append the audio paced at ``speed`` x real time on a thread of its own; stops quietly when the
    socket closes."""
    pcm, step = pcm24k(samples16k), int(24000 * CHUNK_SECONDS) * 2

    def run():
        started = time.monotonic()
        for i, at in enumerate(range(0, len(pcm), step)):
            time.sleep(max(0.0, started + i * CHUNK_SECONDS / speed - time.monotonic()))
            try:
                connection.send(json.dumps({"type": "input_audio_buffer.append",
                                            "audio": base64.b64encode(pcm[at:at + step]).decode()}))
            except websockets.exceptions.ConnectionClosed:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def events_until_closed(connection, timeout: float) -> tuple[list[dict], object]:
    """Every event until the server closes the socket, and the close frame it sent (None: no frame)."""
    events, deadline = [], time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, [e["type"] for e in events]
        try:
            events.append(json.loads(connection.recv(timeout=max(0.1, deadline - time.monotonic()))))
        except websockets.exceptions.ConnectionClosed as closed:
            return events, closed.rcvd
        except TimeoutError:
            continue


def closed_after_the_turn_being_spoken(connection) -> None:
    """A draining instance's stream (speaking SPOKEN, then SECOND_SENTENCE): the turn being spoken when
    the drain began is finished and transcribed, the next one never opens, then ``instance_draining``
    and close code 1012 (service restart)."""
    events, close = events_until_closed(connection, 60)
    kinds = [e["type"] for e in events]
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(completed) == 1 and normalize(completed[0]["transcript"]) == normalize(SPOKEN), kinds
    assert kinds.count("input_audio_buffer.speech_started") == 0, kinds
    assert kinds[-1] == "error" and events[-1]["error"]["code"] == "instance_draining", kinds
    assert close is not None and close.code == 1012, close


def test_a_draining_instance_lets_its_stream_finish_the_turn_then_closes_it_for_a_reconnect(fault_pool):
    from app.control.act.actuator import wait_drained

    svc = fault_pool
    assert poll(lambda: all(svc.instance_ready(p) == 200 for p in svc.instance_ports), 120)
    connection, port = open_raw(svc)
    samples, _ = speech_with_pauses(SPOKEN, SECOND_SENTENCE)
    send_paced(connection, samples)
    event = json.loads(connection.recv(timeout=30))
    assert event["type"] == "input_audio_buffer.speech_started", event
    drained = requests.post(f"http://127.0.0.1:{port}/admin/drain", timeout=10).json()
    assert drained["state"] == "draining" and drained["streams_open"] == 1
    # The drain waits for the stream as for a request.
    assert wait_drained(port, 0.5) == 1
    closed_after_the_turn_being_spoken(connection)
    assert poll(lambda: health(port)["streams_open"] == 0, 10) and wait_drained(port, 0.5) == 0
    try:
        # Reconnecting through nginx lands on the other instance: the draining one refuses the handshake.
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", open_timeout=30)
        assert refused.value.response.status_code == 503
        again, other = open_raw(svc)
        assert other != port
        again.close()
    finally:
        requests.post(f"http://127.0.0.1:{port}/admin/undrain", timeout=10)


def test_stopping_an_instance_under_supervisord_drains_its_stream_before_it_exits(fault_pool):
    """``supervisorctl stop`` (SIGTERM to gunicorn, which passes it to its worker) mid-turn: the worker
    drains first (gunicorn_conf.post_worker_init), so the stream gets the turn being spoken, then
    ``instance_draining`` and 1012, before the process exits."""
    import threading

    from app.control.act.supervisor import SupervisorClient
    from app.control.paths import RunPaths

    svc = fault_pool
    assert poll(lambda: all(svc.instance_ready(p) == 200 and health(p)["streams_open"] == 0
                            for p in svc.instance_ports), 120)
    connection, port = open_raw(svc)
    name = health(port)["instance"]
    client = SupervisorClient(RunPaths.at(svc.run_dir).socket)
    samples, _ = speech_with_pauses(SPOKEN, SECOND_SENTENCE)
    send_paced(connection, samples)
    assert json.loads(connection.recv(timeout=30))["type"] == "input_audio_buffer.speech_started"
    stopping = threading.Thread(target=client.stop, args=(name,), daemon=True)
    stopping.start()
    try:
        closed_after_the_turn_being_spoken(connection)
        stopping.join(60)
        assert not stopping.is_alive() and client.process(name)["statename"] == "STOPPED"
    finally:
        stopping.join(60)
        client.start(name)
    assert poll(lambda: svc.instance_ready(port) == 200, 120)


def test_killing_an_instance_mid_stream_closes_only_its_streams_and_a_reconnect_succeeds(fault_pool):
    svc = fault_pool
    assert poll(lambda: all(svc.instance_ready(p) == 200 and health(p)["streams_open"] == 0
                            for p in svc.instance_ports), 120)
    streams: dict[int, object] = {}
    for _ in range(6):   # nginx alternates between the two instances; one stream on each
        connection, port = open_raw(svc)
        if port in streams:
            connection.close()
        else:
            streams[port] = connection
        if len(streams) == 2:
            break
    assert len(streams) == 2, "both streams landed on one instance"
    doomed, survivor = svc.instance_ports
    samples, _ = speech_with_pauses(SPOKEN)
    for connection in streams.values():
        send_paced(connection, samples)
    assert json.loads(streams[doomed].recv(timeout=30))["type"] == "input_audio_buffer.speech_started"
    os.kill(health(doomed)["pid"], signal.SIGKILL)   # the model's process, as the OOM killer would
    killed_at = time.monotonic()
    # The killed instance's stream ends, promptly, with the socket closed (nothing is left to send a frame).
    _, _ = events_until_closed(streams[doomed], 30)
    assert time.monotonic() - killed_at < 10
    # Reconnecting at once, while the killed instance restarts, lands on the live one: twice, so that
    # nginx's turn comes to the restarting instance too.
    reconnects = [open_raw(svc) for _ in range(2)]
    assert time.monotonic() - killed_at < 15 and svc.instance_ready(doomed) != 200, "the instance was back already"
    assert [port for _, port in reconnects] == [survivor, survivor]
    # The other stream goes on to its whole transcript.
    events = events_until(streams[survivor], "conversation.item.input_audio_transcription.completed", 60)
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert [normalize(e["transcript"]) for e in completed] == [normalize(SPOKEN)]
    streams[survivor].close()
    # The speaker of the killed stream is heard on the reconnected one.
    again = reconnects[0][0]
    reconnects[1][0].close()
    with again:
        send_paced(again, speech_with_pauses(SECOND_SENTENCE)[0], speed=2.0)
        events = events_until(again, "conversation.item.input_audio_transcription.completed", 60)
    assert normalize(events[-1]["transcript"]) == normalize(SECOND_SENTENCE)


def events_until(connection, kind: str, timeout: float) -> list[dict]:
    """Every event up to the first of ``kind``."""
    events, deadline = [], time.monotonic() + timeout
    while not events or events[-1]["type"] != kind:
        assert time.monotonic() < deadline, [e["type"] for e in events]
        events.append(json.loads(connection.recv(timeout=max(0.1, deadline - time.monotonic()))))
        assert events[-1]["type"] != "error", events[-1]
    return events
