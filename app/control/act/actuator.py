"""Carry out pool changes on the running service, in the order that loses no request.

Scale up: add the program (supervisord ``reloadConfig`` + ``addProcessGroup``: no other program
restarts), wait for its ``/ready``, and only then put it in nginx's upstream and reload nginx.
Scale down: take it out of the upstream and reload nginx first, tell the instance it is draining,
wait (bounded) until it has no request in flight, then stop it gracefully and remove its program.
The decisions come from elsewhere (``asrctl scale`` or ``app.control.plan.policy``); this only acts.
"""
from __future__ import annotations

import time
from typing import Callable

import requests

from app.config import Settings
from app.control.act import nginx, processes
from app.control.act.heal import control_lock, retire_nginx_orphans
from app.control.paths import RunPaths
from app.control.plan.placement import GpuInfo, Placement, place_one, resolve_device
from app.control.plan.pool import Pool, load_unhealthy
from app.control.render.files import InstanceSpec, instance_weights, render_all
from app.control.act.supervisor import SupervisorClient
from app.hardware.devices import available_cores
from app.engines.models import display_name
from app.hardware.nvml import detect_gpus, inventory


class ActuationError(RuntimeError):
    pass


class Actuator:
    def __init__(self, settings: Settings, client: SupervisorClient, gpus: list[GpuInfo],
                 log: Callable[[str], None] = print):
        self.settings = settings
        self.client = client
        self.gpus = gpus
        self.paths = RunPaths.at(settings.run_dir)
        self.log = log

    # -- whole-pool operations --

    def publish(self, pool: Pool, verify: bool = True) -> dict[str, list[str]]:
        """Render every file for this pool, apply program changes, test and reload nginx, remember it.

        ``verify``: return only once the public port answers with the configuration just rendered
        (nginx workers a killed master left behind are retired first: they would answer the old one).
        """
        with control_lock(self.paths):
            pool.unhealthy = load_unhealthy(self.paths)
            self._reweigh(pool)
            render_all(self.settings, pool.instances, pool.upstream)
            changes = self.client.apply_config()
            nginx.reload(self.paths, self.client)
            pool.save(self.paths)
            if verify:
                retire_nginx_orphans(self.settings, self.paths, self.client, self.log)
                nginx.verify(self.settings, self.paths)
        return changes

    def scale_to(self, pool: Pool, count: int) -> None:
        while len(pool.instances) < count:
            self.scale_up(pool)
        while len(pool.instances) > count:
            self.scale_down(pool, least_loaded(pool))

    # -- one instance at a time --

    def place_next(self, pool: Pool, gpu: int | tuple[int, ...] | None = None) -> Placement:
        """Where one more instance goes. On GPUs NVML is read afresh each time: ``asrctl scale 4`` adds
        instances one after another, and each must see the memory the previous one has taken since."""
        device = pool_device(pool, self.settings)
        threads = self.settings.cpu_threads or min((i.placement.threads for i in pool.instances), default=1)
        if device != "cuda" or gpu is not None:
            return place_one([i.placement for i in pool.instances], device, self.gpus, available_cores(), threads,
                             gpu=gpu)
        self.gpus = detect_gpus()
        on_gpu = [i for i in pool.instances if i.placement.device == "cuda"]
        healths = [get_json(i.port, "/health") for i in on_gpu]
        return place_one([i.placement for i in pool.instances], device, self.gpus, available_cores(), threads,
                         instance_memory_mb=measured_memory_mb(pool, self.settings, healths)
                         or self.settings.instance_gpu_memory_mb,
                         starting=[i.placement for i, h in zip(on_gpu, healths) if not_loaded(pool, i.name, h)],
                         headroom_mb=self.settings.gpu_headroom_mb, gpus_per_instance=self.settings.gpus_per_instance)

    def scale_up(self, pool: Pool, gpu: int | None = None) -> InstanceSpec:
        port = pool.next_port(self.settings.base_port, avoid={self.settings.port})
        # Before anything changes: a port another process holds is refused, never taken.
        processes.refuse_foreign(self.paths, {port}, "scale up")
        placement = self.place_next(pool, gpu)
        spec = pool.add(port, 1, placement)
        pool.starting.add(spec.name)
        self.log(f"scale up: starting {spec.name} on {placement.describe()}")
        self._reweigh(pool)
        render_all(self.settings, pool.instances, pool.upstream)
        self.client.apply_config()
        pool.save(self.paths)
        wait_ready(self.client, [spec], self.settings.request_timeout_seconds)
        pool.starting.discard(spec.name)
        self.publish(pool)
        self.log(f"scale up: {spec.name} ready and in nginx's upstream ({len(pool.instances)} instances)")
        return spec

    def scale_down(self, pool: Pool, name: str) -> None:
        if len(pool.instances) <= 1:
            raise ActuationError("refusing to remove the last instance")
        self._leave_upstream(pool, pool.get(name))
        pool.remove(name)
        self.publish(pool)  # its program file is gone: supervisord stops it gracefully and removes it
        self.log(f"scale down: {name} stopped and removed ({len(pool.instances)} instances)")

    def restart(self, pool: Pool, name: str) -> None:
        """Restart one instance without losing a request: out of nginx, drain, stop, start, ready, back in.

        The new process reads the run directory's asr.toml afresh; program changes are ``reload``'s job.
        """
        spec = pool.get(name)
        self._leave_upstream(pool, spec)
        self.client.stop(name)
        pool.draining.discard(name)
        pool.starting.add(name)
        pool.save(self.paths)
        self.client.start(name)
        wait_ready(self.client, [spec], self.settings.request_timeout_seconds)
        pool.starting.discard(name)
        self.publish(pool)
        self.log(f"restart: {name} ready and back in nginx's upstream")

    def _leave_upstream(self, pool: Pool, spec: InstanceSpec) -> None:
        """Out of nginx first, so no new request reaches it; then wait (bounded) for its requests."""
        pool.draining.add(spec.name)
        self.publish(pool)
        self.log(f"{spec.name}: out of nginx's upstream, draining")
        _post(spec.port, "/admin/drain")
        left = wait_drained(spec.port, self.settings.drain_seconds)
        if left:
            self.log(f"{spec.name}: still had {left} request(s) or stream(s) after {self.settings.drain_seconds:g} s; "
                     "stopping gracefully anyway (gunicorn finishes them within its graceful timeout)")

    def _reweigh(self, pool: Pool) -> None:
        pool.with_weights(instance_weights(self.settings, [i.placement for i in pool.instances], self.gpus))


def pool_device(pool: Pool, settings: Settings) -> str:
    """What the pool runs on: its instances' device, or for an empty pool what the settings resolve to
    (NVML asked again there, so that a broken driver is refused, not taken for a CPU host)."""
    if pool.instances:
        return pool.instances[0].placement.device
    found = inventory()
    return resolve_device(settings.device, found.gpus, found.error)


def measured_memory_mb(pool: Pool, settings: Settings, healths: list[dict | None] | None = None) -> int | None:
    """The most GPU memory any instance of the pool reports holding after load and warm-up (its
    /health); None until one has loaded, when placement keeps the configured estimate.

    Only instances of the model, engine and batch size being placed count: after ``asrctl up --model
    large-v3`` on a running pool of tiny instances, tiny's figure says nothing of what large-v3 holds.
    """
    if healths is None:
        healths = [get_json(i.port, "/health") for i in pool.instances if i.placement.device == "cuda"]
    same = (settings.engine, display_name(settings.model), settings.batch_size("cuda"))
    figures = [h["gpu"]["memory_mb"] for h in healths
               if h and isinstance(h.get("gpu"), dict) and isinstance(h["gpu"].get("memory_mb"), int)
               and (h.get("engine"), h.get("model"), (h.get("model_config") or {}).get("max_batch")) == same]
    return max(figures, default=None)


def not_loaded(pool: Pool, name: str, health: dict | None) -> bool:
    """The instance holds less GPU memory now than it will: starting, loading its model again (after
    a crash, the watchdog or an autorestart) or not answering (a process starting over). NVML's free
    memory does not show what it is about to take, so placement charges it one instance's figure.
    A draining instance still holds its memory until it stops."""
    if name in pool.starting:
        return True
    if name in pool.draining:
        return False
    return health is None or health.get("state") == "loading"


def least_loaded(pool: Pool) -> str:
    """The instance to drain: not ready first, then fewest requests in flight and live streams (a stream
    cut short costs its speaker a reconnect), then the newest."""
    def key(spec: InstanceSpec):
        health = get_json(spec.port, "/health")
        if not health:
            return (0, 0, -spec.port)
        ready = health.get("state") == "ready"
        return (1 if ready else 0, held(health), -spec.port)
    return min(pool.instances, key=key).name


def wait_ready(client: SupervisorClient, instances: list[InstanceSpec], timeout: float) -> None:
    """Until every instance answers /ready 200; fail fast on a program that cannot stay up."""
    deadline = time.monotonic() + timeout
    pending = {i.name: i for i in instances}
    while pending:
        for name, instance in list(pending.items()):
            state = client.process(name)["statename"]
            if state in ("FATAL", "EXITED", "STOPPED"):
                raise ActuationError(f"{name} is {state}; last log lines:\n{log_tail(client, name)}")
            if state == "RUNNING":
                ready = get_json(instance.port, "/ready")
                if ready and ready.get("ready"):
                    check_answering_process(client, name, instance.port)
                    del pending[name]
                elif ready and ready.get("state") == "failed":
                    raise ActuationError(f"{name} failed to load its model: {ready['error']['message']}")
        if pending and time.monotonic() > deadline:
            raise ActuationError(f"not ready after {timeout:g} s: {', '.join(pending)}")
        if pending:
            time.sleep(0.25)


def check_answering_process(client: SupervisorClient, name: str, port: int) -> int:
    """The process answering ``port`` must be the one supervisord started for ``name`` (gunicorn's
    master) or its worker; anything else is an orphan of an earlier run holding the port."""
    supervised = client.process(name)["pid"]
    health = get_json(port, "/health") or {}
    pid = health.get("pid")
    if pid and (pid == supervised or processes.parent_of(pid) == supervised):
        return pid
    raise ActuationError(
        f"port {port} is answered by pid {pid or 'nobody'}, not by {name} (pid {supervised}) that supervisord "
        f"started: another process holds the port (asrctl down, then asrctl up, replaces it)")


def held(health: dict) -> int:
    """Requests in flight and live streams an instance reports in its /health."""
    return health.get("requests_in_flight", 0) + health.get("streams_open", 0)


def wait_drained(port: int, timeout: float) -> int:
    """Wait until the instance holds no request and no live stream (a draining stream ends after its
    current turn); return how many it still held at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        health = get_json(port, "/health")
        left = held(health) if health else 0
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def get_json(port: int | None, path: str) -> dict | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=2).json()
    except (requests.RequestException, ValueError):
        return None


def _post(port: int, path: str) -> None:
    try:
        requests.post(f"http://127.0.0.1:{port}{path}", timeout=2)
    except requests.RequestException:
        pass  # an instance that is already gone has nothing to drain


def log_tail(client: SupervisorClient, name: str, length: int = 3000) -> str:
    try:
        text, _offset, _overflow = client.api.tailProcessStdoutLog(name, 0, length)
        return text.strip()
    except Exception as e:  # noqa: BLE001 - the log is a courtesy; the failure itself is the message
        return f"(log unavailable: {e})"
