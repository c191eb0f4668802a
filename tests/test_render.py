"""Rendered configurations are accepted by the real nginx and supervisord."""
import json
import re

import pytest
from supervisor.options import ServerOptions

from app.config import ConfigError, load_settings
from app.control.act import nginx
from app.control.plan.placement import GpuInfo
from app.control.render.files import plan_instances, render_all


@pytest.fixture
def settings(tmp_path):
    return load_settings(env={}, overrides={
        "run_dir": str(tmp_path / "run"), "instances": 3, "weights": "2,1,1", "base_port": 19100,
        "port": 17860, "host": "127.0.0.1", "max_audio_seconds": 120,
    })


def test_nginx_accepts_the_rendered_config(settings):
    paths = render_all(settings, plan_instances(settings, gpus=[]))
    nginx.check_config(paths)  # raises with nginx's message if refused
    text = paths.nginx_conf.read_text()
    # max_conns: the queue (max_queue 8) and the live streams (max_streams 4) an instance holds.
    servers = re.findall(r"server 127\.0\.0\.1:(\d+) weight=(\d+) max_conns=12 max_fails=3 fail_timeout=10s;", text)
    assert servers == [("19100", "2"), ("19101", "1"), ("19102", "1")]
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text
    assert "proxy_next_upstream_tries 3;" in text
    assert f"client_max_body_size {settings.max_upload_bytes};" in text
    assert f"proxy_read_timeout {settings.request_timeout_seconds}s;" in text
    assert "listen 127.0.0.1:17860 reuseport;" in text
    # The live-transcription WebSocket: upgraded, unbuffered, retried elsewhere only at the handshake
    # (never non_idempotent), and read for longer than the instance lets a stream stay quiet.
    realtime = text.split("location = /v1/realtime {", 1)[1].split("\n        }", 1)[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in realtime and "proxy_buffering off;" in realtime
    assert "proxy_set_header Connection $asr_connection_upgrade;" in realtime
    assert "proxy_next_upstream error timeout http_502 http_503;" in realtime
    assert f"proxy_read_timeout {int(settings.stream_idle_seconds) + 30}s;" in realtime
    assert f"pid {paths.nginx_pid};" in text
    assert "zone asr_instances" in text           # max_conns and failures shared by all workers
    assert "Bearer" not in text and "limit_req " not in text  # both off unless configured
    assert paths.nginx_conf.stat().st_mode & 0o077 == 0      # may hold API keys: owner only


def test_api_keys_and_rate_limit_render_and_pass_nginx_t(tmp_path, settings):
    keys = tmp_path / "keys"
    keys.write_text("# operators' keys\nk3y-0123456789abcdef\n\nsecond.key_0123456789/+=\n")
    keyed = load_settings(env={}, overrides={**vars(settings), "api_keys_file": str(keys),
                                             "rate_limit_per_second": 5, "rate_limit_burst": 7})
    paths = render_all(keyed, plan_instances(keyed, gpus=[]))
    nginx.check_config(paths)
    text = paths.nginx_conf.read_text()
    assert '"Bearer k3y-0123456789abcdef" 1;' in text and '"Bearer second.key_0123456789/+=" 1;' in text
    assert "rate=300r/m" in text and "burst=7 nodelay" in text
    realtime = text.split("location = /v1/realtime {", 1)[1].split("\n        }", 1)[0]
    assert "return 401;" in realtime and "burst=7 nodelay" in realtime   # keys and limits as /asr
    keys.write_text('bad key"; return 200;\n')
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_settings(env={}, overrides={**vars(settings), "api_keys_file": str(keys)}).api_keys()


def test_nginx_check_refuses_a_broken_config(settings):
    paths = render_all(settings, plan_instances(settings, gpus=[]))
    paths.nginx_conf.write_text(paths.nginx_conf.read_text().replace("keepalive 32;", "keepalive;"))
    with pytest.raises(nginx.NginxConfigError, match="keepalive"):
        nginx.check_config(paths)


def test_supervisord_accepts_the_rendered_config(settings):
    paths = render_all(settings, plan_instances(settings, gpus=[]))
    options = ServerOptions()
    options.realize(args=["-c", str(paths.supervisor_conf)])  # supervisord's own parser; exits on error
    programs = {g.name: g.process_configs[0] for g in options.process_group_configs}
    assert set(programs) == {"asr-19100", "asr-19101", "asr-19102", "nginx", "jobs", "watcher"}
    first = programs["asr-19100"]
    assert first.environment["ASR_INSTANCE_PORT"] == "19100"
    assert first.environment["ASR_CONFIG"] == str(paths.config)
    assert first.environment["CUDA_VISIBLE_DEVICES"] == ""
    assert first.stopsignal == 15 and first.stopwaitsecs == settings.stop_wait_seconds
    assert first.stopwaitsecs > settings.graceful_timeout_seconds > settings.max_inference_seconds
    assert first.autorestart and first.stdout_logfile_backups == 5
    assert options.server_configs[0]["chmod"] == 0o700
    assert programs["nginx"].priority > first.priority
    runner = programs["jobs"]  # the job runner: after the instances, stopped gracefully, reading the same settings
    assert runner.priority > first.priority and runner.stopwaitsecs == settings.stop_wait_seconds
    assert runner.environment["ASR_CONFIG"] == str(paths.config)
    assert f'run_dir = "{paths.root}"' in paths.config.read_text()  # absolute: the jobs database is found from it
    assert json.loads((paths.root / "upstream.json").read_text()) == [
        {"name": f"asr-{port}", "port": port} for port in (19100, 19101, 19102)]
    assert f"client_max_body_size {settings.job_max_upload_bytes};" in paths.nginx_conf.read_text()
    assert programs["watcher"].priority > programs["nginx"].priority  # started after, stopped before


def test_gpu_instances_get_their_own_visible_device(settings):
    gpus = [GpuInfo(0, "H100", 80_000, 20_000), GpuInfo(1, "H100", 80_000, 60_000)]
    instances = plan_instances(settings, gpus)
    paths = render_all(settings, instances)
    env = instances[0].environment(paths)
    assert env["ASR_DEVICE"] == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "1"
    # Without a UUID the index is NVML's, which is PCI bus order: CUDA must number GPUs the same way.
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "ASR_CPU_CORES" not in env
    # With NVML's UUID the pin is unambiguous whatever the numbering.
    gpus = [GpuInfo(0, "H100", 80_000, 20_000, uuid="GPU-aaaa"), GpuInfo(1, "L4", 24_000, 20_000, uuid="GPU-bbbb")]
    env = plan_instances(settings, gpus)[0].environment(paths)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa" and env["ASR_GPU_UUID"] == "GPU-aaaa"


def test_rerender_with_fewer_instances_removes_their_programs(settings):
    render_all(settings, plan_instances(settings, gpus=[]))
    smaller = load_settings(env={}, overrides={**vars(settings), "instances": 1})
    paths = render_all(smaller, plan_instances(smaller, gpus=[]))
    assert sorted(p.name for p in paths.programs.glob("*.conf")) == ["asr-19100.conf", "jobs.conf", "nginx.conf",
                                                                     "watcher.conf"]
    assert "19101" not in paths.nginx_conf.read_text()


def test_without_operator_weights_nginx_weights_follow_capacity(settings):
    gpus = [GpuInfo(0, "H100", 80_000, 70_000), GpuInfo(1, "L4", 24_000, 20_000)]
    unweighted = load_settings(env={}, overrides={**vars(settings), "weights": "", "instances": 2, "gpu_map": "0,1"})
    assert [i.weight for i in plan_instances(unweighted, gpus)] == [10, 3]  # by the cards' memory
    assert [i.weight for i in plan_instances(settings, gpus)] == [2, 1, 1]  # the operator's, as given
