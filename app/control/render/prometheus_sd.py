"""Prometheus file-based service discovery for one run directory.

``render_all`` calls ``write_targets`` on every change of the pool (up, scale, reload), so a
Prometheus pointed at ``run/prometheus/*.json`` (``deploy/prometheus/prometheus.yml``) follows the
pool without a restart: it re-reads the files when they change. Two files, one per scrape job:
``instances.json`` (each instance's loopback ``/metrics``) and ``nginx.json`` (nginx's
``/nginx_metrics``). Readable by all (0644): they hold no secret, and Prometheus often runs as its
own user.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from app.config import Settings
from app.control.paths import RunPaths


def instance_targets(paths: RunPaths, instances) -> list[dict]:
    groups = []
    for i in instances:
        labels = {"asr_run": str(paths.root), "asr_instance": i.name, "device": i.placement.device}
        if i.placement.device == "cuda":
            labels["gpu"] = str(i.placement.gpu)
        else:
            labels["cpu_cores"] = i.placement.describe().removeprefix("cpu:")
        groups.append({"targets": [f"127.0.0.1:{i.port}"], "labels": labels})
    return groups


def nginx_targets(settings: Settings, paths: RunPaths) -> list[dict]:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return [{"targets": [f"{host}:{settings.port}"], "labels": {"asr_run": str(paths.root)}}]


def write_targets(settings: Settings, paths: RunPaths, instances) -> None:
    _write(paths.prometheus / "instances.json", instance_targets(paths, instances))
    _write(paths.prometheus / "nginx.json", nginx_targets(settings, paths))


def _write(path: Path, groups: list[dict]) -> None:
    """Atomically: Prometheus must never read half a file (it would drop every target in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
