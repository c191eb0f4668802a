"""nginx actuation: check a rendered configuration, then reload without dropping requests."""
from __future__ import annotations

import subprocess

from app.control.paths import RunPaths
from app.control.render import NGINX_PROGRAM, nginx_binary


class NginxConfigError(RuntimeError):
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
    supervisor.signal(NGINX_PROGRAM, "HUP")
