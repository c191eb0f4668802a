"""Elastic pool under real load: scale 1 -> 3 -> 1, kill -9 an instance, and the autoscaler, with zero
failed client requests. Real supervisord, gunicorn instances, nginx and model; clients on loopback."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from support import BIN, SteadyLoad, bring_up, short_clips

pytestmark = pytest.mark.integration

# Short clips keep requests short, so each phase sees many requests come and go.
CLIPS = short_clips(5)


def _instances(service) -> dict[str, dict]:
    status = json.loads(service.asrctl("status", "--json", check=False).stdout)
    return {r["name"]: r for r in status["instances"] if r["port"]}


def test_scale_up_to_three_and_back_to_one_under_load_loses_nothing(tmp_path):
    service = bring_up(tmp_path, 1, "--cpu-threads", "1")
    try:
        with SteadyLoad(service.url, CLIPS, concurrency=3) as load:
            load.wait_for(5)
            service.asrctl("scale", "3")
            assert len(_instances(service)) == 3
            before_down = load.count()
            load.wait_for(15)
            new_instances = {f"asr-{service.instance_ports[0] + i}" for i in (1, 2)}
            served_during_three = {r[1] for r in load.results[before_down:] if r[1]}
            service.asrctl("scale", "1")
            load.wait_for(5)
        assert len(_instances(service)) == 1
        assert load.failures() == [], load.failures()[:5]
        assert new_instances & served_during_three == new_instances  # the new instances took traffic
        assert load.count() >= 25
    finally:
        service.asrctl("down")


def test_kill_9_under_load_loses_nothing_and_the_instance_rejoins(tmp_path):
    service = bring_up(tmp_path, 2)
    try:
        victim = f"asr-{service.instance_ports[1]}"
        with SteadyLoad(service.url, CLIPS, concurrency=3) as load:
            load.wait_for(5)
            old_pid = _instances(service)[victim]["pid"]
            os.kill(old_pid, signal.SIGKILL)  # the gunicorn master: its worker and model go with it
            killed_at = load.count()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                row = _instances(service).get(victim, {})
                if row.get("ready") and row.get("pid") != old_pid:
                    break
                time.sleep(0.5)
            assert row.get("ready") and row["pid"] != old_pid, f"{victim} did not come back: {row}"
            rejoined_at = load.count()
            # nginx takes it back once its fail_timeout has passed; keep the load on until it serves again.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and victim not in {r[1] for r in load.results[rejoined_at:]}:
                time.sleep(0.2)
        assert load.failures() == [], load.failures()[:5]
        assert load.count() > killed_at + 5
        assert victim in {r[1] for r in load.results[rejoined_at:]}, "restarted instance never served again"
    finally:
        service.asrctl("down")


def test_reloads_lose_no_request_of_clients_that_keep_their_connections_open(tmp_path):
    """Every scale, drain and heal reloads nginx, and a reload retires the old workers. Clients that keep
    their connection open between requests (requests.Session, HTTP client pools) must lose nothing:
    cheap requests back to back, so a request is in flight on a reused connection at most reloads."""
    service = bring_up(tmp_path, 1)
    try:
        status = json.loads(service.asrctl("status", "--json", check=False).stdout)
        nginx = next(r["pid"] for r in status["instances"] if r["name"] == "nginx")
        stop = threading.Event()
        results: list[object] = []

        def client() -> None:
            session = requests.Session()
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and len(results) < 50_000:
                try:
                    results.append(session.get(f"{service.url}/health", timeout=30).status_code)
                except requests.RequestException as e:
                    results.append(repr(e))

        clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            for _ in range(100):
                time.sleep(0.05)
                os.kill(nginx, signal.SIGHUP)  # what asrctl's reload sends, through supervisord
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
        failed = [r for r in results if r != 200]
        assert failed == [], f"{len(failed)} of {len(results)} failed: {failed[:3]}"
        assert len(results) >= 1000, len(results)
    finally:
        service.asrctl("down")


def test_autoscaler_grows_after_a_load_step_and_shrinks_after_it_stops(tmp_path):
    # A fast policy for the test: decide every 0.5 s, act after 1.5 s of high load or 4 s of low.
    config = tmp_path / "autoscale.toml"
    config.write_text("\n".join([
        "target_in_flight = 1.0", "autoscale_interval_seconds = 0.5", "upscale_delay_seconds = 1.5",
        "downscale_delay_seconds = 4", "cooldown_seconds = 2", "max_instances = 2", ""]))
    service = bring_up(tmp_path, 1, "--cpu-threads", "1", "--config", str(config))
    log = open(service.run_dir / "logs" / "autoscale-test.log", "w")
    scaler = subprocess.Popen([str(BIN / "asrctl"), "autoscale", "--run-dir", str(service.run_dir)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        counts = []

        def watch(until, seconds: float):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                n = len(_instances(service))
                counts.append(n)
                if until(n):
                    return n
                time.sleep(0.5)
            return counts[-1]

        with SteadyLoad(service.url, CLIPS, concurrency=4) as load:
            assert watch(lambda n: n == 2, 60) == 2, "autoscaler did not scale up under load"
            load.wait_for(10)
        assert load.failures() == [], load.failures()[:5]
        assert watch(lambda n: n == 1, 60) == 1, "autoscaler did not scale down after the load stopped"
        changes = sum(1 for a, b in zip(counts, counts[1:]) if a != b)
        assert changes == 2, f"flapping: instance counts over time {counts}"
    finally:
        scaler.terminate()
        scaler.wait(timeout=60)
        log.close()
        text = (service.run_dir / "logs" / "autoscale-test.log").read_text()
        service.asrctl("down")
    assert "decision: 1 -> 2" in text and "decision: 2 -> 1" in text, text[-2000:]
    assert "scaling up" in text or "scale up" in text
