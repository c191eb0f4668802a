"""``python -m bench long``: long-file latency, chunked against window after window, and the jobs path.

Recordings of ``--minutes`` (default 5 and 30) are built from the English set-A clips back to back
with pauses of 0.4-1.5 s (seeded), so the reference text is known and the word error rate of every
run is reported next to its time. Each configuration is a pool brought up with the real ``asrctl``
on free loopback ports, one core and one thread per instance (``--cpu-threads 1``):

* ``window``: ``chunking = false``: one instance decodes the file window after window (the other, if
  any, idles);
* ``chunked``: the file is cut at pauses and the chunks decoded on the instance that got it and on
  its idle siblings;
* ``job``: ``POST /v1/jobs``, then ``GET /v1/jobs/{id}`` every 0.5 s until done: the time to done and
  the longest stretch without progress. With ``--restart-job-minutes M`` (default 30), the job of
  that length gets an ``asrctl restart --rolling`` when half done, and the chunks decoded twice are
  counted from the job database.

Results: ``bench/results/long-<timestamp>/`` (``summary.md``, ``results.json``, plots).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from bench import REPO
from app.selfcheck.speech import SPEECH
from bench.machine import busy_seconds
from bench.service import Service, tree_cpu_seconds
from app.selfcheck.wer import word_error_rate

RATE = 16_000


def recording(minutes: float, seed: int = 0) -> tuple[bytes, float, str]:
    """(16-bit WAV bytes, seconds, reference text): set-A clips back to back until ``minutes``."""
    import soundfile
    import soxr

    if not (SPEECH / "manifest.jsonl").exists():  # its word error rate needs references
        raise SystemExit(f"no real speech at {SPEECH}: python -m bench long builds its recording from the "
                         "set-A clips of ../shared/audio beside the checkout (ASR_SHARED_AUDIO moves it)")
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("language") == "en" and r.get("set") == "A"]
    clips = []
    for row in rows:
        samples, rate = soundfile.read(str(SPEECH / row["file"]), dtype="float32", always_2d=True)
        mono = samples.mean(axis=1)
        clips.append((soxr.resample(mono, rate, RATE) if rate != RATE else mono, row["reference"]))
    rng = random.Random(seed)
    pieces, texts, total = [], [], 0
    while total < minutes * 60 * RATE:
        samples, text = clips[rng.randrange(len(clips))]
        pause = np.zeros(int(rng.uniform(0.4, 1.5) * RATE), np.float32)
        pieces += [samples.astype(np.float32), pause]
        texts.append(text)
        total += len(samples) + len(pause)
    audio = np.concatenate(pieces)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue(), len(audio) / RATE, " ".join(texts)


def transcribe(service: Service, data: bytes) -> dict:
    started, load = time.monotonic(), OtherLoad(service)
    response = requests.post(service.url, files={"audio": ("long.wav", data)}, timeout=7200)
    seconds = time.monotonic() - started
    response.raise_for_status()
    return {"seconds": round(seconds, 2), "text": response.json()["text"],
            "chunks": response.headers.get("X-ASR-Chunks", ""),
            "other_load_cores": load.cores()}


def run_job(service: Service, data: bytes, restart: bool) -> dict:
    base = f"http://127.0.0.1:{service.port}"
    started, load = time.monotonic(), OtherLoad(service)
    posted = requests.post(f"{base}/v1/jobs", files={"audio": ("long.wav", data)}, timeout=600)
    posted.raise_for_status()
    job_id = posted.json()["id"]
    timeline: list[tuple[float, float]] = []   # (seconds since the POST, audio seconds done) at each change
    running_since: float | None = None
    restarter: threading.Thread | None = None
    while True:
        job = requests.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        now = time.monotonic() - started
        done = job["progress"]["done_seconds"]
        if running_since is None and job["state"] != "queued":
            running_since = now
        if not timeline or done != timeline[-1][1]:
            timeline.append((round(now, 2), done))
        if restart and restarter is None and job["progress"]["fraction"] >= 0.5:
            restarter = threading.Thread(target=service_restart, args=(service, started))
            restarter.start()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    # The longest stretch, once running, in which the progress did not move (the last one ends at done).
    changes = [running_since or 0.0] + [t for t, _ in timeline if t >= (running_since or 0.0)]
    longest_gap = max((b - a for a, b in zip(changes, changes[1:])), default=0.0)
    seconds = time.monotonic() - started
    if restarter:
        restarter.join()
    result = {"seconds": round(seconds, 2), "state": job["state"], "longest_seconds_without_progress": round(longest_gap, 2),
              "progress": timeline, "text": (job.get("result") or {}).get("text", ""),
              "other_load_cores": load.cores()}
    if restart:
        from app.jobs.store import JobStore

        chunks = JobStore(service.run_dir / "jobs" / "jobs.sqlite3").chunks(job_id)
        result["restart"] = {"window": getattr(service, "restart_window", None),
                             "chunks": len(chunks),
                             # a chunk sent again: its instance was draining (503) or gone mid-chunk
                             "sent_more_than_once": sum(1 for c in chunks if c.attempts > 1),
                             "lost": sum(1 for c in chunks if c.speech and c.result is None)}
    return result


def service_restart(service: Service, started: float) -> None:
    from bench.service import asrctl

    begin = time.monotonic() - started
    asrctl("restart", "--rolling", "--run-dir", str(service.run_dir), "--quiet", timeout=900)
    service.restart_window = (round(begin, 2), round(time.monotonic() - started, 2))


class OtherLoad:
    """Cores other processes kept busy from now until ``cores()``: the machine's busy CPU time minus
    the services' own (each supervisord's whole tree) and this process's with its children (a bare
    engine's child process), over the wall time."""

    def __init__(self, *services: Service):
        self.services = services
        self.started, self.busy, self.own = time.monotonic(), busy_seconds(), self._own()

    def _own(self) -> float:
        return sum(s.cpu_seconds() for s in self.services) + tree_cpu_seconds(os.getpid())

    def cores(self) -> float:
        wall = time.monotonic() - self.started
        other = (busy_seconds() - self.busy) - (self._own() - self.own)
        return round(max(0.0, other) / wall, 2) if wall > 0 else 0.0


def run(minutes: list[float], instances: list[int], restart_minutes: float | None, out: Path,
        skip: set[str], rounds: int) -> dict:
    """Per pool size, a window-after-window pool and a chunked pool up side by side (an idle pool
    costs nothing), each recording sent to one then the other, ``rounds`` times for files up to 10
    minutes: the two modes are measured in alternation, so the machine's drift hits both."""
    recordings = {m: recording(m) for m in minutes}
    results: list[dict] = []
    limit = str(max(minutes) * 60 + 120)
    for count in instances:
        services: dict[str, Service] = {}
        try:
            for mode in ("window", "chunked"):
                env = {"ASR_CHUNKING": str(mode == "chunked").lower(), "ASR_MAX_AUDIO_SECONDS": limit,
                       "ASR_JOB_MAX_AUDIO_SECONDS": limit}
                services[mode] = Service(f"{mode}-{count}", out / f"run-{mode}-{count}", count, cpu_threads=1, env=env)
                services[mode].up(timeout=600)
            for m in minutes:
                data, duration, reference = recordings[m]
                repeats = rounds if m <= 10 else 1
                for round_ in range(repeats):
                    for mode in ("window", "chunked"):
                        if f"{mode}@{count}@{m:g}" in skip:
                            continue
                        measured = transcribe(services[mode], data)
                        row = {"minutes": m, "audio_seconds": round(duration, 1), "instances": count, "mode": mode,
                               "round": round_ + 1, "seconds": measured["seconds"], "chunks": measured["chunks"],
                               "wer": word_error_rate(reference, measured["text"]),
                               "other_load_cores": measured["other_load_cores"]}
                        results.append(row)
                        print(json.dumps(row), flush=True)
                    if count == max(instances) and f"job@{count}@{m:g}" not in skip:
                        restart = restart_minutes == m and round_ == repeats - 1
                        job = run_job(services["chunked"], data, restart=restart)
                        row = {"minutes": m, "audio_seconds": round(duration, 1), "instances": count,
                               "mode": "job + rolling restart" if restart else "job", "round": round_ + 1,
                               "seconds": job["seconds"], "wer": word_error_rate(reference, job["text"]),
                               "state": job["state"], "other_load_cores": job["other_load_cores"],
                               "longest_seconds_without_progress": job["longest_seconds_without_progress"],
                               "progress": job["progress"], **({"restart": job["restart"]} if restart else {})}
                        results.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "progress"}), flush=True)
        finally:
            for service in services.values():
                service.down()
                shutil.rmtree(service.run_dir, ignore_errors=True)
    summary = {"results": results, "ratios": ratios(results), "cpu": os.cpu_count(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    plot(out, summary)
    return summary


def ratios(results: list[dict]) -> dict:
    """Mean seconds of each mode over its rounds, against window after window on the same pool size."""
    def seconds(m, count, mode):
        times = [r["seconds"] for r in results if r["minutes"] == m and r["instances"] == count and r["mode"] == mode]
        return sum(times) / len(times) if times else None
    out = {}
    for m in sorted({r["minutes"] for r in results}):
        for count in sorted({r["instances"] for r in results}):
            window = seconds(m, count, "window")
            for mode in ("chunked", "job", "job + rolling restart"):
                measured = seconds(m, count, mode)
                if window and measured:
                    out[f"{m:g} min on {count} instance(s): {mode} / window after window"] = round(measured / window, 3)
    return out


def markdown(summary: dict) -> str:
    lines = ["| audio | instances | mode | round | seconds | RTFx | WER | other load (cores) | chunks / notes |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in summary["results"]:
        note = r.get("chunks", "")
        if r["mode"].startswith("job"):
            note = f"longest without progress {r['longest_seconds_without_progress']} s"
            if "restart" in r:
                x = r["restart"]
                note += (f"; restart at {x['window']}: {x['chunks']} chunks, "
                         f"{x.get('sent_more_than_once', x.get('decoded_more_than_once'))} sent again, {x['lost']} lost")
        lines.append(f"| {r['minutes']:g} min ({r['audio_seconds']} s) | {r['instances']} | {r['mode']} | {r.get('round', 1)} | "
                     f"{r['seconds']} | {r['audio_seconds'] / r['seconds']:.2f} | {r['wer']:.4f} | "
                     f"{r.get('other_load_cores')} | {note} |")
    lines += ["", "| ratio | measured |", "| --- | ---: |"]
    lines += [f"| {k} | **{v}** |" for k, v in summary["ratios"].items()]
    return "\n".join(lines) + "\n"


def plot(out: Path, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['minutes']:g} min\n{r['instances']}x {r['mode'].replace(' + rolling restart', '+restart')}"
              for r in results]
    ax.bar(range(len(results)), [r["seconds"] for r in results],
           color=["tab:gray" if r["mode"] == "window" else "tab:blue" if r["mode"] == "chunked" else "tab:green"
                  for r in results])
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("seconds to the transcript")
    ax.set_title("Long files on one core per instance: window after window vs chunked vs job")
    fig.tight_layout()
    fig.savefig(out / "long_file_latency.png", dpi=110)
    plt.close(fig)
    jobs = [r for r in results if r["mode"].startswith("job")]
    if jobs:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in jobs:
            t, done = zip(*r["progress"]) if r["progress"] else ((), ())
            ax.step(t, [d / r["audio_seconds"] for d in done], where="post", label=f"{r['minutes']:g} min {r['mode']}")
            if "restart" in r and r["restart"]["window"]:
                ax.axvspan(*r["restart"]["window"], alpha=0.15, color="tab:red", label="asrctl restart --rolling")
        ax.set_xlabel("seconds since POST /v1/jobs")
        ax.set_ylabel("progress (audio done / total)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "job_progress.png", dpi=110)
        plt.close(fig)


def engine_batches(minutes: float, engine: str, device: str, batch: int) -> dict:
    """The GPU case inside one instance, without HTTP: the bare engine decoding a recording window
    after window against the same recording's chunks in batches of ``batch`` (one process, one
    model, alternating twice so drift hits both). On CPU it shows what batching does not buy there."""
    import soundfile

    from app.audio import chunking, longform
    from app.config import Settings
    from app.engines import load_engine
    from app.engines.base import DecodeOptions
    from app.engines.models import resolve_model

    data, duration, reference = recording(minutes)
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    settings = Settings(engine=engine)
    model = load_engine(engine, resolve_model(engine, settings.model, settings.model_cache), device)
    options = DecodeOptions(beam_size=settings.beam_size)
    chunks = longform.split(samples, settings.chunk_seconds)
    times: dict[str, list[float]] = {"window": [], "batched": []}
    texts = {}
    for _ in range(2):
        started = time.monotonic()
        texts["window"] = model.transcribe(samples, options).text
        times["window"].append(time.monotonic() - started)
        started = time.monotonic()
        parts = []
        for i in range(0, len(chunks), batch):
            group = chunks[i:i + batch]
            parts += model.transcribe_batch([samples[c.start:c.end] for c in group], [options] * len(group))
        texts["batched"] = chunking.join(parts, chunks, duration).text
        times["batched"].append(time.monotonic() - started)
    best = {k: min(v) for k, v in times.items()}
    return {"minutes": minutes, "engine": engine, "device": device, "batch": batch, "chunks": len(chunks),
            "window_seconds": round(best["window"], 2), "batched_seconds": round(best["batched"], 2),
            "speedup": round(best["window"] / best["batched"], 2),
            "wer_window": word_error_rate(reference, texts["window"]),
            "wer_batched": word_error_rate(reference, texts["batched"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench long", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", default="5,30", help="recording lengths, e.g. 5,30")
    parser.add_argument("--instances", default="1,2", help="pool sizes, e.g. 1,2")
    parser.add_argument("--restart-job-minutes", type=float, default=30.0,
                        help="the job of this length gets a rolling restart half way (0: none)")
    parser.add_argument("--skip", default="window@1@30,chunked@1@30",
                        help="mode@instances@minutes to leave out, mode one of window, chunked, job (default: "
                             "the 30-minute file on one instance: window after window on one core again)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds for files up to 10 minutes")
    parser.add_argument("--out", help="results folder (default: bench/results/long-<timestamp>)")
    parser.add_argument("--engine-batches", metavar="DEVICE",
                        help="instead: the bare engine on DEVICE (cuda, cpu), window after window against chunk "
                             "batches of --batch, on the first --minutes recording (the GPU goal)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--engine", default="ctranslate2")
    args = parser.parse_args(argv)
    if args.engine_batches:
        result = engine_batches(float(args.minutes.split(",")[0]), args.engine, args.engine_batches, args.batch)
        print(json.dumps(result, indent=2))
        return 0
    out = Path(args.out or REPO / "bench" / "results" / time.strftime("long-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    summary = run([float(m) for m in args.minutes.split(",")], [int(n) for n in args.instances.split(",")],
                  args.restart_job_minutes or None, out, {s for s in args.skip.split(",") if s}, args.rounds)
    print(markdown(summary))
    print(f"results: {out}")
    return 0 if all(r.get("state", "done") == "done" for r in summary["results"]) else 1


if __name__ == "__main__":
    from bench import stop_on_sigterm

    stop_on_sigterm()
    sys.exit(main())
