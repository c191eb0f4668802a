"""The long-form accuracy benchmark (bench/long_accuracy.py) on the first minute of the shared read
speech: real asrctl pools, the real model, faster-whisper's defaults in a pinned child; and how it
cuts a recording and its reference, and what it says when there is nothing to measure."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
import soundfile

from bench import long_accuracy
from bench.long_accuracy import LONGFORM, MODES, load_recordings
from bench.machine import cpu_model
from support import REPO

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
    (moved,) = load_recordings(tmp_path, lead_silence_ms=30)
    samples, rate = soundfile.read(io.BytesIO(moved.data), dtype="int16")
    assert rate == 16000 and len(samples) == 16000 + 480
    assert not samples[:480].any() and np.array_equal(samples[480:], speech)
    assert moved.reference == plain.reference == "hello there"
    assert moved.seconds == pytest.approx(plain.seconds + 0.03) and moved.lead_silence_ms == 30
