"""Which processes belong to one run directory, and signals that reach only those.

supervisord knows the processes it started; this module finds the ones it does not: nginx workers a
killed master left behind, and instances and nginx that outlived a killed supervisord. Ownership is by
identity, never by name or port: a process belongs to a run when its environment holds
``ASRCTL_RUN=<the exact resolved run directory>`` (asrctl starts supervisord with it, and supervisord
sets it for every program), when it is an nginx holding this run's identity file open (nginx overwrites
its environment with its process title; master and workers keep the file from the rendered
configuration open), or when it descends from such a process. A port held by anything else is not
ours to take: callers refuse (``PortHeld``). Every signal goes through a pidfd opened after the
process's start time and identity were checked again, so a pid reused since the scan is never hit.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from app.control.paths import RunPaths

IDENTITY_ENV = "ASRCTL_RUN"


class PortHeld(RuntimeError):
    """A port this run needs is held by a process that is not part of it."""


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    kind: str      # nginx | instance | supervisord | control | check (nginx -t) | other
    ports: tuple[int, ...]
    started: int = 0   # start time in clock ticks after boot (/proc/PID/stat): pid + start = one process
    program: str = ""
    run: str = ""      # the run directory whose identity it carried when found; checked again before a signal

    def describe(self) -> str:
        where = f" on port {', '.join(map(str, self.ports))}" if self.ports else ""
        return f"{self.kind} pid {self.pid}{where}"


def identity(paths: RunPaths) -> dict[str, str]:
    """The environment that marks a process as this run's (for supervisord and what it starts)."""
    return {IDENTITY_ENV: str(paths.root)}


# -- reading /proc ----------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat; None when it is gone. The command name in
    parentheses may hold spaces and parentheses itself: fields are counted after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[1]), int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _holds(pid: int, path: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def _is_nginx(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("nginx")
    except OSError:
        return False


def carries_identity(pid: int, paths: RunPaths) -> bool:
    """This process itself carries the run's identity (exact comparison, no prefix or substring)."""
    if _environ(pid).get(IDENTITY_ENV) == str(paths.root):
        return True
    return _is_nginx(pid) and _holds(pid, str(paths.nginx_identity))


def program_of(pid: int) -> str:
    """What an operator would recognise a process by: its command line, shortened."""
    text = " ".join(_cmdline(pid))
    if not text:
        try:
            text = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            text = "?"
    return text if len(text) <= 120 else text[:117] + "..."


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def listeners(ports: set[int]) -> dict[int, set[int]]:
    """Port -> every pid holding a socket that listens on it (whoever's: a port is never ownership).

    From /proc directly: psutil's ``net_connections`` names one process per socket, while an nginx
    socket is held by its master and workers alike, and a killed master's workers each hold their own.
    """
    inodes = _listening_inodes(ports)
    found: dict[int, set[int]] = {}
    if not inodes:
        return found
    for pid in _all_pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                port = inodes.get(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if port is not None:
                found.setdefault(port, set()).add(pid)
    return found


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrates_queued_connections() -> bool | None:
    """Whether the kernel moves the connections queued on a closing listening socket to another
    socket of the same port (``net.ipv4.tcp_migrate_req``, Linux 5.14 and later) instead of resetting
    them; None where the setting does not exist (an older kernel) or cannot be read."""
    try:
        return MIGRATE_REQ.read_text().strip() != "0"
    except OSError:
        return None


def listening_ports(ports: set[int]) -> set[int]:
    """Which of these ports something listens on (also a process whose pid this user cannot see)."""
    return set(_listening_inodes(ports).values())


def _listening_inodes(ports: set[int]) -> dict[str, int]:
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
    return inodes


def tree(pid: int | None) -> set[int]:
    """``pid`` and all its descendants (empty when it is gone)."""
    if not pid or _stat(pid) is None:
        return set()
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        stat = _stat(other)
        if stat:
            children.setdefault(stat[0], []).append(other)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def parent_of(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[0] if stat else None


# -- ownership --------------------------------------------------------------------------------------

def run_processes(paths: RunPaths, ports: set[int] = frozenset()) -> list[Proc]:
    """Every live process of this run directory, whoever started it (``ports``: to say which of them
    each listens on; they decide nothing)."""
    stats = {pid: s for pid in _all_pids() if (s := _stat(pid))}
    me = os.getpid()
    owned = {pid for pid in stats if carries_identity(pid, paths)}
    # Descent: what our processes started is ours, whatever it did to its environment.
    children: dict[int, list[int]] = {}
    for pid, (ppid, _start) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(owned)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in owned:
                owned.add(child)
                todo.append(child)
    port_of: dict[int, list[int]] = {}
    for port, pids in listeners(set(ports)).items():
        for pid in pids:
            port_of.setdefault(pid, []).append(port)
    found = []
    for pid in sorted(owned - {me}):
        ppid, started = stats[pid]
        cmdline = _cmdline(pid)
        found.append(Proc(pid, ppid, _kind(pid, cmdline), tuple(sorted(port_of.get(pid, ()))), started,
                          program_of(pid), str(paths.root)))
    return found


def _kind(pid: int, cmdline: list[str]) -> str:
    """What an owned process is, for the order of a stop and for messages (never for ownership)."""
    if _is_nginx(pid):
        # `nginx -t` (asrctl's configuration test) reads the same file, serves nothing, exits by itself.
        return "check" if "-t" in cmdline else "nginx"
    names = [os.path.basename(a) for a in cmdline[:2]]
    if "supervisord" in names:
        return "supervisord"
    if "gunicorn" in names:
        return "instance"
    if "asrctl" in names or "app.jobs.runner" in cmdline:
        return "control"
    return "other"


def orphans(paths: RunPaths, ports: set[int], supervisord_pid: int | None,
            include_control: bool = False) -> list[Proc]:
    """Processes of this run directory that the running supervisord (if any) did not start.

    ``include_control``: also an earlier supervisord and its watcher or autoscaler (for ``up`` and
    ``down``; the watcher leaves them alone, an operator may be running ``asrctl`` by hand).
    """
    found = run_processes(paths, ports)
    # The tree after the scan: a process supervisord started while the scan ran is in it.
    ours = tree(supervisord_pid) | _ancestors(os.getpid())
    skip = ("check",) if include_control else ("check", "supervisord", "control")
    return [p for p in found if p.pid not in ours and p.kind not in skip]


def foreign_holders(paths: RunPaths, ports: set[int]) -> dict[int, list[int]]:
    """Port -> pids listening on it that are not part of this run (an empty list: a listener whose
    process this user cannot see, another user's)."""
    listening = listening_ports(set(ports))
    if not listening:
        return {}
    by_port = listeners(listening)
    ours = {p.pid for p in run_processes(paths)}
    found = {}
    for port in sorted(listening):
        pids = by_port.get(port, set())
        others = sorted(pids - ours)
        if others or not pids:
            found[port] = others
    return found


def refuse_foreign(paths: RunPaths, ports: set[int], action: str) -> None:
    """Raise ``PortHeld`` (one sentence naming the pid and program) when a port this run needs is held
    by anything that is not part of it; signals nothing."""
    held = foreign_holders(paths, ports)
    if not held:
        return
    port, pids = next(iter(held.items()))
    who = (f"pid {pids[0]} ({program_of(pids[0])})" if pids
           else "a process of another user")
    more = f" (and {len(held) - 1} more port(s) of this run are held too)" if len(held) > 1 else ""
    raise PortHeld(f"port {port} is held by {who}, which is not part of {paths.root}: {action} refuses to "
                   f"touch it; stop it yourself or choose other ports (--port, --base-port){more}")


def _ancestors(pid: int) -> set[int]:
    found = {pid}
    while (parent := parent_of(pid)) and parent not in found:
        found.add(parent)
        pid = parent
    return found


# -- signals ----------------------------------------------------------------------------------------

def send(p: Proc, sig: int) -> bool:
    """Signal ``p`` only if its pid is still that process of that run: a pidfd is opened first, then
    its start time and its identity are checked again; the signal goes through the pidfd, so a pid
    reused in between is never hit. Returns whether it was sent."""
    if not p.run:
        return False  # found by no identity: nothing proves it is ours
    try:
        fd = os.pidfd_open(p.pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if start_time(p.pid) != p.started:
            return False  # the pid now names another process
        if not _still_ours(p, RunPaths(Path(p.run))):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _still_ours(p: Proc, paths: RunPaths) -> bool:
    """The identity a scan found is still there (a descendant by its line back to an owned process)."""
    pid = p.pid
    for _ in range(64):
        if carries_identity(pid, paths):
            return True
        parent = parent_of(pid)
        if not parent or parent == 1:
            return False
        pid = parent
    return False


def retire(procs: list[Proc], timeout: float, log=print) -> list[Proc]:
    """Stop each process gracefully (nginx: QUIT, finishing its requests; gunicorn: TERM, the same),
    wait up to ``timeout``, then KILL what is left. Returns the processes this stopped: signalled
    (or their parent was) and gone now; one that had exited by itself, or whose pid now names another
    process, is not counted."""
    pids = {p.pid for p in procs}
    signalled = set()
    for p in procs:
        if p.ppid in pids:
            continue  # its parent stops it (an nginx master its workers, gunicorn's master its worker)
        if send_graceful(p):
            signalled.add(p.pid)
            log(f"retiring {p.describe()} gracefully")
    resume(procs)
    left = alive(procs, timeout)
    for p in left:
        if send(p, signal.SIGKILL):
            signalled.add(p.pid)
    still = alive(left, 5)
    return [p for p in procs if p not in still and (p.pid in signalled or p.ppid in signalled)]


def alive(procs: list[Proc], timeout: float = 0) -> list[Proc]:
    """Wait up to ``timeout`` until these processes have exited; return those still running (a pid
    now naming another process counts as exited)."""
    deadline = time.monotonic() + timeout
    left = list(procs)
    while left:
        left = [p for p in left if start_time(p.pid) == p.started and not _zombie(p.pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return left


def wait_gone(pids: list[int], timeout: float) -> set[int]:
    """Wait until these pids have exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        left = {pid for pid in left if _stat(pid) is not None and not _zombie(pid)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return left


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def send_graceful(p: Proc) -> bool:
    """QUIT for nginx, TERM for the others: both finish the requests they hold, then exit."""
    return send(p, signal.SIGQUIT if p.kind == "nginx" else signal.SIGTERM)


def resume(procs: list[Proc]) -> None:
    for p in procs:
        send(p, signal.SIGCONT)


def port_free(port: int) -> bool:
    """Whether a loopback listener could bind ``port`` now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False

def free_ports(count: int, spare: int = 8) -> list[int]:
    """Free consecutive loopback ports, base..base+count-1, for a pool the tests or the benchmark bring
    up, with ``spare`` more free after them for scaling up.

    Drawn below the kernel's ephemeral range (``ip_local_port_range``), where no outgoing connection
    takes its source port: a port drawn inside it can be taken by any client socket on the host
    between the draw and the bind (as the instance ports 7861.. of a real deployment never are)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low, 12000) - count - spare
    for _ in range(200):
        base = random.randrange(10000, top)
        if all(port_free(base + i) for i in range(count + spare)):
            return [base + i for i in range(count)]
    raise RuntimeError("no free range of loopback ports")
