"""The browser pages for real: Debian's chromium, driven by selenium through chromedriver, against the
service through nginx. The try-it page transcribes jfk.flac from a file input and from chromium's
fake microphone (fed from a wav), and its SRT and WebVTT downloads equal the service's own; Swagger
UI at /docs renders and its "Try it out" on POST /asr gets a transcript.

Screenshots land in $ASR_SCREENSHOTS when set (scripts/screenshots.sh: docs/screenshots/).
"""
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
import soundfile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from support import JFK_REFERENCE, bring_up, read_16k_mono, shared_audio, wer



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
        rows = browser.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
        assert len(rows) == len(expected["segments"]) >= 2
        first = rows[1].find_elements(By.TAG_NAME, "td")
        assert first[0].text == "00:00:08.000" and first[2].text == expected["segments"][1]["text"].strip()
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
