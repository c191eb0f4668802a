"""The systemd unit: rendered from app/control/render/templates/systemd/asr-service.service.j2, checked by systemd's own tools,
and its invariants (timeouts nest, the sandbox is complete) held for several settings."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from app.config import load_settings
from app.control.paths import RunPaths
from app.control.render.systemd import STOP_MARGIN_SECONDS, render_unit, stop_groups
from support import BIN, REPO

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd); the unit is not checked by systemd")

# Not under /tmp: the unit's PrivateTmp=yes would hide it (render_unit refuses such a run directory).
RUN_DIR = "/srv/asr-test/run"
MODEL_CACHE = "/srv/asr-test/cache"


def _settings(**overrides):
    return load_settings(env={}, overrides={"run_dir": RUN_DIR, "model_cache": MODEL_CACHE, **overrides})


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _render(**overrides) -> str:
    # The venv's real binaries: systemd-analyze verify refuses an ExecStart that does not exist.
    return render_unit(_settings(**overrides), _current_user(), REPO, BIN)


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (systemd keys may repeat, e.g. ReadWritePaths=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _one(unit: dict, key: str, section: str = "Service") -> str:
    values = unit[section][key]
    assert len(values) == 1, (key, values)
    return values[0]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "asr-service.service"
    path.write_text(text)
    return path


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


# -- systemd's own checks ----------------------------------------------------------------------------

@needs_systemd_analyze
@pytest.mark.parametrize("overrides", [{}, {"device": "cpu"}, {"port": 80, "autoscale": True, "max_instances": 6}],
                         ids=["defaults", "cpu", "port 80 with autoscaler"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, overrides):
    result = _verify(_write(tmp_path, _render(**overrides)))
    # verify exits 0 even when it ignores a key it cannot parse: any line about the unit is a failure.
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if "asr-service" in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path):
    """So that the check above means something on this systemd version."""
    text = _render()
    broken = (text.replace("KillMode=process", "KillMode=bogus")
              .replace("ProtectSystem=strict", "ProtectSytem=strict")
              .replace(f"{BIN}/supervisord", "/nonexistent/supervisord"))
    output = (lambda r: r.stdout + r.stderr)(_verify(_write(tmp_path, broken)))
    assert "KillMode" in output or "kill mode" in output
    assert "ProtectSytem" in output and "/nonexistent/supervisord" in output


@needs_systemd_analyze
def test_sandbox_exposure_is_low(tmp_path):
    """systemd's own score of the sandbox (0 = locked down, 10 = none), for the dedicated-user render."""
    help_text = subprocess.run([SYSTEMD_ANALYZE, "security", "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text or "--threshold" not in help_text:
        pytest.skip("this systemd-analyze cannot score a unit file offline (needs systemd >= 250)")
    path = _write(tmp_path, render_unit(_settings(device="cpu"), "asr", REPO, BIN))
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Overall exposure level" in result.stdout


# -- invariants --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},
    {"max_audio_seconds": 30, "instances": 1, "max_instances": 1, "jobs": False},
    {"max_audio_seconds": 3600, "slowest_realtime_factor": 1.0, "instances": 8, "max_instances": 8, "autoscale": True},
], ids=["defaults", "small", "long audio, 8 instances, autoscaler"])
def test_timeouts_nest(overrides):
    settings = _settings(**overrides)
    unit = _parse(render_unit(settings, "asr", REPO, BIN))
    stop = int(_one(unit, "TimeoutStopSec"))
    # systemd never SIGKILLs before supervisord would have; supervisord never before gunicorn would have.
    assert stop > settings.stop_wait_seconds > settings.graceful_timeout_seconds > settings.max_inference_seconds
    # supervisord stops its groups one after another: the worst case is the sum of their waits.
    groups = max(settings.instances, settings.max_instances) + 1 + int(settings.autoscale) + int(settings.jobs)
    assert stop_groups(settings) == groups
    assert stop >= groups * settings.stop_wait_seconds + STOP_MARGIN_SECONDS
    # TERM to supervisord alone, so its order holds; and its death leaves the service serving.
    assert _one(unit, "KillMode") == "process"
    # ExecReload waits up to --timeout; TimeoutStartSec (which bounds reloads too) is longer.
    reload = _one(unit, "ExecReload").split()
    assert int(_one(unit, "TimeoutStartSec")) > float(reload[reload.index("--timeout") + 1])


def test_the_unit_runs_supervisord_on_the_run_directory():
    unit = _parse(_render())
    paths = RunPaths.at(RUN_DIR)
    assert _one(unit, "ExecStart") == f"{BIN}/supervisord -n -c {paths.supervisor_conf}"
    create, render = unit["Service"]["ExecStartPre"]
    assert create.startswith("+/usr/bin/install -d -o ") and create.endswith(f" -m 0750 {paths.root} {MODEL_CACHE}")
    assert render == f"{BIN}/asrctl render --quiet --run-dir {paths.root}"
    assert _one(unit, "ExecStopPost").endswith(f"exec {BIN}/asrctl down --quiet --run-dir {paths.root}'")
    assert _one(unit, "ExecReload").startswith(f"{BIN}/asrctl reload --quiet --run-dir {paths.root} ")
    assert _one(unit, "Type") == "exec"
    assert _one(unit, "User") == _current_user() and _one(unit, "Group")
    assert _one(unit, "WorkingDirectory") == str(REPO)
    assert _one(unit, "Restart") == "on-failure" and _one(unit, "RestartSec")
    assert _one(unit, "OOMPolicy") == "continue"
    assert int(_one(unit, "LimitNOFILE")) >= 4096  # supervisord's minfds
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "UMask": "0027",
}


def test_the_sandbox_is_complete():
    unit = _parse(_render())
    for key, value in HARDENING.items():
        assert _one(unit, key) == value, key
    families = set(_one(unit, "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # Writable: the run directory and the model cache, nothing else.
    assert unit["Service"]["ReadWritePaths"] == [RUN_DIR, f"-{MODEL_CACHE}"]
    # Port 7860 needs no privilege at all.
    assert _one(unit, "CapabilityBoundingSet") == "" and _one(unit, "AmbientCapabilities") == ""
    assert _one(unit, "User") != "" and "DynamicUser" not in unit["Service"]


def test_a_privileged_port_gets_only_the_bind_capability():
    unit = _parse(_render(port=443))
    assert _one(unit, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert _one(unit, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"


def test_gpu_devices_stay_visible_unless_the_device_is_cpu():
    assert _one(_parse(_render(device="cpu")), "PrivateDevices") == "yes"
    for device in ("cuda", "auto"):
        assert "PrivateDevices" not in _parse(_render(device=device))["Service"]


def test_relative_paths_are_taken_from_the_working_directory():
    # A checkout where a service would live (this test's own clone may sit under /tmp, which the
    # unit's PrivateTmp hides, so the renderer rightly refuses that one).
    checkout = Path("/srv/asr-service")
    unit = _parse(render_unit(load_settings(env={}, overrides={"run_dir": "run", "model_cache": MODEL_CACHE}),
                              "asr", checkout, BIN))
    assert unit["Service"]["ReadWritePaths"][0] == str(checkout / "run")
    assert unit["Service"]["WorkingDirectory"][0] == str(checkout)


@pytest.mark.parametrize("setting", ["run_dir", "model_cache"])
def test_a_directory_under_tmp_is_refused(setting):
    with pytest.raises(ValueError, match="PrivateTmp"):
        render_unit(_settings(**{setting: "/tmp/asr/x"}), "asr", REPO, BIN)


def test_every_setting_says_why_it_is_there():
    """In [Service], each paragraph of settings carries a comment."""
    text = _render()
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    for paragraph in (p for p in service.split("\n\n") if p.strip()):
        lines = paragraph.strip().splitlines()
        if any(not line.startswith("#") for line in lines):
            assert any(line.startswith("#") for line in lines), paragraph


# -- the trip points a new operator meets ----------------------------------------------------------

def test_the_run_directory_is_created_for_the_service_user_before_anything_runs():
    unit = _parse(render_unit(_settings(), "asr", REPO, BIN, group="asr"))
    create = unit["Service"]["ExecStartPre"][0]
    # "+": as root, so it can create /srv/... and hand it to the service user.
    assert create == f"+/usr/bin/install -d -o asr -g asr -m 0750 {RUN_DIR} {MODEL_CACHE}"


def test_a_model_cache_under_a_home_directory_becomes_systemd_s_cache_directory():
    """ProtectHome=read-only would make ~/.cache/asr-service unwritable: the unit uses /var/cache."""
    unit = _parse(render_unit(_settings(model_cache="/home/asr/.cache/asr-service"), "asr", REPO, BIN))
    service = unit["Service"]
    assert service["CacheDirectory"] == ["asr-service"]
    assert service["Environment"] == [f"ASRCTL_RUN={RUN_DIR}", "ASR_MODEL_CACHE=/var/cache/asr-service"]
    assert _one(unit, "ProtectHome") == "read-only"
    assert not any("/home/" in p for p in service["ReadWritePaths"])
    assert service["ExecStartPre"][0].endswith(f" -m 0750 {RUN_DIR}")


def test_flags_given_to_systemd_unit_reach_every_render(tmp_path):
    """`asrctl systemd-unit --instances 3 --port 8080` must start 3 instances on 8080, not the defaults."""
    config = tmp_path / "asr.toml"
    config.write_text("max_queue = 5\n")
    result = subprocess.run([str(BIN / "asrctl"), "systemd-unit", "--run-dir", RUN_DIR, "--instances", "3",
                             "--port", "8080", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "ASR_MODEL_CACHE": MODEL_CACHE})
    assert result.returncode == 0, result.stderr
    unit = _parse(result.stdout)
    render = unit["Service"]["ExecStartPre"][1].split()
    reload = _one(unit, "ExecReload").split()
    for command in (render, reload):
        assert {"--instances=3", "--port=8080", f"--config={config}"} <= set(command), command
    # The flags parse as asrctl's own: the render they make is what the unit promised.
    from app.control.cli import _parser
    args = _parser().parse_args(render[1:])
    assert (args.instances, args.port, args.config) == (3, 8080, str(config))
    assert "on 0.0.0.0:8080" in _one(unit, "Description", "Unit") and "3 Whisper" in _one(unit, "Description", "Unit")
