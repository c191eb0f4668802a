"""The host's process table and listening sockets, as they concern one run directory.

supervisord knows the processes it started; this module finds the ones it does not: nginx workers a
killed master left behind, and instances and nginx that outlived a killed supervisord. A process
belongs to a run directory when it listens on one of its ports, or names its files on its command
line or in its environment (``ASR_CONFIG``). Signals go to single pids found that way, never by name.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

import psutil

from app.control.paths import RunPaths


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    kind: str      # nginx | instance | supervisord | control | other
    ports: tuple[int, ...]

    def describe(self) -> str:
        where = f" on port {', '.join(map(str, self.ports))}" if self.ports else ""
        return f"{self.kind} pid {self.pid}{where}"


def listeners(ports: set[int]) -> dict[int, set[int]]:
    """Port -> every pid holding a socket that listens on it (this user's processes only).

    From /proc directly: psutil's ``net_connections`` names one process per socket, while an nginx
    socket is held by its master and workers alike, and a killed master's workers each hold their own.
    """
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    inodes[f"socket:[{fields[9]}]"] = port
    found: dict[int, set[int]] = {}
    if not inodes:
        return found
    uid = os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            for fd in os.listdir(fd_dir):
                try:
                    port = inodes.get(os.readlink(f"{fd_dir}/{fd}"))
                except OSError:
                    continue
                if port is not None:
                    found.setdefault(port, set()).add(int(entry))
        except OSError:
            continue
    return found


def tree(pid: int | None) -> set[int]:
    """``pid`` and all its descendants (empty when it is gone)."""
    if not pid:
        return set()
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return set()


def parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def run_processes(paths: RunPaths, ports: set[int]) -> list[Proc]:
    """Every live process of this run directory, whoever started it."""
    by_port = listeners(ports)
    port_of: dict[int, list[int]] = {}
    for port, pids in by_port.items():
        for pid in pids:
            port_of.setdefault(pid, []).append(port)
    root = str(paths.root)
    found: dict[int, Proc] = {}
    for proc in psutil.process_iter(["pid", "ppid", "name", "cmdline", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            pid = proc.info["pid"]
            if pid == os.getpid():
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            kind = _kind(proc, cmdline, root, paths)
            if kind is None and pid not in port_of:
                continue
            found[pid] = Proc(pid, proc.info["ppid"], kind or _name_kind(proc.info["name"]),
                              tuple(sorted(port_of.get(pid, ()))))
        except psutil.Error:
            continue
    # nginx workers name nothing on their command line: they belong with their master.
    for proc in list(found.values()):
        if proc.kind == "nginx":
            for child in tree(proc.pid) - found.keys():
                found[child] = Proc(child, proc.pid, "nginx", ())
    return sorted(found.values(), key=lambda p: p.pid)


def _kind(proc: psutil.Process, cmdline: str, root: str, paths: RunPaths) -> str | None:
    if str(paths.supervisor_conf) in cmdline:
        return "supervisord"
    if str(paths.nginx_conf) in cmdline:
        return "nginx"
    if "asrctl" in cmdline and f"--run-dir {root}" in cmdline:
        return "control"
    if "gunicorn" in cmdline or "app.jobs.runner" in cmdline:  # an instance, or the job runner
        try:
            if proc.environ().get("ASR_CONFIG") == str(paths.config):
                return "instance" if "gunicorn" in cmdline else "control"
        except psutil.Error:
            return None
    return None


def _name_kind(name: str | None) -> str:
    name = name or ""
    if name.startswith("nginx"):
        return "nginx"
    if "gunicorn" in name or name.startswith("asr-"):
        return "instance"
    return "other"


def orphans(paths: RunPaths, ports: set[int], supervisord_pid: int | None,
            include_control: bool = False) -> list[Proc]:
    """Processes of this run directory that the running supervisord (if any) did not start.

    ``include_control``: also an earlier supervisord and its watcher or autoscaler (for ``up`` and
    ``down``; the watcher leaves them alone, an operator may be running ``asrctl`` by hand).
    """
    ours = tree(supervisord_pid) | _ancestors(os.getpid())
    skip = () if include_control else ("supervisord", "control")
    return [p for p in run_processes(paths, ports) if p.pid not in ours and p.kind not in skip]


def _ancestors(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).parents()} | {pid}
    except psutil.Error:
        return {pid}


def retire(procs: list[Proc], timeout: float, log=print) -> list[Proc]:
    """Stop each process gracefully (nginx: QUIT, finishing its requests; gunicorn: TERM, the same),
    wait up to ``timeout``, then KILL what is left. Returns the processes that had to be killed."""
    pids = {p.pid for p in procs}
    for p in procs:
        if p.ppid in pids:
            continue  # its parent stops it (an nginx master its workers, gunicorn's master its worker)
        send_graceful(p)
        log(f"retiring {p.describe()} gracefully")
    resume(procs)
    left = wait_gone([p.pid for p in procs], timeout)
    killed = [p for p in procs if p.pid in left]
    for p in killed:
        kill(p.pid, signal.SIGKILL)
    wait_gone([p.pid for p in killed], 5)
    return killed


def wait_gone(pids: list[int], timeout: float) -> set[int]:
    """Wait until these pids have exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive:
        alive = {pid for pid in alive if _alive(pid)}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def send_graceful(p: Proc) -> None:
    """QUIT for nginx, TERM for the others: both finish the requests they hold, then exit."""
    kill(p.pid, signal.SIGQUIT if p.kind == "nginx" else signal.SIGTERM)


def resume(procs: list[Proc]) -> None:
    for p in procs:
        kill(p.pid, signal.SIGCONT)


def port_free(port: int) -> bool:
    """Whether a loopback listener could bind ``port`` now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
