"""The long-form accuracy benchmark (bench/long_accuracy.py) on the first minute of the shared read
speech: real asrctl pools, the real model, faster-whisper's defaults in a pinned child; and how it
cuts a recording and its reference, and what it says when there is nothing to measure."""
from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import pytest
import soundfile

from bench import long_accuracy
from bench.long_accuracy import LONGFORM, MODES, load_recordings
from bench.machine import cpu_model
from app.control.act import processes
from app.control.paths import RunPaths
from support import REPO, poll, run_asrctl

shared = pytest.mark.skipif(not (LONGFORM / "manifest.jsonl").exists(),
                            reason=f"the shared long-form recordings are not here ({LONGFORM})")


def long1_parts() -> list[dict]:
    rows = [json.loads(line) for line in (LONGFORM / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in rows if r["file"] == "long1.wav")["parts"]


@shared
def test_a_slice_is_whole_utterances_cut_in_a_pause_with_their_reference():
    (recording,) = load_recordings(LONGFORM, ["long1"], seconds=60)
    parts = long1_parts()
    kept = [p for p in parts if p["end_s"] <= 60]
    following = parts[len(kept)]
    assert 0 < len(kept) < len(parts)
    assert kept[-1]["end_s"] < recording.seconds < following["start_s"]   # in the pause after the last one
    assert recording.reference == " ".join(p["text"] for p in kept)
    cut, rate = soundfile.read(io.BytesIO(recording.data), dtype="int16")
    whole, _ = soundfile.read(str(LONGFORM / "long1.wav"), dtype="int16")
    assert rate == 16000 and len(cut) == round(recording.seconds * rate)
    assert np.array_equal(cut, whole[:len(cut)])                          # the same samples, not re-encoded


def test_nothing_to_measure_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(long_accuracy, "LONGFORM", tmp_path / "absent")
    assert long_accuracy.main([]) == 0                                    # not on this machine: skipped
    assert f"skipped: no recordings at {tmp_path / 'absent'}" in capsys.readouterr().err
    assert long_accuracy.main(["--audio", str(tmp_path)]) == 2            # a folder named by hand must hold some
    assert "no WAV with a reference .txt" in capsys.readouterr().err
    soundfile.write(str(tmp_path / "talk.wav"), np.zeros(16000, np.int16), 16000)
    (tmp_path / "talk.txt").write_text("hello\n")
    assert long_accuracy.main(["--audio", str(tmp_path), "--seconds", "30"]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err                   # cannot cut a reference without times


@shared
@pytest.mark.integration
def test_the_first_minute_of_long1_measured_four_ways(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "long-accuracy", "--only", "long1", "--seconds", "60",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((out / "results.json").read_text())
    summary_md = (out / "summary.md").read_text()

    # The machine line above the table names the CPU and the libraries that decode.
    first = summary_md.splitlines()[0]
    assert cpu_model() in first and f"faster-whisper {metadata.version('faster-whisper')}" in first
    assert f"ctranslate2 {metadata.version('ctranslate2')}" in first and "int8" in first

    kept = [p for p in long1_parts() if p["end_s"] <= 60]
    assert result["recordings"] == {"long1": {"audio_seconds": pytest.approx(kept[-1]["end_s"], abs=1.0),
                                              "reference_words": sum(len(p["text"].split()) for p in kept)}}
    rows = {r["mode"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(MODES) and len(result["rows"]) == 4
    for mode, row in rows.items():
        assert "error" not in row and row["seconds"] > 0, row
        assert row["wer"] < 0.2, (mode, row["wer"], row["text"])           # real words, not the target
    # (b) decodes window after window (no chunks); (c) cuts and sends chunks to both instances.
    assert "chunks" not in rows["b"] and "chunks" in rows["c"], (rows["b"], rows["c"])
    lanes = dict(part.split("=") for part in rows["c"]["chunks"].split(", "))
    assert len(lanes) == 2 and all(int(n) >= 1 for n in lanes.values()), rows["c"]["chunks"]

    entry = result["summary"]["long1"]
    ratio, gap = entry["c_over_a_time"], entry["c_minus_a_wer_pp"]
    assert ratio["measured"] == round(rows["c"]["seconds"] / rows["a"]["seconds"], 3)
    assert gap["measured"] == round(100 * (rows["c"]["wer"] - rows["a"]["wer"]), 2)
    assert ratio["met"] == (ratio["measured"] <= 0.55) and gap["met"] == (gap["measured"] <= 0.5)
    for mode, label in MODES.items():
        assert f"| ({mode}) {label} | {100 * rows[mode]['wer']:.2f} |" in summary_md
    assert f"| long1 | {ratio['measured']:.2f} (" in summary_md and f"{gap['measured']:+.2f} (" in summary_md
    assert summary_md in run.stdout


def test_lead_silence_goes_before_the_same_samples_and_reference(tmp_path):
    speech = (np.sin(np.arange(16000) / 5) * 8000).astype(np.int16)
    soundfile.write(str(tmp_path / "talk.wav"), speech, 16000, subtype="PCM_16")
    (tmp_path / "talk.txt").write_text("hello there\n")
    (plain,) = load_recordings(tmp_path)
    moved = long_accuracy.shifted(plain, 30)
    samples, rate = soundfile.read(io.BytesIO(moved.data), dtype="int16")
    assert rate == 16000 and len(samples) == 16000 + 480
    assert not samples[:480].any() and np.array_equal(samples[480:], speech)
    assert moved.reference == plain.reference == "hello there" and moved.name == plain.name == "talk"
    assert moved.seconds == pytest.approx(plain.seconds + 0.03) and moved.lead_silence_ms == 30
    assert long_accuracy.shifted(plain, 0) is plain and plain.lead_silence_ms == 0


def test_each_recording_rearranged_ones_too_comes_once_per_lead_silence(tmp_path):
    made_up_chapters(tmp_path)
    (tmp_path / "talk0.txt").write_text("the first file\n")
    parser = argparse.ArgumentParser()
    long_accuracy.choosing(parser)
    got = long_accuracy.chosen(tmp_path, parser.parse_args(["--rearranged", "1", "--lead-silence", "0,20,50"]))
    assert [(r.name, r.lead_silence_ms) for r in got] == [("talk0", 0), ("talk0", 20), ("talk0", 50),
                                                          ("mix1", 0), ("mix1", 20), ("mix1", 50)]
    for r in got:
        base = next(b for b in got if b.name == r.name and b.lead_silence_ms == 0)
        samples, _ = soundfile.read(io.BytesIO(r.data), dtype="int16")
        plain, _ = soundfile.read(io.BytesIO(base.data), dtype="int16")
        lead = 16 * r.lead_silence_ms
        assert not samples[:lead].any() and np.array_equal(samples[lead:], plain) and r.reference == base.reference
    assert long_accuracy.recorded(got)["mix1"]["lead_silence_ms"] == [0, 20, 50]
    assert "lead_silence_ms" not in long_accuracy.recorded([b for b in got if b.lead_silence_ms == 0])["mix1"]
    for bad in ("10,10", "-5", "x", ","):
        with pytest.raises(SystemExit):
            parser.parse_args(["--lead-silence", bad])


def made_up_chapters(folder, chapters: int = 6, sentences: int = 4) -> dict[str, tuple[np.ndarray, str]]:
    """Two WAVs of noise "sentences" (never zero, so pauses are the only zeros) with their manifest:
    {utt_id: (samples, text)}."""
    rng = np.random.default_rng(0)
    made, rows = {}, []
    for f, file_chapters in enumerate((range(0, chapters, 2), range(1, chapters, 2))):
        pieces, parts, at = [np.zeros(8000, np.int16)], [], 8000
        for c in file_chapters:
            for s in range(sentences):
                utt_id, text = f"{100 + c}-{7 * c}-{s:04d}", f"chapter {c} sentence {s}"
                noise = rng.integers(1, 3000, round(16000 * rng.uniform(1, 3))).astype(np.int16)
                parts.append({"utt_id": utt_id, "start_s": at / 16000, "end_s": (at + len(noise)) / 16000,
                              "text": text})
                made[utt_id] = (noise, text)
                pieces += [noise, np.zeros(8000, np.int16)]
                at += len(noise) + 8000
        soundfile.write(str(folder / f"talk{f}.wav"), np.concatenate(pieces), 16000, subtype="PCM_16")
        rows.append({"file": f"talk{f}.wav", "parts": parts})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return made


def test_rearranged_recordings_are_whole_chapters_with_new_pauses_and_runs_back_to_back(tmp_path):
    made = made_up_chapters(tmp_path)
    mixes = long_accuracy.rearranged(tmp_path, 3, seed=7)
    assert [m.name for m in mixes] == ["mix1", "mix2", "mix3"]
    assert len({m.data for m in mixes}) == 3                                     # three different draws
    assert [m.data for m in long_accuracy.rearranged(tmp_path, 3, seed=7)] == [m.data for m in mixes]
    assert long_accuracy.rearranged(tmp_path, 1, seed=8)[0].data != mixes[0].data
    by_text = {text: (utt_id, noise) for utt_id, (noise, text) in made.items()}
    for mix in mixes:
        samples, rate = soundfile.read(io.BytesIO(mix.data), dtype="int16")
        assert rate == 16000 and mix.seconds == len(samples) / rate
        texts = [" ".join(mix.reference.split()[i:i + 4]) for i in range(0, len(mix.reference.split()), 4)]
        ids = [by_text[t][0] for t in texts]
        chapters = list(dict.fromkeys(i.rsplit("-", 1)[0] for i in ids))
        assert len(chapters) == long_accuracy.CHAPTERS_PER_MIX and len(ids) == 4 * len(chapters)
        assert ids == sorted(ids, key=lambda i: (chapters.index(i.rsplit("-", 1)[0]), i))  # each chapter in order
        # The audio: 0.5 s of silence, each sentence's own samples in that order with pauses between, 0.5 s.
        nonzero = np.flatnonzero(samples)
        edges = np.flatnonzero(np.diff(nonzero) > 1)
        starts, ends = np.r_[nonzero[0], nonzero[edges + 1]], np.r_[nonzero[edges] + 1, nonzero[-1] + 1]
        assert starts[0] == 8000 and len(samples) - ends[-1] == 8000
        assert [samples[s:e].tobytes() for s, e in zip(starts, ends)] == [by_text[t][1].tobytes() for t in texts]
        pauses = (starts[1:] - ends[:-1]) / rate
        tight = np.isclose(pauses, long_accuracy.BACK_TO_BACK_SECONDS)
        assert tight.sum() == 4 and all(0.3 <= p <= 1.2 for p in pauses[~tight])
        runs = np.flatnonzero(tight)
        assert len({i // 3 for i in runs}) == 2 and all(i % 3 < 2 for i in runs)   # two runs of three sentences


def test_rearranged_recordings_cut_at_seconds_are_their_first_utterances_up_to_a_pause(tmp_path):
    made_up_chapters(tmp_path)
    wholes = long_accuracy.rearranged(tmp_path, 3, seed=7)
    cuts = long_accuracy.rearranged(tmp_path, 3, seed=7, seconds=30)
    for whole, cut in zip(wholes, cuts):
        samples, rate = soundfile.read(io.BytesIO(whole.data), dtype="int16")
        kept, _ = soundfile.read(io.BytesIO(cut.data), dtype="int16")
        assert whole.seconds > 45 and cut.seconds <= 30 and cut.seconds == len(kept) / rate
        assert np.array_equal(kept, samples[:len(kept)])                    # the same draw, its beginning
        nonzero = np.flatnonzero(samples)
        edges = np.flatnonzero(np.diff(nonzero) > 1)
        starts, ends = np.r_[nonzero[0], nonzero[edges + 1]], np.r_[nonzero[edges] + 1, nonzero[-1] + 1]
        n = int((ends <= 30 * rate).sum())                                  # the sentences that end by 30 s
        assert 0 < n < len(starts)
        assert ends[n - 1] < len(kept) < starts[n]                          # cut in the pause after the last
        words = whole.reference.split()
        assert cut.reference == " ".join(words[:4 * n])                     # their text, four words each


def test_rearranged_needs_utterance_times(tmp_path, capsys):
    soundfile.write(str(tmp_path / "talk.wav"), np.zeros(16000, np.int16), 16000)
    (tmp_path / "talk.txt").write_text("hello\n")
    assert long_accuracy.main(["--audio", str(tmp_path), "--rearranged", "2"]) == 2
    assert "--rearranged needs" in capsys.readouterr().err


def test_the_summary_gives_the_mean_difference_over_the_recordings():
    def entry(gap, ratio):
        return {"modes": {}, "c_minus_a_wer_pp": {"measured": gap, "met": gap <= 0.5},
                "c_over_a_time": {"measured": ratio, "met": ratio <= 0.55}}

    every = long_accuracy.overall({"x": entry(1.5, 0.5), "y": entry(-0.5, 0.6), "z": entry(0.3, 0.45)})
    assert every["recordings"] == 3
    assert every["wer_gap_pp"] == {"recordings": 3, "mean": 0.43, "min": -0.5, "max": 1.5, "standard_error": 0.58,
                                   "within": 2}
    assert every["time_ratio"] == {"recordings": 3, "mean": 0.517, "min": 0.45, "max": 0.6, "standard_error": 0.044,
                                   "within": 2}
    assert long_accuracy.overall({"x": entry(1.5, 0.5), "failed": {"modes": {}}}) is None   # one is no mean


def test_shifts_are_averaged_per_recording_and_a_is_held_against_itself():
    # Two recordings, each decoded at 0 and 20 ms: (a) and (c) WER by shift, as fractions.
    wers = {("x", "a", 0): 0.100, ("x", "a", 20): 0.120, ("x", "c", 0): 0.110, ("x", "c", 20): 0.104,
            ("y", "a", 0): 0.200, ("y", "a", 20): 0.196, ("y", "c", 0): 0.190, ("y", "c", 20): 0.230}
    rows = [{"recording": n, "mode": m, "lead_silence_ms": ms, "wer": w, "seconds": 10.0 if m == "a" else 5.0 + ms / 20,
             "other_load_cores": 0.0}
            for (n, m, ms), w in wers.items()]
    summary = long_accuracy.summarize(rows)
    x = summary["x"]
    assert x["modes"]["a"]["wer_by_shift"] == {"0": 0.1, "20": 0.12} and x["modes"]["a"]["wer"] == 0.11
    assert x["modes"]["c"]["wer"] == 0.107 and x["modes"]["c"]["seconds"] == 5.5
    assert x["c_minus_a_wer_pp"]["measured"] == -0.3 and x["c_over_a_time"]["measured"] == 0.55
    assert summary["y"]["c_minus_a_wer_pp"]["measured"] == 1.2
    every = long_accuracy.overall(summary)
    assert list(every["a_against_itself_pp"]) == ["20"]
    itself = every["a_against_itself_pp"]["20"]                     # (a) at 20 ms minus (a) at 0 ms
    assert (itself["min"], itself["max"], itself["within"]) == (pytest.approx(-0.4), pytest.approx(2.0), 1)
    by_shift = every["wer_gap_pp_by_shift"]
    assert (by_shift["0"]["min"], by_shift["0"]["max"], by_shift["0"]["within"]) == (
        pytest.approx(-1.0), pytest.approx(1.0), 1)
    assert (by_shift["20"]["min"], by_shift["20"]["max"], by_shift["20"]["within"]) == (
        pytest.approx(-1.6), pytest.approx(3.4), 1)
    md = long_accuracy.markdown({"machine": {"cpu_model": "cpu", "cores": 2, "system": "Linux", "python": "3",
                                             "libraries": {}, "model": "m", "compute_type": "int8", "beam_size": 5,
                                             "code": "c"},
                                 "loadavg_start": 0, "loadavg_end": 0, "rounds": 1, "started": "now", "modes": "ac",
                                 "recordings": {"x": {"audio_seconds": 9.0}, "y": {"audio_seconds": 9.0}},
                                 "rows": rows, "summary": summary, "overall": every})
    assert "| x | (a) | 10.00 | 12.00 | 11.00 |" in md and "| y | (c) | 19.00 | 23.00 | 21.00 |" in md
    assert "(b) service" not in md                                                   # not measured, not listed
    assert "- (a) 20 ms later against (a) at 0 ms: +0.80 points on average (-0.40 to +2.00), within 0.5 on 1 of 2." in md


def test_modes_are_letters_of_the_four_in_their_order():
    assert long_accuracy._modes("ca") == "ac" and long_accuracy._modes("abcd") == "abcd"
    for bad in ("", "ae", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            long_accuracy._modes(bad)


def test_only_chooses_among_the_folder_s_recordings_and_the_rearranged_ones(tmp_path):
    made_up_chapters(tmp_path)
    (tmp_path / "talk0.txt").write_text("the first file\n")        # talk1 has no reference: not a recording
    parser = argparse.ArgumentParser()
    long_accuracy.choosing(parser)

    def names(*argv):
        return [r.name for r in long_accuracy.chosen(tmp_path, parser.parse_args(argv))]

    assert names() == ["talk0"]
    assert names("--rearranged", "2") == ["talk0", "mix1", "mix2"]
    assert names("--rearranged", "2", "--only", "mix2") == ["mix2"]
    assert names("--rearranged", "2", "--only", "talk0,mix1") == ["talk0", "mix1"]
    assert names("--rearranged", "2", "--only", "talk0") == ["talk0"]
    with pytest.raises(long_accuracy.NoRecordings):
        names("--rearranged", "2", "--only", "mix3")                # no such recording


@pytest.mark.integration
def test_sigterm_mid_run_takes_both_pools_and_the_bare_engine_down(tmp_path):
    # A run stopped by ``timeout`` or ``kill`` while it measures, as by Ctrl-C: it exits 143 and leaves
    # no supervisord, nginx, instance or bare-engine process behind, and no run directory.
    audio = tmp_path / "audio"
    audio.mkdir()
    soundfile.write(str(audio / "quiet.wav"), np.zeros(20 * 16000, np.int16), 16000)
    (audio / "quiet.txt").write_text("nothing\n")
    out = tmp_path / "results"
    bench = subprocess.Popen([sys.executable, "-m", "bench", "long-accuracy", "--audio", str(audio), "--rounds", "500",
                              "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    runs = [RunPaths.at(out / "run-window"), RunPaths.at(out / "run-chunked")]
    try:
        said, deadline = "", time.monotonic() + 300
        while "(b) service" not in said and bench.poll() is None and time.monotonic() < deadline:
            if select.select([bench.stdout], [], [], 1)[0]:
                said += bench.stdout.readline()
        assert "(b) service" in said, said                        # measuring: both pools up, the bare engine too
        # Both runs' supervisord, nginx and instances, and the bench's own children (the bare engine).
        family = [p for run in runs for p in processes.run_processes(run)]
        family += [processes.Proc(pid, bench.pid, "other", (), processes.start_time(pid) or 0)
                   for pid in processes.tree(bench.pid) - {bench.pid}]
        assert {"supervisord", "nginx", "instance"} <= {p.kind for p in family}, family
        assert len(family) >= 8, family
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 128 + signal.SIGTERM, bench.stdout.read()
        assert poll(lambda: not processes.alive(family), 10), processes.alive(family)
        assert not any(run.root.exists() for run in runs)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for run in runs:
            if run.root.exists():
                run_asrctl("down", "--run-dir", str(run.root), check=False, timeout=120)

