"""The streaming benchmark (bench/streaming.py) run as a user runs it, on a short piece of speech: real
asrctl pools, real WebSocket clients paced at real time; and how it turns events into latencies."""
from __future__ import annotations

import json
import subprocess
import sys

from bench.streaming import turns
from support import REPO


def test_turn_latencies_count_from_when_the_audio_was_sent():
    """At 2x real time, audio at 3.0 s of the recording is sent 1.5 s after the start."""
    arrivals = [
        (0.9, {"type": "input_audio_buffer.speech_started", "item_id": "a", "audio_start_ms": 700}),
        (1.6, {"type": "conversation.item.input_audio_transcription.delta", "item_id": "a", "delta": "Hello"}),
        (1.7, {"type": "input_audio_buffer.speech_stopped", "item_id": "a", "audio_end_ms": 3000}),
        (2.1, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "a", "transcript": "Hello."}),
        (2.2, {"type": "input_audio_buffer.speech_started", "item_id": "b", "audio_start_ms": 3500}),
        (3.0, {"type": "input_audio_buffer.speech_stopped", "item_id": "b", "audio_end_ms": 5000}),
        (3.9, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "b", "transcript": "Bye."}),
    ]
    measured = turns(arrivals, speed=2.0)
    assert [t["transcript"] for t in measured] == ["Hello.", "Bye."]
    assert [t["latency"] for t in measured] == [0.6, 1.4]              # 2.1 - 1.5, 3.9 - 2.5
    assert measured[0]["first_delta"] == 1.1                           # 1.6 - (0.7 + 0.3) / 2
    assert measured[1]["first_delta"] is None and measured[1]["seconds"] == 1.5


def test_the_benchmark_streams_through_a_pool_and_ramps_one_instance(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench", "streaming", "--seconds", "12", "--streams", "2",
                          "--fast", "0", "--capacity-seconds", "8", "--capacity-max", "2", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((out / "results.json").read_text())
    (pool,) = result["pool"]
    assert pool["streams"] == 2 and not pool["errors"] and pool["turns"] >= 2
    assert 0 < pool["latency_median"] < 30 and pool["wer_mean"] <= 0.25, pool
    assert all(t.strip() for t in pool["transcripts"])
    assert 1 <= len(result["capacity"]) <= 2 and result["capacity"][0]["turns"] >= 1
    summary = (out / "summary.md").read_text()
    assert "end of turn -> completed" in summary and "| 2 instances | 2 | 1x |" in summary
    ramp_ended = result["streams_per_core"] == 2                       # the ramp's last row held: a lower bound
    assert result["capacity_ramp_ended"] is ramp_ended
    assert ("held at least **2**" in summary) is ramp_ended, summary
    assert not list(out.glob("run-*")), "the pools' run directories are left behind"


def test_whole_recordings_are_streamed_and_compared_with_asr(tmp_path):
    """``--whole``: each recording of a folder streamed at 4x, its WER next to /asr's on the same audio."""
    import numpy as np
    import soundfile
    from support import SECOND_SENTENCE, SPOKEN, speech_with_pauses

    folder = tmp_path / "audio"
    folder.mkdir()
    samples, _ = speech_with_pauses(SPOKEN, SECOND_SENTENCE)
    soundfile.write(folder / "two.wav", np.asarray(samples), 16000, subtype="PCM_16")
    (folder / "two.txt").write_text(f"{SPOKEN} {SECOND_SENTENCE}\n")
    (folder / "no-reference.wav").write_bytes((folder / "two.wav").read_bytes())
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench", "streaming", "--whole", "--audio", str(folder),
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads((out / "results.json").read_text())["whole"]
    assert row["name"] == "two" and row["speed"] == 4 and row["turns"] == 2 and not row["errors"]
    assert row["wer_mean"] <= 0.15 and row["asr_wer"] <= 0.15, row
    assert "| two |" in (out / "summary.md").read_text()
    assert not list(out.glob("run-*")), "the pool's run directory is left behind"
