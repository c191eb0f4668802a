"""The pool of instances a run directory holds, and which of them nginx sends traffic to.

Kept in ``run/pool.json`` because the pool changes after ``asrctl up``: scaling adds instances on the
next free port and drains the least loaded, so ports need not stay contiguous, and a draining instance
still has its program while it is already out of nginx's upstream.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from app.control.paths import RunPaths
from app.control.plan.placement import Placement
from app.control.render.files import InstanceSpec, instance_name


@dataclass
class Pool:
    instances: list[InstanceSpec]
    draining: set[str] = field(default_factory=set)   # leaving: out of nginx, finishing its requests
    starting: set[str] = field(default_factory=set)   # joining: in supervisord, not in nginx until ready
    # Orphans of a killed supervisord still serving on their old ports: in nginx's upstream (they have
    # no program) until the instances that replace them are ready.
    adopted: list[InstanceSpec] = field(default_factory=list)
    # Out of nginx because the liveness watcher is restarting them; kept in run/unhealthy.json, which
    # only the watcher writes, so that other writers of pool.json cannot undo it.
    unhealthy: set[str] = field(default_factory=set)

    @property
    def upstream(self) -> list[InstanceSpec]:
        out = self.draining | self.starting | self.unhealthy
        return [i for i in self.instances if i.name not in out] + self.adopted

    def get(self, name: str) -> InstanceSpec:
        return next(i for i in self.instances if i.name == name)

    def next_port(self, base_port: int, avoid: set[int] = frozenset()) -> int:
        used = {i.port for i in self.instances + self.adopted} | set(avoid)
        port = base_port
        while port in used:
            port += 1
        return port

    def add(self, port: int, weight: int, placement: Placement) -> InstanceSpec:
        spec = InstanceSpec(instance_name(port), port, weight, placement)
        self.instances.append(spec)
        return spec

    def remove(self, name: str) -> None:
        self.instances = [i for i in self.instances if i.name != name]
        self.draining.discard(name)
        self.starting.discard(name)

    def with_weights(self, weights: list[int]) -> None:
        self.instances = [InstanceSpec(i.name, i.port, w, i.placement) for i, w in zip(self.instances, weights)]

    # -- persistence --

    @classmethod
    def load(cls, paths: RunPaths) -> "Pool | None":
        path = paths.root / "pool.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        instances = [_spec(i) for i in data["instances"]]
        adopted = [_spec(i) for i in data.get("adopted", ())]
        return cls(instances, set(data.get("draining", ())), set(data.get("starting", ())), adopted,
                   load_unhealthy(paths))

    def save(self, paths: RunPaths) -> None:
        data = {
            "instances": [_record(i) for i in self.instances],
            "draining": sorted(self.draining),
            "starting": sorted(self.starting),
            "adopted": [_record(i) for i in self.adopted],
        }
        _write_json(paths.root / "pool.json", data)


def load_unhealthy(paths: RunPaths) -> set[str]:
    try:
        return set(json.loads((paths.root / "unhealthy.json").read_text()))
    except (OSError, ValueError):
        return set()


def save_unhealthy(paths: RunPaths, names: set[str]) -> None:
    _write_json(paths.root / "unhealthy.json", sorted(names))


def _spec(i: dict) -> InstanceSpec:
    return InstanceSpec(i["name"], i["port"], i["weight"],
                        Placement(i["device"], i.get("gpu"), tuple(i.get("cpu_cores", ())), i.get("gpu_uuid", ""),
                                  tuple(i.get("more_gpus", ())), tuple(i.get("more_gpu_uuids", ()))))


def _record(i: InstanceSpec) -> dict:
    return {"name": i.name, "port": i.port, "weight": i.weight, "device": i.placement.device,
            "gpu": i.placement.gpu, "gpu_uuid": i.placement.gpu_uuid, "cpu_cores": list(i.placement.cpu_cores),
            "more_gpus": list(i.placement.more_gpus), "more_gpu_uuids": list(i.placement.more_gpu_uuids)}


def _write_json(path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
