"""The autoscaling loop: observe the pool, ask the pure policy, act through the actuator.

Runs as ``asrctl autoscale`` (in a terminal, from cron with ``--once``, or as a supervisord program
when ``autoscale = true``). The policy's counter and the time of the last change are kept in
``run/autoscale.json`` so that ``--once`` runs continue where the last one stopped.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import psutil

from app.config import Settings
from app.hardware.nvml import detect_gpus
from app.control.act.actuator import Actuator, get_json, measured_memory_mb, not_loaded, pool_device
from app.control.act import processes
from app.control.plan.placement import GpuInfo, core_usage, free_core_sets
from app.control.plan.policy import (
    Decision, GpuLoad, HostLoad, InstanceLoad, PolicyState, ScalingConfig, ScalingContext, decide,
)
from app.control.plan.pool import Pool
from app.hardware.devices import available_cores

log = logging.getLogger("asr.autoscale")


def scaling_config(settings: Settings) -> ScalingConfig:
    return ScalingConfig(
        min_instances=settings.min_instances,
        max_instances=settings.max_instances,
        target_in_flight_per_instance=settings.target_in_flight,
        upscale_delay_s=settings.upscale_delay_seconds,
        downscale_delay_s=settings.downscale_delay_seconds,
        cooldown_s=settings.cooldown_seconds,
        loop_interval_s=settings.autoscale_interval_seconds,
        instance_memory_mb=settings.instance_gpu_memory_mb,
        gpu_headroom_mb=settings.gpu_headroom_mb,
        gpus_per_instance=settings.gpus_per_instance,
    )


def observe(pool: Pool, settings: Settings, gpus: list[GpuInfo], now: float,
            last_change_at: float | None) -> ScalingContext:
    """A snapshot of load from each instance's /health, NVML and the host's CPU.

    The GPUs count only for a pool of GPU instances: a ``device = "cpu"`` pool on a GPU host grows
    onto free CPU core sets, never onto a GPU.
    """
    loads, healths = [], []
    for spec in pool.instances:
        answer = get_json(spec.port, "/health")
        health = answer or {}
        healths.append(health)
        queue = health.get("queue", {})
        ready = health.get("state") == "ready" and spec.name not in pool.starting | pool.draining
        loads.append(InstanceLoad(spec.name, in_flight=queue.get("running", 0),
                                  queue_depth=queue.get("waiting", 0), ready=ready, gpu=spec.placement.gpu,
                                  more_gpus=spec.placement.more_gpus,
                                  loaded=not not_loaded(pool, spec.name, answer)))
    threads = settings.cpu_threads or min((i.placement.threads for i in pool.instances), default=1)
    placements = [i.placement for i in pool.instances]
    cores = available_cores()
    host = HostLoad(cpu_pct=idle_core_busy_pct(placements, cores),
                    free_core_sets=free_core_sets(placements, cores, threads))
    on_gpu = pool_device(pool, settings) == "cuda"
    gpu_loads = tuple(GpuLoad(g.index, g.utilization_pct, g.memory_free_mb, g.memory_total_mb, g.fault)
                      for g in gpus) if on_gpu else ()
    return ScalingContext(tuple(loads), gpu_loads, host, now, last_change_at,
                          instance_memory_mb=measured_memory_mb(pool, settings, healths) if on_gpu else None,
                          gpu_pool=on_gpu)


def idle_core_busy_pct(placements, cores: list[int]) -> float:
    """How busy the cores no instance is pinned to are: where a new CPU instance would run.

    The host-wide average would also count the instances' own saturated cores, which is the very
    load a new instance relieves; what matters is whether the free cores are taken by something else.
    """
    per_core = psutil.cpu_percent(interval=None, percpu=True)
    usage = core_usage(placements, cores)
    free = [per_core[c] for c in cores if usage[c] == 0 and c < len(per_core)]
    return sum(free) / len(free) if free else sum(per_core) / max(1, len(per_core))


class Autoscaler:
    def __init__(self, settings: Settings, actuator: Actuator):
        self.settings = settings
        self.actuator = actuator
        self.config = scaling_config(settings)
        self.state_file = actuator.paths.root / "autoscale.json"

    def tick(self, pool: Pool, dry_run: bool = False) -> Decision:
        saved = self._load()
        now = time.time()
        gpus = detect_gpus()
        ctx = observe(pool, self.settings, gpus, now, saved.get("last_change_at"))
        decision, state = decide(ctx, self.config, PolicyState(saved.get("consecutive", 0)))
        current = len(pool.instances)
        log.info("%s: %d -> %d: %s", "dry run" if dry_run else "decision", current, decision.desired, decision.reason)
        if not dry_run:
            if decision.desired != current:
                self.actuator.gpus = gpus
                for gpu in decision.placement:
                    self.actuator.scale_up(pool, gpu=gpu)
                for name in decision.remove:
                    self.actuator.scale_down(pool, name)
                saved["last_change_at"] = time.time()
            saved["consecutive"] = state.consecutive
            self._save(saved)
        return decision

    def run(self, pool: Pool, dry_run: bool = False) -> None:
        """Tick until SIGTERM/SIGINT; a change in progress (a drain) completes before the loop exits."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        psutil.cpu_percent(interval=None, percpu=True)  # prime: the first reading compares against this one
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.tick(pool, dry_run)
            except processes.PortHeld as e:  # an operator's matter, not a bug: one line, not a traceback
                log.warning("autoscale: no instance added: %s", e)
                pool = Pool.load(self.actuator.paths) or pool
            except Exception:  # noqa: BLE001 - one failed tick must not end the loop; it is logged
                log.exception("autoscale tick failed")
                pool = Pool.load(self.actuator.paths) or pool
            stop.wait(max(0.0, self.config.loop_interval_s - (time.monotonic() - started)))
        log.info("autoscaler stopped")

    def _load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, data: dict) -> None:
        tmp = self.state_file.with_name("autoscale.json.tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, self.state_file)
