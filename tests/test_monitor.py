"""scripts/monitor.sh against a real service: all up -> exit 0; an instance down -> exit 2 naming it."""
import subprocess

import pytest

from support import BIN, REPO, bring_up

pytestmark = pytest.mark.integration


def _monitor(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "monitor.sh"), str(run_dir)],
                          capture_output=True, text=True, timeout=60)


def test_monitor_reports_the_service_and_fails_when_an_instance_is_down(tmp_path):
    service = bring_up(tmp_path, 2)
    try:
        jfk = (REPO / "tests" / "data" / "jfk.flac").read_bytes()
        for _ in range(2):
            assert service.transcribe(jfk).status_code == 200
        ok = _monitor(service.run_dir)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.rstrip().endswith("OK")
        rows = {line.split()[0]: line.split() for line in ok.stdout.splitlines() if line.startswith("asr-") and line.split()[1].isdigit()}
        assert set(rows) == {f"asr-{p}" for p in service.instance_ports}
        assert all(r[2] == "RUNNING" and r[3] == "yes" for r in rows.values())
        assert sum(int(r[6]) for r in rows.values()) == 2          # requests served
        assert sum(int(r[7]) for r in rows.values()) == 0          # no errors
        assert sum(float(r[8]) for r in rows.values()) == 22       # audio seconds: 2 x 11 s
        assert "nginx  RUNNING" in ok.stdout and "/ready 200" in ok.stdout

        victim = f"asr-{service.instance_ports[1]}"
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(service.run_dir / "supervisor" / "supervisord.conf"),
                        "stop", victim], check=True, capture_output=True)
        down = _monitor(service.run_dir)
        assert down.returncode == 2
        assert f"DOWN: {victim} is STOPPED" in down.stdout
    finally:
        service.asrctl("down")
