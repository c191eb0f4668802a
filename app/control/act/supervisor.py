"""supervisord actuation over its XML-RPC interface (the unix socket in the run directory)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from app.control.paths import RunPaths
from app.control.act.processes import identity


class SupervisorError(RuntimeError):
    pass


class SupervisorClient:
    def __init__(self, socket: Path):
        transport = SupervisorTransport(None, None, f"unix://{socket}")
        # The URL's host is ignored: the transport talks to the unix socket.
        self._rpc = xmlrpc.client.ServerProxy("http://localhost", transport=transport)
        self.socket = socket

    @property
    def api(self):
        return self._rpc.supervisor

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self.api.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def processes(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.api.getAllProcessInfo()}

    def process(self, name: str) -> dict:
        return self.api.getProcessInfo(name)

    def apply_config(self) -> dict[str, list[str]]:
        """Re-read the program files and act like ``supervisorctl update``: only what changed moves."""
        added, changed, removed = self.api.reloadConfig()[0]
        for name in removed + changed:
            self.stop(name)
            self.api.removeProcessGroup(name)
        for name in changed + added:
            self.api.addProcessGroup(name)
        return {"added": added, "changed": changed, "removed": removed}

    def start(self, name: str) -> None:
        try:
            self.api.startProcess(name, True)
        except xmlrpc.client.Fault as e:
            if "ALREADY_STARTED" not in e.faultString:
                raise

    def stop(self, name: str) -> None:
        """Graceful stop; blocks until the process has exited (supervisord escalates after stopwaitsecs)."""
        try:
            self.api.stopProcess(name, True)
        except xmlrpc.client.Fault as e:
            if "NOT_RUNNING" not in e.faultString:
                raise

    def signal(self, name: str, signal: str) -> None:
        self.api.signalProcess(name, signal)

    def shutdown(self, timeout: float = 30) -> None:
        self.api.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.socket.exists():
            time.sleep(0.1)


def start_supervisord(paths: RunPaths, timeout: float = 20) -> SupervisorClient:
    """Start supervisord (it daemonizes) and wait until its socket answers."""
    binary = Path(sys.executable).parent / "supervisord"
    # supervisord itself carries the run's identity too (its configuration gives it to its programs).
    result = subprocess.run([str(binary), "-c", str(paths.supervisor_conf)], capture_output=True, text=True,
                            env={**os.environ, **identity(paths)})
    if result.returncode != 0:
        raise SupervisorError(f"supervisord did not start: {(result.stderr or result.stdout).strip()}")
    client = SupervisorClient(paths.socket)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.running():
            return client
        time.sleep(0.1)
    raise SupervisorError(f"supervisord did not answer on {paths.socket} within {timeout:g} s")
