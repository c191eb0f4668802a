"""Whisper's guards against hallucination (app/engines/fallback.py) in both Whisper engines.

A tiny random Whisper is made to loop: its decoder's last layer norm gives every position the same
hidden state, which the tied output projection turns into the same logits at every step, one text
token (" the") well above the rest. At temperature 0 it writes " the the the ..." (a compression
ratio far above 2.4); sampled at higher temperatures it writes other tokens. The policy itself is
checked on its own, and temperature 0 stays deterministic on real speech.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.engines import fallback
from app.engines.base import SAMPLE_RATE, DecodeOptions
from app.engines.fallback import Attempt
from app.selfcheck.speech import SPEECH
from support import SPOKEN, as_an_instance, espeak, read_16k_mono

LOOP_TOKEN = 262    # " the" in the embedded tokenizer's byte-level BPE
LOOP_MARGIN = 9.0   # its logit over every other token's 0: above the timestamps' total, below sampling's reach
LONGFORM = SPEECH / "longform"


# The policy -------------------------------------------------------------------------------------

def attempt(text="a b c d", logprob=-0.2, no_speech=0.01, temperature=0.0):
    return Attempt(text, logprob, no_speech, temperature)


def test_only_the_windows_that_fail_go_again_together_at_the_next_temperature():
    calls = []
    outcomes = {0: ["fine"], 1: ["loop", "fine"], 2: ["unsure", "unsure", "fine"], 3: ["silence"]}

    def decode(indices, temperature):
        calls.append((tuple(indices), temperature))
        made = []
        for i in indices:
            kind = outcomes[i][len([c for c in calls if i in c[0]]) - 1]
            made.append({"fine": attempt(f"clip {i} at {temperature}", temperature=temperature),
                         "loop": attempt("the " * 50, temperature=temperature),
                         "unsure": attempt(f"clip {i}", logprob=-1.5, temperature=temperature),
                         "silence": attempt("thanks", logprob=-1.5, no_speech=0.9, temperature=temperature)}[kind])
        return made

    kept = fallback.decode_with_fallback(4, decode, fallback.LADDER)
    assert calls == [((0, 1, 2, 3), 0.0), ((1, 2), 0.2), ((2,), 0.4)]
    assert [a.temperature for a in kept] == [0.0, 0.2, 0.4, 0.0]
    assert fallback.is_silence(kept[3]) and not fallback.is_silence(kept[0])


def test_when_every_temperature_fails_the_likeliest_that_does_not_loop_is_kept():
    results = {0.0: attempt("the " * 50, logprob=-0.1), 0.2: attempt("x", logprob=-2.0),
               0.4: attempt("y", logprob=-1.2), 0.6: attempt("the " * 60, logprob=-0.05),
               0.8: attempt("z", logprob=-3.0), 1.0: attempt("w", logprob=-1.9)}
    kept = fallback.decode_with_fallback(1, lambda idx, t: [replace(results[t], temperature=t)], fallback.LADDER)
    assert kept[0].text == "y" and kept[0].temperature == 0.4
    loops = fallback.decode_with_fallback(1, lambda idx, t: [attempt("the " * 50, logprob=-t, temperature=t)],
                                          fallback.LADDER)
    assert loops[0].temperature == 0.0  # all loop: the likeliest of all


def test_temperature_0_is_the_ladder_and_any_other_value_only_itself():
    assert fallback.temperatures(0) == fallback.LADDER == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert fallback.temperatures(0.5) == (0.5,)
    calls = []
    fallback.decode_with_fallback(1, lambda idx, t: calls.append(t) or [attempt("the " * 50, temperature=t)],
                                  fallback.temperatures(0.5))
    assert calls == [0.5]


# A random Whisper that loops ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def looping(tmp_path_factory) -> tuple[Path, Path]:
    """(transformers directory, CTranslate2 directory) of the looping random Whisper."""
    import ctranslate2
    import torch
    from transformers import WhisperForConditionalGeneration

    from app.selfcheck import random_whisper

    out = tmp_path_factory.mktemp("looping-whisper")
    hf, _ = random_whisper.build(out, "test", ct2=False)
    model = WhisperForConditionalGeneration.from_pretrained(hf)
    with torch.no_grad():
        norm, embedding = model.model.decoder.layer_norm, model.model.decoder.embed_tokens.weight
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0                      # every position's hidden state: (1, 0, 0, ...)
        embedding[:, 0] = 0.0                   # the tied projection: logits = embedding[:, 0]
        embedding[LOOP_TOKEN, 0] = LOOP_MARGIN
    assert model.proj_out.weight.data_ptr() == embedding.data_ptr()
    model.save_pretrained(hf)
    ct2 = out / "ct2"
    ctranslate2.converters.TransformersConverter(
        str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(str(ct2), quantization="float32")
    yield hf, ct2
    shutil.rmtree(out, ignore_errors=True)


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, int(seconds * SAMPLE_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def ct2_looping(looping):
    from app.engines.ctranslate2_engine import CTranslate2Engine

    return CTranslate2Engine.load(str(looping[1]))


def test_ctranslate2_batch_retries_the_looping_windows_together_at_higher_temperatures(ct2_looping, monkeypatch):
    engine, clips = ct2_looping, [noise(3, 0), noise(2.5, 1)]
    options = [DecodeOptions(language="en")] * 2
    # What temperature 0 alone gives (the setting temperature_fallback = false): a loop.
    greedy = engine.transcribe_batch(clips, [replace(o, fallback=False) for o in options])
    assert all(fallback.compression_ratio(t.text) > fallback.COMPRESSION_RATIO_THRESHOLD for t in greedy)
    assert {s.temperature for t in greedy for s in t.segments} == {0.0}

    calls = []
    generate = engine._generate
    monkeypatch.setattr(engine, "_generate", lambda encoded, prompts, *a, **k: calls.append(
        (k.get("temperature", 0.0), len(prompts))) or generate(encoded, prompts, *a, **k))
    retried = engine.transcribe_batch(clips, options)
    assert calls[0] == (0.0, 2) and calls[1] == (0.2, 2), calls  # both windows again, in one batch
    for before, after in zip(greedy, retried):
        assert after.text != before.text
        assert after.segments and all(s.temperature > 0 for s in after.segments)


def test_ctranslate2_one_by_one_path_has_the_same_guards(ct2_looping):
    """Word timestamps go through faster-whisper's own transcribe: with the ladder too. What it keeps
    is sampled, so not reproducible; where every temperature fails, faster-whisper keeps the likeliest
    attempt, whose ratio (on its own raw text) can sit just over 2.4 (measured 2.40 here with
    CTranslate2's AVX2 kernels): not the loop, far above it, is what is asserted."""
    options = DecodeOptions(language="en", word_timestamps=True)
    loop = ct2_looping.transcribe(noise(3, 2), replace(options, fallback=False))
    transcript = ct2_looping.transcribe(noise(3, 2), options)
    assert {s.temperature for s in loop.segments} == {0.0}
    assert transcript.segments and all(s.temperature > 0 for s in transcript.segments)
    assert fallback.compression_ratio(transcript.text) < fallback.compression_ratio(loop.text) / 2, \
        (transcript.text, loop.text, fallback.compression_ratio(loop.text))


def test_one_temperature_above_0_is_that_one_only(ct2_looping):
    transcript = ct2_looping.transcribe(noise(3, 3), DecodeOptions(language="en", temperature=0.4))
    assert {s.temperature for s in transcript.segments} == {0.4}


def test_transformers_retries_the_looping_windows_together_at_higher_temperatures(looping, monkeypatch):
    from app.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine.load(str(looping[0]))
    clips, options = [noise(1, 4), noise(0.8, 5)], [DecodeOptions(language="en", beam_size=2)] * 2
    greedy = engine.transcribe_batch(clips, [replace(o, fallback=False) for o in options])
    assert all(fallback.compression_ratio(t.text) > fallback.COMPRESSION_RATIO_THRESHOLD for t in greedy)
    assert {s.temperature for t in greedy for s in t.segments} == {0.0}

    model, calls = engine._runner.model, []
    generate = model.generate

    def recorded(*args, **kwargs):
        calls.append((kwargs.get("temperature", 0.0), len(kwargs["encoder_outputs"].last_hidden_state)))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    retried = engine.transcribe_batch(clips, options)
    # Both windows again in one batch, each sampled best-of-5.
    assert calls[0] == (0.0, 2) and calls[1] == (0.2, 2 * fallback.BEST_OF), calls
    for before, after in zip(greedy, retried):
        assert after.text != before.text
        assert after.segments and all(s.temperature > 0 for s in after.segments)
    # Sampling is seeded here: the same request decodes the same way again.
    assert engine.transcribe_batch(clips, options) == retried


# Real speech ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct2_tiny():
    from app.engines.ctranslate2_engine import CTranslate2Engine
    from app.engines.models import embedded_ct2_dir

    return CTranslate2Engine.load(str(embedded_ct2_dir()))


def test_temperature_0_decodes_a_clip_the_same_way_twice(ct2_tiny):
    speech = espeak(SPOKEN, voice="en", speed=150)
    for options in (DecodeOptions(), DecodeOptions(ends_in_pause=True)):  # faster-whisper's loop, lockstep
        first, second = ct2_tiny.transcribe(speech, options), ct2_tiny.transcribe(speech, options)
        assert first.text and first == second
        assert {s.temperature for s in first.segments} == {0.0}


@pytest.mark.skipif(not (LONGFORM / "long1.wav").exists(), reason=f"no long-form recordings at {LONGFORM}")
def test_a_chunk_whose_open_segment_starts_the_window_over_is_not_written_twice(ct2_tiny):
    """On this stretch of long1.wav, the open last segment decoded again on the same window started
    the window over (timestamps from 0) on the CPUs measured: the chunk's words came out twice."""
    audio = read_16k_mono(LONGFORM / "long1.wav")[int(341.632 * SAMPLE_RATE):int(366.672 * SAMPLE_RATE)]
    transcript = ct2_tiny.transcribe(audio, DecodeOptions(ends_in_pause=True))
    assert transcript.text.lower().count("egyptian background") == 1, transcript.text
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts)


def test_openai_verbose_reports_the_temperature_each_segment_kept():
    from app import formats
    from app.engines.base import Segment, Transcript

    transcript = Transcript("a b", "en", 4.0, [Segment(0.0, 2.0, "a", temperature=0.4), Segment(2.0, 4.0, "b")])
    body = formats.openai_verbose(transcript, "transcribe", 0.0)
    assert [s["temperature"] for s in body["segments"]] == [0.4, 0.0]  # the second: not reported, the request's


def test_a_chunk_whose_open_segment_re_reads_its_sentence_is_not_written_twice(ct2_tiny):
    """The last chunk of test_longform's recording: primed on its open segment, Whisper read "And so my
    fellow Americans ask not ..." a second time, with timestamps that moved on (measured on this CPU)."""
    from support import english_set_a, set_a_sequence

    forward, _ = set_a_sequence(gap=1.0)
    backward, _ = set_a_sequence(gap=0.6, rows=english_set_a()[::-1])
    audio = np.concatenate([forward, backward])[int(111.616 * SAMPLE_RATE):int(134.841 * SAMPLE_RATE)]
    transcript = ct2_tiny.transcribe(audio, DecodeOptions(ends_in_pause=True))
    assert transcript.text.lower().count("fellow americans") == 1, transcript.text
    assert "your country" in transcript.text.lower().split("fellow americans")[1]


def test_an_open_segment_repeating_the_words_before_the_join_counts_as_a_re_read():
    from app.engines.ctranslate2_engine import _repeats

    assert _repeats("is beneath pitifulness. Now leave and take your", " Take your half a man with you.")
    assert _repeats("And so my fellow Americans ask not", " my fellow Americans ask not what")
    assert not _repeats("Now leave and take your", " half a man with you.")
    assert not _repeats("he said, take", " take your half")   # one word again is not a re-read
    assert not _repeats("", " take your half")
    # Numbers written the other way, and a re-read that starts after words of its own (read recipes).
    assert _repeats("Lobster-alled newburg. One pound of lobster meat, one teaspoon full of butter,",
                    " 1 pound of lobster meat, 1 teaspoon full of butter, yolks of 4 eggs")
    assert _repeats("It was the recipe that was followed when it was prepared in the Domonico. Lobster Alen "
                    "Newberg. One pound of lobster meat, one wine glass of",
                    " the rest speed that was followed when it was prepared in the Domeonico.")
    assert not _repeats("One pound of lobster meat,", " 2 pounds of butter")    # other numbers, other words
    assert not _repeats("the recipe that was followed when it", " was prepared in the kitchen of the hotel")


def test_an_open_segment_with_more_words_than_its_audio_could_hold_counts_as_a_re_read():
    from app.engines.ctranslate2_engine import _crowded

    re_read = " the story is regarding Joseph, there is no founder at Frum in Manate, say."   # 14 words
    assert _crowded(re_read, 1.4) and not _crowded(re_read, 3.0)    # 5 words a second and 2 to spare
    assert not _crowded(" yolks of four eggs, one wine glass of sherry lobster fat.", 5.4)
    assert _crowded(" and", -0.5) is False and _crowded(" and so on then", 0.0)


SPAN = """
import json, sys
import numpy as np
from app.engines import load_engine
from app.engines.base import DecodeOptions
from support import read_16k_mono
samples = read_16k_mono(sys.argv[2])
lead, sentences = json.loads(sys.argv[3])
pieces = [np.zeros(lead, np.float32)]
for start, end, pause in sentences:
    pieces += [samples[start:end], np.zeros(pause, np.float32)]
audio = np.concatenate(pieces)
engine = load_engine("ctranslate2", sys.argv[1], "cpu", "int8", threads)
print(json.dumps({"samples": len(audio), "text": engine.transcribe(audio, DecodeOptions(ends_in_pause=True)).text}))
"""


@pytest.mark.skipif(not (LONGFORM / "long1.wav").exists(), reason=f"no long-form recordings at {LONGFORM}")
def test_a_span_whose_open_segment_re_reads_a_list_with_figures_is_not_written_twice():
    """A 73.4 s span of long1.wav's recipe chapter, its eight sentences spaced as a rearranged recording
    of the long-form benchmark spaced them (cut where the service cut it, in the pause after the last),
    decoded as an instance decodes it. Primed on its open last segment, Whisper read "One pound of
    lobster meat, one teaspoon full of butter, one half pint of cream" a second time as "1 pound of
    lobster meat, 1 teaspoon ..." (measured on an AMD EPYC, Zen 5)."""
    sentences = [(3859520, 3897360, 6139), (3903120, 3973200, 17399), (3983280, 4163760, 14322),
                 (4182640, 4422720, 7766), (4433120, 4527120, 12290), (4537360, 4786240, 19026),
                 (4796640, 4834240, 17580), (4839680, 4996240, 6486)]   # (start, end, pause after), samples
    decoded = span_as_an_instance(8000, sentences)
    assert decoded["samples"] == 1174528
    text = " ".join(decoded["text"].lower().replace(",", " ").replace(".", " ").split())
    for figure, word in (("1", "one"), ("4", "four")):
        text = text.replace(f" {figure} ", f" {word} ")
    assert text.count("pound of lobster meat") == 1, decoded["text"]
    assert "yolks of four eggs" in text, decoded["text"]


@pytest.mark.skipif(not (LONGFORM / "long1.wav").exists(), reason=f"no long-form recordings at {LONGFORM}")
def test_a_span_whose_open_segment_crams_earlier_words_into_its_last_second_takes_a_second_window():
    """A 71.6 s span of long1.wav's chapter on the Hebrews in Egypt, spaced as a rearranged recording of
    the long-form benchmark spaced it (10 ms later), cut where the service cut it, in a pause inside its
    eighth sentence. Primed on its open last segment, Whisper wrote "the story is regarding Joseph, there
    is no founder ..." (14 words) into the last 1.4 s, after "The stories regarding Joseph, they've
    traditionally found ..." (measured on an AMD EPYC, Zen 5)."""
    sentences = [(5147760, 5219600, 8701), (5228240, 5306400, 12504), (5316960, 5488880, 13292),
                 (5504080, 5557840, 10200), (5565520, 5855600, 18384), (5872240, 5976320, 8235),
                 (5984480, 6153360, 9952), (6154160, 6271100, 0)]
    decoded = span_as_an_instance(8160, sentences)
    assert decoded["samples"] == 1145088
    text = decoded["text"].lower().replace("'s", "s").replace("story is", "stories")
    assert text.count("regarding joseph") == 1, decoded["text"]


def span_as_an_instance(lead: int, sentences: list[tuple[int, int, int]]) -> dict:
    """``lead`` samples of silence, then each (start, end, pause after) of long1.wav, decoded as a chunk
    by a child started as an instance is (``as_an_instance``): {"samples", "text"}."""
    import json

    from app.engines.models import embedded_ct2_dir

    return as_an_instance(SPAN, str(embedded_ct2_dir()), str(LONGFORM / "long1.wav"), json.dumps([lead, sentences]))


@pytest.mark.skipif(not (LONGFORM / "long2.wav").exists(), reason=f"no long-form recordings at {LONGFORM}")
def test_a_chunk_whose_open_segment_repeats_the_words_before_it_is_not_written_twice(ct2_tiny):
    """On this chunk of long2.wav (as longform.split cuts it) the open last segment, decoded again on the same
    window, began with the two words before it ("... take your" / "Take your half a man"), where
    faster-whisper's second window from that segment's start does not (measured on this CPU)."""
    audio = read_16k_mono(LONGFORM / "long2.wav")[2433792:2817792]  # 152.112-176.112 s
    transcript = ct2_tiny.transcribe(audio, DecodeOptions(ends_in_pause=True))
    assert transcript.text.lower().count("take your") == 1, transcript.text
    assert "half a man" in transcript.text.lower(), transcript.text


@pytest.mark.skipif(not (LONGFORM / "long2.wav").exists(), reason=f"no long-form recordings at {LONGFORM}")
def test_a_chunk_writes_no_segment_that_starts_after_its_audio(ct2_tiny):
    """On this chunk of long2.wav (27.57 s, as longform.split cuts it) the window's open last segment started at
    29.04 s, past the audio: decoded again, it gave an "I" that is not there. faster-whisper's loop
    ends there; the chunk does too."""
    audio = read_16k_mono(LONGFORM / "long2.wav")[6049536:6490624]  # 378.096-405.664 s
    transcript = ct2_tiny.transcribe(audio, DecodeOptions(ends_in_pause=True))
    assert transcript.segments and all(s.start < len(audio) / SAMPLE_RATE for s in transcript.segments), \
        [(s.start, s.end, s.text) for s in transcript.segments]
    assert "peaceful night" in transcript.text.lower()
