"""``python -m bench long-accuracy``: word error rate and time on long recordings with human transcripts.

Each recording (a WAV with its reference in a ``.txt`` of the same name; by default the read speech
in ``../shared/audio/longform/``) is transcribed four ways, the same WAV bytes each time:

* ``a``: faster-whisper's defaults on the whole file: ``WhisperModel.transcribe`` with its default
  arguments (beam 5, temperature fallback, conditioning on previous text), the service's model and
  compute type, in a child process pinned to one core with one thread, as an instance pins itself;
* ``b``: the service window after window: a one-instance pool with ``chunking = false``;
* ``c``: the service chunk-parallel: an idle pool of two instances of one core each (``chunking`` and
  ``chunk_fanout`` on, the defaults);
* ``d``: the same pool through ``POST /v1/jobs``, polled until done.

Both pools come up with the real ``asrctl`` on free loopback ports (``--device cpu``). The targets
(issue #20): on every recording, (c)'s time at most 0.55 x (a)'s, and (c)'s WER at most 0.5
percentage points above (a)'s. ``--seconds N`` decodes only the recordings' first utterances up to
N seconds (needs ``manifest.jsonl`` with each utterance's times, as ``longform/`` has), for a quick
check; ``--lead-silence MS[,MS...]`` decodes each recording once per value with that much silence
before it: the same speech with every window and cut a little elsewhere, each mode's WER on a
recording the mean over them, and how far (a) itself moves; ``--modes`` measures only some of the
four; ``--rearranged N`` adds N recordings of the same utterances, chapters in other orders with other
pauses, and the mean difference over all of them.
Results: ``bench/results/long-accuracy-<timestamp>/`` (``summary.md``, ``results.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from bench.bare import child_environment, stop_child
from bench import REPO
from app.selfcheck.speech import SPEECH
from bench.long import OtherLoad, run_job, transcribe
from bench.machine import cpu_model
from bench.service import Service
from app.selfcheck.wer import word_error_rate

LONGFORM = SPEECH / "longform"
MAX_RATIO = 0.55       # (c) seconds / (a) seconds
MAX_WER_GAP_PP = 0.5   # (c) WER - (a) WER, percentage points
CHAPTERS_PER_MIX = 5         # --rearranged: chapters (10 sentences of one reader each) per recording
BACK_TO_BACK_SECONDS = 0.05  # --rearranged: the pause inside a run of sentences read back to back
MODES = {
    "a": "faster-whisper defaults, whole file, 1 core",
    "b": "service, window after window (chunking = false)",
    "c": "service, chunk-parallel, idle 2-instance pool",
    "d": "service, POST /v1/jobs, same pool",
}
LIBRARIES = ("faster-whisper", "ctranslate2", "onnxruntime", "numpy", "jiwer")


class NoRecordings(Exception):
    """The folder is missing or holds no WAV with a reference transcript."""


@dataclass
class Recording:
    name: str
    data: bytes        # a 16-bit WAV: what every mode decodes
    seconds: float
    reference: str
    lead_silence_ms: int = 0


def load_recordings(folder: Path, only: list[str] | None = None, seconds: float | None = None) -> list[Recording]:
    """Every ``X.wav`` in ``folder`` with a reference ``X.txt`` (``only``: these names, without the suffix).

    With ``seconds``, each recording is cut after its last utterance that ends by then, in the pause
    that follows it, and the reference is those utterances' text: ``manifest.jsonl`` must give them
    (a row per file with ``parts``: ``start_s``, ``end_s``, ``text``).
    """
    import soundfile

    if not folder.is_dir():
        raise NoRecordings(f"no folder {folder}")
    pairs = sorted(p for p in folder.glob("*.wav") if p.with_suffix(".txt").exists())
    if only:
        missing = set(only) - {p.stem for p in pairs}
        if missing:
            raise NoRecordings(f"no WAV with a .txt reference named {', '.join(sorted(missing))} in {folder}")
        pairs = [p for p in pairs if p.stem in only]
    if not pairs:
        raise NoRecordings(f"no WAV with a reference .txt of the same name in {folder}")
    manifest = {}
    if seconds is not None:
        path = folder / "manifest.jsonl"
        if not path.exists():
            raise NoRecordings(f"--seconds needs {path} with each utterance's times (parts), to cut the reference")
        manifest = {row["file"]: row for row in map(json.loads, path.read_text().splitlines()) if row.get("parts")}
    out = []
    for path in pairs:
        if seconds is None:
            data = path.read_bytes()
            out.append(Recording(path.stem, data, soundfile.info(io.BytesIO(data)).duration,
                                 path.with_suffix(".txt").read_text().strip()))
            continue
        samples, rate = soundfile.read(str(path), dtype="int16")
        reference = path.with_suffix(".txt").read_text().strip()
        if seconds is not None:
            if path.name not in manifest:
                raise NoRecordings(f"{path.name} has no utterance times (parts) in {folder / 'manifest.jsonl'}")
            cut, reference = first_utterances(manifest[path.name]["parts"], seconds)
            samples = samples[:round(cut * rate)]
        out.append(Recording(path.stem, _wav(samples, rate), len(samples) / rate, reference))
    return out


def shifted(recording: Recording, ms: int) -> Recording:
    """The same recording ``ms`` milliseconds later: that much silence before the same samples, so
    every window and cut falls a little elsewhere in the speech; the same name and reference."""
    import soundfile

    if not ms:
        return recording
    samples, rate = soundfile.read(io.BytesIO(recording.data), dtype="int16")
    samples = np.concatenate([np.zeros(round(ms * rate / 1000), samples.dtype), samples])
    return Recording(recording.name, _wav(samples, rate), len(samples) / rate, recording.reference,
                     recording.lead_silence_ms + ms)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def first_utterances(parts: list[dict], seconds: float) -> tuple[float, str]:
    """(where to cut, the reference up to there): the utterances that end by ``seconds``, cut halfway
    into the pause after the last of them."""
    parts = sorted(parts, key=lambda p: p["start_s"])
    kept = [p for p in parts if p["end_s"] <= seconds]
    if not kept:
        raise NoRecordings(f"no utterance ends within the first {seconds:g} s")
    after = parts[len(kept)]["start_s"] if len(kept) < len(parts) else None
    end = kept[-1]["end_s"]
    cut = min(seconds, (end + after) / 2) if after is not None else min(seconds, end + 0.5)
    return cut, " ".join(p["text"] for p in kept)


def rearranged(folder: Path, count: int, seed: int = 1, seconds: float | None = None) -> list[Recording]:
    """``count`` more recordings of the same utterances as ``folder``'s (``manifest.jsonl``'s parts),
    built in memory: one WAV and reference is one draw of where windows and cuts fall, and a
    difference of 0.5 points is a few words, so more draws tell a decoder's difference from chance.

    Recording ``mixK`` takes ``CHAPTERS_PER_MIX`` of the chapters (consecutive sentences of one reader,
    kept in their order, as in the originals), in a random order, with pauses of 0.3-1.2 s and two runs
    of three sentences only 0.05 s apart, so a chunker has to cut inside speech as in the originals;
    0.5 s of silence at each end. The samples are the originals' own, copied exactly. Deterministic
    for a ``seed``. With ``seconds``, each is cut as ``--seconds`` cuts the originals
    (``first_utterances``): the same draw, up to the pause after its last utterance that ends by then.
    """
    import soundfile

    path = folder / "manifest.jsonl"
    if not path.exists():
        raise NoRecordings(f"--rearranged needs {path} with each utterance's times (parts)")
    chapters: dict[str, list[tuple[np.ndarray, str]]] = {}
    rate = None
    for row in map(json.loads, filter(str.strip, path.read_text().splitlines())):
        samples, rate = soundfile.read(str(folder / row["file"]), dtype="int16")
        for part in sorted(row.get("parts", []), key=lambda p: p["start_s"]):
            chapter = part["utt_id"].rsplit("-", 1)[0]        # speaker-chapter-sentence
            utterance = samples[round(part["start_s"] * rate):round(part["end_s"] * rate)]
            chapters.setdefault(chapter, []).append((utterance, part["text"]))
    if len(chapters) < CHAPTERS_PER_MIX:
        raise NoRecordings(f"--rearranged needs {CHAPTERS_PER_MIX} chapters in {path}, it has {len(chapters)}")
    names = sorted(chapters)
    out = []
    for k in range(1, count + 1):
        rng = np.random.default_rng([seed, k])
        picked = [chapters[names[i]] for i in rng.permutation(len(names))[:CHAPTERS_PER_MIX]]
        utterances = [u for chapter in picked for u in chapter]
        pauses = rng.uniform(0.3, 1.2, len(utterances) - 1)
        for start in rng.choice(np.arange(0, len(pauses) - 1, 3), size=2, replace=False):
            pauses[start:start + 2] = BACK_TO_BACK_SECONDS      # three sentences back to back
        edge = np.zeros(round(0.5 * rate), np.int16)
        pieces, parts, at = [edge], [], len(edge)
        for i, (utterance, text) in enumerate(utterances):
            parts.append({"start_s": at / rate, "end_s": (at + len(utterance)) / rate, "text": text})
            pieces.append(utterance)
            pieces.append(np.zeros(round(pauses[i] * rate), np.int16) if i < len(pauses) else edge)
            at += len(pieces[-2]) + len(pieces[-1])
        audio = np.concatenate(pieces)
        reference = " ".join(t for _, t in utterances)
        if seconds is not None:
            cut, reference = first_utterances(parts, seconds)
            audio = audio[:round(cut * rate)]
        out.append(Recording(f"mix{k}", _wav(audio, rate), len(audio) / rate, reference))
    return out


# (a): faster-whisper's defaults in a child process on one core -------------------------------------

class Bare:
    """``WhisperModel`` with default decoding in a spawned child pinned to ``core`` with one thread."""

    def __init__(self, model_dir: str, compute_type: str, core: int):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_bare_child, args=(child, model_dir, compute_type, core),
                                    name="bare-faster-whisper", daemon=True)
        with child_environment(OMP_NUM_THREADS="1"):
            self._process.start()
        child.close()
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError("the bare faster-whisper child failed to load") from reply

    def transcribe(self, data: bytes) -> dict:
        self._conn.send(data)
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        stop_child(self._process, self._conn, None)


def _bare_child(conn, model_dir: str, compute_type: str, core: int) -> None:
    """Pinned and threaded as ``asrctl`` and the instance pin one (OMP_NUM_THREADS from its start,
    ``child_environment``, then ``pin_to_cores``) before CTranslate2 loads; warmed up like an instance;
    then each WAV it is sent is decoded with ``transcribe``'s defaults, timed from the bytes
    (faster-whisper decodes them)."""
    try:
        import numpy as np

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from app.runtime.instance import pin_to_cores

        threads = pin_to_cores(str(core), 1)
        import ctranslate2
        from faster_whisper import WhisperModel

        model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)
        list(model.transcribe(np.zeros(16000, np.float32))[0])
        conn.send("ready")
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(e)
        return
    while (data := conn.recv()) is not None:
        try:
            ctranslate2.set_random_seed(0)   # the temperature fallback samples: the same draws every run
            started = time.perf_counter()
            segments, _ = model.transcribe(io.BytesIO(data))
            text = " ".join(s.text.strip() for s in segments)
            conn.send({"seconds": round(time.perf_counter() - started, 2), "text": text})
        except BaseException as e:  # noqa: BLE001
            conn.send(e)


# The run -----------------------------------------------------------------------------------------

def run(recordings: list[Recording], out: Path, rounds: int = 1, log=print, modes: str = "".join(MODES)) -> dict:
    """Both pools and the bare engine up at once (idle, they cost nothing), then per round and
    recording the ``modes`` one after the other, so the machine's drift hits all of them. A recording
    may come several times, shifted (``shifted``): its rows carry the shift, and its summary is the
    mean over them."""
    from app.config import load_settings
    from app.hardware.devices import parse_cores
    from app.engines.models import display_name, resolve_model

    started, load_start, code = time.time(), os.getloadavg()[0], _code_version()   # the code measured
    # What the pools will read (the operator's ASR_* and config file), on the CPU, with faster-whisper.
    common = {"ASR_DEVICE": "cpu", "ASR_ENGINE": "ctranslate2"}
    settings = load_settings(env={**os.environ, **common})
    limit = str(max(settings.max_audio_seconds, max(r.seconds for r in recordings) + 60))
    common.update(ASR_MAX_AUDIO_SECONDS=limit, ASR_JOB_MAX_AUDIO_SECONDS=limit)
    pools = {
        "window": Service("window", out / "run-window", 1, cpu_threads=1,
                          env={**common, "ASR_CHUNKING": "false", "ASR_JOBS": "false"}),
        "chunked": Service("chunked", out / "run-chunked", 2, cpu_threads=1,
                           env={**common, "ASR_CHUNKING": "true", "ASR_CHUNK_FANOUT": "true"}),
    }
    rows: list[dict] = []
    bare = None
    served = {"model": display_name(settings.model), "compute_type": settings.compute_type}
    errors: list[BaseException] = []

    def up(service: Service) -> None:
        try:
            service.up(timeout=600)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)

    threads = [threading.Thread(target=up, args=(s,)) for s in pools.values()]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        # The bare engine: the served model and compute type, on the window-after-window instance's core.
        health = pools["window"].health()[0]
        served["model"], served["compute_type"] = health["model"], health["model_config"]["compute_type"]
        core = (parse_cores(health["cpu_cores"] or "") or sorted(os.sched_getaffinity(0)))[0]
        bare = Bare(resolve_model("ctranslate2", settings.model, settings.model_cache), served["compute_type"], core)
        services = list(pools.values())
        for round_ in range(1, rounds + 1):
            for rec in recordings:
                for mode in modes:
                    row = {"recording": rec.name, "audio_seconds": round(rec.seconds, 1), "mode": mode,
                           "round": round_, "lead_silence_ms": rec.lead_silence_ms}
                    load = OtherLoad(*services)
                    try:
                        if mode == "a":
                            measured = bare.transcribe(rec.data)
                        elif mode == "b":
                            measured = transcribe(pools["window"], rec.data)
                        elif mode == "c":
                            measured = transcribe(pools["chunked"], rec.data)
                        else:
                            measured = run_job(pools["chunked"], rec.data, restart=False)
                            if measured["state"] != "done":
                                raise RuntimeError(f"job ended {measured['state']}")
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on, the exit code says it
                        row["error"] = f"{type(e).__name__}: {e}"
                        log(f"{rec.name} ({mode}) {MODES[mode]}: FAILED {row['error']}")
                        rows.append(row)
                        continue
                    row.update(seconds=measured["seconds"], wer=word_error_rate(rec.reference, measured["text"]),
                               other_load_cores=load.cores(), text=measured["text"])
                    if measured.get("chunks"):
                        row["chunks"] = measured["chunks"]
                    rows.append(row)
                    later = f" +{rec.lead_silence_ms} ms" if rec.lead_silence_ms else ""
                    log(f"{rec.name}{later} ({mode}) {MODES[mode]}: {row['seconds']} s, WER {100 * row['wer']:.2f} %, "
                        f"other load {row['other_load_cores']} cores")
    finally:
        if bare is not None:
            bare.close()
        for t in threads:   # interrupted while a pool comes up: down once it is up, or it would stay
            if t.is_alive():
                t.join()
        for service in pools.values():
            service.down()
            shutil.rmtree(service.run_dir, ignore_errors=True)
    result = {
        "machine": machine(served["compute_type"], served["model"], settings.beam_size, code),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "rounds": rounds, "modes": modes,
        "recordings": recorded(recordings),
        "rows": rows,
        "summary": summarize(rows),
    }
    result["overall"] = overall(result["summary"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(result))
    return result


def recorded(recordings: list[Recording]) -> dict:
    """Per recording name: its length and reference words, and its shifts where it was shifted."""
    out: dict[str, dict] = {}
    for r in recordings:
        out.setdefault(r.name, {"audio_seconds": round(r.seconds - r.lead_silence_ms / 1000, 1),
                                "reference_words": len(r.reference.split()), "lead_silence_ms": []})
        out[r.name]["lead_silence_ms"].append(r.lead_silence_ms)
    for entry in out.values():
        if entry["lead_silence_ms"] == [0]:
            del entry["lead_silence_ms"]
    return out


def summarize(rows: list[dict]) -> dict:
    """Per recording and mode: mean seconds and mean WER over the rounds and shifts (each shift's
    mean WER too, where there are several); then the two targets on those means."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["recording"] for r in rows):
        modes = {}
        for mode in MODES:
            done = [r for r in rows if r["recording"] == name and r["mode"] == mode and "error" not in r]
            if done:
                modes[mode] = {"seconds": round(sum(r["seconds"] for r in done) / len(done), 2),
                               "wer": round(sum(r["wer"] for r in done) / len(done), 4), "rounds": len(done)}
                shifts = sorted({r.get("lead_silence_ms", 0) for r in done})
                if len(shifts) > 1:
                    modes[mode]["wer_by_shift"] = {
                        str(ms): round(float(np.mean([r["wer"] for r in done if r.get("lead_silence_ms", 0) == ms])), 4)
                        for ms in shifts}
        entry: dict = {"modes": modes}
        if "a" in modes and "c" in modes:
            ratio = round(modes["c"]["seconds"] / modes["a"]["seconds"], 3)
            gap = round(100 * (modes["c"]["wer"] - modes["a"]["wer"]), 2)
            entry["c_over_a_time"] = {"measured": ratio, "target": f"<= {MAX_RATIO}", "met": ratio <= MAX_RATIO}
            entry["c_minus_a_wer_pp"] = {"measured": gap, "target": f"<= {MAX_WER_GAP_PP}",
                                         "met": gap <= MAX_WER_GAP_PP}
        out[name] = entry
    return out


def spread(values: list[float], limit: float, digits: int = 2) -> dict:
    """How ``values`` (one per recording) spread: how many, their mean, range and standard error
    (None from one value), and how many are at most ``limit``."""
    v = np.array(values, dtype=float)
    return {"recordings": len(v), "mean": round(float(v.mean()), digits), "min": float(v.min()),
            "max": float(v.max()),
            "standard_error": round(float(v.std(ddof=1) / np.sqrt(len(v))), digits) if len(v) > 1 else None,
            "within": int((v <= limit).sum())}


def overall(summary: dict) -> dict | None:
    """Over the recordings measured both ways (two at least): how (c) - (a) in WER points and (c)'s time
    over (a)'s spread, against their targets."""
    entries = [e for e in summary.values() if "c_minus_a_wer_pp" in e]
    if len(entries) < 2:
        return None
    out = {"recordings": len(entries),
           "wer_gap_pp": spread([e["c_minus_a_wer_pp"]["measured"] for e in entries], MAX_WER_GAP_PP),
           "time_ratio": spread([e["c_over_a_time"]["measured"] for e in entries], MAX_RATIO, 3)}
    shifted_ = [e for e in entries if all("wer_by_shift" in e["modes"].get(m, {}) for m in "ac")]
    if len(shifted_) >= 2:
        a = [e["modes"]["a"]["wer_by_shift"] for e in shifted_]
        c = [e["modes"]["c"]["wer_by_shift"] for e in shifted_]
        shifts = [ms for ms in a[0] if all(ms in x for x in a + c)]
        # The target's own yardstick: (a) a few milliseconds later, held to the target against (a) unshifted.
        out["base_shift_ms"] = shifts[0]
        out["a_against_itself_pp"] = {ms: spread([100 * (x[ms] - x[shifts[0]]) for x in a], MAX_WER_GAP_PP)
                                      for ms in shifts[1:]}
        out["wer_gap_pp_by_shift"] = {ms: spread([100 * (y[ms] - x[ms]) for x, y in zip(a, c)], MAX_WER_GAP_PP)
                                      for ms in shifts}
    return out


def machine(compute_type: str, model: str, beam_size: int, code: str) -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "libraries": versions, "model": model, "compute_type": compute_type, "beam_size": beam_size,
            "code": code}


def _code_version() -> str:
    """The commit measured, with ``+changes`` when the checkout differs from it."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" +changes" if dirty else "")


def machine_line(result: dict) -> str:
    m = result["machine"]
    libraries = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    return (f"{m['cpu_model']}, {m['cores']} cores ({m['system']}); Python {m['python']}, {libraries}; "
            f"{m['model']} {m['compute_type']}, beam {m['beam_size']}, one core and one thread per decoder; "
            f"code {m['code']}; load average {result['loadavg_start']} at the start, {result['loadavg_end']} "
            f"at the end; {result['rounds']} round(s), {result['started']}.")


def markdown(result: dict) -> str:
    lines = [machine_line(result), "",
             "| recording | mode | WER % | seconds | x (a)'s time | other load (cores) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    measured = result.get("modes", "".join(MODES))
    for name, entry in result["summary"].items():
        audio = result["recordings"][name]["audio_seconds"]
        a = entry["modes"].get("a")
        for mode, label in MODES.items():
            if mode not in measured:
                continue
            m = entry["modes"].get(mode)
            loads = [r["other_load_cores"] for r in result["rows"]
                     if r["recording"] == name and r["mode"] == mode and "error" not in r]
            if m is None:
                lines.append(f"| {name} ({audio} s) | ({mode}) {label} | failed | - | - | - |")
                continue
            times = f"{m['seconds'] / a['seconds']:.2f}" if a else "-"
            lines.append(f"| {name} ({audio} s) | ({mode}) {label} | {100 * m['wer']:.2f} | {m['seconds']:.1f} | "
                         f"{times} | {_span(loads)} |")
    lines += ["", f"| recording | (c) time / (a) time (target <= {MAX_RATIO}) | "
                  f"WER (c) - (a), points (target <= {MAX_WER_GAP_PP}) |", "| --- | ---: | ---: |"]
    for name, entry in result["summary"].items():
        if "c_over_a_time" in entry:
            ratio, gap = entry["c_over_a_time"], entry["c_minus_a_wer_pp"]
            lines.append(f"| {name} | {ratio['measured']:.2f} ({'met' if ratio['met'] else 'not met'}) | "
                         f"{gap['measured']:+.2f} ({'met' if gap['met'] else 'not met'}) |")
        else:
            lines.append(f"| {name} | - | - |")
    lines += _by_shift(result)
    every = result.get("overall")
    if every:
        gap, ratio, n = every["wer_gap_pp"], every["time_ratio"], every["recordings"]
        lines += ["", f"Over the {n} recordings: WER (c) - (a) {gap['mean']:+.2f} points on average "
                      f"({gap['min']:+.2f} to {gap['max']:+.2f}, standard error {gap['standard_error']:.2f}), "
                      f"within {MAX_WER_GAP_PP} on {gap['within']} of {n}; (c)'s time {ratio['mean']:.2f} x (a)'s "
                      f"({ratio['min']:.2f} to {ratio['max']:.2f}), within {MAX_RATIO} on {ratio['within']} of {n}."]
        for ms, d in every.get("a_against_itself_pp", {}).items():
            lines.append(f"- (a) {ms} ms later against (a) at {every['base_shift_ms']} ms: "
                         f"{d['mean']:+.2f} points on average ({d['min']:+.2f} to {d['max']:+.2f}), "
                         f"within {MAX_WER_GAP_PP} on {d['within']} of {d['recordings']}.")
        for ms, d in every.get("wer_gap_pp_by_shift", {}).items():
            lines.append(f"- (c) - (a), both at {ms} ms: {d['mean']:+.2f} points on average "
                         f"({d['min']:+.2f} to {d['max']:+.2f}), within {MAX_WER_GAP_PP} on {d['within']} of "
                         f"{d['recordings']}.")
    return "\n".join(lines) + "\n"


def _by_shift(result: dict) -> list[str]:
    """Where recordings were decoded at several shifts: each mode's WER at each, and the mean."""
    entries = {name: e for name, e in result["summary"].items()
               if any("wer_by_shift" in m for m in e["modes"].values())}
    if not entries:
        return []
    shifts = list(dict.fromkeys(ms for e in entries.values() for m in e["modes"].values()
                                for ms in m.get("wer_by_shift", {})))
    lines = ["", "Each recording was decoded once per lead silence (the same speech that many milliseconds later); "
                 "the WER and seconds above, and the targets, are the means over them. WER % at each:", "",
             "| recording | mode | " + " | ".join(f"{ms} ms" for ms in shifts) + " | mean |",
             "| --- | --- | " + "---: | " * len(shifts) + "---: |"]
    for name, entry in entries.items():
        for mode, m in entry["modes"].items():
            by = m.get("wer_by_shift", {})
            cells = " | ".join(f"{100 * by[ms]:.2f}" if ms in by else "-" for ms in shifts)
            lines.append(f"| {name} | ({mode}) | {cells} | {100 * m['wer']:.2f} |")
    return lines


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"


def choosing(parser: argparse.ArgumentParser) -> None:
    """The options that choose the recordings (``chosen``), for each benchmark that reads them."""
    parser.add_argument("--audio", help=f"folder of WAV files with reference .txt files of the same name "
                                        f"(default: {LONGFORM})")
    parser.add_argument("--only", help="these recordings only, by name without .wav, e.g. long1 or mix3")
    parser.add_argument("--seconds", type=float, help="only each recording's utterances within its first N seconds "
                                                      "(needs manifest.jsonl with utterance times; the "
                                                      "rearranged ones too)")
    parser.add_argument("--lead-silence", dest="lead_silence", type=_milliseconds, default=[0], metavar="MS[,MS...]",
                        help="this many milliseconds of silence before each recording, decoded once per value "
                             "(default 0)")
    parser.add_argument("--rearranged", type=int, default=0, metavar="N",
                        help="N more recordings of the same utterances, chapters in other orders with other "
                             "pauses (mix1..mixN; needs manifest.jsonl with utterance times)")
    parser.add_argument("--seed", type=int, default=1, help="which rearrangements --rearranged draws (default 1)")


def chosen(folder: Path, args: argparse.Namespace) -> list[Recording]:
    """The recordings ``choosing``'s options name: the folder's and ``--rearranged``'s, ``--only`` of both."""
    only = args.only.split(",") if args.only else None
    mixes = rearranged(folder, args.rearranged, args.seed, args.seconds) if args.rearranged > 0 else []
    mix_names = {m.name for m in mixes}
    originals = [n for n in only if n not in mix_names] if only else None
    recordings = [] if originals == [] else load_recordings(folder, originals, args.seconds)
    return [shifted(r, ms) for r in recordings + [m for m in mixes if not only or m.name in only]
            for ms in args.lead_silence]


def _milliseconds(text: str) -> list[int]:
    """``--lead-silence``'s values: distinct whole milliseconds, 0 or more, in the order given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not whole milliseconds: {text!r}") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"distinct milliseconds, 0 or more: {text!r}")
    return values


def chosen_or_status(args: argparse.Namespace, command: str) -> list[Recording] | int:
    """``chosen``'s recordings, or the exit status once ``command`` has said why there are none: 0 where
    the shared recordings are not on this machine (nothing to measure), 2 where the options name none."""
    folder = Path(args.audio) if args.audio else LONGFORM
    if not args.audio and not folder.is_dir():
        print(f"{command}: skipped: no recordings at {folder} (--audio DIR: WAV files with .txt references)",
              file=sys.stderr)
        return 0
    try:
        return chosen(folder, args)
    except NoRecordings as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench long-accuracy", description=__doc__.split("\n")[0])
    choosing(parser)
    parser.add_argument("--rounds", type=int, default=1, help="passes over every recording and mode (default 1)")
    parser.add_argument("--modes", default="".join(MODES), type=_modes,
                        help=f"which of the four to measure, e.g. ac (default {''.join(MODES)})")
    parser.add_argument("--out", help="results folder (default: bench/results/long-accuracy-<timestamp>)")
    args = parser.parse_args(argv)
    recordings = chosen_or_status(args, "long-accuracy")
    if isinstance(recordings, int):
        return recordings
    out = Path(args.out or REPO / "bench" / "results" / time.strftime("long-accuracy-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    result = run(recordings, out, max(1, args.rounds), log=lambda line: print(line, flush=True), modes=args.modes)
    print()
    print((out / "summary.md").read_text())
    print(f"results: {out} (summary.md, results.json), {result['duration_seconds']} s")
    return 1 if any("error" in r for r in result["rows"]) else 0


def _modes(text: str) -> str:
    """``--modes``: letters among MODES', kept in MODES' order (the order a round measures them)."""
    if not text or set(text) - set(MODES):
        raise argparse.ArgumentTypeError(f"letters of {''.join(MODES)}: {text!r}")
    return "".join(m for m in MODES if m in text)


if __name__ == "__main__":
    sys.exit(main())
