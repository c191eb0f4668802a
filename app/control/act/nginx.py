"""nginx actuation: check a rendered configuration, reload without dropping requests, and verify that
the nginx answering the public port runs what was just rendered."""
from __future__ import annotations

import subprocess
import time

import requests

from app.config import Settings
from app.control.paths import RunPaths
from app.control.render.files import NGINX_PROGRAM, nginx_binary, rendered_generation

# Answers in a row, each on a fresh connection, that must carry the new generation: with reuseport
# each worker has its own socket, so one answer speaks for one worker only.
CONSECUTIVE_ANSWERS = 6


class NginxConfigError(RuntimeError):
    pass


class NginxNotVerified(RuntimeError):
    pass


def check_config(paths: RunPaths) -> None:
    """``nginx -t`` on the rendered file; raises with nginx's own words when it is refused."""
    result = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(paths.nginx_prefix), "-c", str(paths.nginx_conf)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise NginxConfigError((result.stderr or result.stdout).strip())


def reload(paths: RunPaths, supervisor) -> None:
    """Test, then HUP: the master starts workers with the new upstream while old ones finish their requests."""
    check_config(paths)
    # A killed master is being replaced by supervisord: HUP the new one once it runs (it reads the
    # new file at start anyway, but then the HUP is harmless).
    deadline = time.monotonic() + 15
    while supervisor.process(NGINX_PROGRAM)["statename"] != "RUNNING":
        if time.monotonic() > deadline:
            raise NginxNotVerified(f"nginx is not running under supervisord; see {paths.logs}/nginx.log")
        time.sleep(0.2)
    supervisor.signal(NGINX_PROGRAM, "HUP")


def public_host(settings: Settings) -> str:
    return "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host


def served_generation(settings: Settings) -> int | None:
    """The configuration generation the worker that takes this connection runs (None: no answer)."""
    try:
        r = requests.get(f"http://{public_host(settings)}:{settings.port}/_asr/generation", timeout=2,
                         headers={"Connection": "close"})
        return int(r.text) if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def verify(settings: Settings, paths: RunPaths, timeout: float = 15) -> int:
    """Wait until the public port answers with the generation rendered last, several times in a row.

    Raises when it does not within ``timeout``: nginx refused the configuration on reload (it keeps the
    old one and says why in logs/nginx.log), or another nginx holds the port.
    """
    wanted = rendered_generation(paths)
    deadline = time.monotonic() + timeout
    streak, seen = 0, None
    while streak < CONSECUTIVE_ANSWERS:
        seen = served_generation(settings)
        streak = streak + 1 if seen == wanted else 0
        if streak < CONSECUTIVE_ANSWERS:
            if time.monotonic() > deadline:
                got = "no answer" if seen is None else f"generation {seen}"
                raise NginxNotVerified(
                    f"nginx on port {settings.port} does not serve the configuration just rendered "
                    f"(generation {wanted}; it answered {got}); see {paths.logs}/nginx.log")
            time.sleep(0.05 if seen == wanted else 0.2)
    return wanted
