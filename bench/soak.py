"""``python -m bench.soak``: a long run at about 70 % of capacity with a fault every 2 minutes.

Brings a service up with the real ``asrctl`` on loopback, measures its capacity (closed loop, a
minute), then sends an open-loop stream at ``--load`` of it for ``--minutes`` while a fault hits it
every ``--fault-every`` seconds, in turn: an instance's gunicorn master killed (``kill -9``), nginx's
master killed, an instance's worker frozen (``SIGSTOP``), a scale step (+1, then -1 on the next
round). It samples every process's memory (RSS) every 10 s and reports failed requests, p50/p95
latency per minute, each fault's recovery and each program's memory trend, in
``bench/results/soak-<timestamp>/`` (``summary.md``, ``soak.json``). Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from app.selfcheck.speech import load_clips
from bench.load import Connection, Record, Uploads, run_load
from bench.service import Service

FAULTS = ("instance killed", "nginx killed", "worker frozen", "scale step")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out or Path(__file__).parent / "results" / time.strftime("soak-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    clips = load_clips(limit=args.clips)
    uploads = Uploads(clips)
    run_dir = Path(tempfile.mkdtemp(prefix="asr-soak-")) / "run"
    service = Service("soak", run_dir, args.instances, 1, flags=["--max-queue", "8"],
                      env={"ASR_MAX_INSTANCES": str(args.instances + 1)})
    service.up()
    print(f"up: http://127.0.0.1:{service.port} ({args.instances} instances), run dir {run_dir}", flush=True)
    try:
        capacity = _capacity(service, uploads, clips, args.capacity_seconds)
        rate = capacity * args.load
        print(f"capacity {capacity:.2f} req/s; soak at {rate:.2f} req/s for {args.minutes} min", flush=True)
        result = _soak(service, uploads, clips, rate, args.minutes * 60, args.fault_every)
        result.update(capacity_rps=capacity, rate_rps=rate, load=args.load, instances=args.instances,
                      clips=[c.name for c in clips])
    finally:
        service.down()
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(summary(result))
    print((out / "summary.md").read_text())
    print(f"results: {out}")
    return 1 if result["failed"] else 0


def _capacity(service: Service, uploads: Uploads, clips, seconds: float) -> float:
    """Requests per second the pool completes with twice as many clients as instances, kept busy."""
    schedule = clips * 1000
    records = run_load(service.url, uploads, schedule, "capacity", concurrency=2 * service.instances,
                       max_seconds=seconds)
    ok = [r for r in records if r.ok]
    span = max(r.end for r in ok) - min(r.start for r in ok)
    return len(ok) / span


def _soak(service: Service, uploads: Uploads, clips, rate: float, seconds: float, fault_every: float) -> dict:
    records: list[Record] = []
    lock = threading.Lock()
    local = threading.local()
    t0 = time.monotonic()
    stop = threading.Event()
    memory: list[dict] = []
    faults: list[dict] = []

    def send(clip) -> None:
        if not hasattr(local, "connection"):
            local.connection = Connection()
        r = uploads.post(local.connection, service.url, clip, "soak")
        if not r.ok:
            local.connection.close()
            local.connection = Connection()
        with lock:
            records.append(r)

    def sample_memory() -> None:
        while not stop.wait(10):
            memory.append({"t": round(time.monotonic() - t0, 1), "rss_mb": program_rss(service.run_dir)})

    def inject() -> None:
        n = 0
        while not stop.wait(fault_every - ((time.monotonic() - t0) % fault_every)):
            if time.monotonic() - t0 > seconds - 30:
                return
            kind = FAULTS[n % len(FAULTS)]
            step = +1 if (n // len(FAULTS)) % 2 == 0 else -1
            at = time.monotonic() - t0
            try:
                detail, hit, replaced, recovered = inject_fault(service, kind, step)
            except Exception as e:  # noqa: BLE001 - reported, the soak goes on
                detail, hit, replaced, recovered = f"fault injection failed: {e}", None, None, None
            hit = hit or (at + t0)

            def since_hit(when):
                return None if when is None else round(when - hit, 1)

            faults.append({"t": round(hit - t0, 1), "wall": time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - hit))),
                           "fault": kind, "detail": detail, "replaced_s": since_hit(replaced),
                           "recovered_s": since_hit(recovered)})
            print(f"[{at:6.0f} s] {kind}: {detail}", flush=True)
            n += 1

    threads = [threading.Thread(target=sample_memory, daemon=True), threading.Thread(target=inject, daemon=True)]
    for t in threads:
        t.start()
    with ThreadPoolExecutor(max_workers=32) as pool:
        i = 0
        while True:
            due = t0 + i / rate
            if due - t0 >= seconds:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(send, clips[i % len(clips)])
            i += 1
            if i % 200 == 0:
                with lock:
                    bad = sum(1 for r in records if not r.ok)
                print(f"[{time.monotonic() - t0:6.0f} s] {len(records)} answered, {bad} failed", flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return analyse(records, memory, faults, t0)


def inject_fault(service: Service, kind: str, step: int) -> tuple[str, float, float | None, float | None]:
    """Do one fault. Returns what was done, when (monotonic) it hit, when the process hit was replaced
    (supervisord runs a new pid: for a frozen worker, the watcher's detection) and when the service was
    whole again (the replacement ready, or the scale step done)."""
    programs = _programs(service)
    instances = sorted(n for n in programs if n.startswith("asr-"))
    if kind in ("instance killed", "nginx killed", "worker frozen"):
        name = instances[-1] if kind == "instance killed" else "nginx" if kind == "nginx killed" else instances[0]
        old = programs[name]["pid"]
        if kind == "worker frozen":
            port = int(name.split("-")[1])
            target = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["pid"]
            sig, what = signal.SIGSTOP, f"SIGSTOP {name} worker pid {target}"
        else:
            target, sig, what = old, signal.SIGKILL, f"kill -9 {name} master pid {old}"
        os.kill(target, sig)
        hit = time.monotonic()
        replaced = _until(lambda: _programs(service).get(name, {}).get("pid") not in (None, old))
        return what, hit, replaced, _until(lambda: _replaced(service, name, old))
    target = len(instances) + step
    hit = time.monotonic()
    from bench.service import asrctl
    asrctl("scale", str(target), "--run-dir", str(service.run_dir), "--quiet", timeout=600)
    return f"asrctl scale {len(instances)} -> {target}", hit, None, time.monotonic()


def _programs(service: Service) -> dict[str, dict]:
    from bench.service import asrctl
    status = json.loads(asrctl("status", "--json", "--run-dir", str(service.run_dir), check=False).stdout)
    return {r["name"]: r for r in status.get("instances", [])}


def _replaced(service: Service, name: str, old_pid: int) -> bool:
    row = _programs(service).get(name, {})
    return bool(row.get("ready") and row.get("pid") not in (None, old_pid))


def _until(condition, seconds: float = 110) -> float | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.5)
    return None


def program_rss(run_dir: Path) -> dict[str, float]:
    """RSS in MB per program (supervisord, nginx, each instance, the watcher), its children included."""
    try:
        root = psutil.Process(int((run_dir / "supervisord.pid").read_text()))
    except (OSError, ValueError, psutil.Error):
        return {}
    rss = {"supervisord": root.memory_info().rss / 2**20}
    for child in root.children():
        try:
            name = _program_name(child)
            total = child.memory_info().rss + sum(c.memory_info().rss for c in child.children(recursive=True))
            rss[name] = rss.get(name, 0) + total / 2**20
        except psutil.Error:
            continue
    return {k: round(v, 1) for k, v in rss.items()}


def _program_name(proc: psutil.Process) -> str:
    env = proc.environ()
    if env.get("ASR_INSTANCE_ID"):
        return env["ASR_INSTANCE_ID"]
    cmd = " ".join(proc.cmdline())
    if "nginx" in cmd:
        return "nginx"
    if "asrctl watch" in cmd:
        return "watcher"
    return proc.name()


def analyse(records: list[Record], memory: list[dict], faults: list[dict], t0: float) -> dict:
    minutes: dict[int, list[Record]] = {}
    for r in records:
        minutes.setdefault(int((r.start - t0) // 60), []).append(r)
    per_minute = []
    for m in sorted(minutes):
        ok = sorted(r.latency for r in minutes[m] if r.ok)
        per_minute.append({
            "minute": m + 1, "requests": len(minutes[m]), "failed": sum(1 for r in minutes[m] if not r.ok),
            "p50_s": round(statistics.median(ok), 2) if ok else None,
            "p95_s": round(ok[math.ceil(0.95 * len(ok)) - 1], 2) if ok else None,  # nearest rank
        })
    failed = [r for r in records if not r.ok]
    programs = sorted({k for m in memory for k in m["rss_mb"]})
    trend = {}
    for name in programs:
        points = [(m["t"], m["rss_mb"][name]) for m in memory if name in m["rss_mb"]]
        if len(points) >= 3:
            xs, ys = zip(*points)
            slope = statistics.linear_regression(xs, ys).slope * 3600 if len(set(xs)) > 1 else 0.0
            third = max(1, len(ys) // 3)
            trend[name] = {"first_mb": round(statistics.mean(ys[:third]), 1),
                           "last_mb": round(statistics.mean(ys[-third:]), 1),
                           "max_mb": round(max(ys), 1), "slope_mb_per_hour": round(slope, 1)}
    return {
        "requests": len(records), "failed": len(failed),
        "failures": [{"t": round(r.start - t0, 1), "status": r.status, "error": r.error} for r in failed[:50]],
        "per_minute": per_minute, "faults": faults, "memory": memory, "memory_trend": trend,
    }


def summary(result: dict) -> str:
    lines = [f"# Soak: {result['requests']} requests, {result['failed']} failed", "",
             f"{result['instances']} instances x 1 core; capacity {result['capacity_rps']:.2f} req/s measured "
             f"first; open-loop load {result['rate_rps']:.2f} req/s ({result['load']:.0%}); clips: "
             f"{', '.join(result['clips'])}", "",
             "| minute | requests | failed | p50 s | p95 s |", "| ---: | ---: | ---: | ---: | ---: |"]
    for m in result["per_minute"]:
        lines.append(f"| {m['minute']} | {m['requests']} | {m['failed']} | {m['p50_s']} | {m['p95_s']} |")
    lines += ["", "| at s | fault | what | new process after s | whole again after s |",
              "| ---: | --- | --- | ---: | ---: |"]
    for f in result["faults"]:
        lines.append(f"| {f['t']:.0f} | {f['fault']} | {f['detail']} | {_or_dash(f['replaced_s'])} | "
                     f"{_or_dash(f['recovered_s'])} |")
    lines += ["", "Memory: each program's RSS (its children included), sampled every 10 s; an instance "
              "restarted by a fault starts again from its fresh size.", "",
              "| program | RSS first third MB | last third MB | max MB | trend MB/h |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, t in result["memory_trend"].items():
        lines.append(f"| {name} | {t['first_mb']} | {t['last_mb']} | {t['max_mb']} | {t['slope_mb_per_hour']} |")
    if result["failures"]:
        lines += ["", "Failures: " + ", ".join(f"{f['t']} s {f['status']} {f['error']}" for f in result["failures"])]
    return "\n".join(lines) + "\n"


def _or_dash(value) -> str:
    return "-" if value is None else f"{value}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--fault-every", dest="fault_every", type=float, default=120)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--clips", type=int, default=5, help="the N shortest set-A clips")
    parser.add_argument("--capacity-seconds", dest="capacity_seconds", type=float, default=60)
    parser.add_argument("--out")
    return parser


if __name__ == "__main__":
    from bench import stop_on_sigterm

    stop_on_sigterm()
    raise SystemExit(main())
