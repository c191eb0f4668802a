"""scripts/monitor.sh against a real service: all up -> exit 0; an instance down -> exit 2 naming it."""
import io
import subprocess

import pytest
import soundfile

from support import BIN, REPO, bring_up, spoken_wav

pytestmark = pytest.mark.integration


def _monitor(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "monitor.sh"), str(run_dir)],
                          capture_output=True, text=True, timeout=60)


def test_monitor_reports_the_service_and_fails_when_an_instance_is_down(tmp_path):
    service = bring_up(tmp_path, 2)
    try:
        speech = spoken_wav()
        seconds = soundfile.info(io.BytesIO(speech)).duration
        for _ in range(2):
            assert service.transcribe(speech).status_code == 200
        ok = _monitor(service.run_dir)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.rstrip().endswith("OK")
        rows = {line.split()[0]: line.split() for line in ok.stdout.splitlines() if line.startswith("asr-") and line.split()[1].isdigit()}
        assert set(rows) == {f"asr-{p}" for p in service.instance_ports}
        assert all(r[2] == "RUNNING" and r[3] == "yes" for r in rows.values())
        assert sum(int(r[6]) for r in rows.values()) == 2          # requests served
        assert sum(int(r[7]) for r in rows.values()) == 0          # no errors
        assert sum(float(r[8]) for r in rows.values()) == pytest.approx(2 * seconds, abs=0.01)  # audio seconds
        assert "nginx  RUNNING" in ok.stdout and "/ready 200" in ok.stdout

        victim = f"asr-{service.instance_ports[1]}"
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(service.run_dir / "supervisor" / "supervisord.conf"),
                        "stop", victim], check=True, capture_output=True)
        down = _monitor(service.run_dir)
        assert down.returncode == 2
        assert f"DOWN: {victim} is STOPPED" in down.stdout
    finally:
        service.asrctl("down")


def test_monitor_shows_gpu_names_with_spaces_whole(tmp_path):
    """nvidia-smi's CSV names GPUs with spaces ("NVIDIA H100 80GB HBM3"): split on commas only.
    nvidia-smi is faked on PATH (no GPU here); the run directory has no supervisord, so it exits 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 37, 30000, 81559'\necho '1, NVIDIA L4, 5, 500, 23034'\n")
    smi.chmod(0o755)
    run_dir = tmp_path / "run"
    (run_dir / "supervisor").mkdir(parents=True)
    (run_dir / "supervisor" / "supervisord.conf").write_text("")
    (run_dir / "asr.toml").write_text('port = 7860\nhost = "127.0.0.1"\n')
    import os
    result = subprocess.run(["bash", str(REPO / "scripts" / "monitor.sh"), str(run_dir)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                        "SUPERVISORCTL": "/bin/false"})
    assert result.returncode == 2
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("gpu")]
    assert lines[0][:5] == ["gpu0", "NVIDIA", "H100", "80GB", "HBM3"] and lines[0][-3:] == ["memory", "30000/81559", "MiB"]
    assert lines[1][:3] == ["gpu1", "NVIDIA", "L4"] and "5%" in lines[1]
