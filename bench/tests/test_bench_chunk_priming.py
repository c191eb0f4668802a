"""bench/chunk_priming.py: which earlier chunk's tokens prime a chunk, where a recording is halved, how
the ways are compared with the whole-file decode; and one short run on the shared read speech."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import chunk_priming
from bench.chunk_priming import BASELINE, WAYS, compare, conditioned_prompt, prompt, span_cuts
from bench.long_accuracy import LONGFORM
from app.audio.chunking import Chunk
from app.engines.base import Segment, Transcript
from app.engines.models import embedded_ct2_dir
from support import REPO, speech_with_pauses


def test_a_chunk_is_primed_only_with_chunks_decoded_before_it_starts():
    tokens = [[10, 11], [20], [30, 31], [40]]
    assert [prompt("lag1", tokens, k) for k in range(4)] == [None, [10, 11], [20], [30, 31]]
    # Two lanes: chunk k starts while k - 1 is still decoding, so k - 2 is the latest it can have.
    assert [prompt("lag2", tokens, k) for k in range(4)] == [None, None, [10, 11], [20]]
    assert [prompt("upto2", tokens, k) for k in range(4)] == [None, None, [10, 11], [10, 11, 20]]
    assert all(prompt(way, tokens, 3) is None for way in ("none", "whole", "halves", "quarters"))


def test_a_chained_chunk_is_primed_with_its_span_s_earlier_text_from_after_the_last_hot_chunk():
    def decoded(text: str, temperature: float = 0.0) -> Transcript:
        return Transcript(text, "en", 1.0, [Segment(0.0, 1.0, text, temperature=temperature)])
    assert conditioned_prompt("Names.", [decoded("one"), decoded("two")]) == "Names. one two"
    assert conditioned_prompt("Names.", [decoded("one"), decoded("hot", 0.8), decoded("three")]) == "three"
    assert conditioned_prompt("", [decoded("warm", 0.4)]) == "warm" and conditioned_prompt("", []) == ""


def test_a_recording_is_cut_into_spans_in_the_pauses_nearest_its_halves_or_quarters():
    # Cuts at 30 (a pause), 55 (inside speech: the chunks overlap) and 80 (a pause), of 100.
    chunks = [Chunk(0, 30, True), Chunk(30, 56, True), Chunk(54, 80, True), Chunk(81, 100, True)]
    assert span_cuts(chunks, 100, 2) == [30]          # 55 is nearer the middle, but inside speech
    assert span_cuts(chunks, 130, 2) == [80]
    assert span_cuts(chunks, 100, 3) == [30, 80]
    # Quarters of 100 at 25, 50, 75 on cuts at 10, 20, 40, 60, 90: each the nearest one still free.
    tens = [Chunk(a, b, True) for a, b in [(0, 10), (10, 20), (20, 40), (40, 60), (60, 90), (90, 100)]]
    assert span_cuts(tens, 100, 4) == [20, 40, 60]
    with pytest.raises(ValueError):
        span_cuts([Chunk(0, 56, True), Chunk(54, 100, True)], 100, 2)
    with pytest.raises(ValueError):
        span_cuts(chunks, 100, 4)                     # two pauses make three spans at most


def test_each_way_is_compared_with_the_whole_file_on_the_recordings_it_decoded():
    rows = [{"recording": n, "way": w, "wer": v} for n, w, v in [
        ("x", BASELINE, 0.10), ("x", "none", 0.12), ("x", "lag1", 0.101),
        ("y", BASELINE, 0.20), ("y", "none", 0.19), ("y", "lag1", 0.23),
        ("z", "none", 0.50)]]                           # z has no whole-file decode: left out
    compared = compare(rows, [BASELINE, "none", "lag1"])
    assert set(compared) == {"none", "lag1"}
    assert compared["none"] == {"recordings": 2, "mean": 0.5, "min": -1.0, "max": 2.0, "standard_error": 1.5,
                                "within": 1}
    assert compared["lag1"] == pytest.approx({"recordings": 2, "mean": 1.55, "min": 0.1, "max": 3.0,
                                              "standard_error": 1.45, "within": 1})
    assert compare(rows[:2], [BASELINE, "none"])["none"]["standard_error"] is None


def test_each_chunk_reaches_the_decoder_with_the_prompt_its_way_gives_it():
    from faster_whisper import WhisperModel

    samples, _ = speech_with_pauses("The first sentence is about the weather today.",
                                    "The second one talks about a train to the city.",
                                    "And the third sentence ends this short recording.", pause=1.5)
    model = WhisperModel(str(embedded_ct2_dir()), device="cpu", compute_type="int8", cpu_threads=1)
    calls = []
    transcribe = model.transcribe

    def spied(audio, **options):   # the real decode; what it was asked, and the tokens it gave
        segments, info = transcribe(audio, **options)
        segments = list(segments)
        calls.append((options.get("initial_prompt"), [t for s in segments for t in s.tokens]))
        return iter(segments), info

    model.transcribe = spied
    for way in ("lag1", "none"):
        calls.clear()
        text = chunk_priming.decode(model, samples, way, chunk_seconds=6)
        assert len(calls) >= 3 and all(tokens for _, tokens in calls) and "train" in text.lower()
        prompts = [p for p, _ in calls]
        if way == "lag1":   # each chunk after the first primed with the tokens its neighbour decoded
            assert prompts == [None] + [tokens for _, tokens in calls[:-1]]
        else:
            assert prompts == [None] * len(calls)


@pytest.mark.skipif(not (LONGFORM / "manifest.jsonl").exists(),
                    reason=f"the shared long-form recordings are not here ({LONGFORM})")
def test_the_first_minute_of_long1_decoded_whole_alone_and_primed(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "chunk-priming", "--only", "long1", "--seconds", "60",
                          "--ways", "none,lag1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["ways"] == [BASELINE, "none", "lag1"] and result["recordings"] == ["long1"]
    wer = {r["way"]: r["wer"] for r in result["rows"]}
    assert sorted(wer) == sorted(result["ways"]) and all(v < 0.2 for v in wer.values()), result["rows"]
    assert result["compared"]["lag1"]["mean"] == pytest.approx(100 * (wer["lag1"] - wer[BASELINE]), abs=0.01)
    assert f"| lag1: {WAYS['lag1']} |" in (out / "summary.md").read_text()


def test_unknown_ways_are_refused(capsys):
    with pytest.raises(SystemExit):
        chunk_priming.main(["--ways", "none,sideways"])
    assert "unknown ways: sideways" in capsys.readouterr().err
