"""Render every configuration file an operator sees from the templates in ``templates/``, shipped with
the package."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2

from app.hardware import cuda
from app.config import API_KEY_SUBPROTOCOL, Settings
from app.control.render.public_routes import PUBLIC_ROUTES
from app.control.act import processes
from app.control.render import prometheus_sd
from app.control.paths import RunPaths
from app.engines import engine_bin_dir
from app.control.plan.placement import GpuInfo, Placement, capacity_weights, plan_placement, resolve_device
from app.hardware.devices import available_cores, format_cores, gpu_environment

TEMPLATES = Path(__file__).resolve().parent / "templates"
PROGRAM_PREFIX = "asr-"
NGINX_PROGRAM = "nginx"
AUTOSCALER_PROGRAM = "autoscaler"
JOBS_PROGRAM = "jobs"
WATCHER_PROGRAM = "watcher"
# Programs that are not model instances, stopped first by ``asrctl down`` (nothing may add work then;
# jobs resume at the next up).
CONTROL_PROGRAMS = (AUTOSCALER_PROGRAM, WATCHER_PROGRAM, JOBS_PROGRAM)


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    port: int
    weight: int
    placement: Placement

    def environment(self, paths: RunPaths) -> dict[str, str]:
        """What supervisord (or a pod spec) sets for this instance on top of the shared settings."""
        env = {
            "ASR_CONFIG": str(paths.config),
            "ASR_INSTANCE_ID": self.name,
            "ASR_INSTANCE_PORT": str(self.port),
            "ASR_DEVICE": self.placement.device,
        }
        if self.placement.device == "cuda":
            # Pinned by UUID (PCI order for an index), and CUDA 12 libraries from pip's nvidia-*
            # wheels on the loader's path: CTranslate2 opens libcublas.so.12 by name.
            env.update(gpu_environment(self.placement.gpus, self.placement.gpu_uuids))
            env["ASR_GPU_UUID"] = self.placement.gpu_uuid   # CUDA's device 0, checked by the instance
            library_path = cuda.library_path(os.environ.get("LD_LIBRARY_PATH", ""))
            if library_path:
                env["LD_LIBRARY_PATH"] = library_path
        else:
            # No GPU for a CPU instance, its own cores, and math libraries sized to them.
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["ASR_CPU_CORES"] = format_cores(self.placement.cpu_cores)
            env["OMP_NUM_THREADS"] = str(self.placement.threads)
        return env


def instance_name(port: int) -> str:
    return f"{PROGRAM_PREFIX}{port}"


def plan_instances(settings: Settings, gpus: list[GpuInfo], cores: list[int] | None = None,
                   nvml_error: str = "") -> list[InstanceSpec]:
    device = resolve_device(settings.device, gpus, nvml_error)
    placements = plan_placement(settings.instances, device, gpus, cores or available_cores(),
                                gpu_map=settings.gpu_list(), cpu_threads=settings.cpu_threads,
                                instance_memory_mb=settings.instance_gpu_memory_mb,
                                headroom_mb=settings.gpu_headroom_mb, gpus_per_instance=settings.gpus_per_instance)
    weights = instance_weights(settings, placements, gpus)
    return [
        InstanceSpec(instance_name(port), port, weight, placement)
        for port, weight, placement in zip(settings.ports(), weights, placements)
    ]


def instance_weights(settings: Settings, placements: list[Placement], gpus: list[GpuInfo]) -> list[int]:
    """nginx weights: the operator's ``weights`` by position (repeating), else each instance's capacity.

    The one rule for ``asrctl up`` and for every re-render after a scale or restart.
    """
    if settings.weights:
        given = settings.weight_list()
        return [given[i % len(given)] for i in range(len(placements))]
    return capacity_weights(placements, gpus)


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def template_environment() -> jinja2.Environment:
    """The one jinja2 setup for every template under ``templates/``: unknown variables are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _nginx_user(settings: Settings, paths: RunPaths) -> str:
    """Workers' user when nginx's master runs as root: the run directory's owner unless configured."""
    if os.geteuid() != 0:
        return ""
    return settings.nginx_user or pwd.getpwuid(paths.root.stat().st_uid).pw_name


def render_all(settings: Settings, instances: list[InstanceSpec], upstream: list[InstanceSpec] | None = None) -> RunPaths:
    """Write the settings, supervisord's configuration and programs, and nginx's configuration.

    ``upstream`` (default: all instances) is who nginx sends traffic to; a draining instance keeps its
    program but leaves the upstream.
    """
    paths = RunPaths.at(settings.run_dir)
    paths.make_dirs()
    env = template_environment()
    upstream = instances if upstream is None else upstream
    context = {
        "settings": settings,
        "paths": paths,
        "bin_dir": Path(sys.executable).parent,
        # The instances' gunicorn: from the engine's own environment where it has one (vllm's .venv-vllm).
        "instance_bin_dir": engine_bin_dir(settings.engine, settings.engine_environment) or Path(sys.executable).parent,
        # Programs run where asrctl ran: relative paths in the settings mean the same to them.
        "work_dir": Path.cwd(),
        "nginx_bin": nginx_binary(),
        "identity_env": processes.IDENTITY_ENV,
    }
    # Absolute: instances and the job runner find the job database and upstream.json through it.
    _write(paths.config, replace(settings, run_dir=str(paths.root)).to_toml())
    _write(paths.supervisor_conf, env.get_template("supervisor/supervisord.conf.j2").render(context))
    wanted = {paths.program_file(NGINX_PROGRAM)}
    _write(paths.program_file(NGINX_PROGRAM), env.get_template("supervisor/nginx.conf.j2").render(context))
    # Optional control programs: one template each, rendered when its setting is on.
    for program, enabled in ((AUTOSCALER_PROGRAM, settings.autoscale), (WATCHER_PROGRAM, settings.liveness),
                             (JOBS_PROGRAM, settings.jobs)):
        if enabled:
            wanted.add(paths.program_file(program))
            _write(paths.program_file(program), env.get_template(f"supervisor/{program}.conf.j2").render(context))
    for instance in instances:
        path = paths.program_file(instance.name)
        wanted.add(path)
        _write(path, env.get_template("supervisor/instance.conf.j2").render(context, instance=instance))
    for stale in set(paths.programs.glob("*.conf")) - wanted:
        stale.unlink()
    render_nginx(settings, upstream, paths, env)
    prometheus_sd.write_targets(settings, paths, instances)
    return paths


def render_nginx(settings: Settings, upstream: list[InstanceSpec], paths: RunPaths | None = None,
                 env: jinja2.Environment | None = None) -> Path:
    paths = paths or RunPaths.at(settings.run_dir)
    env = env or template_environment()
    user = _nginx_user(settings, paths)
    generation = rendered_generation(paths) + 1
    control_allow = ["127.0.0.1", "::1"]
    if settings.host not in ("0.0.0.0", "::", "", *control_allow):
        control_allow.append(settings.host)  # this host reaching its own address comes from it
    text = env.get_template("nginx/nginx.conf.j2").render(
        settings=settings, paths=paths, upstream=upstream, nginx_user=user, api_keys=settings.api_keys(),
        key_subprotocol=API_KEY_SUBPROTOCOL, next_upstream_tries=max(1, min(len(upstream), 3)), public_routes=PUBLIC_ROUTES,
        monitor_allow=settings.monitor_addresses(), scrapers=settings.monitor_addresses()[2:],
        control_allow=control_allow, generation=generation,
    )
    _write(paths.nginx_conf, text)
    # The same instances, for the data path: an instance's idle siblings, the job runner's pool.
    _write(paths.root / "upstream.json",
           json.dumps([{"name": i.name, "port": i.port} for i in upstream], indent=2) + "\n")
    _write(paths.nginx_generation, f"{generation}\n")
    if user:  # workers write request bodies to the temp paths
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        for d in [paths.nginx_temp, *paths.nginx_temp.iterdir()]:
            os.chown(d, uid, gid)
    return paths.nginx_conf


def rendered_generation(paths: RunPaths) -> int:
    """The number of the last nginx configuration rendered here; nginx serves it at /_asr/generation."""
    try:
        return int(paths.nginx_generation.read_text())
    except (OSError, ValueError):
        return 0


def _write(path: Path, text: str) -> None:
    """Replace atomically: supervisord or nginx never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # 0600 from the first byte: nginx.conf may hold API keys; everything here is read by the
    # operator's user (supervisord, nginx's master) only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
