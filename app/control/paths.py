"""Everything a run writes lives under its run directory; this names each path once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def at(cls, run_dir: str | Path) -> "RunPaths":
        return cls(Path(run_dir).resolve())

    config = property(lambda self: self.root / "asr.toml")
    supervisor_conf = property(lambda self: self.root / "supervisor" / "supervisord.conf")
    programs = property(lambda self: self.root / "supervisor" / "programs")
    socket = property(lambda self: self.root / "supervisor.sock")
    supervisord_pid = property(lambda self: self.root / "supervisord.pid")
    logs = property(lambda self: self.root / "logs")
    nginx_prefix = property(lambda self: self.root / "nginx")
    nginx_conf = property(lambda self: self.root / "nginx" / "nginx.conf")
    nginx_temp = property(lambda self: self.root / "nginx" / "tmp")
    nginx_pid = property(lambda self: self.root / "nginx.pid")
    nginx_generation = property(lambda self: self.root / "nginx" / "generation")
    # Held open by nginx's master and every worker: how asrctl knows this run's nginx (app/control/act/processes.py).
    nginx_identity = property(lambda self: self.root / "nginx" / "identity.log")
    lock = property(lambda self: self.root / "control.lock")
    prometheus = property(lambda self: self.root / "prometheus")  # file_sd targets (app.control.render.prometheus_sd)

    def program_file(self, name: str) -> Path:
        return self.programs / f"{name}.conf"

    def make_dirs(self) -> None:
        for d in (self.programs, self.logs, self.nginx_temp):
            d.mkdir(parents=True, exist_ok=True)
