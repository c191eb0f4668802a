"""The benchmark end to end in its quick mode: real asrctl, real instance, real clips, bare engine."""
import csv
import json
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.integration


def test_quick_bench_writes_sane_reports(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--quick", "--rates", "4", "--no-progress",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "served / bare throughput at saturation" in run.stdout

    for name in ("results.json", "runs.csv", "requests.csv", "summary.md", "latency_vs_concurrency.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_vs_concurrency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert {"served c=1", "gunicorn direct c=1", "served c=2", "bare engine, all cores", "served 4 req/s"} <= set(runs)
    for r in runs.values():
        assert r["errors"] == 0 and r["ok"] == r["requests"] > 0, r
        assert r["rtfx"] > 0 and r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
    served = runs["served c=1"]
    assert 0 < served["inference_p50_ms"] < served["p50_ms"] and served["overhead_p50_ms"] > 0

    ratios = result["ratios"]
    for key in ("served_vs_bare_saturation", "instances_scaling", "overhead_p50_ms", "served_vs_bare_cpu_efficiency",
                "overhead_decode_ms", "overhead_nginx_ms", "overhead_gunicorn_flask_ms"):
        assert key in ratios
    assert ratios["served_vs_bare_saturation"] > 0.3   # sane, not the target: the machine may be busy
    assert ratios["instances_scaling"] is None          # quick mode compares no instance counts
    assert set(result["targets"]) == {"served_vs_bare_saturation", "instances_scaling", "overhead_p50_ms"}

    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(r["requests"] for r in result["runs"] if r["kind"] == "served")
    assert all(row["status"] == "200" and float(row["latency_ms"]) > 0 for row in rows)
