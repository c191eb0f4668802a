"""Through the public port only the client API answers: a walk over every route the app serves, and
more, through the real nginx, from an address that is not loopback (127.0.0.2) and from loopback."""
from __future__ import annotations

import re
import socket

import pytest
import requests
from requests.adapters import HTTPAdapter

from app.routes import create_app
from app.config import load_settings
from app.control.paths import RunPaths
from app.control.render.files import rendered_generation
from app.runtime.instance import ModelInstance
from app.control.render.public_routes import PUBLIC_ROUTES, is_public
from support import bring_up

pytestmark = pytest.mark.integration

# Paths that no route of the app serves, but that a scan of a service would try.
PROBED = ["/metrics", "/nginx_status", "/nginx_metrics", "/_asr/generation", "/admin/drain", "/admin/undrain", "/v1/models",
          "/docs", "/docs/index.css", "/openapi.json", "/", "/favicon.ico", "/server-status", "/asr/../metrics",
          "/%2e%2e/metrics", "/ASR", "/asr/", "/health/", "/v1/audio/transcriptions", "/v1/audio/speech"]


class SourceAddressAdapter(HTTPAdapter):
    """Connections from a given local address (127.0.0.2 is loopback to the kernel, not to nginx's allow)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def _session(source: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(source))
    return session


def _app_paths(monkeypatch) -> set[str]:
    """Every route the app serves (the route table only: no model is loaded)."""
    monkeypatch.setattr(ModelInstance, "start_loading", lambda self: None)
    app = create_app(load_settings(env={}))
    paths = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<[^>]*>", "x", rule.rule)
        paths.add(path)
    return paths


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("surface"), 1)
    yield svc
    svc.asrctl("down")


def test_only_the_public_routes_answer_from_outside(service, monkeypatch):
    try:
        socket.create_connection(("127.0.0.1", service.port), source_address=("127.0.0.2", 0)).close()
    except OSError as e:
        pytest.skip(f"cannot connect from 127.0.0.2 here: {e}")
    outside = _session("127.0.0.2")
    walked = _app_paths(monkeypatch) | set(PROBED)
    answered = {}
    for path in sorted(walked):
        for method in ("GET", "POST"):
            r = outside.request(method, service.url + path, timeout=30)
            answered[(method, path)] = r
            from_instance = "X-ASR-Instance" in r.headers
            if is_public(path):
                continue
            assert r.status_code in (400, 403, 404) and not from_instance, (method, path, r.status_code, r.text[:200])
    # The public ones do reach an instance (the documentation pages too, once the app serves them).
    for route in PUBLIC_ROUTES:
        if route.kind != "docs" and not route.prefix:
            r = answered.get(("GET", route.path)) or answered[("POST", route.path)]
            assert "X-ASR-Instance" in r.headers, route.path
    assert answered[("POST", "/v1/audio/transcriptions")].headers.get("X-ASR-Instance")
    # The app's own monitoring and drain routes exist (on the instance's port) and were walked.
    assert {"/metrics", "/admin/drain"} <= walked


def test_monitoring_and_the_configuration_generation_answer_on_loopback(service):
    inside = _session("127.0.0.1")
    metrics = inside.get(service.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "asr_requests_total" in metrics.text
    assert inside.get(service.url + "/nginx_status", timeout=30).text.startswith("Active connections")
    assert "nginx_connections_active" in inside.get(service.url + "/nginx_metrics", timeout=30).text
    generation = inside.get(service.url + "/_asr/generation", timeout=30)
    assert int(generation.text) == rendered_generation(RunPaths.at(service.run_dir)) > 0


def test_a_configured_scraper_address_may_read_metrics(tmp_path):
    """monitor_allow adds addresses to loopback for /metrics and /nginx_status (rendered, nginx -t)."""
    from app.control.act import nginx
    from app.control.render.files import plan_instances, render_all

    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path / "run"), "monitor_allow": "10.0.0.7, 10.1.0.0/16"})
    paths = render_all(settings, plan_instances(settings, gpus=[]))
    nginx.check_config(paths)
    text = paths.nginx_conf.read_text()
    metrics = text.split("location = /metrics {", 1)[1].split("}", 1)[0]
    assert "allow 10.0.0.7;" in metrics and "allow 10.1.0.0/16;" in metrics and "deny all;" in metrics
    with pytest.raises(Exception, match="monitor_allow"):
        load_settings(env={}, overrides={"monitor_allow": "10.0.0.7; return 200"})


def test_a_reload_nginx_cannot_apply_is_reported_not_claimed(service):
    """A port another process holds passes `nginx -t` but fails on reload: nginx keeps the old
    configuration, and asrctl must say so (one sentence, non-zero), not claim the reload. Runs last
    in this module: it leaves the run directory's settings on the busy port."""
    import socket as socket_

    busy = socket_.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        result = service.asrctl("reload", "--port", str(busy.getsockname()[1]), check=False, timeout=120)
    finally:
        busy.close()
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not serve the configuration just rendered" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    # The old configuration still serves on the old port.
    assert requests.get(service.url + "/ready", timeout=30).status_code == 200
