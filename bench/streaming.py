"""``python -m bench streaming``: live transcription (``/v1/realtime``) under load.

One recording (by default the first minute of ``../shared/audio/longform/long1.wav`` with its human
transcript; without the shared audio, sentences espeak-ng speaks) is streamed over the WebSocket through
nginx, paced at real time, by N clients at once, with server VAD as OpenAI's defaults set it:

* ``pool``: the default pool (two instances of one core), for each N in ``--streams``: per turn, the
  time from the end of the turn's audio (``speech_stopped``'s ``audio_end_ms``, as sent) to its
  ``completed`` event, and from the first word spoken (``audio_start_ms`` plus the prefix padding) to
  the turn's first ``delta``; the word error rate of the joined turns, against the reference and next
  to ``/asr``'s on the same audio; and one stream at ``--fast`` x real time;
* ``capacity``: one instance on one core, N = 1, 2, ... streams until the median turn latency passes
  ``--max-latency`` (2 s): the most real-time streams one instance core sustains.

Results: ``bench/results/streaming-<timestamp>/`` (``summary.md``, ``results.json``).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.selfcheck.speech import SENTENCES, espeak_wav
from app.selfcheck.wer import word_error_rate
from bench import REPO
from bench.long import OtherLoad
from bench.long_accuracy import LONGFORM, NoRecordings, load_recordings
from bench.machine import cpu_model
from bench.service import Service

STEP_SECONDS = 0.1        # one append: 100 ms of audio, as a microphone client sends it
PREFIX_PADDING_MS = 300   # server VAD's default: a turn starts this long before its first word
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@dataclass
class Audio:
    name: str
    samples: np.ndarray   # 16 kHz mono float32, 1 s of silence at the end so the last turn closes
    reference: str


def load_audio(seconds: float) -> Audio:
    import soundfile
    import soxr

    try:
        (rec,) = load_recordings(LONGFORM, ["long1"], seconds=seconds)
        samples, rate = soundfile.read(io.BytesIO(rec.data), dtype="float32")
        name, reference = f"long1, first {rec.seconds:.0f} s", rec.reference
    except NoRecordings:
        pieces, said, total = [], [], 0.0
        while total < seconds:
            for text in SENTENCES:
                wav, rate = soundfile.read(io.BytesIO(espeak_wav(text)), dtype="float32")
                pieces += [wav, np.zeros(int(rate * 0.8), np.float32)]
                said.append(text)
                total += len(wav) / rate + 0.8
                if total >= seconds:
                    break
        samples, name, reference = np.concatenate(pieces), "espeak-ng sentences", " ".join(said)
    if rate != 16000:
        samples = soxr.resample(samples, rate, 16000).astype(np.float32)
    return Audio(name, np.concatenate([samples, np.zeros(16000, np.float32)]), reference)


@dataclass
class StreamResult:
    turns: list[dict] = field(default_factory=list)   # per turn: latency, first_delta, transcript
    transcript: str = ""
    error: str | None = None


def stream(url: str, samples: np.ndarray, speed: float = 1.0, timeout: float = 120.0) -> StreamResult:
    """One client: the audio appended every 100 ms of audio (at ``speed`` x real time) on one thread,
    the events received on this one, until every turn server VAD opened has its transcript."""
    import websockets.sync.client as ws_client

    pcm = (np.clip(_to_24k(samples), -1, 1) * 32767).astype("<i2").tobytes()
    step = int(24000 * STEP_SECONDS) * 2
    result, arrivals, sent = StreamResult(), [], threading.Event()
    try:
        with ws_client.connect(url.replace("http://", "ws://") + "/v1/realtime?intent=transcription",
                               open_timeout=30, max_size=None) as ws:
            json.loads(ws.recv(timeout=30))
            ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"language": "en"},
                "turn_detection": {"type": "server_vad", "prefix_padding_ms": PREFIX_PADDING_MS}}}}}))
            json.loads(ws.recv(timeout=30))
            started = time.monotonic()

            def send() -> None:
                for i, at in enumerate(range(0, len(pcm), step)):
                    time.sleep(max(0.0, started + i * STEP_SECONDS / speed - time.monotonic()))
                    ws.send(json.dumps({"type": "input_audio_buffer.append",
                                        "audio": base64.b64encode(pcm[at:at + step]).decode()}))
                sent.set()

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            deadline = started + len(samples) / 16000 / speed + timeout
            opened = closed = 0
            while not sent.is_set() or closed < opened:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{opened - closed} turn(s) without a transcript {timeout:g} s after the audio")
                try:
                    event = json.loads(ws.recv(timeout=1))
                except TimeoutError:
                    continue
                arrivals.append((time.monotonic() - started, event))
                opened += event["type"] == "input_audio_buffer.speech_started"
                closed += event["type"] in (COMPLETED, "conversation.item.input_audio_transcription.failed")
                if event["type"] == "error":
                    raise RuntimeError(event["error"]["message"])
    except Exception as e:  # noqa: BLE001 - counted in the results; the run goes on
        result.error = f"{type(e).__name__}: {e}"
    result.turns = turns(arrivals, speed)
    result.transcript = " ".join(t["transcript"] for t in result.turns)
    return result


def turns(arrivals: list[tuple[float, dict]], speed: float) -> list[dict]:
    """Per completed turn: ``latency`` (the moment the turn's last audio was sent -> ``completed``) and
    ``first_delta`` (its first word sent -> its first delta; None without one), in seconds."""
    start_ms, stop_ms, first_delta, out = {}, {}, {}, []
    for at, e in arrivals:
        item = e.get("item_id")
        if e["type"] == "input_audio_buffer.speech_started":
            start_ms[item] = e["audio_start_ms"]
        elif e["type"] == "input_audio_buffer.speech_stopped":
            stop_ms[item] = e["audio_end_ms"]
        elif e["type"] == DELTA:
            first_delta.setdefault(item, at)
        elif e["type"] == COMPLETED and item in stop_ms:
            spoken = (start_ms.get(item, 0) + PREFIX_PADDING_MS) / 1000 / speed
            out.append({"latency": round(at - stop_ms[item] / 1000 / speed, 3),
                        "first_delta": round(first_delta[item] - spoken, 3) if item in first_delta else None,
                        "seconds": round((stop_ms[item] - start_ms.get(item, 0)) / 1000, 2),
                        "transcript": e["transcript"]})
    return out


def _to_24k(samples: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(samples, 16000, 24000)


def streams_at_once(url: str, audio: Audio, count: int, speed: float = 1.0) -> dict:
    """``count`` clients streaming the same audio at once (started 0.3 s apart, so their turns do not
    all end in the same instant): latencies over all their turns, and each stream's WER."""
    results: list[StreamResult] = [StreamResult() for _ in range(count)]

    def one(i: int) -> None:
        time.sleep(0.3 * i)
        results[i] = stream(url, audio.samples, speed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = [t["latency"] for r in results for t in r.turns]
    first = [t["first_delta"] for r in results for t in r.turns if t["first_delta"] is not None]
    wers = [word_error_rate(audio.reference, r.transcript) for r in results if not r.error]
    return {"streams": count, "speed": speed, "errors": [r.error for r in results if r.error],
            "turns": len(latencies),
            "latency_median": _median(latencies), "latency_p90": _quantile(latencies, 0.9),
            "latency_max": max(latencies, default=None),
            "first_delta_median": _median(first), "turns_with_delta": len(first),
            "wer_mean": round(statistics.mean(wers), 4) if wers else None,
            "transcripts": [r.transcript for r in results]}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def asr_wer(url: str, audio: Audio) -> float:
    import requests
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio.samples, 16000, format="WAV", subtype="PCM_16")
    r = requests.post(f"{url}/asr", files={"audio": ("a.wav", buffer.getvalue())}, data={"language": "en"}, timeout=600)
    r.raise_for_status()
    return word_error_rate(audio.reference, r.json()["text"])


def run(audio: Audio, counts: list[int], fast: float, capacity_audio: Audio | None, capacity_max: int,
        max_latency: float, out: Path, log=print) -> dict:
    started, load_start = time.time(), os.getloadavg()[0]
    limit = str(max(600, int(len(audio.samples) / 16000) + 60))
    common = {"ASR_DEVICE": "cpu", "ASR_ENGINE": "ctranslate2", "ASR_MAX_AUDIO_SECONDS": limit,
              "ASR_MAX_STREAMS": str(max(max(counts, default=1), capacity_max))}
    pool = Service("pool", out / "run-pool", 2, cpu_threads=1, env=common)
    result: dict = {"audio": {"name": audio.name, "seconds": round(len(audio.samples) / 16000, 1),
                              "reference_words": len(audio.reference.split())}, "pool": [], "capacity": []}
    try:
        pool.up(timeout=600)
        url = f"http://127.0.0.1:{pool.port}"
        result["asr_wer"] = round(asr_wer(url, audio), 4)
        log(f"/asr on the same audio: WER {100 * result['asr_wer']:.2f} %")
        for count in counts:
            load = OtherLoad(pool)
            row = {**streams_at_once(url, audio, count), "other_load_cores": load.cores()}
            result["pool"].append(row)
            log(_line(f"pool, {count} stream(s) at real time", row))
        if fast:
            load = OtherLoad(pool)
            row = {**streams_at_once(url, audio, 1, speed=fast), "other_load_cores": load.cores()}
            result["fast"] = row
            log(_line(f"pool, 1 stream at {fast:g}x real time", row))
    finally:
        pool.down()
        shutil.rmtree(pool.run_dir, ignore_errors=True)
    if capacity_audio is not None:
        one = Service("capacity", out / "run-capacity", 1, cpu_threads=1, env=common)
        try:
            one.up(timeout=600)
            url = f"http://127.0.0.1:{one.port}"
            for count in range(1, capacity_max + 1):
                load = OtherLoad(one)
                row = {**streams_at_once(url, capacity_audio, count), "other_load_cores": load.cores()}
                result["capacity"].append(row)
                log(_line(f"one instance core, {count} stream(s)", row))
                if row["errors"] or row["latency_median"] is None or row["latency_median"] > max_latency:
                    break
        finally:
            one.down()
            shutil.rmtree(one.run_dir, ignore_errors=True)
    held = [r["streams"] for r in result["capacity"]
            if not r["errors"] and r["latency_median"] is not None and r["latency_median"] <= max_latency]
    result["streams_per_core"] = max(held, default=0)
    # the ramp stopped at its end, not at a row over the limit: the capacity is a lower bound
    result["capacity_ramp_ended"] = bool(held) and max(held) == capacity_max
    result.update(max_latency=max_latency, cpu_model=cpu_model(), cores=os.cpu_count(),
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  duration_seconds=round(time.time() - started, 1),
                  loadavg_start=round(load_start, 2), loadavg_end=round(os.getloadavg()[0], 2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(result))
    return result


def whole_recordings(fast: float, out: Path, folder: Path = LONGFORM, log=print) -> dict:
    """Each recording of ``folder`` (``X.wav`` with its reference ``X.txt``) streamed whole by one client
    at ``fast`` x real time on the default pool: the joined turns' WER next to ``/asr``'s on the same audio."""
    import soundfile

    recordings, rows = load_recordings(folder), []
    pool = Service("pool", out / "run-whole", 2, cpu_threads=1, env={
        "ASR_DEVICE": "cpu", "ASR_ENGINE": "ctranslate2", "ASR_MAX_AUDIO_SECONDS": "3600"})
    try:
        pool.up(timeout=600)
        url = f"http://127.0.0.1:{pool.port}"
        for rec in recordings:
            samples, _ = soundfile.read(io.BytesIO(rec.data), dtype="float32")
            audio = Audio(rec.name, np.concatenate([samples, np.zeros(16000, np.float32)]), rec.reference)
            load = OtherLoad(pool)
            row = {**streams_at_once(url, audio, 1, speed=fast), "other_load_cores": load.cores()}
            row.update(name=rec.name, seconds=round(rec.seconds, 1), asr_wer=round(asr_wer(url, audio), 4))
            rows.append(row)
            log(_line(f"{rec.name}, whole, 1 stream at {fast:g}x real time", row) + f"; /asr {100 * row['asr_wer']:.2f} %")
    finally:
        pool.down()
        shutil.rmtree(pool.run_dir, ignore_errors=True)
    result = {"whole": rows, "cpu_model": cpu_model(), "cores": os.cpu_count()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{result['cpu_model']}, {result['cores']} cores; each recording streamed whole by one client at "
             f"{fast:g}x real time on the default pool.", "",
             "| recording | seconds | turns | WER streamed | WER /asr | difference (points) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        streamed = "-" if r["wer_mean"] is None else f"{100 * r['wer_mean']:.2f} %"
        gap = "-" if r["wer_mean"] is None else f"{100 * (r['wer_mean'] - r['asr_wer']):+.2f}"
        lines.append(f"| {r['name']} | {r['seconds']:g} | {r['turns']} | {streamed} | {100 * r['asr_wer']:.2f} % | {gap} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return result


def _line(what: str, row: dict) -> str:
    wer = "-" if row["wer_mean"] is None else f"{100 * row['wer_mean']:.2f} %"
    return (f"{what}: {row['turns']} turns, end of turn -> completed median {row['latency_median']} s "
            f"(p90 {row['latency_p90']}), first word -> first delta median {row['first_delta_median']} s, "
            f"WER {wer}, other load {row['other_load_cores']} cores"
            f"{', errors: ' + '; '.join(row['errors']) if row['errors'] else ''}")


def markdown(result: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f} %"

    def s(v):
        return "-" if v is None else f"{v:.2f} s"

    lines = [f"Audio: {result['audio']['name']} ({result['audio']['seconds']} s, {result['audio']['reference_words']} "
             f"words); {result['cpu_model']}, {result['cores']} cores; load average {result['loadavg_start']} -> "
             f"{result['loadavg_end']}.", "",
             "| pool | streams | pace | turns (with a delta) | end of turn -> completed, median | p90 | first word -> first delta, median | WER streamed | WER /asr | other load (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("2 instances", r) for r in result["pool"]] + ([("2 instances", result["fast"])] if "fast" in result else [])
    rows += [("1 instance, 1 core", r) for r in result["capacity"]]
    for pool, r in rows:
        lines.append(f"| {pool} | {r['streams']} | {r['speed']:g}x | {r['turns']} ({r['turns_with_delta']}) | {s(r['latency_median'])} | "
                     f"{s(r['latency_p90'])} | {s(r['first_delta_median'])} | {pct(r['wer_mean'])} | "
                     f"{pct(result.get('asr_wer')) if pool == '2 instances' else '-'} | {r['other_load_cores']} |")
    if result["capacity"]:
        bound = ("at least " if result.get("capacity_ramp_ended") else "")
        lines += ["", f"One instance core held {bound}**{result['streams_per_core']}** real-time stream(s) with the median "
                      f"turn latency at most {result['max_latency']:g} s"
                      + (" (the most the ramp tried; `--capacity-max` raises it)." if bound else ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench streaming", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how much of the recording to stream (default 60)")
    parser.add_argument("--streams", default="1,2,4", help="concurrent streams on the pool (default 1,2,4)")
    parser.add_argument("--fast", type=float, default=4, help="one stream at this many times real time (0: none)")
    parser.add_argument("--capacity-seconds", type=float, default=30,
                        help="audio per stream in the capacity ramp (0: no ramp; default 30)")
    parser.add_argument("--capacity-max", type=int, default=8, help="the most streams the ramp tries (default 8)")
    parser.add_argument("--max-latency", type=float, default=2.0, help="median turn latency the ramp allows (s)")
    parser.add_argument("--whole", action="store_true",
                        help="instead: each recording of --audio streamed whole at --fast x real time, WER against /asr")
    parser.add_argument("--audio", type=Path, default=LONGFORM,
                        help="with --whole: a folder of X.wav with reference X.txt (default ../shared/audio/longform)")
    parser.add_argument("--out", help="results folder (default bench/results/streaming-<timestamp>)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"streaming-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.whole:
        try:
            result = whole_recordings(args.fast or 4, out, args.audio)
        except NoRecordings as e:
            print(f"skipped: {e}")
            return 0
        print((out / "summary.md").read_text())
        print(f"results: {out}")
        return 1 if any(r["errors"] for r in result["whole"]) else 0
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    audio = load_audio(args.seconds)
    capacity = load_audio(args.capacity_seconds) if args.capacity_seconds > 0 else None
    result = run(audio, counts, args.fast, capacity, args.capacity_max, args.max_latency, out)
    print((out / "summary.md").read_text())
    print(f"results: {out}")
    # The pool's runs must all succeed; the capacity ramp ends where the instance no longer keeps up.
    return 1 if any(r["errors"] for r in result["pool"] + [result.get("fast", {"errors": []})]) else 0
