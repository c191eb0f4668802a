"""The monitoring set-up with the real Prometheus and promtool from Debian.

promtool checks deploy/prometheus/ (configuration, rules, a unit test for every alert) and the
Grafana dashboard's expressions; the PrometheusRule in deploy/k8s carries the same rules. Then a real
Prometheus on loopback, configured by deploy/prometheus/prometheus.yml as shipped (only the scrape
interval shortened), follows asrctl's file_sd targets while a real pool scales 1 -> 2, and every
metric the dashboard and the alerts name is one the service really exports.
"""
import json
import re
import shutil
import subprocess
import time
import types

import pytest
import requests
import yaml

from support import REPO, bring_up, free_ports, spoken_wav

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "asr.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "asr.rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "asr-service.json"
PROMETHEUS_RULE = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if not exe:
        pytest.fail("promtool is needed: scripts/test.sh installs it (apt: prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def alerts(path=RULES) -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "alert" in r}


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once label matchers, ranges, grouping
    labels, functions and keywords are taken out."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if n not in ("and", "or", "unless", "bool", "offset") and not n[0].isdigit()}


# promtool, offline --------------------------------------------------------------------------------

def test_rules_pass_promtool_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_every_alert_has_a_promtool_test_that_fires_it_and_one_that_does_not():
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fired == set(alerts()), set(alerts()) ^ fired
    assert quiet == set(alerts()) - {"AsrNginxDown"}, set(alerts()) ^ quiet  # (nginx: down or not, no middle)


def test_the_alerts_the_issue_asks_for():
    assert {"AsrInstanceDown", "AsrInstanceNotReady", "AsrHighErrorRatio", "AsrHighLatencyP95",
            "AsrQueueSaturated", "AsrOverloaded503", "AsrModelLoadFailed", "AsrGpuMemoryHigh",
            "AsrAutoscalerAtMax"} <= set(alerts())
    assert "0.9" in alerts()["AsrGpuMemoryHigh"]["expr"]


def test_config_passes_promtool_check(tmp_path):
    deploy = tmp_path / "deploy" / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, deploy)
    done = promtool("check", "config", str(deploy / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_dashboard_expressions_parse(tmp_path):
    exprs = dashboard_expressions()
    assert len(exprs) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for topic in ("throughput", "latency", "queue", "error", "instances", "gpu"):
        assert topic in titles


def test_prometheus_rule_carries_the_same_alerts(tmp_path):
    k8s = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert k8s["kind"] == "PrometheusRule"
    host = alerts()
    del host["AsrNginxDown"]  # in a cluster the Ingress controller is the entry
    path = tmp_path / "k8s.rules.yml"
    path.write_text(yaml.safe_dump(k8s["spec"]))
    assert alerts(path) == host
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_are_read_from_expressions():
    assert metric_names('sum by (job) (rate(asr_requests_total{status="503"}[5m])) / sum(asr_queue_capacity) > 0.9') \
        == {"asr_requests_total", "asr_queue_capacity"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}


# A real Prometheus following a real pool ------------------------------------------------------------

def gpu_metric_names(monkeypatch) -> set[str]:
    """What a GPU instance adds, from app.runtime.metrics with NVML faked (no GPU here: the hardware boundary)."""
    from app.runtime import metrics
    from fake_nvml import FakeGpu, FakeNvml

    h200 = FakeNvml([FakeGpu("NVIDIA H200", 143_771, used_mb=1_000)]).install(monkeypatch).gpus[0]
    instance = types.SimpleNamespace(gpu_identity=lambda: h200.uuid, gpu={"uuid": h200.uuid, "name": h200.name,
                                                                          "index": 0, "memory_mb": 900})
    return {family.name for family in metrics._GpuReader(instance).collect()}


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def wait_for(self, what, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            result = what()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)


@pytest.mark.integration
def test_prometheus_follows_the_pool_as_it_scales(tmp_path, monkeypatch):
    svc = bring_up(tmp_path, 1, "--cpu-threads", "1", env={"ASR_MAX_INSTANCES": "2"})
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is needed: scripts/test.sh installs it (apt: prometheus)"
    deploy = tmp_path / "deploy" / "prometheus"  # beside the run directory, as in a checkout
    shutil.copytree(PROMETHEUS_DIR, deploy)
    config = yaml.safe_load((deploy / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (deploy / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    server = subprocess.Popen([prometheus_bin, f"--config.file={deploy / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        assert prom.wait_for(prom.ready, 60), (tmp_path / "prometheus.log").read_text()[-2000:]
        first = prom.wait_for(lambda: _up(prom, "asr") == {svc.instance_ports[0]: "1"} or None)
        assert first, (_up(prom, "asr"), (tmp_path / "prometheus.log").read_text()[-2000:])
        assert prom.wait_for(lambda: _up(prom, "asr-nginx") == {svc.port: "1"} or None), _up(prom, "asr-nginx")
        requests.post(f"{svc.url}/asr", files={"audio_file": ("speech.wav", spoken_wav())}, timeout=120).raise_for_status()

        svc.asrctl("scale", "2")
        ports = {i["port"] for i in json.loads((svc.run_dir / "pool.json").read_text())["instances"]}
        assert len(ports) == 2
        both = prom.wait_for(lambda: _up(prom, "asr") == {p: "1" for p in ports} or None)
        assert both, _up(prom, "asr")
        ready = prom.wait_for(lambda: len(prom.query('asr_instance_ready{job="asr"} == 1')) == 2 or None)
        assert ready, prom.query("asr_instance_ready")
        series = prom.query('asr_queue_capacity{job="asr"}')
        labels = {s["metric"]["asr_instance"]: s["metric"] for s in series}
        assert set(labels) == {f"asr-{p}" for p in ports}
        assert all(m["device"] == "cpu" and m["cpu_cores"] and m["asr_run"] == str(svc.run_dir.resolve())
                   for m in labels.values())
        # The pool is at its maximum (2): the autoscaler-at-max condition's first half holds for real.
        assert prom.query('count by (job) (asr_instance_ready == 1) >= on (job) max by (job) (asr_autoscale_max_instances)')

        # Every metric the dashboard and the alerts name exists (GPU metrics on GPU instances only).
        exported = {v for v in requests.get(f"{prom.url}/api/v1/label/__name__/values", timeout=10).json()["data"]}
        exported |= gpu_metric_names(monkeypatch)
        exported |= {"up"}
        named = set().union(*(metric_names(e) for e in dashboard_expressions() + [a["expr"] for a in alerts().values()]))
        assert named - exported == set(), sorted(named - exported)
        for expr in dashboard_expressions():  # and each evaluates on the live server
            prom.query(expr)
    finally:
        server.terminate()
        server.wait(timeout=30)
        svc.asrctl("down")


def _up(prom: Prometheus, job: str) -> dict[int, str]:
    return {int(s["metric"]["instance"].rsplit(":", 1)[1]) if ":" in s["metric"]["instance"]
            else int(s["metric"]["instance"].removeprefix("asr-")): s["value"][1]
            for s in prom.query(f'up{{job="{job}"}}')}
