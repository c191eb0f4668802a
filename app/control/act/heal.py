"""Healing what supervisord cannot see: orphans of a killed nginx master or of a killed supervisord.

- nginx master killed: its workers live on, holding the public port with the old configuration.
  supervisord starts a new master, which binds beside them (``listen ... reuseport``); once its own
  workers listen, the orphans get QUIT: they stop accepting, finish their requests and exit. A
  connection the kernel queued on an orphan's socket in the instant it closes is reset, unless the
  host lets the kernel move it to another socket of the port (``net.ipv4.tcp_migrate_req = 1``,
  Linux 5.14 and later): where it does not, the retirement says so in its log line.
- supervisord killed: instances and nginx live on as orphans and keep serving. ``asrctl up`` (or the
  unit's ``ExecStartPre`` render under systemd) starts each replacement instance on a fresh port while
  nginx keeps sending traffic to the orphans; once the replacements are ready, they take over the
  upstream, and the orphans are retired gracefully (``finish_adoption``: by ``asrctl up``, or by the
  watcher under systemd). No port is ever shared between two instances.

Every step that changes nginx's upstream holds the run directory's control lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import threading
from typing import Callable

from app.config import Settings
from app.control.act import processes
from app.control.paths import RunPaths
from app.control.plan.pool import Pool
from app.control.render.files import NGINX_PROGRAM, InstanceSpec, instance_name

_lock_depth = threading.local()


@contextlib.contextmanager
def control_lock(paths: RunPaths):
    """One writer of nginx's upstream at a time across asrctl, the autoscaler and the watcher
    (re-entrant within a thread)."""
    depth = getattr(_lock_depth, "n", 0)
    if depth:
        _lock_depth.n = depth + 1
        try:
            yield
        finally:
            _lock_depth.n -= 1
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _lock_depth.n = 1
        try:
            yield
        finally:
            _lock_depth.n = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def run_ports(settings: Settings, pool: Pool | None) -> set[int]:
    ports = {settings.port}
    if pool:
        ports |= {i.port for i in pool.instances + pool.adopted}
    else:
        ports |= set(settings.ports())
    return ports


def nginx_orphans(settings: Settings, paths: RunPaths, nginx_pid: int | None) -> list[processes.Proc]:
    """This run's nginx processes that are not the supervised master or its workers: workers a killed
    master left, or a killed supervisord's nginx (by identity, whatever port they hold)."""
    # Its workers by the parent pid read in the same scan: a worker the master forks while the scan
    # runs (a reload) is found with it, where a tree taken before the scan would not know it.
    return [p for p in processes.run_processes(paths, {settings.port})
            if p.kind == "nginx" and nginx_pid not in (p.pid, p.ppid)]


def supervised_nginx_listens(settings: Settings, nginx_pid: int | None) -> bool:
    listening = processes.listeners({settings.port}).get(settings.port, set())
    return bool(listening & (processes.tree(nginx_pid) - {nginx_pid}))


def reset_risk() -> str:
    """What retiring an nginx orphan risks on this host, for the line that says it is retired: "" where
    the kernel moves the connections queued on a closing socket to another socket of the port."""
    migrate = processes.migrates_queued_connections()
    if migrate:
        return ""
    return (f"; net.ipv4.tcp_migrate_req is {'0' if migrate is False else 'not there'}: a connection queued "
            "on an orphan's socket as it closes is reset (docs/operations.md)")


def retire_nginx_orphans(settings: Settings, paths: RunPaths, client, log: Callable[[str], None],
                         wait: float | None = None) -> int:
    """QUIT nginx orphans once the supervised nginx's workers listen (``wait``: until they exit, KILL
    after that many seconds); return how many were retired."""
    info = client.process(NGINX_PROGRAM)
    pid = info["pid"] if info["statename"] == "RUNNING" else None
    found = nginx_orphans(settings, paths, pid)
    if not found or not supervised_nginx_listens(settings, pid):
        return 0  # none, or they are all that serves the port until the supervised master's workers listen
    log(f"nginx: {len(found)} orphaned process(es) on port {settings.port} "
        f"({', '.join(str(p.pid) for p in found)}); the supervised master is pid {pid}{reset_risk()}")
    if wait is None:
        for p in found:
            processes.send_graceful(p)
    else:
        processes.retire(found, wait, log=log)
    return len(found)


def plan_adoption(settings: Settings, pool: Pool, log: Callable[[str], None],
                  previous: Pool | None = None) -> list[processes.Proc]:
    """supervisord is not running: find this run directory's orphans and plan around them.

    An instance an orphan still serves moves to a fresh port (the orphan stays in nginx's upstream
    as ``adopted`` until the replacement is ready). An old watcher or autoscaler is stopped at once:
    it would act on a supervisord that is gone. Returns the orphans found.
    """
    paths = RunPaths.at(settings.run_dir)
    found = processes.orphans(paths, run_ports(settings, pool) | run_ports(settings, previous), None,
                              include_control=True)
    control = [p for p in found if p.kind in ("control", "supervisord")]
    if control:
        processes.retire(control, 30, log=log)
    serving = {port for p in found if p.kind == "instance" for port in p.ports}
    for spec in list(pool.instances):
        if spec.port not in serving or spec.port in {a.port for a in pool.adopted}:
            continue
        taken = {port for p in found for port in p.ports} | {settings.port}
        port = pool.next_port(settings.base_port, avoid=taken)
        while not processes.port_free(port):
            port = pool.next_port(settings.base_port, avoid=taken | {port})
            taken.add(port)
        replacement = InstanceSpec(instance_name(port), port, spec.weight, spec.placement)
        pool.instances[pool.instances.index(spec)] = replacement
        pool.adopted.append(spec)
        pool.starting.add(replacement.name)
        log(f"adopting: {spec.name} (pid {_pids(found, spec.port)}) keeps serving on port {spec.port} "
            f"until {replacement.name} replaces it")
    return [p for p in found if p not in control]


def orphans_holding_gpus(settings: Settings, previous: Pool | None) -> str:
    """Why a plan may find the GPUs full after supervisord was killed, for the error that says so: ''
    when no instance of the previous run on a GPU still serves.

    Replacements start beside the orphans they replace, so on a GPU more than half full they cannot
    fit; the orphans keep serving meanwhile, and ``asrctl down`` then ``up`` starts afresh.
    """
    if previous is None or not any(i.placement.device == "cuda" for i in previous.instances):
        return ""
    serving = {port for p in processes.orphans(RunPaths.at(settings.run_dir), run_ports(settings, previous), None)
               if p.kind == "instance" for port in p.ports}
    if not serving:
        return ""
    return (f". {len(serving)} instance(s) of the previous run still serve unsupervised (supervisord "
            "is gone) and hold their GPU memory, and their replacements start beside them: the service keeps "
            "running on them; `asrctl down` stops them, then `asrctl up` starts afresh")


def finish_adoption(settings: Settings, client, pool: Pool, publish: Callable[[Pool], None],
                    wait_ready: Callable[[list[InstanceSpec]], None], log: Callable[[str], None]) -> bool:
    """Once the replacements are ready: they take the upstream, then every orphan is retired gracefully.

    Returns whether there was anything to adopt.
    """
    paths = RunPaths.at(settings.run_dir)
    supervisord_pid = _supervisord_pid(client)
    found = processes.orphans(paths, run_ports(settings, pool), supervisord_pid)
    if not pool.adopted and not found:
        return False
    replacements = [i for i in pool.instances if i.name in pool.starting]
    wait_ready(replacements)
    with control_lock(paths):
        # `asrctl up` and the watcher may both get here: the first one does it, the other finds it done.
        fresh = Pool.load(paths)
        if fresh is not None:
            pool.instances, pool.starting, pool.adopted = fresh.instances, fresh.starting, fresh.adopted
        found = processes.orphans(paths, run_ports(settings, pool), supervisord_pid)
        if not pool.adopted and not found:
            return False
        pool.starting -= {i.name for i in replacements}
        old = pool.adopted
        pool.adopted = []
        publish(pool)  # the replacements take the upstream; nginx's orphans still run the old one
        retire_nginx_orphans(settings, paths, client, log, wait=settings.stop_wait_seconds)
        publish(pool)  # verified against the public port, now that only the supervised nginx answers
        leftover = processes.orphans(paths, run_ports(settings, pool) | {i.port for i in old}, supervisord_pid)
        if leftover:
            processes.retire(leftover, settings.stop_wait_seconds, log=log)
    log(f"adopted: {len(old)} orphaned instance(s) replaced, {len(found)} orphaned process(es) retired")
    return True


def _supervisord_pid(client) -> int | None:
    try:
        return client.api.getPID()
    except Exception:  # noqa: BLE001 - no supervisord: nothing is ours
        return None


def _pids(found: list[processes.Proc], port: int) -> str:
    return ", ".join(str(p.pid) for p in found if port in p.ports)
