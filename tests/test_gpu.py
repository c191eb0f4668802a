"""GPU hosts through a fake NVML at the pynvml boundary (tests/fake_nvml.py), driving the real code:
``app.hardware.nvml``, placement, rendering, the autoscaler, an instance's /health and /metrics, and ``asrctl
status``. Mixed GPUs, vGPU (utilization NotSupported), MIG mode and MIG slices, a GPU lost mid-run, a
full GPU, a hung NVML, no driver and a broken driver, processes whose memory NVML cannot tell; CUDA's
own answer through a fake driver; an instance's memory measured after its warm-up; and what each
engine asks its library for on cuda."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from app.hardware import nvml
from app.config import ConfigError, load_settings
from app.control.act.actuator import measured_memory_mb
from app.control.daemons.autoscaler import Autoscaler
from app.control.plan.placement import Placement, place_one
from app.control.plan.pool import Pool
from app.control.render.files import InstanceSpec, plan_instances
from fake_nvml import FakeGpu, FakeNvml, cuda_sees


def mixed() -> list[FakeGpu]:
    """An 80 GB card with 30 GB in use and a 24 GB card nearly empty: different memory, different order."""
    return [FakeGpu("NVIDIA H100 80GB HBM3", 81_559, used_mb=30_000, util=40),
            FakeGpu("NVIDIA L4", 23_034, used_mb=500, util=5)]


def test_without_a_driver_nvml_gives_no_gpus_and_no_traceback(caplog):
    nvml.reset()
    caplog.set_level(logging.INFO, "asr.gpu")
    found = nvml.inventory()          # the real pynvml on this host: no libnvidia-ml
    assert found.gpus == [] and found.error
    assert nvml.gpu("0") is None and nvml.process_memory_mb("0", os.getpid()) is None
    assert sum("NVML unavailable" in r.message for r in caplog.records) == 1
    nvml.inventory()
    assert sum("NVML unavailable" in r.message for r in caplog.records) == 1   # logged once, not per call


def test_mixed_gpus_are_read_placed_weighted_and_pinned_by_uuid(monkeypatch, tmp_path):
    fake = FakeNvml(mixed()).install(monkeypatch)
    found = nvml.detect_gpus()
    assert [(g.index, g.name, g.memory_total_mb, g.memory_free_mb, g.utilization_pct) for g in found] == [
        (0, "NVIDIA H100 80GB HBM3", 81_559, 51_559, 40.0), (1, "NVIDIA L4", 23_034, 22_534, 5.0)]
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "instances": 3, "device": "cuda",
                                                "instance_gpu_memory_mb": 20_000})
    specs = plan_instances(settings, found)
    # 51.5 GB free on the H100 takes two 20 GB instances; then the L4's 22.5 GB beats the 11.5 GB left.
    assert [s.placement.gpu for s in specs] == [0, 0, 1]
    assert [s.weight for s in specs] == [10, 10, 3]                  # by the cards' memory
    from app.control.paths import RunPaths
    env = specs[2].environment(RunPaths.at(settings.run_dir))
    assert env["CUDA_VISIBLE_DEVICES"] == fake.gpus[1].uuid == env["ASR_GPU_UUID"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # Pool.json keeps the UUID, so a scale or a re-render pins the same way.
    pool = Pool(specs)
    pool.save(RunPaths.at(settings.run_dir))
    assert Pool.load(RunPaths.at(settings.run_dir)).instances[2].placement.gpu_uuid == fake.gpus[1].uuid


def test_a_full_gpu_takes_no_instance_and_up_says_why(monkeypatch, tmp_path):
    gpus = [FakeGpu("NVIDIA A10", 23_028, used_mb=22_000), FakeGpu("NVIDIA A10", 23_028, used_mb=1_000)]
    FakeNvml(gpus).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "instances": 2, "device": "cuda",
                                                "instance_gpu_memory_mb": 4_000})
    assert [s.placement.gpu for s in plan_instances(settings, nvml.detect_gpus())] == [1, 1]
    greedy = load_settings(env={}, overrides={**vars(settings), "instances": 6})
    with pytest.raises(ConfigError, match=r"room on the GPUs for 5 of 6 instances: GPU memory full \(gpu0 1028 MB free"):
        plan_instances(greedy, nvml.detect_gpus())


def test_a_vgpu_without_utilization_still_places_and_serves_figures(monkeypatch, caplog):
    gpus = [FakeGpu("GRID A100D-40C", 40_192, used_mb=100, util_not_supported=True)]
    FakeNvml(gpus).install(monkeypatch)
    caplog.set_level(logging.INFO, "asr.gpu")
    (g,) = nvml.detect_gpus()
    assert g.usable and g.fault == "" and g.utilization_fault == "" and g.utilization_pct is None
    assert g.memory_free_mb == 40_092 and not caplog.records          # NotSupported is no fault
    placement = place_one([], "cuda", [g], [0], 1, instance_memory_mb=3_000)
    assert placement.gpu == 0 and placement.gpu_uuid == g.uuid


def test_a_gpu_in_mig_mode_is_not_placed_on_and_says_why(monkeypatch, tmp_path):
    """CUDA computes on a MIG GPU's slices, not on the GPU its UUID names, and the GPU's free memory is
    no slice's: asrctl places on whole GPUs only, and says so instead of starting instances that fail."""
    fake = FakeNvml([FakeGpu("NVIDIA A100-SXM4-80GB", 81_920, util_not_supported=True, mig=True),
                     FakeGpu("NVIDIA A100-SXM4-80GB", 81_920, used_mb=1_000, mig=False)]).install(monkeypatch)
    mig, whole = nvml.detect_gpus()
    assert not mig.usable and "MIG mode is on" in mig.fault and whole.usable
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "instances": 2, "device": "cuda"})
    assert [s.placement.gpu for s in plan_instances(settings, [mig, whole])] == [1, 1]
    fake.gpus[1].mig = True
    with pytest.raises(ConfigError, match=r"room on the GPUs for 0 of 2 instances: NVML fault \(gpu0: MIG mode is on"):
        plan_instances(settings, nvml.detect_gpus())


def test_an_instance_given_a_mig_slice_finds_it_under_either_prefix(monkeypatch, tmp_path):
    """On Kubernetes the device plugin hands a pod one MIG slice. CUDA names it by 16 bytes, written
    GPU-...; NVML knows it as MIG-...: the instance finds its slice's figures all the same."""
    from app.hardware import cuda
    from app.runtime.instance import ModelInstance

    slice_ = FakeGpu("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40_192, used_mb=13, util_not_supported=True,
                     uuid="MIG-4b2c9a1e-7d3f-5e60-8a9b-0c1d2e3f4a5b")
    fake = FakeNvml([FakeGpu("NVIDIA A100-SXM4-80GB", 81_920, mig=True)], slices=[slice_]).install(monkeypatch)
    monkeypatch.setattr(cuda, "current_device", lambda: {"uuid": "GPU-" + slice_.uuid[4:], "name": slice_.name,
                                                         "pci_bus_id": "0000:07:00.0", "visible": 1})
    inst = ModelInstance(load_settings(env={}, overrides={"device": "cuda"}))
    inst.gpu = inst._check_gpu()
    assert inst.gpu["uuid"] == slice_.uuid and inst.gpu["seen_by"] == "cuda"   # NVML's own name for it
    assert inst._gpu_used_before_mb == 13 and inst.gpu_identity() == slice_.uuid
    assert nvml.gpu(inst.gpu_identity()).memory_total_mb == 40_192 and fake.gpus[0].mig


def test_a_gpu_lost_mid_run_degrades_to_a_fault_and_placement_avoids_it(monkeypatch, caplog):
    fake = FakeNvml(mixed()).install(monkeypatch)
    caplog.set_level(logging.WARNING, "asr.gpu")
    assert all(g.usable for g in nvml.detect_gpus())
    fake.gpus[0].lost = True
    for _ in range(3):
        lost, healthy = nvml.detect_gpus()
    assert not lost.usable and "GPU is lost" in lost.fault and lost.memory_free_mb is None
    assert healthy.usable
    assert sum("GPU is lost" in r.message for r in caplog.records) == 1  # one line, not one per tick
    # The 80 GB card had more room; lost, it takes nothing.
    assert place_one([], "cuda", [lost, healthy], [0], 1).gpu == 1
    with pytest.raises(ConfigError, match="NVML fault"):
        place_one([], "cuda", [lost], [0], 1)


def test_measured_memory_replaces_the_estimate_and_starting_instances_are_charged(monkeypatch):
    fake = FakeNvml([FakeGpu("NVIDIA L40S", 46_068, used_mb=0)]).install(monkeypatch)
    fake.gpus[0].processes = {os.getpid(): 5_120}
    assert nvml.process_memory_mb(fake.gpus[0].uuid, os.getpid()) == 5_120
    assert nvml.process_memory_mb(fake.gpus[0].uuid, 1) is None           # a process not on this GPU
    settings = load_settings(env={}, overrides={"device": "cuda", "model": "large-v3", "engine": "transformers"})
    of = lambda mb, model="large-v3", engine="transformers", batch=8: {  # noqa: E731 - an instance's /health
        "gpu": {"memory_mb": mb}, "engine": engine, "model": model, "model_config": {"max_batch": batch}}
    healths = [of(5_120), of(4_900), None, {"gpu": None}]
    assert measured_memory_mb(Pool([]), settings, healths) == 5_120
    assert measured_memory_mb(Pool([]), settings, [None, {"gpu": None}]) is None
    # Figures of another model, engine or batch size say nothing of this one's: they do not count.
    assert measured_memory_mb(Pool([]), settings, [of(900, model="whisper-tiny.en"), of(2_000, engine="ctranslate2"),
                                                   of(3_000, batch=1), of(4_000)]) == 4_000
    # 40948 MB free; instances measured at 5120 MB; starting ones charged (NVML does not show them yet):
    # 6 starting leave 10228 MB, room for one more; 7 leave 5108 MB, below 5120 + 512 headroom.
    (g,) = nvml.detect_gpus()
    starting = [Placement("cuda", gpu=0)] * 6
    place_one([], "cuda", [g], [0], 1, instance_memory_mb=5_120, starting=starting, headroom_mb=512)
    with pytest.raises(ConfigError, match="gpu0 5108 MB free; an instance needs 5632 MB"):
        place_one([], "cuda", [g], [0], 1, instance_memory_mb=5_120, starting=[*starting, starting[0]],
                  headroom_mb=512)


# -- the autoscaler ---------------------------------------------------------------------------------


class _NoActuator:
    """The autoscaler's actuator in a dry run: the tick reads only its run directory."""

    def __init__(self, run_dir: Path):
        from app.control.paths import RunPaths

        self.paths = RunPaths.at(str(run_dir))
        self.paths.make_dirs()


def _tick(settings, pool) -> str:
    return Autoscaler(settings, _NoActuator(Path(settings.run_dir))).tick(pool, dry_run=True).reason


def _dead_pool(device: str, count: int, gpu_index: int | None = None) -> Pool:
    """Instances whose ports answer nothing: the tick sees them not ready, with no load."""
    from support import free_ports

    placement = Placement(device, gpu=gpu_index) if device == "cuda" else Placement("cpu", cpu_cores=(0,))
    return Pool([InstanceSpec(f"asr-{p}", p, 1, placement) for p in free_ports(count)])


def test_autoscaler_grows_a_cpu_pool_on_cpu_even_on_a_gpu_host(monkeypatch, tmp_path):
    FakeNvml(mixed()).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "min_instances": 2, "max_instances": 2,
                                                "device": "cpu"})
    reason = _tick(settings, _dead_pool("cpu", 1))
    assert "pool of 1 is below min 2" in reason and "gpu" not in reason


def test_autoscaler_tick_survives_a_lost_gpu_and_names_it(monkeypatch, tmp_path):
    fake = FakeNvml(mixed()).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "min_instances": 3, "max_instances": 3,
                                                "device": "cuda"})
    assert "scaling up 1 -> 3 on gpu0, gpu0" in _tick(settings, _dead_pool("cuda", 1, 0))
    fake.gpus[0].lost = True
    assert "scaling up 1 -> 3 on gpu1, gpu1" in _tick(settings, _dead_pool("cuda", 1, 0))
    fake.gpus[1].used_mb = 22_900                                       # and the other one full
    reason = _tick(settings, _dead_pool("cuda", 1, 0))
    assert "no room for 2 new instances" in reason and "GPU memory full (gpu1 134 MB free" in reason
    assert "NVML fault (gpu0: memory: GPU is lost" in reason


def test_autoscaler_on_a_gpu_pool_without_nvml_adds_nothing(monkeypatch, tmp_path):
    FakeNvml([], driver=False).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "min_instances": 2, "max_instances": 2})
    assert "no room for 1 new instance: no GPU figures from NVML" in _tick(settings, _dead_pool("cuda", 1, 0))


class _HealthStubs:
    """One tiny HTTP server per instance on a free loopback port, answering ``/health`` with what
    the test sets: what the autoscaler reads of running instances, without loading a model."""

    def __init__(self, answers: list[dict]):
        import http.server
        import threading

        self.servers = []
        for answer in answers:
            body = json.dumps(answer).encode()

            class Health(http.server.BaseHTTPRequestHandler):
                def do_GET(self, body=body):
                    self.send_response(200 if self.path == "/health" else 404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, *args):
                    pass

            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def test_autoscaler_places_by_the_memory_its_gpu_instances_measured(monkeypatch, tmp_path):
    """``observe`` reads each GPU instance's /health ``gpu.memory_mb`` (the most of them is one
    instance's memory) into the policy's context, and the tick's room check uses it instead of the
    configured 2048 MB."""
    from app.control.daemons.autoscaler import observe

    FakeNvml([FakeGpu("NVIDIA L40S", 46_068, used_mb=34_068)]).install(monkeypatch)   # 12000 MB free
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "device": "cuda", "min_instances": 1,
                                                "max_instances": 8, "upscale_delay_seconds": 0,
                                                "cooldown_seconds": 0})
    from app.engines.models import display_name

    # Instances of the model being placed (only their figures count): its engine, model and batch size.
    busy = {"state": "ready", "queue": {"running": 2, "waiting": 8}, "engine": settings.engine,
            "model": display_name(settings.model), "model_config": {"max_batch": settings.batch_size("cuda")}}
    stubs = _HealthStubs([{**busy, "gpu": {"memory_mb": 5_120}}, {**busy, "gpu": {"memory_mb": 4_900}}])
    try:
        pool = Pool([InstanceSpec(f"asr-{p}", p, 1, Placement("cuda", gpu=0)) for p in stubs.ports])
        ctx = observe(pool, settings, nvml.detect_gpus(), now=0.0, last_change_at=None)
        assert ctx.instance_memory_mb == 5_120 and ctx.gpu_pool
        assert [(i.in_flight, i.queue_depth, i.ready) for i in ctx.instances] == [(2, 8, True)] * 2
        # 12000 MB free takes two instances of 5120 MB (+ 512 headroom): 12000 -> 6880 -> 1760. The
        # configured 2048 MB would have let five in.
        reason = _tick(settings, pool)
        assert "room for only 2 of 6 new instances" in reason and "scaling up 2 -> 4 on gpu0, gpu0" in reason
        assert "gpu0 1760 MB free; an instance needs 5632 MB" in reason
    finally:
        stubs.close()


# -- an instance's /health and /metrics --------------------------------------------------------------


def _gpu_app(monkeypatch, tmp_path, pin: str, **overrides):
    from app.routes import create_app

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", pin)
    settings = load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": pin, "instance_port": 1,
                                                "model_cache": str(tmp_path), **overrides})
    app = create_app(settings)
    inst = app.extensions["asr_instance"]
    deadline = time.monotonic() + 60
    while inst.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    return app.test_client(), inst


def _metric(text: str, name: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return lines[0] if lines else None


def test_metrics_and_health_read_the_pinned_gpu_and_survive_its_loss(monkeypatch, tmp_path):
    fake = FakeNvml(mixed()).install(monkeypatch)
    l4 = fake.gpus[1]
    client, inst = _gpu_app(monkeypatch, tmp_path, l4.uuid)
    # No CUDA on this host: the instance cannot compute on a GPU, says so, and names none as its own
    # (NVML's view of the GPU it was meant for is not the GPU an engine uses); it lives on.
    assert inst.state == "failed" and client.get("/ready").status_code == 503
    health = client.get("/health").get_json()
    assert health["gpu"] is None and "no CUDA driver (libcuda.so.1 not found)" in health["error"]
    # /metrics still reads the GPU it is pinned to.
    metrics = client.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "asr_gpu_nvml_up") == "asr_gpu_nvml_up 1.0"
    assert f'uuid="{l4.uuid}"' in _metric(metrics, "asr_gpu_info")
    # The L4's figures, not GPU 0's: /metrics reads the GPU by its UUID.
    assert float(_metric(metrics, "asr_gpu_memory_total_bytes").split()[1]) == 23_034 * 2**20
    assert float(_metric(metrics, "asr_gpu_utilization_percent").split()[1]) == 5.0
    l4.lost = True
    lost = client.get("/metrics")
    assert lost.status_code == 200
    text = lost.get_data(as_text=True)
    assert _metric(text, "asr_gpu_nvml_up") == "asr_gpu_nvml_up 0.0"
    assert _metric(text, "asr_gpu_memory_used_bytes") is None and _metric(text, "asr_requests_in_flight")


def test_metrics_on_mig_leave_out_utilization_only(monkeypatch, tmp_path):
    fake = FakeNvml([FakeGpu("NVIDIA H100 MIG 1g.10gb", 9_984, util_not_supported=True)]).install(monkeypatch)
    client, _ = _gpu_app(monkeypatch, tmp_path, fake.gpus[0].uuid)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "asr_gpu_nvml_up").endswith("1.0")
    assert _metric(metrics, "asr_gpu_utilization_percent") is None
    assert float(_metric(metrics, "asr_gpu_memory_total_bytes").split()[1]) == 9_984 * 2**20


@pytest.mark.integration
def test_status_lists_the_gpus_and_their_faults(monkeypatch, tmp_path, capsys):
    """``asrctl status`` against a real service on a host whose GPU 0 fell off the bus: a row that
    says so, the other GPU's figures, no traceback."""
    from app.control import cli
    from support import bring_up, run_asrctl

    try:
        service = bring_up(tmp_path, 1, "--device", "cpu")
        fake = FakeNvml(mixed()).install(monkeypatch)
        fake.gpus[0].lost = True
        assert cli.main(["status", "--run-dir", str(service.run_dir)]) == 0
        text = capsys.readouterr().out
        assert "GPU is lost" in text and "NVIDIA L4" in text and fake.gpus[1].uuid in text
        row = next(line for line in text.splitlines() if line.startswith(f"asr-{service.instance_ports[0]}"))
        assert row.split()[-1] == "-"                                   # a CPU instance: no GPU
        assert cli.main(["status", "--run-dir", str(service.run_dir), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert [g["fault"] for g in data["gpus"]] == ["memory: GPU is lost", None]
        assert data["gpus"][1]["memory_total_mb"] == 23_034 and data["instances"][0]["gpu"] is None
    finally:  # also when bring_up itself failed: its supervisord must not outlive the test
        run_asrctl("down", "--run-dir", str(tmp_path / "run"), check=False)


# -- the engines on cuda, as far as a CPU host allows ---------------------------------------------------


def test_engines_pick_float16_on_cuda_and_refuse_to_fall_back_to_cpu():
    """``auto`` means float16 on a GPU (what each engine then loads: the tests below); asked for cuda
    on a host without one, each fails loudly at load (the instance turns 'failed'), never serves from
    the CPU while saying cuda."""
    from app.engines import load_engine
    from app.engines.models import resolve_model
    from app.engines.torch_common import reserved_gpu_memory_mb, resolve_compute_type

    assert resolve_compute_type("auto", "cuda") == "float16"
    assert resolve_compute_type("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="int8"):
        resolve_compute_type("int8", "cuda")
    assert reserved_gpu_memory_mb("cpu") is None
    for engine in ("ctranslate2", "transformers"):
        model = resolve_model(engine, "embedded", load_settings(env={}).model_cache)  # the shared cache
        with pytest.raises(Exception, match="(?i)cuda"):
            load_engine(engine, model, "cuda", "auto")


def _capture_to(monkeypatch, model_class) -> list:
    """``model_class.to`` records where the engine sends the model and leaves it where it is (no GPU
    here): the last step of loading on cuda, the rest of the load real."""
    sent = []

    def to(self, *args, **kwargs):
        sent.append((args, kwargs))
        return self

    monkeypatch.setattr(model_class, "to", to)
    return sent


def test_ctranslate2_loads_float16_on_cuda_for_auto(monkeypatch):
    """What faster-whisper's ``WhisperModel`` is asked for: device cuda, float16 for ``auto`` (int8 on
    CPU), and an explicit precision as given. The model itself is then built on the CPU (no GPU)."""
    import faster_whisper

    from app.engines import load_engine
    from app.engines.models import EMBEDDED, resolve_model

    real, asked = faster_whisper.WhisperModel, []

    def whisper_model(model, **kwargs):
        asked.append(kwargs)
        return real(model, **{**kwargs, "device": "cpu", "compute_type": "int8"})

    monkeypatch.setattr(faster_whisper, "WhisperModel", whisper_model)
    model = resolve_model("ctranslate2", EMBEDDED, load_settings(env={}).model_cache)
    engine = load_engine("ctranslate2", model, "cuda", "auto")
    assert (asked[-1]["device"], asked[-1]["compute_type"]) == ("cuda", "float16")
    assert (engine.device, engine.compute_type) == ("cuda", "float16")     # what /health reports
    load_engine("ctranslate2", model, "cuda", "int8_float16")
    assert (asked[-1]["device"], asked[-1]["compute_type"]) == ("cuda", "int8_float16")
    load_engine("ctranslate2", model, "cpu", "auto")
    assert (asked[-1]["device"], asked[-1]["compute_type"]) == ("cpu", "int8")


def test_transformers_loads_whisper_in_float16_on_cuda_for_auto(monkeypatch):
    """The real checkpoint is loaded in the precision the engine asks for (float16 for ``auto`` on
    cuda) and then sent to cuda; only that last move is caught, as this host has no GPU."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from app.engines import load_engine
    from app.engines.models import EMBEDDED, resolve_model

    sent = _capture_to(monkeypatch, WhisperForConditionalGeneration)
    model = resolve_model("transformers", EMBEDDED, load_settings(env={}).model_cache)   # the shared cache
    engine = load_engine("transformers", model, "cuda", "auto")
    assert sent == [(("cuda",), {})]
    assert engine._runner.model.dtype == torch.float16
    assert (engine.device, engine.compute_type) == ("cuda", "float16")


def test_qwen3_asr_loads_in_bfloat16_on_cuda_for_auto(monkeypatch, tmp_path):
    """Qwen3-ASR (and its aligner) in bfloat16 on cuda for ``auto``, as its checkpoints are published;
    built on a tiny random checkpoint (tests/random_qwen3_asr.py)."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

    import random_qwen3_asr
    from app.engines import load_engine

    asr, aligner = random_qwen3_asr.build(tmp_path)
    sent = _capture_to(monkeypatch, Qwen3ASRForConditionalGeneration)
    sent_aligner = _capture_to(monkeypatch, Qwen3ASRForTokenClassification)
    engine = load_engine("qwen3-asr", str(asr), "cuda", "auto", aligner_model=str(aligner))
    assert sent == sent_aligner == [(("cuda",), {})]
    assert engine.model.dtype == engine.aligner.dtype == torch.bfloat16
    assert (engine.device, engine.compute_type) == ("cuda", "bfloat16")


def test_up_names_the_missing_engine_packages_of_a_ctranslate2_only_install(monkeypatch, tmp_path, capsys):
    """A ctranslate2-only install has no torch: asking it for the transformers engine is one clear line."""
    import importlib.util

    from app.control import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert cli.main(["up", "--run-dir", str(tmp_path / "run"), "--engine", "transformers"]) == 1
    assert "engine transformers needs torch, which this environment lacks" in capsys.readouterr().err
    assert not (tmp_path / "run" / "supervisor.sock").exists()


def test_an_instance_measures_its_gpu_memory_from_the_best_figure_it_can_get(monkeypatch, tmp_path):
    """NVML's per-process figure first; in a container whose pids NVML does not see, the engine's own
    figure; for an engine with none, the GPU's used memory after loading minus before."""
    from app.runtime.instance import ModelInstance

    fake = FakeNvml([FakeGpu("NVIDIA H200", 143_771, used_mb=1_000)]).install(monkeypatch)
    h200 = fake.gpus[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", h200.uuid)
    inst = ModelInstance(load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": h200.uuid}))
    cuda_sees(monkeypatch, h200)
    inst.gpu = inst._check_gpu()
    assert inst.gpu["uuid"] == h200.uuid and inst._gpu_used_before_mb == 1_000

    class _Engine:  # an engine with no memory figure of its own, as CTranslate2
        pass

    inst.engine = _Engine()
    h200.processes = {os.getpid(): 3_300}
    assert inst._measure_gpu_memory() == {"memory_mb": 3_300, "memory_source": "nvml"}
    h200.processes = {999_999: 3_300}            # the same process under the host's pid: unseen
    assert inst._measure_gpu_memory() == {"memory_mb": 3_300, "memory_source": "nvml-device-delta"}
    inst.engine.gpu_memory_mb = lambda: 2_900     # torch's reserved memory
    assert inst._measure_gpu_memory() == {"memory_mb": 2_900, "memory_source": "engine"}


class _WarmingEngine:
    """An engine on the fake GPU: loading it takes ``loaded_mb`` of this process's GPU memory, and its
    first batch raises that to ``batch_mb``, as a real warm-up does (activations, cuBLAS workspaces, the
    caching allocator keeping what the batch used). ``own_mb``: the engine's own figure, if any."""

    name, model_name, device, compute_type = "ctranslate2", "fake", "cuda", "float16"
    multilingual, languages, can_translate, word_timestamps = False, frozenset({"en"}), False, False
    continues_prefix = False

    def __init__(self, g: FakeGpu, loaded_mb: int, batch_mb: int, own_mb: int | None = None):
        self.g, self.batch_mb, self.batches = g, batch_mb, []
        g.processes[os.getpid()] = loaded_mb
        if own_mb is not None:
            self.gpu_memory_mb = lambda: own_mb

    def transcribe_batch(self, audios, options):
        from app.engines.base import SAMPLE_RATE, Transcript

        self.batches.append(([len(a) for a in audios], [o.beam_size for o in options]))
        self.g.processes[os.getpid()] = self.batch_mb
        return [Transcript(text="", language="en", duration=len(a) / SAMPLE_RATE) for a in audios]

    def transcribe(self, audio, options):
        return self.transcribe_batch([audio], [options])[0]


def _load_on_fake_gpu(monkeypatch, tmp_path, g: FakeGpu, make_engine, **overrides):
    """A real instance app on ``cuda`` (CUDA's device 0 is ``g``), its engine made by ``make_engine``
    where the real one would load: (test client, instance, the engine loaded, load_engine's arguments)."""
    import app.runtime.instance

    cuda_sees(monkeypatch, g)
    loaded = []

    def load_engine(engine, model, device, *args, **kwargs):
        loaded.append((make_engine(), device))
        return loaded[-1][0]

    monkeypatch.setattr(app.runtime.instance, "load_engine", load_engine)
    client, inst = _gpu_app(monkeypatch, tmp_path, g.uuid, **overrides)
    assert inst.state == "ready", inst.error
    (engine, device), = loaded
    return client, inst, engine, device


def test_an_instance_measures_its_gpu_memory_after_a_full_warm_up_batch(monkeypatch, tmp_path):
    """The memory an instance reports is what it holds after warming up on one batch as large as its
    queue runs, of full 30 s windows: measured right after loading, it would leave out what a batch
    takes, and placement would put too many instances on the GPU."""
    from app.engines.base import SAMPLE_RATE

    fake = FakeNvml([FakeGpu("NVIDIA H200", 143_771, used_mb=1_000)]).install(monkeypatch)
    h200 = fake.gpus[0]
    client, inst, engine, device = _load_on_fake_gpu(
        monkeypatch, tmp_path, h200, lambda: _WarmingEngine(h200, loaded_mb=1_500, batch_mb=4_200),
        max_batch=5, beam_size=3)
    assert device == "cuda"
    assert engine.batches == [([30 * SAMPLE_RATE] * 5, [3] * 5)]     # one batch of max_batch 30 s windows
    health = client.get("/health").get_json()
    assert health["gpu"]["memory_mb"] == 4_200 and health["gpu"]["memory_source"] == "nvml"
    assert health["gpu"]["uuid"] == h200.uuid


@pytest.mark.parametrize("refusal", ["usedGpuMemory None", "NotSupported"])
def test_without_nvml_per_process_memory_an_instance_reports_the_engines_figure(monkeypatch, tmp_path, refusal):
    """MIG and some containers list processes with no memory figure (pynvml's ``usedGpuMemory`` is
    None), and some GPUs refuse the process list (NotSupported): ``app.hardware.nvml.process_memory_mb`` says
    it does not know, and the instance reports the engine's own figure (torch's reserved memory)."""
    fake = FakeNvml([FakeGpu("NVIDIA A100-SXM4-80GB", 81_920, used_mb=800)]).install(monkeypatch)
    a100 = fake.gpus[0]
    a100.process_memory_hidden = refusal == "usedGpuMemory None"
    a100.processes_not_supported = refusal == "NotSupported"
    client, inst, engine, _ = _load_on_fake_gpu(
        monkeypatch, tmp_path, a100, lambda: _WarmingEngine(a100, loaded_mb=1_500, batch_mb=4_200, own_mb=3_968))
    assert nvml.process_memory_mb(a100.uuid, os.getpid()) is None
    reported = client.get("/health").get_json()["gpu"]
    assert (reported["memory_mb"], reported["memory_source"]) == (3_968, "engine")
    a100.process_memory_hidden = a100.processes_not_supported = False     # the same GPU, figures given
    assert nvml.process_memory_mb(a100.uuid, os.getpid()) == 4_200


def test_an_instance_refuses_a_gpu_other_than_the_one_it_was_placed_on(monkeypatch):
    """CUDA's device 0 (asked of the driver; faked here, there is no GPU) must be the GPU placement
    chose: a wrong pin fails the instance with both names, instead of serving from the wrong card."""
    from app.hardware import cuda
    from app.runtime.instance import ModelInstance

    fake = FakeNvml(mixed()).install(monkeypatch)
    h100, l4 = fake.gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(cuda, "current_device", lambda: {"uuid": h100.uuid.upper(), "name": h100.name,
                                                         "pci_bus_id": h100.pci_bus_id, "visible": 1})
    inst = ModelInstance(load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": l4.uuid}))
    with pytest.raises(RuntimeError, match=f"CUDA's device 0 is {h100.name} .* placed on {l4.uuid}"):
        inst._check_gpu()
    right = ModelInstance(load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": h100.uuid}))
    right.gpu = right._check_gpu()
    # CUDA wrote the UUID in capitals (the fake's; real drivers may differ from NVML in case): the
    # GPU is still found, and named as NVML names it.
    assert right.gpu["seen_by"] == "cuda" and right.gpu["index"] == 0 and right.gpu_identity() == h100.uuid


# -- NVML that hangs, a driver that is broken, and CUDA's own answer --------------------------------------


def test_a_hung_nvml_is_a_fault_within_its_timeout_and_recovers(monkeypatch, tmp_path, capsys):
    """A GPU falling off the bus can make NVML calls block. A scrape, a tick or ``asrctl status`` then
    gets a fault within the timeout, later calls fail at once while the stuck one has not returned,
    and the figures come back (with one log line) when NVML answers again."""
    import threading

    fake = FakeNvml(mixed()).install(monkeypatch)
    monkeypatch.setattr(nvml, "CALL_TIMEOUT_S", 0.5)
    client, _ = _gpu_app(monkeypatch, tmp_path, fake.gpus[1].uuid)
    assert all(g.usable for g in nvml.detect_gpus())
    fake.gpus[0].hang = threading.Event()
    try:
        t0 = time.monotonic()
        stuck = nvml.detect_gpus()
        assert time.monotonic() - t0 < 3          # one timeout, then every call fails at once
        assert "NVML not answering (nvmlDeviceGetName has not returned since" in stuck[0].fault
        assert not any(g.usable for g in stuck)   # NVML answers nothing while a call is stuck
        t0 = time.monotonic()
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and time.monotonic() - t0 < 3
        assert _metric(metrics.get_data(as_text=True), "asr_gpu_nvml_up") == "asr_gpu_nvml_up 0.0"
        # Still stuck seconds later: the same fault, not a new log line per scrape or tick.
        time.sleep(1.1)
        for _ in range(2):
            later = nvml.inventory()        # now even the count fails at once: no GPU figures at all
            assert later.gpus == [] and "NVML not answering" in later.error
            client.get("/metrics")
        stuck_log = capsys.readouterr().out
        assert [stuck_log.count(f"NVML {key}: ") for key in ("gpu0", f"gpu {fake.gpus[1].uuid}", "count")] == [1, 1, 1]
    finally:
        fake.gpus[0].hang.set()
    deadline = time.monotonic() + 10
    while nvml._caller.stuck and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(g.usable for g in nvml.detect_gpus())
    logged = stuck_log + capsys.readouterr().out     # the JSON log lines (create_app set them up)
    assert "NVML gpu0: memory: NVML not answering" in logged and "NVML gpu0: cleared" in logged


def test_a_broken_driver_is_not_taken_for_a_cpu_host(monkeypatch, tmp_path, capsys, caplog):
    """NVML failing on a host that has a driver (a library/driver mismatch after an upgrade without a
    reboot) must not quietly put ``device = auto`` on the CPU: ``asrctl up`` refuses, with NVML's
    own words; asked for the CPU explicitly, it serves there. No driver at all is a CPU host."""
    import pynvml

    from app.control import cli

    caplog.set_level(logging.INFO, "asr.gpu")
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH).install(monkeypatch)
    found = nvml.inventory()
    assert found.gpus == [] and found.error and not found.no_driver
    assert any(r.levelno == logging.WARNING and "NVML unavailable" in r.message for r in caplog.records)
    auto = load_settings(env={}, overrides={"run_dir": str(tmp_path / "run"), "instances": 1})
    with pytest.raises(ConfigError, match=f"NVML .* failed: {found.error}.* device = \"cpu\""):
        plan_instances(auto, found.gpus, nvml_error=found.error)
    cpu = load_settings(env={}, overrides={**vars(auto), "device": "cpu"})
    assert plan_instances(cpu, found.gpus, nvml_error=found.error)[0].placement.device == "cpu"
    with pytest.raises(ConfigError, match=f"no NVIDIA GPU is visible \\(NVML: {found.error}\\)"):
        plan_instances(load_settings(env={}, overrides={**vars(auto), "device": "cuda"}), [], nvml_error=found.error)
    assert cli.main(["up", "--run-dir", str(tmp_path / "run")]) == 1
    assert f"NVML (the NVIDIA driver's library) failed: {found.error}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "supervisor.sock").exists()

    FakeNvml([], driver=False).install(monkeypatch)
    absent = nvml.inventory()
    assert absent.no_driver and plan_instances(auto, [], nvml_error=absent.error)[0].placement.device == "cpu"


class FakeLibcuda:
    """The CUDA driver API's few calls ``app.hardware.cuda`` makes, answering through the same ctypes
    arguments the real libcuda.so.1 gets (no GPU here: the hardware boundary)."""

    def __init__(self, devices: list[tuple[str, str, str]], init_status: int = 0):
        self.devices, self.init_status = devices, init_status   # (name, uuid, pci bus id)

    def cuInit(self, flags):
        return self.init_status

    def cuGetErrorName(self, status, name_ref):
        self._name = {100: b"CUDA_ERROR_NO_DEVICE", 999: b"CUDA_ERROR_UNKNOWN"}.get(status)
        if self._name is None:
            return 1
        name_ref._obj.value = self._name
        return 0

    def cuDeviceGetCount(self, count_ref):
        count_ref._obj.value = len(self.devices)
        return 0

    def cuDeviceGet(self, device_ref, ordinal):
        device_ref._obj.value = ordinal
        return 0 if ordinal < len(self.devices) else 101

    def cuDeviceGetName(self, buffer, size, device):
        buffer.value = self.devices[device.value][0].encode()[:size - 1]
        return 0

    def cuDeviceGetUuid_v2(self, buffer, device):
        import uuid

        buffer.raw = uuid.UUID(self.devices[device.value][1].split("-", 1)[1]).bytes
        return 0

    def cuDeviceGetPCIBusId(self, buffer, size, device):
        buffer.value = self.devices[device.value][2].encode()
        return 0


def test_cuda_names_device_0_as_nvml_does_and_its_errors_by_name(monkeypatch):
    from app.hardware import cuda

    h100 = ("NVIDIA H100 80GB HBM3", "GPU-6f3a0c2e-9b1d-4e57-a8c3-0d2e4f6a8b9c", "0000:3B:00.0")
    monkeypatch.setattr(cuda.ctypes, "CDLL", lambda name: FakeLibcuda([h100]))
    assert cuda.current_device() == {"uuid": h100[1], "name": h100[0], "pci_bus_id": h100[2], "visible": 1}
    monkeypatch.setattr(cuda.ctypes, "CDLL", lambda name: FakeLibcuda([]))
    assert cuda.current_device()["error"].startswith("cuDeviceGetCount: no CUDA device visible")
    monkeypatch.setattr(cuda.ctypes, "CDLL", lambda name: FakeLibcuda([h100], init_status=100))
    assert cuda.current_device() == {"error": "cuInit: CUDA_ERROR_NO_DEVICE (100)"}
    monkeypatch.setattr(cuda.ctypes, "CDLL", lambda name: FakeLibcuda([h100], init_status=3))
    assert cuda.current_device() == {"error": "cuInit: CUresult 3"}

    def no_library(name):
        raise OSError("libcuda.so.1: cannot open shared object file")
    monkeypatch.setattr(cuda.ctypes, "CDLL", no_library)
    assert cuda.current_device() is None
    assert cuda.same_gpu("MIG-" + h100[1][4:], h100[1].upper()) and not cuda.same_gpu(h100[1], "")


def test_an_instance_whose_cuda_fails_says_so_and_names_no_gpu(monkeypatch):
    from app.hardware import cuda
    from app.runtime.instance import ModelInstance

    fake = FakeNvml(mixed()).install(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", fake.gpus[1].uuid)
    monkeypatch.setattr(cuda, "current_device", lambda: {"error": "cuInit: CUDA_ERROR_NO_DEVICE (100)"})
    inst = ModelInstance(load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": fake.gpus[1].uuid}))
    inst.load_now()
    assert inst.state == "failed" and inst.gpu is None
    assert "CUDA cannot give this instance a GPU" in inst.error and "CUDA_ERROR_NO_DEVICE" in inst.error


def test_scaling_by_several_reads_the_gpus_again_for_each_new_instance(monkeypatch, tmp_path):
    """``asrctl scale 4`` adds instances one after another; each placement must see the memory the
    ones before it took once loaded, not the free memory read before the first."""
    from app.control.act import actuator as actuation
    from app.control.act.actuator import Actuator

    states = {9000: "ready"}       # each instance's /health state, by port
    monkeypatch.setattr(actuation, "get_json", lambda port, path: {"state": states[port]} if port in states else None)
    fake = FakeNvml([FakeGpu("NVIDIA L4", 23_034, used_mb=7_000)]).install(monkeypatch)   # one instance loaded
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "device": "cuda",
                                                "instance_gpu_memory_mb": 7_000, "gpu_headroom_mb": 512})
    pool = Pool([InstanceSpec("asr-9000", 9000, 1, Placement("cuda", gpu=0, gpu_uuid=fake.gpus[0].uuid))])
    actuator = Actuator(settings, client=None, gpus=nvml.detect_gpus(), log=lambda m: None)
    for port in (9001, 9002):
        placement = actuator.place_next(pool)
        assert placement.gpu == 0 and placement.gpu_uuid == fake.gpus[0].uuid
        pool.add(port, 1, placement)
        fake.gpus[0].used_mb += 7_000        # it has loaded: NVML now shows what it holds
        states[port] = "ready"
    # 23034 - 21000 = 2034 MB free: a fourth 7000 MB instance does not fit, though the snapshot taken
    # before the first scale-up still said 16 GB.
    with pytest.raises(ConfigError, match=r"no room on a GPU for another instance: GPU memory full \(gpu0 2034 MB free"):
        actuator.place_next(pool)
    # An instance loading its model again (after a crash or the watchdog) holds nothing NVML shows
    # yet, but will: it is charged. So is one that does not answer; one draining is not (it still
    # holds its memory, which NVML shows).
    fake.gpus[0].used_mb -= 14_000            # two of the three are reloading: 16034 MB free
    states[9001] = "loading"
    del states[9002]
    with pytest.raises(ConfigError, match=r"GPU memory full \(gpu0 2034 MB free"):
        actuator.place_next(pool)
    states[9002] = "ready"
    pool.draining.add("asr-9001")              # being stopped: what it holds is going, not coming
    assert actuator.place_next(pool).gpu == 0


def test_the_autoscaler_charges_the_instances_that_do_not_hold_their_memory_yet(monkeypatch, tmp_path):
    """The autoscaler's room check and asrctl scale charge the same instances: one loading its model
    again is charged (NVML does not show what it is about to take), one draining is not (it still
    holds its memory, which NVML shows)."""
    from app.control.daemons import autoscaler

    fake = FakeNvml([FakeGpu("NVIDIA L4", 23_034, used_mb=7_000)]).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "device": "cuda", "min_instances": 4,
                                                "max_instances": 4, "instance_gpu_memory_mb": 7_000})
    pool = Pool([InstanceSpec(f"asr-{p}", p, 1, Placement("cuda", gpu=0, gpu_uuid=fake.gpus[0].uuid))
                 for p in (9000, 9001)])
    states = {9000: "ready", 9001: "loading"}
    monkeypatch.setattr(autoscaler, "get_json", lambda port, path: {"state": states[port], "queue": {}})
    ctx = autoscaler.observe(pool, settings, nvml.detect_gpus(), now=1_000.0, last_change_at=None)
    assert [(i.ready, i.holds_its_memory) for i in ctx.instances] == [(True, True), (False, False)]
    # Two more wanted (min 4). 16034 MB free, less 7000 for the instance loading again: 9034, room for
    # one 7512 MB instance; were the loading one not charged, there would be room for two.
    decision, _ = autoscaler.decide(ctx, autoscaler.scaling_config(settings), autoscaler.PolicyState())
    assert decision.desired == 3 and decision.placement == (0,), decision
    states[9001] = "ready"
    pool.draining.add("asr-9001")
    ctx = autoscaler.observe(pool, settings, nvml.detect_gpus(), now=1_000.0, last_change_at=None)
    assert [(i.ready, i.holds_its_memory) for i in ctx.instances] == [(True, True), (False, True)]


def test_an_instance_reports_the_most_gpu_memory_it_has_held(monkeypatch):
    """Measured after a warm-up on silence, the figure grows with what real decoding takes (checked
    every GPU_MEMORY_REFRESH_SECONDS on a thread of its own); it never shrinks, as placement must
    charge what an instance can come to hold."""
    from app.runtime.instance import ModelInstance

    fake = FakeNvml([FakeGpu("NVIDIA H200", 143_771)]).install(monkeypatch)
    h200 = fake.gpus[0]
    cuda_sees(monkeypatch, h200)
    inst = ModelInstance(load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": h200.uuid}))
    inst.gpu = inst._check_gpu()
    h200.processes = {os.getpid(): 3_300}
    inst.gpu = {**inst.gpu, **inst._measure_gpu_memory()}
    h200.processes = {os.getpid(): 4_100}        # long transcripts at a wide beam: a larger cache
    inst.refresh_gpu_memory()
    assert (inst.gpu["memory_mb"], inst.gpu["memory_source"]) == (4_100, "nvml")
    h200.processes = {os.getpid(): 3_900}
    inst.refresh_gpu_memory()
    assert inst.gpu["memory_mb"] == 4_100
    # Where the figure was the GPU's used memory minus before loading, nothing reads it again: other
    # instances' memory would be counted as this one's.
    inst.gpu = {**inst.gpu, "memory_mb": 2_000, "memory_source": "nvml-device-delta"}
    h200.processes = {os.getpid(): 9_000}
    inst.refresh_gpu_memory()
    assert inst.gpu["memory_mb"] == 2_000


@pytest.mark.integration
def test_up_after_supervisord_was_killed_on_a_full_gpu_says_the_orphans_hold_it(monkeypatch, tmp_path, capsys):
    """supervisord killed on a GPU host: the orphans keep serving and hold their GPU memory, so their
    replacements (which start beside them) may not fit. ``asrctl up`` then refuses with the room
    message and says why and what to do, and the service keeps running on the orphans."""
    import signal

    import requests

    from app.control import cli
    from support import bring_up, run_asrctl, spoken_wav

    try:
        service = bring_up(tmp_path, 1, "--device", "cpu")
        # The previous run was on a GPU as far as its pool.json tells (its orphan computes on the CPU:
        # there is no GPU here; what counts is that it still serves).
        pool_file = service.run_dir / "pool.json"
        pool = json.loads(pool_file.read_text())
        for spec in pool["instances"]:
            spec.update(device="cuda", gpu=0, cpu_cores=[])
        pool_file.write_text(json.dumps(pool))
        os.kill(int((service.run_dir / "supervisord.pid").read_text()), signal.SIGKILL)
        FakeNvml([FakeGpu("NVIDIA L4", 23_034, used_mb=22_000)]).install(monkeypatch)
        assert cli.main(["up", "--run-dir", str(service.run_dir), "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert "room on the GPUs for 0 of 1 instances: GPU memory full" in err, err
        assert "1 instance(s) of the previous run still serve unsupervised" in err and "asrctl down" in err, err
        # Another error of the plan is not about the orphans' memory: no such advice with it.
        import pynvml

        FakeNvml([], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH).install(monkeypatch)
        assert cli.main(["up", "--run-dir", str(service.run_dir), "--device", "auto"]) == 1
        err = capsys.readouterr().err
        assert "NVML (the NVIDIA driver's library) failed" in err and "previous run" not in err, err
        speech = spoken_wav()
        assert requests.post(f"{service.url}/asr", files={"audio": ("speech.wav", speech)}, timeout=60).ok
    finally:  # also when bring_up itself failed: its processes must not outlive the test
        run_asrctl("down", "--run-dir", str(tmp_path / "run"), check=False)


def four_gpus() -> list[FakeGpu]:
    """Four 80 GB cards, the third already half used by something else."""
    return [FakeGpu("NVIDIA H100 80GB HBM3", 81_559, used_mb=used) for used in (1_000, 2_000, 40_000, 3_000)]


def test_an_instance_spanning_two_gpus_is_placed_on_two_and_pinned_to_both(monkeypatch, tmp_path):
    fake = FakeNvml(four_gpus()).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "instances": 2, "device": "cuda",
                                                "engine": "vllm", "model": str(tmp_path), "beam_size": 1,
                                                "gpus_per_instance": 2, "instance_gpu_memory_mb": 30_000})
    specs = plan_instances(settings, nvml.detect_gpus())
    # Most free memory first: gpu0 and gpu1 for the first instance; then gpu3 (78.5 GB free) and gpu0
    # (50.5 GB left), not gpu2 (41.5 GB) nor gpu1 (49.5 GB).
    assert [s.placement.gpus for s in specs] == [(0, 1), (3, 0)]
    assert [s.placement.describe() for s in specs] == ["cuda:0+1", "cuda:3+0"]
    from app.control.paths import RunPaths
    env = specs[0].environment(RunPaths.at(settings.run_dir))
    assert env["CUDA_VISIBLE_DEVICES"] == f"{fake.gpus[0].uuid},{fake.gpus[1].uuid}"
    assert env["ASR_GPU_UUID"] == fake.gpus[0].uuid   # CUDA's device 0, which the instance checks
    pool = Pool(specs)
    pool.save(RunPaths.at(settings.run_dir))
    assert Pool.load(RunPaths.at(settings.run_dir)).instances[1].placement == specs[1].placement


def test_two_gpu_instances_that_do_not_fit_are_refused_saying_why(monkeypatch, tmp_path):
    FakeNvml(four_gpus()).install(monkeypatch)
    settings = load_settings(env={}, overrides={"run_dir": str(tmp_path), "instances": 3, "device": "cuda",
                                                "engine": "vllm", "model": str(tmp_path), "beam_size": 1,
                                                "gpus_per_instance": 2, "instance_gpu_memory_mb": 45_000})
    # 45 GB (and 512 MB headroom) on each of two GPUs: gpu0+gpu1, then only gpu3 has that much left.
    with pytest.raises(ConfigError, match=r"room on the GPUs for 1 of 3 instances: an instance spans 2 GPUs "
                                          r"\(gpus_per_instance\) with 45512 MB free on each, and 1 GPU\(s\) have "
                                          r"that \(gpu3\) and GPU memory full \(gpu0 35559 MB free"):
        plan_instances(settings, nvml.detect_gpus())
    with pytest.raises(ConfigError, match="above 1 only for engine vllm"):
        load_settings(env={}, overrides={"gpus_per_instance": 2})


def test_the_autoscaler_adds_an_instance_on_two_gpus_charging_both():
    from app.control.plan.policy import GpuLoad, InstanceLoad, ScalingConfig, _place
    from app.control.plan.policy import ScalingContext, HostLoad
    gpus = tuple(GpuLoad(i, 10.0, free, 81_559) for i, free in enumerate((35_000, 35_000, 31_000, 45_000)))
    config = ScalingConfig(instance_memory_mb=20_000, gpu_headroom_mb=0, gpus_per_instance=2)
    # One instance still loading on gpu0+gpu1: NVML does not show its memory yet, so both are charged
    # (15 GB left on each, too little); gpu3 and gpu2 take the next, and nothing has room for another.
    starting = InstanceLoad("asr-1", 0, 0, ready=False, gpu=0, more_gpus=(1,), loaded=False)
    ctx = ScalingContext((starting,), gpus, HostLoad(cpu_pct=0.0, free_core_sets=0), now=0.0, last_change_at=None, gpu_pool=True)
    placement, note = _place(2, ctx, config)
    assert placement == [(3, 2)] and "1 of 2" in note, (placement, note)


def test_render_for_vllm_on_two_gpus_pins_both_and_writes_the_tensor_parallel_setting(monkeypatch, tmp_path):
    # asrctl's own rendering on the fake NVML: the files `asrctl up` hands supervisord (nothing starts:
    # there is no GPU to load on here).
    from app.control import cli

    fake = FakeNvml(four_gpus()).install(monkeypatch)
    run = tmp_path / "run"
    venv = tmp_path / "venv-vllm"        # an environment that has vLLM, as engine_environment finds one
    (venv / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "vllm" / "__init__.py").write_text("")
    monkeypatch.setenv("ASR_ENGINE_ENVIRONMENT", str(venv))
    monkeypatch.setenv("ASR_INSTANCE_GPU_MEMORY_MB", "30000")
    assert cli.main(["render", "--run-dir", str(run), "--engine", "vllm", "--model", str(tmp_path),
                     "--beam-size", "1", "--device", "cuda", "--instances", "2", "--gpus-per-instance", "2",
                     "--port", "17860", "--base-port", "17861"]) == 0
    assert "gpus_per_instance = 2" in (run / "asr.toml").read_text().splitlines()
    programs = sorted((run / "supervisor" / "programs").glob("asr-*.conf"))
    texts = [p.read_text() for p in programs]
    assert [f"command={venv / 'bin' / 'gunicorn'} --config python:app.runtime.gunicorn_conf" in t for t in texts] == \
           [True, True]
    pins = [re.search(r'CUDA_VISIBLE_DEVICES="([^"]*)"', t).group(1) for t in texts]
    assert pins == [f"{fake.gpus[0].uuid},{fake.gpus[1].uuid}", f"{fake.gpus[3].uuid},{fake.gpus[0].uuid}"]


@pytest.mark.integration
def test_up_for_vllm_on_two_gpus_starts_instances_pinned_to_both_and_says_why_they_fail_here(monkeypatch, tmp_path,
                                                                                            capsys):
    """The real ``asrctl up --engine vllm --gpus-per-instance 2`` on the fake NVML: it places each
    instance on two GPUs, renders the pins and the tensor-parallel setting, starts supervisord, nginx
    and the instances from the vllm environment; on this host they find no CUDA driver, and up says
    so in one line and fails. ``asrctl down`` then leaves no process of the run."""
    from app.control import cli
    from app.control.act.processes import run_processes
    from app.control.paths import RunPaths
    from support import free_ports, vllm_python

    vllm_python()
    fake = FakeNvml(four_gpus()).install(monkeypatch)
    monkeypatch.setenv("ASR_INSTANCE_GPU_MEMORY_MB", "30000")
    run = tmp_path / "run"
    ports = free_ports(3)
    try:
        assert cli.main(["up", "--run-dir", str(run), "--engine", "vllm", "--model", str(tmp_path), "--beam-size", "1",
                         "--device", "cuda", "--instances", "2", "--gpus-per-instance", "2", "--port", str(ports[0]),
                         "--base-port", str(ports[1]), "--timeout", "120"]) == 1
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(r"asrctl up: asr-\d+ failed to load its model: RuntimeError: device is cuda but this "
                            r"host has no CUDA driver \(libcuda.so.1 not found\)", err), err
        pool = json.loads((run / "pool.json").read_text())["instances"]
        assert [[s["gpu"], *s["more_gpus"]] for s in pool] == [[0, 1], [3, 0]]
        assert "gpus_per_instance = 2" in (run / "asr.toml").read_text().splitlines()
        programs = [p.read_text() for p in (run / "supervisor" / "programs").glob("asr-*.conf")]
        pins = {re.search(r'ASR_INSTANCE_ID="([^"]*)"', t).group(1): re.search(r'CUDA_VISIBLE_DEVICES="([^"]*)"', t).group(1)
                for t in programs}
        assert pins == {pool[0]["name"]: f"{fake.gpus[0].uuid},{fake.gpus[1].uuid}",
                        pool[1]["name"]: f"{fake.gpus[3].uuid},{fake.gpus[0].uuid}"}
        logs = "".join(p.read_text(errors="replace") for p in (run / "logs").glob("asr-*"))
        assert "no CUDA driver" in logs, logs[-2000:]     # the instances themselves started, and refused
    finally:
        assert cli.main(["down", "--run-dir", str(run), "--quiet"]) == 0
    assert run_processes(RunPaths.at(run)) == []


def test_an_instance_spanning_two_gpus_refuses_to_load_when_cuda_sees_one(monkeypatch):
    from app.hardware import cuda
    from app.runtime.instance import ModelInstance

    fake = FakeNvml(four_gpus()).install(monkeypatch)
    first = fake.gpus[0]
    settings = load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": first.uuid, "engine": "vllm",
                                                "model": "/srv/q", "beam_size": 1, "gpus_per_instance": 2})
    seen = {"uuid": first.uuid, "name": first.name, "pci_bus_id": first.pci_bus_id, "visible": 1}
    monkeypatch.setattr(cuda, "current_device", lambda: seen)
    with pytest.raises(RuntimeError, match=r"spans 2 GPUs \(gpus_per_instance\) but CUDA sees 1"):
        ModelInstance(settings)._check_gpu()
    seen["visible"] = 2
    assert ModelInstance(settings)._check_gpu()["gpus"] == 2
    from app.control.cli import _gpu_column
    assert _gpu_column({"name": first.name, "uuid": first.uuid, "memory_mb": 100, "gpus": 2}).endswith(
        "100 MB and 1 more GPU(s)")
