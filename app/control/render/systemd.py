"""A systemd unit for the whole service: supervisord (and under it every instance and nginx), sandboxed.

``render_unit`` is pure: it reads the settings and names, and renders ``app/control/render/templates/systemd/asr-service.service.j2``.
Every timeout in the unit is derived from the same settings as supervisord's and gunicorn's, so they nest:
systemd's TimeoutStopSec > supervisord's stopwaitsecs (per group) > gunicorn's graceful_timeout.
"""
from __future__ import annotations

import grp
import pwd
from pathlib import Path

from app.config import Settings
from app.control.paths import RunPaths
from app.control.act.processes import identity
from app.control.render.files import template_environment
TEMPLATE = "systemd/asr-service.service.j2"

# systemd waits this much beyond supervisord's own worst case before it SIGKILLs what is left.
STOP_MARGIN_SECONDS = 30
# `asrctl reload --timeout`: the longest it waits for new instances' /ready (a model load).
RELOAD_TIMEOUT_SECONDS = 600
# PrivateTmp= gives the service its own /tmp and /var/tmp: a run directory there would be invisible.
_PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))
# ProtectHome=read-only: a model cache under a home directory (the default, ~/.cache/asr-service)
# cannot be written by the unit; it gets systemd's own cache directory instead (CacheDirectory=).
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
CACHE_DIRECTORY = "asr-service"


def commands(settings: Settings, run_dir: Path, bin_dir: Path, flags: list[str] = ()) -> dict[str, str]:
    """The unit's asrctl and supervisord command lines, with the operator's ``asrctl systemd-unit``
    flags passed on, so that every start renders what the unit was made for."""
    extra = "".join(f" {flag}" for flag in flags)
    return {
        "render": f"{bin_dir}/asrctl render --quiet --run-dir {run_dir}{extra}",
        "supervisord": f"{bin_dir}/supervisord -n -c {run_dir}/supervisor/supervisord.conf",
        "reload": f"{bin_dir}/asrctl reload --quiet --run-dir {run_dir}{extra} --timeout {RELOAD_TIMEOUT_SECONDS}",
        "down": f"{bin_dir}/asrctl down --quiet --run-dir {run_dir}",
    }


def model_cache_for_unit(settings: Settings, work_dir: Path) -> Path | None:
    """The model cache the unit uses: the configured one, or None for systemd's CacheDirectory."""
    cache = _absolute(str(Path(settings.model_cache).expanduser()), work_dir)
    if any(cache == h or h in cache.parents for h in _HOMES):
        return None
    return cache


def stop_groups(settings: Settings) -> int:
    """Process groups supervisord may hold: every instance the pool can grow to, nginx, the autoscaler,
    the job runner.

    On shutdown supervisord stops one group at a time (highest priority first) and waits up to that
    group's stopwaitsecs before moving on, so the worst case is the sum over the groups.
    """
    return max(settings.instances, settings.max_instances) + 1 + int(settings.autoscale) + int(settings.jobs)


def timeout_stop_seconds(settings: Settings) -> int:
    return stop_groups(settings) * settings.stop_wait_seconds + STOP_MARGIN_SECONDS


def render_unit(settings: Settings, user: str, work_dir: str | Path, bin_dir: str | Path, *,
                group: str | None = None, flags: list[str] = ()) -> str:
    """The unit file's text.

    ``user`` runs the service (a dedicated account; it must own the run directory). ``group`` defaults
    to the user's primary group (or a group of the same name when the user does not exist here).
    ``work_dir`` is the unit's working directory (where ``asrctl systemd-unit`` ran): a relative
    ``run_dir`` or model cache is taken relative to it. ``bin_dir`` holds asrctl, supervisord and
    gunicorn (the environment asrctl was installed into). ``flags`` (``asrctl systemd-unit``'s own
    setting flags) are passed on to the unit's ``asrctl render`` and ``asrctl reload``.
    """
    work_dir, bin_dir = Path(work_dir).resolve(), Path(bin_dir)
    run_dir = _absolute(settings.run_dir, work_dir)
    model_cache = model_cache_for_unit(settings, work_dir)
    for name, path in (("run_dir", run_dir), ("model_cache", model_cache or Path("/var/cache"))):
        if any(path == t or t in path.parents for t in _PRIVATE_TMP):
            raise ValueError(f"{name} {path} is under {path.parts[1]}, which the unit's PrivateTmp=yes hides "
                             f"from the service; choose a directory elsewhere (e.g. /srv/asr or /var/lib/asr)")
    for name, value in (("user", user), ("group", group or "")):
        if any(c.isspace() for c in value):
            raise ValueError(f"{name} {value!r} holds white space")
    context = {
        "settings": settings,
        "user": user,
        "group": group or _primary_group(user),
        "work_dir": work_dir,
        "bin_dir": bin_dir,
        "run_dir": run_dir,
        "model_cache": model_cache,
        "cache_directory": CACHE_DIRECTORY,
        "commands": commands(settings, run_dir, bin_dir, list(flags)),
        "identity": " ".join(f"{k}={v}" for k, v in identity(RunPaths.at(run_dir)).items()),
        "max_instances": max(settings.instances, settings.max_instances),
        "stop_groups": stop_groups(settings),
        "stop_margin": STOP_MARGIN_SECONDS,
        "timeout_stop": timeout_stop_seconds(settings),
        "reload_timeout": RELOAD_TIMEOUT_SECONDS,
        "timeout_start": RELOAD_TIMEOUT_SECONDS + 60,
        "needs_bind_capability": settings.port < 1024,
        "private_devices": settings.device == "cpu",
    }
    return template_environment().get_template(TEMPLATE).render(context)


def _absolute(path: str, base: Path) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else base / p).resolve()


def _primary_group(user: str) -> str:
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:  # rendered for a host where the account is yet to be created
        return user


