"""One benchmark run: bring the services up, measure them against the bare engine, write the report.

Three measurements, each interleaved with the bare engine in short blocks so that a noisy machine
(load from elsewhere drifting during the run) hits both sides alike:

1. **Overhead at concurrency 1** on one instance with all cores: each clip goes, in rotating order,
   to the bare engine, straight to the instance (gunicorn, no nginx) and through nginx. Paired
   differences split the overhead into audio decoding, gunicorn + Flask, and nginx.
2. **Concurrency sweep** on the same instance: closed-loop load at each concurrency, alternating
   with the bare engine transcribing the same clips back to back on the same cores and threads.
   The best served throughput over the sweep is "served at saturation".
3. **Instance scaling**: 1, 2, ... instances of one core and one thread each, saturated with two
   requests in flight per instance, alternating with a bare engine on one core and one thread.

Requests go longest clip first in each block, so a block's tail is a short clip, not an idle core.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.bare import BareEngine
from bench import REPO
from app.selfcheck.speech import Clip, load_clips
from bench.load import Connection, Record, Uploads, run_load
from bench.machine import busy_seconds, cpu_model
from bench.report import check_targets, summarize_bare, summarize_http, write_files
from bench.service import Service

RESULTS = REPO / "bench" / "results"


@dataclass
class Plan:
    clips_dir: str | None = None
    clip_limit: int | None = None
    concurrency: list[int] = field(default_factory=lambda: [2, 4])   # 1 is always measured (phase 1)
    rates: list[float] = field(default_factory=list)                 # open-loop runs (requests/s)
    instances: list[int] = field(default_factory=lambda: [1, 2])      # single-thread instances
    rounds: int = 2            # passes over the clips at concurrency 1
    blocks: int = 2            # interleaved served/bare blocks in phases 2 and 3
    passes: int = 1            # passes over the clips per block
    max_seconds: float = 720.0 # the whole run stops starting new work after this
    engine: str = "ctranslate2"
    device: str = "auto"       # auto: cuda where NVML finds a GPU; the bare engine runs where the service does
    model: str = "embedded"
    compute_type: str = "auto"
    beam_size: int = 5
    max_batch: int = 0
    max_wait_ms: float = 10.0
    max_queue: int = 8
    out: Path | None = None
    progress: bool = True
    keep_run_dirs: bool = False

    @classmethod
    def quick(cls, **changes) -> "Plan":
        base = dict(clip_limit=3, concurrency=[2], instances=[], rounds=1, blocks=1, max_seconds=150.0)
        return cls(**{**base, **changes})


def run_benchmark(plan: Plan) -> tuple[dict, Path]:
    started = datetime.now()
    out = plan.out or RESULTS / started.strftime("%Y%m%d-%H%M%S")
    deadline = time.monotonic() + plan.max_seconds
    clips = load_clips(plan.clips_dir, plan.clip_limit)
    uploads = Uploads(clips)
    cores = sorted(os.sched_getaffinity(0))
    device = _device(plan)
    batch = _batch_size(plan, device)
    notes: list[str] = []
    loadavg_start = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="asr-bench-"))
    flags = ["--engine", plan.engine, "--device", device, "--model", plan.model, "--compute-type", plan.compute_type,
             "--beam-size", str(plan.beam_size), "--max-queue", str(plan.max_queue)]
    env = {"ASR_MAX_BATCH": str(plan.max_batch), "ASR_MAX_WAIT_MS": str(plan.max_wait_ms)}
    full = Service(f"1 instance x {len(cores)} cores", work / "full", 1, 0, flags, env)
    scaled = [Service(f"{n} x 1 core", work / f"scaled-{n}", n, 1, flags, env) for n in plan.instances]
    services = [full, *scaled]
    common = dict(engine=plan.engine, model=plan.model, compute_type=plan.compute_type, beam_size=plan.beam_size,
                  model_cache=_model_cache(), max_audio_seconds=600.0, device=device)
    bares: dict[str, BareEngine] = {}
    bare_all_summary = bare_one_summary = None
    health_full: dict = {}
    records: list[Record] = []
    runs: list[dict] = []
    ratios: dict = {}
    progress = _progress(plan, clips, len(scaled))
    try:
        with ThreadPoolExecutor(max_workers=len(services) + 2) as pool:
            progress.set_description("bringing up services and bare engines")
            ups = [pool.submit(s.up) for s in services]
            if device == "cuda":  # the bare engine on the very GPU the served instance uses
                ups[0].result()
                common["gpu"] = (full.health()[0].get("gpu") or {}).get("uuid")
                if not common["gpu"]:   # pinning "" would put the bare engine on whatever GPU is first
                    raise RuntimeError("the served instance names no GPU on /health: the bare engine cannot "
                                       "be put on the same GPU, so the comparison would measure the hardware")
            bare_all = pool.submit(BareEngine, "all_cores", clips, _spec(cores), len(cores), **common)
            bare_one = pool.submit(BareEngine, "one_core", clips, _spec(cores[:1]), 1, **common) if scaled else None
            # One more single-core bare engine per extra core, to run side by side with the first.
            top_n = min(max((s.instances for s in scaled), default=1), len(cores))
            bare_more = [pool.submit(BareEngine, f"core_{k}", clips, _spec(cores[k:k + 1]), 1, **common)
                         for k in range(1, top_n)]
            for f in ups:
                f.result()
            bares["all_cores"] = bare_all.result()
            if bare_one:
                bares["one_core"] = bare_one.result()
            for k, f in enumerate(bare_more, start=1):
                bares[f"core_{k}"] = f.result()
        health_full = full.health()[0]
        lpt = sorted(clips * plan.passes, key=lambda c: -c.duration)  # longest first: short tail

        # 1. Overhead at concurrency 1: bare engine vs straight to gunicorn vs through nginx.
        progress.set_description("concurrency 1: bare / gunicorn / nginx")
        phase1 = _overhead_phase(plan, full, bares["all_cores"], clips, uploads, progress, deadline)
        records += phase1["nginx"] + phase1["direct"]
        # One request at a time: throughput is audio over the summed latencies.
        for name, key, series in (("served c=1", "nginx", "concurrency"), ("gunicorn direct c=1", "direct", None)):
            runs.append(summarize_http(name, phase1[key], walls=[sum(r.latency for r in phase1[key])],
                                       service=full.name, instances=1, threads_per_instance=len(cores),
                                       concurrency=1, series=series))
        ratios.update(_overhead(phase1, bares["all_cores"], clips))

        # 2. Concurrency sweep on all cores, alternating with the bare engine on the same cores.
        bare_blocks, sweep = [], {c: [] for c in plan.concurrency}
        for block in range(plan.blocks):
            if time.monotonic() > deadline:
                notes.append(f"time budget reached: concurrency sweep ran {block} of {plan.blocks} blocks")
                break
            progress.set_description(f"sweep block {block + 1}/{plan.blocks}: bare engine")
            bare_blocks.append(bares["all_cores"].transcribe(lpt, batch))
            progress.update(len(lpt))
            for c in _rotate(plan.concurrency, block):
                progress.set_description(f"sweep block {block + 1}/{plan.blocks}: concurrency {c}")
                sweep[c].append(_served_block(full, uploads, lpt, f"served c={c}", c, None, progress, deadline))
        bare_all_summary = _bare_summary("bare engine, all cores", bare_blocks, phase1["bare"], cores, batch)
        runs.append(bare_all_summary)
        best = None
        for c, blocks in sweep.items():
            if not blocks:
                continue
            block_records = [r for b in blocks for r in b["records"]]
            records += block_records
            summary = summarize_http(f"served c={c}", block_records, walls=[b["wall"] for b in blocks],
                                     service=full.name, instances=1, threads_per_instance=len(cores),
                                     concurrency=c, series="concurrency",
                                     cpu_s=_r(sum(b["cpu"] for b in blocks)), other_cores=_mean(blocks))
            summary["audio_per_cpu_s"] = _r(summary["audio_s"] / summary["cpu_s"]) if summary["cpu_s"] else None
            summary["client_cpu_s"] = _r(sum(b["client_cpu"] for b in blocks))
            runs.append(summary)
            if summary["errors"] == 0 and (best is None or summary["rtfx"] > best["rtfx"]):
                best = summary
        if best and bare_all_summary["rtfx"]:
            ratios["served_vs_bare_saturation"] = _r(best["rtfx"] / bare_all_summary["rtfx"])
            ratios["saturation_concurrency"] = best["concurrency"]
            if best.get("audio_per_cpu_s") and bare_all_summary.get("audio_per_cpu_s"):
                ratios["served_vs_bare_cpu_efficiency"] = _r(best["audio_per_cpu_s"]
                                                             / bare_all_summary["audio_per_cpu_s"])
            ratios["client_cpu_share"] = _r(best["client_cpu_s"] / best["wall_s"]) if best["wall_s"] else None

        # Open-loop runs at fixed rates, if asked for.
        for rate in plan.rates:
            if time.monotonic() > deadline:
                notes.append(f"time budget reached: rate {rate}/s not run")
                continue
            progress.set_description(f"open loop {rate:g} requests/s")
            block = _served_block(full, uploads, lpt, f"served {rate:g}/s", 4 * len(cores), rate, progress, deadline)
            records += block["records"]
            runs.append(summarize_http(f"served {rate:g} req/s", block["records"], service=full.name, instances=1,
                                       threads_per_instance=len(cores), rate=rate, series="rate"))

        # 3. Instance scaling: single-thread instances, saturated, alternating with a 1-core bare engine.
        if scaled:
            side_by_side = [bares["one_core"], *(bares[f"core_{k}"] for k in range(1, top_n))]
            bare_one_blocks, bare_n_blocks, by_service = [], [], {s.name: [] for s in scaled}
            for block in range(plan.blocks):
                if time.monotonic() > deadline:
                    notes.append(f"time budget reached: scaling ran {block} of {plan.blocks} blocks")
                    break
                progress.set_description(f"scaling block {block + 1}/{plan.blocks}: bare engine, 1 core")
                bare_one_blocks.append(bares["one_core"].transcribe(lpt, batch))
                progress.update(len(lpt))
                for s in _rotate(scaled, block):
                    progress.set_description(f"scaling block {block + 1}/{plan.blocks}: {s.name}")
                    by_service[s.name].append(_served_block(s, uploads, lpt, s.name, 2 * s.instances, None,
                                                            progress, deadline))
                if len(side_by_side) > 1:
                    # What the machine gives the bare engine itself right now: N pinned engines at once.
                    progress.set_description(f"scaling block {block + 1}/{plan.blocks}: "
                                             f"{len(side_by_side)} bare engines side by side")
                    bare_n_blocks.append(_side_by_side(side_by_side, lpt, batch))
                    progress.update(len(lpt) * len(side_by_side))
            bare_one_summary = _bare_summary("bare engine, 1 core", bare_one_blocks, [], cores[:1], batch)
            bare_one_summary.update(instances=1, series="bare_instances")
            runs.append(bare_one_summary)
            if bare_n_blocks:
                bare_n = _bare_summary(f"{len(side_by_side)} bare engines x 1 core", bare_n_blocks, [],
                                       cores[:len(side_by_side)], batch)
                bare_n.update(instances=len(side_by_side), threads_per_instance=1, series="bare_instances")
                runs.append(bare_n)
            rtfx = {}
            for s in scaled:
                blocks = by_service[s.name]
                if not blocks:
                    continue
                block_records = [r for b in blocks for r in b["records"]]
                records += block_records
                summary = summarize_http(s.name, block_records, walls=[b["wall"] for b in blocks], service=s.name,
                                         instances=s.instances, threads_per_instance=1,
                                         concurrency=2 * s.instances, series="instances",
                                         other_cores=_mean(blocks))
                runs.append(summary)
                rtfx[s.instances] = summary["rtfx"]
            if 1 in rtfx and bare_one_summary["rtfx"]:
                ratios["served_vs_bare_one_core"] = _r(rtfx[1] / bare_one_summary["rtfx"])
            top = max(rtfx, default=None)
            if top and top > 1 and 1 in rtfx:
                ratios["instances_scaling"] = _r(rtfx[top] / rtfx[1])
                ratios["instances_scaling_n"] = top
                if bare_n_blocks and bare_one_summary["rtfx"] and top == len(side_by_side):
                    # The same ratio for bare engines pinned the same way, between the same blocks: what
                    # the machine allowed at the time, whatever the service does.
                    ratios["bare_scaling"] = _r(bare_n["rtfx"] / bare_one_summary["rtfx"])
                    ratios["instances_scaling_vs_bare"] = _r(ratios["instances_scaling"] / ratios["bare_scaling"])
        ratios.setdefault("served_vs_bare_saturation", None)
        ratios.setdefault("instances_scaling", None)
        ratios.setdefault("overhead_p50_ms", None)
    finally:
        progress.set_description("bringing services down")
        with ThreadPoolExecutor(max_workers=len(services) + 1) as pool:
            list(pool.map(lambda s: s.down(), services))
        for b in bares.values():
            b.close()
        progress.close()
        if not plan.keep_run_dirs:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "cpu_model": cpu_model(),
            "cores": len(cores),
            "python": platform.python_version(),
            "engine": plan.engine,
            "device": device,
            "model": plan.model,
            "compute_type": plan.compute_type,
            "beam_size": plan.beam_size,
            "batch_size": batch,
            "max_wait_ms": plan.max_wait_ms,
            "clips": len(clips),
            "clip_audio_s": sum(c.duration for c in clips),
            "clip_names": [c.name for c in clips],
            "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.__dict__.items()},
            "instance_health": {k: health_full.get(k) for k in ("cpu_cores", "engine", "model", "device", "gpu")},
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg()[0],
            "duration_s": round((datetime.now() - started).total_seconds(), 1),
            "notes": notes,
        },
        "bare": {"all_cores": bare_all_summary, "one_core": bare_one_summary},
        "runs": runs,
        "ratios": ratios,
        "targets": check_targets(ratios),
    }
    result["files"] = write_files(out, result, records)
    return result, out


def _overhead_phase(plan: Plan, service: Service, bare: BareEngine, clips: list[Clip], uploads: Uploads,
                    progress, deadline: float) -> dict:
    """Each clip, one at a time, to the bare engine, straight to gunicorn and through nginx, in an order
    that rotates from clip to clip so no path always goes first."""
    out = {"bare": [], "direct": [], "nginx": []}
    with Connection() as direct, Connection() as nginx:
        for rnd in range(plan.rounds):
            for k, clip in enumerate(clips):
                if time.monotonic() > deadline:
                    return out
                for path in _rotate(["bare", "direct", "nginx"], k + rnd):
                    if path == "bare":
                        (result,), _, _ = bare.transcribe([clip])
                        out["bare"].append(result.latency)
                    else:
                        session, url = (direct, service.instance_url(0)) if path == "direct" else (nginx, service.url)
                        out[path].append(uploads.post(session, url, clip, f"{path} c=1"))
                    progress.update(1)
    return out


def _overhead(phase: dict, bare: BareEngine, clips: list[Clip]) -> dict:
    """What the service adds at concurrency 1.

    The headline is per request and needs no second process: the client's latency minus the engine
    call inside the instance (its Server-Timing header), so machine noise in the engine call cancels.
    It splits into audio decoding (timed in the bare process), nginx (through nginx minus straight to
    gunicorn) and gunicorn + Flask (the rest). ``served_minus_bare_p50_ms`` compares the two processes
    directly, and ``served_inference_vs_bare_p50`` checks the engine call itself is no slower served.
    """
    import numpy as np

    def overheads(records):
        return [r.overhead for r in records if r.ok and r.overhead is not None]

    nginx, direct = overheads(phase["nginx"]), overheads(phase["direct"])
    served = [r.latency for r in phase["nginx"] if r.ok]
    if not nginx or not phase["bare"]:
        return {}
    ms = lambda xs: round(float(np.median(xs)) * 1000, 2)  # noqa: E731
    decode = ms(bare.decode_seconds)
    inference = [r.inference_s for r in phase["nginx"] if r.ok and r.inference_s is not None]
    return {
        "overhead_p50_ms": ms(nginx),
        "overhead_decode_ms": decode,
        "overhead_nginx_ms": round(ms(nginx) - ms(direct), 2) if direct else None,
        "overhead_gunicorn_flask_ms": round(ms(direct) - decode, 2) if direct else None,
        "served_minus_bare_p50_ms": round(ms(served) - ms(phase["bare"]), 2),
        "served_inference_vs_bare_p50": round(float(np.median(inference)) / float(np.median(phase["bare"])), 3),
    }


def _served_block(service: Service, uploads: Uploads, schedule: list[Clip], run: str, concurrency: int,
                  rate: float | None, progress, deadline: float) -> dict:
    cpu0, client0, busy0, t0 = service.cpu_seconds(), time.process_time(), busy_seconds(), time.monotonic()
    records = run_load(service.url, uploads, schedule, run, concurrency=concurrency, rate=rate,
                       max_seconds=max(1.0, deadline - time.monotonic()), progress=progress)
    elapsed = time.monotonic() - t0
    wall = max(r.end for r in records) - min(r.start for r in records) if records else 0.0
    cpu, client = service.cpu_seconds() - cpu0, time.process_time() - client0
    # Cores kept busy by everything else on the machine meanwhile (other processes, not this run).
    others = (busy_seconds() - busy0 - cpu - client) / elapsed if elapsed else None
    return {"records": records, "wall": wall, "cpu": cpu, "client_cpu": client, "other_cores": others}


def _side_by_side(engines: list[BareEngine], schedule: list[Clip], batch: int):
    """Every engine transcribes the whole schedule at the same time; one block, as ``transcribe`` returns."""
    with ThreadPoolExecutor(max_workers=len(engines)) as pool:
        parts = list(pool.map(lambda e: e.transcribe(schedule, batch), engines))
    return ([r for results, _, _ in parts for r in results], max(wall for _, wall, _ in parts),
            sum(cpu for _, _, cpu in parts))


def _bare_summary(name: str, blocks: list, c1_latencies: list[float], cores: list[int], batch: int) -> dict:
    """Throughput from the back-to-back blocks; latency percentiles from one-at-a-time calls where there
    were some (phase 1), else from the blocks."""
    results = [r for b in blocks for r in b[0]]
    latencies = c1_latencies or [r.latency for r in results]
    return summarize_bare(name, latencies, clips=len(results), audio=sum(r.audio_s for r in results),
                          wall=sum(b[1] for b in blocks), cpu=sum(b[2] for b in blocks),
                          service=f"bare, cores {_spec(cores)}", instances=0, threads_per_instance=len(cores),
                          concurrency=1, batch=batch)


def _batch_size(plan: Plan, device: str) -> int:
    from app.config import load_settings

    settings = load_settings(env={}, overrides={"max_batch": plan.max_batch, "max_queue": plan.max_queue})
    return settings.batch_size(device)


def _device(plan: Plan) -> str:
    """Where the services run, so the bare engine runs there too (a GPU service against a CPU bare
    engine measures the hardware, not the service)."""
    from app.control.plan.placement import resolve_device
    from app.hardware.nvml import inventory

    found = inventory()
    return resolve_device(plan.device, found.gpus, found.error)


def _model_cache() -> str:
    from app.config import load_settings

    return load_settings(env={k: v for k, v in os.environ.items() if k == "ASR_MODEL_CACHE"}).model_cache


def _progress(plan: Plan, clips: list[Clip], scaled: int):
    from tqdm import tqdm

    n = len(clips)
    side_by_side = max(plan.instances, default=1) if scaled else 0
    total = (plan.rounds * n * 3 + plan.blocks * n * plan.passes * (1 + len(plan.concurrency))
             + len(plan.rates) * n * plan.passes
             + (plan.blocks * n * plan.passes * (1 + sum(plan.instances) + side_by_side) if scaled else 0))
    return tqdm(total=total, unit="clip", disable=not plan.progress, dynamic_ncols=True)


def _rotate(items: list, k: int) -> list:
    k %= len(items) or 1
    return items[k:] + items[:k]


def _spec(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def _mean(blocks: list[dict]) -> float | None:
    """Cores other processes kept busy, averaged over the blocks."""
    values = [b["other_cores"] for b in blocks if b.get("other_cores") is not None]
    return _r(sum(values) / len(values)) if values else None


def _r(x: float) -> float:
    return round(float(x), 3)
