"""The rendered Kubernetes manifests as `podman kube play` can run them on one host (scripts/image.sh).

Reads `kubectl kustomize` output on stdin, writes YAML on stdout: only the kinds podman plays
(Deployment, ConfigMap, PersistentVolumeClaim); the rest (Service, HPA, PDB, Ingress, NetworkPolicy,
the monitoring resources, Namespace) and the probes, which podman turns into health checks that call
curl, stay covered by tests/test_k8s.py's offline validation. The image is the one just built, and
the container's port is published on a loopback port, since no Service reaches the pod here.
"""
import argparse
import sys

import yaml

PLAYED = ("Deployment", "ConfigMap", "PersistentVolumeClaim")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def for_podman(documents: list[dict], image: str, host_port: int) -> list[dict]:
    played = [d for d in documents if d and d.get("kind") in PLAYED]
    for doc in played:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            container["image"] = image
            for probe in PROBES:
                container.pop(probe, None)
            for port in container.get("ports", []):
                port.update(hostIP="127.0.0.1", hostPort=host_port)
    return played


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--host-port", type=int, required=True)
    args = parser.parse_args(argv)
    played = for_podman(list(yaml.safe_load_all(sys.stdin)), args.image, args.host_port)
    if not any(d["kind"] == "Deployment" for d in played):
        print("podman_kube: no Deployment in the input", file=sys.stderr)
        return 1
    yaml.safe_dump_all(played, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
