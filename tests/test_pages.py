"""The browser pages for real: Debian's chromium, driven by selenium through chromedriver, against the
service through nginx. The try-it page transcribes jfk.flac from a file input and from chromium's
fake microphone (fed from a wav), and its SRT and WebVTT downloads equal the service's own; its live
captions stream the fake microphone (espeak-ng speech) over /v1/realtime with an API key, show why a
stream is refused, and Stop closes the stream; Swagger UI at /docs renders and its "Try it out" on
POST /asr gets a transcript.

Screenshots land in $ASR_SCREENSHOTS when set (scripts/screenshots.sh: docs/screenshots/).
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
import websockets.sync.client as ws_client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app.formats import vtt_time
from support import (JFK_REFERENCE, SECOND_SENTENCE, SPOKEN, bring_up, metric, normalize, poll,
                     read_16k_mono, shared_audio, speech_with_pauses, wer)


def jfk() -> Path:
    """The real recording: the page's segment table is checked against where its sentence breaks."""
    return shared_audio("setA/jfk.flac")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("pages"), 1)
    yield svc
    svc.asrctl("down")


def chromium(*flags: str) -> webdriver.Chrome:
    """Headless chromium from Debian (scripts/test.sh installs chromium and chromium-driver)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are needed: scripts/test.sh installs them (apt: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(executable_path=driver), options=options)


def screenshot(browser: webdriver.Chrome, name: str) -> None:
    folder = os.environ.get("ASR_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        browser.save_screenshot(os.path.join(folder, f"{name}.png"))


def blob_text(browser: webdriver.Chrome, link_id: str) -> str:
    """What a download link holds (a blob: URL made by the page)."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch(document.getElementById('{link_id}').href).then(r => r.text()).then(done);")


def transcribe_on_page(browser: webdriver.Chrome) -> None:
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "transcribe").is_enabled())
    browser.find_element(By.ID, "transcribe").click()
    WebDriverWait(browser, 180).until(
        lambda b: b.find_element(By.ID, "transcript").text or "error" in b.find_element(By.ID, "status").get_attribute("class"))
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class"), \
        browser.find_element(By.ID, "status").text


def test_page_transcribes_a_file_and_offers_the_services_subtitles(service):
    expected = requests.post(f"{service.url}/asr", files={"audio_file": jfk().open("rb")}, timeout=120).json()
    browser = chromium()
    try:
        browser.get(f"{service.url}/")
        assert browser.title == "asr-service"
        browser.find_element(By.ID, "file").send_keys(str(jfk()))
        transcribe_on_page(browser)
        assert browser.find_element(By.ID, "transcript").text == expected["text"].strip()
        # The table is the service's segments: two on most CPUs (JFK pauses after "fellow Americans"), where
        # some CPUs' int8 kernels hear the clip as one.
        rows = browser.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
        assert len(rows) == len(expected["segments"]) >= 1
        for row, segment in zip(rows, expected["segments"]):
            cells = row.find_elements(By.TAG_NAME, "td")
            assert [cells[0].text, cells[2].text] == [vtt_time(segment["start"]), segment["text"].strip()]
        for output, link in (("srt", "download-srt"), ("vtt", "download-vtt")):
            served = requests.post(f"{service.url}/asr", files={"audio_file": jfk().open("rb")},
                                   data={"output": output}, timeout=120).text
            assert blob_text(browser, link) == served, output
        screenshot(browser, "page")
    finally:
        browser.quit()


def test_page_records_from_the_microphone(service, tmp_path):
    wav = tmp_path / "jfk.wav"
    soundfile.write(wav, read_16k_mono(jfk()), 16000, subtype="PCM_16")
    browser = chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                       f"--use-file-for-fake-audio-capture={wav}%noloop")
    try:
        browser.get(f"{service.url}/")
        browser.find_element(By.ID, "record").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "stop").is_enabled())
        time.sleep(11.5)  # the fake microphone plays the 11 s clip in real time
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 10).until(lambda b: "recording." in b.find_element(By.ID, "status").text)
        transcribe_on_page(browser)
        heard = browser.find_element(By.ID, "transcript").text
        assert wer([JFK_REFERENCE], [heard]) <= 0.2, heard
        screenshot(browser, "page-microphone")
    finally:
        browser.quit()


def test_swagger_ui_try_it_out_transcribes(service):
    browser = chromium()
    try:
        browser.get(f"{service.url}/docs")  # redirected to /docs/, every asset from the service
        wait = WebDriverWait(browser, 30)
        op = wait.until(lambda b: b.find_element(By.ID, "operations-transcription-post_asr"))
        assert browser.find_element(By.ID, "operations-openai-post_v1_audio_transcriptions")
        op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda b: op.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
        wait.until(lambda b: op.find_element(By.CSS_SELECTOR, "input[type=file]")).send_keys(str(jfk()))
        op.find_element(By.CSS_SELECTOR, ".execute").click()
        status = WebDriverWait(browser, 180).until(
            lambda b: op.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
        body = op.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_description").text
        assert status.text.strip() == "200", body
        assert "what you can do for your country" in body
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                               op.find_element(By.CSS_SELECTOR, ".live-responses-table"))
        screenshot(browser, "docs")
    finally:
        browser.quit()


# Live captions ------------------------------------------------------------------------------------

LIVE_KEY = "page-live-key-0123456789"
# Stop comes while this is spoken: long (7 s), so a loaded machine's late delta still comes before its end.
LAST_SENTENCE = "We measure how long each request takes, from the first byte to the last, on every instance of the pool."


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    """One instance holding one live stream, behind an API key: the page must send the key the way a
    browser's WebSocket can, and a second stream is refused."""
    tmp = tmp_path_factory.mktemp("pages-live")
    keys = tmp / "keys"
    keys.write_text(LIVE_KEY + "\n")
    svc = bring_up(tmp, 1, env={"ASR_MAX_STREAMS": "1", "ASR_API_KEYS_FILE": str(keys)})
    yield svc
    svc.asrctl("down")


RESAMPLE = """
const [rate, tones, done] = arguments;
(async () => {
  const context = new OfflineAudioContext(1, rate, rate);   // 1 s
  await context.audioWorklet.addModule("static/live-worklet.js");
  const node = new AudioWorkletNode(context, "pcm-resampler",
    { numberOfOutputs: 0, processorOptions: { rate: 24000, chunk: 0.1 } });
  const out = [];
  node.port.onmessage = (e) => { if (e.data.pcm) out.push(...new Int16Array(e.data.pcm)); };
  for (const frequency of tones) {
    const tone = new OscillatorNode(context, { frequency });
    tone.connect(new GainNode(context, { gain: 0.4 })).connect(node);
    tone.start();
  }
  await context.startRendering();
  await new Promise((resolve) => setTimeout(resolve, 300));   // the last messages from the audio thread
  done(out);
})().catch((e) => done(String(e)));
"""


def resampled_spectrum(browser: webdriver.Chrome, rate: int, tones: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The page's microphone resampler (static/live-worklet.js) run in chromium on 1 s of tones at
    ``rate``: the amplitude spectrum of what it posts (1 Hz bins, as a fraction of full scale), and
    how many samples it posted."""
    out = browser.execute_async_script(RESAMPLE, rate, list(tones))
    assert isinstance(out, list), out
    pcm = np.array(out, np.float64) / 32768
    steady = pcm[2400:2400 + 19200]   # skip the first 100 ms; 0.8 s, so 1.25 Hz bins
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady)))) / (len(steady) / 4)
    return np.interp(np.arange(12001), np.fft.rfftfreq(len(steady), 1 / 24000), spectrum), len(pcm)


def test_live_captions_stream_the_microphone_show_refusals_and_stop(live_service, tmp_path):
    """One browser: a wrong key and a full pool are told apart on the page; then the fake microphone's
    first two sentences appear as provisional captions, then as final ones; Stop during the third ends
    its turn, which gets a final transcript, and closes the stream."""
    samples, ends = speech_with_pauses(SPOKEN, SECOND_SENTENCE, LAST_SENTENCE)
    third = (ends[1] + 1.5, ends[2])   # where the third sentence is spoken, in the file
    wav = tmp_path / "live.wav"
    soundfile.write(wav, samples, 16000, subtype="PCM_16")
    port = live_service.instance_ports[0]
    browser = chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                       f"--use-file-for-fake-audio-capture={wav}%noloop")
    try:
        browser.get(f"{live_service.url}/")
        # The resampler: 24 kHz out of 48 kHz and 44.1 kHz; a tone above 12 kHz is filtered, not folded
        # onto the speech band (16 kHz from 44.1 kHz would fold to 8 kHz, 15 kHz from 48 kHz to 9 kHz).
        for rate, high in ((48000, 15000), (44100, 16000)):
            spectrum, count = resampled_spectrum(browser, rate, (1000, high))
            folded = 24000 - high
            print(f"resampler {rate} Hz -> 24 kHz: {count} samples; 1 kHz at {spectrum[1000]:.3f}, "
                  f"{high} Hz folded to {folded} Hz at {spectrum[folded - 20:folded + 21].max():.5f}")
            assert 21600 <= count <= 24000 and int(np.argmax(spectrum)) in range(995, 1006)
            assert 0.36 < spectrum[1000] < 0.44 and spectrum[folded - 20:folded + 21].max() < 0.004

        live, stop, key = (browser.find_element(By.ID, name) for name in ("live", "live-stop", "api-key"))
        error = lambda: browser.find_element(By.ID, "live-error").text   # noqa: E731
        state = lambda: browser.find_element(By.ID, "live-state").text   # noqa: E731

        key.send_keys("wrong-key-0123456789")
        live.click()
        WebDriverWait(browser, 30).until(lambda b: error())
        assert "401" in error() and "unauthorized" in error(), error()
        assert live.is_enabled() and not stop.is_enabled()

        key.clear()
        key.send_keys(LIVE_KEY)
        with ws_client.connect(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription") as other:
            assert json.loads(other.recv(timeout=30))["type"] == "session.created"   # the only slot taken
            live.click()
            WebDriverWait(browser, 30).until(lambda b: "503" in error())
            assert "streams_full" in error(), error()
        assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)

        # A language tiny.en lacks: the session.update's error event is shown, the stream goes on in English.
        browser.find_element(By.ID, "language").send_keys("fr")
        live.click()
        # The fake microphone plays the file in real time from here: Stop comes 40 % into the third
        # sentence by that clock (by the captions, a loaded machine that thins out deltas never shows it).
        stop_at = time.monotonic() + third[0] + 0.4 * (third[1] - third[0])
        WebDriverWait(browser, 30).until(lambda b: "invalid_value" in error())
        assert "English only" in error(), error()
        reference = f"{SPOKEN} {SECOND_SENTENCE}"
        provisional, finals, shot = [], [], False
        while time.monotonic() < stop_at:   # until the third sentence is 40 % spoken
            # One read of the lines: read apart, a turn completing in between showed its provisional line
            # as the third sentence's.
            shown = browser.execute_script(   # one round trip: the lines as they are at one instant
                "return [...document.querySelectorAll('#caption-lines p')].map(p => [p.className, p.innerText]);")
            now = [text for kind, text in shown if kind == "provisional" and text.strip()]
            finals = [text for kind, text in shown if kind == "final"]
            provisional += now
            if finals and now and not shot:   # for the docs: a final turn and one still spoken
                screenshot(browser, "page-live")
                shot = True
            time.sleep(0.1)
        print(f"live captions before Stop: {finals}; provisional lines seen: {len(provisional)}; {state()}")
        assert provisional, "no provisional caption (delta) was shown while a turn was spoken"
        assert metric(port, "asr_streams_open") == 1 and stop.is_enabled()
        assert not browser.find_element(By.ID, "result").is_displayed()   # no file transcribed: no empty result

        # The third sentence half spoken: Stop commits its turn and closes the socket once every turn has
        # its transcript (a slow machine may still owe the first two then).
        stop.click()
        WebDriverWait(browser, 30).until(lambda b: state() == "stopped")
        assert poll(lambda: metric(port, "asr_streams_open") == 0, 30)
        assert live.is_enabled() and not stop.is_enabled()
        lines = [(p.get_attribute("class"), p.text) for p in browser.find_elements(By.CSS_SELECTOR, "#caption-lines p")]
        print(f"after Stop: {lines}")
        assert [text for _, text in lines[:len(finals)]] == finals and len(lines) > len(finals), lines
        heard = " ".join(text for _, text in lines[:-1])
        assert all(kind == "final" for kind, _ in lines) and wer([reference], [heard]) <= 0.15, lines
        kind, last = lines[-1]
        said = normalize(last).split()
        spoken = normalize(LAST_SENTENCE).split()
        assert kind == "final" and 3 <= len(said) < len(spoken), lines   # cut by Stop, not by a pause
        assert wer([" ".join(spoken[:len(said) - 1])], [" ".join(said[:-1])]) <= 0.25, lines   # the last word may be cut

        # A stream the server drops: its instance's worker killed mid-stream; the page says so.
        live.click()
        WebDriverWait(browser, 30).until(lambda b: state().startswith("listening"))
        worker = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["pid"]   # this test's own instance
        os.kill(worker, signal.SIGKILL)
        WebDriverWait(browser, 30).until(lambda b: "closed" in error())
        assert "the live stream was closed (1006)" in error() and live.is_enabled(), error()
    finally:
        browser.quit()
