"""Overload, edge security, request logs and graceful restarts, on the real service under real load."""
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import soundfile

from support import SteadyLoad, bring_up, short_clips, spoken_wav

pytestmark = pytest.mark.integration

SHORT_CLIPS = short_clips(5)
JFK = spoken_wav()  # a sentence of JFK's, spoken by espeak-ng


def _post(url: str, data: bytes, **kwargs) -> tuple[int, float, dict]:
    started = time.monotonic()
    r = requests.post(f"{url}/asr", files={"audio": ("clip.wav", data)}, timeout=120, **kwargs)
    return r.status_code, time.monotonic() - started, {"headers": r.headers, "body": r.json()}


def test_three_times_capacity_gets_only_200s_and_fast_503s(tmp_path):
    # Capacity: 2 instances x max_queue 2 = 4 requests at once. 12 clients = 3 x capacity.
    service = bring_up(tmp_path, 2, "--max-queue", "2")
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: _post(service.url, SHORT_CLIPS[i % len(SHORT_CLIPS)]), range(72)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        refused = [(t, extra) for s, t, extra in results if s == 503]
        # These clients retry at once instead of honouring Retry-After, so most are refused while the
        # admitted ones run; every slot still serves, and nothing waits long.
        assert statuses.count(200) >= 4 and refused, statuses
        assert max(t for s, t, _ in results if s == 200) < 60
        assert all(extra["headers"].get("Retry-After") for _, extra in refused)
        assert all(extra["body"]["error"]["code"] in ("no_instance_available", "overloaded") for _, extra in refused)
        times = sorted(t for t, _ in refused)
        assert times[int(len(times) * 0.95) - 1] < 0.1, f"503s not fast: {times[-5:]}"
        assert all(service.instance_ready(p) == 200 for p in service.instance_ports)

        # Straight to one instance (no nginx in front): its own bounded queue refuses the excess.
        port = service.instance_ports[0]
        with ThreadPoolExecutor(8) as pool:
            direct = list(pool.map(lambda i: _post(f"http://127.0.0.1:{port}", JFK), range(8)))
        codes = [s for s, _, _ in direct]
        assert set(codes) == {200, 503} and codes.count(200) >= 2
        overloaded = [extra for s, _, extra in direct if s == 503]
        assert all(e["body"]["error"]["code"] == "overloaded" and e["headers"]["Retry-After"] for e in overloaded)
    finally:
        service.asrctl("down")


def test_api_keys_rate_limit_and_request_logs(tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\ntest-key-0123456789abcdef\n")
    service = bring_up(tmp_path, 1, "--config", str(_config(tmp_path, api_keys_file=str(keys),
                                                                 rate_limit_per_second=1, rate_limit_burst=3)))
    good = {"Authorization": "Bearer test-key-0123456789abcdef"}
    try:
        missing = requests.post(f"{service.url}/asr", files={"audio": JFK}, timeout=60)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = requests.post(f"{service.url}/asr", files={"audio": JFK}, timeout=60,
                              headers={"Authorization": "Bearer test-key-0123456789abcdeX"})
        assert wrong.status_code == 401
        assert requests.get(f"{service.url}/health", timeout=5).status_code == 200  # probes stay public
        assert requests.get(f"{service.url}/ready", timeout=5).status_code == 200
        # The page, the API document and Swagger UI need no key (they hold no data); the API does.
        for path in ("/", "/openapi.json", "/docs", "/static/page.js"):
            page = requests.get(f"{service.url}{path}", timeout=5)
            assert page.status_code == 200 and page.url.startswith(service.url), path
        assert requests.post(f"{service.url}/v1/audio/transcriptions", files={"file": JFK}, timeout=60).status_code == 401
        # /metrics is for scrapers on loopback (or monitor_allow), key or not; from elsewhere it is 404
        # (tests/test_public_surface.py).
        assert requests.get(f"{service.url}/metrics", timeout=5).status_code == 200
        status, _, extra = _post(service.url, JFK, headers={**good, "X-Request-ID": "log-check-1"})
        assert status == 200

        # One JSON line per request, in the instance's log and in nginx's, joined by the request id.
        time.sleep(0.5)
        instance_lines = [json.loads(line) for line in (service.run_dir / "logs" / f"asr-{service.instance_ports[0]}.log")
                          .read_text().splitlines() if line.startswith("{")]
        mine = [line for line in instance_lines if line.get("request_id") == "log-check-1"]
        assert len(mine) == 1 and mine[0]["status"] == 200
        assert mine[0]["audio_seconds"] == pytest.approx(soundfile.info(io.BytesIO(JFK)).duration, abs=0.001)
        assert mine[0]["instance"] == f"asr-{service.instance_ports[0]}" and mine[0]["latency_ms"] > 0
        nginx_lines = [json.loads(line) for line in (service.run_dir / "logs" / "nginx.log").read_text().splitlines()
                       if line.startswith("{")]
        assert [line["status"] for line in nginx_lines if line["request_id"] == "log-check-1"] == [200]

        # Per-client rate: 1/s with a burst of 3; a quick run of 8 gets 429s with Retry-After.
        codes = [requests.get(f"{service.url}/asr", headers=good, timeout=5) for _ in range(8)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and all(r.headers["Retry-After"] and r.json()["error"]["code"] == "rate_limited"
                               for r in limited)
    finally:
        service.asrctl("down")


def _config(tmp_path, **values) -> Path:
    path = tmp_path / "asr-test.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_rolling_restart_under_load_loses_nothing(tmp_path):
    service = bring_up(tmp_path, 2)
    try:
        before = {r["name"]: r["pid"] for r in json.loads(service.asrctl("status", "--json").stdout)["instances"]
                  if r["port"]}
        with SteadyLoad(service.url, SHORT_CLIPS, concurrency=3) as load:
            load.wait_for(5)
            service.asrctl("restart", "--rolling")
            load.wait_for(5)
        after = {r["name"]: r for r in json.loads(service.asrctl("status", "--json").stdout)["instances"] if r["port"]}
        assert load.failures() == [], load.failures()[:5]
        assert all(after[name]["pid"] != pid and after[name]["ready"] for name, pid in before.items())
    finally:
        service.asrctl("down")


def test_down_lets_requests_in_flight_finish(tmp_path):
    service = bring_up(tmp_path, 2)
    results = []

    def client():
        results.append(_post(service.url, JFK)[0])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the instances hold the requests
        held = sum(requests.get(f"http://127.0.0.1:{p}/health", timeout=5).json()["requests_in_flight"]
                   for p in service.instance_ports)
        if held >= 2:
            break
        time.sleep(0.02)
    service.asrctl("down")
    for t in threads:
        t.join(timeout=120)
    assert results == [200] * 4
