"""The qwen3-asr engine in-process, on a tiny Qwen3-ASR built offline (tests/random_qwen3_asr.py).

The model was taught for a few seconds to name the language of three clips and stop; anything else it
says is random. So these tests check what crosses the interfaces: a forced language, a prompt, beams
and temperature reach the model; detection reports the model's own language as an ISO code with no
invented probability; batches equal single decodes; long audio is cut at quiet points and lands on
one timeline; word times come from the aligner; checkpoints that would serve random weights are refused.
"""
from __future__ import annotations

import numpy as np
import pytest

from app.engines import load_engine
from app.engines.base import SAMPLE_RATE, DecodeOptions
from app.engines.models import resolve_model
from app.engines.qwen3_asr_engine import CheckpointError, Qwen3AsrEngine, token_budget
from random_qwen3_asr import missing_weights, original_layout
from support import manifest, normalize, read_16k_mono, shared_audio

GREEDY = DecodeOptions(beam_size=1)
S = SAMPLE_RATE


@pytest.fixture(scope="module")
def engine(qwen_models) -> Qwen3AsrEngine:
    asr, aligner = qwen_models
    return load_engine("qwen3-asr", str(asr), "cpu", aligner_model=str(aligner), chunk_seconds=20)


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {code: read_16k_mono(shared_audio(manifest(language=code)[0]["file"])) for code in ("en", "zh", "de")}


def long_recording(clips) -> np.ndarray:
    """English, Mandarin and German speech with pauses between: 40 s or so, over two 20 s chunks."""
    pause = np.zeros(S, np.float32)
    return np.concatenate([clips["en"], pause, clips["zh"], pause, clips["de"], pause, clips["en"]])


def test_loads_in_float32_on_cpu_and_knows_qwens_languages(engine):
    assert (engine.name, engine.device, engine.compute_type) == ("qwen3-asr", "cpu", "float32")
    assert {"en", "zh", "yue", "de", "fil"} <= engine.languages and len(engine.languages) == 30
    assert engine.multilingual and not engine.can_translate and engine.word_timestamps


def test_detected_language_is_the_models_own_as_an_iso_code_without_a_probability(engine, clips):
    for code, audio in clips.items():
        transcript = engine.transcribe(audio, GREEDY)
        assert transcript.language == code and transcript.language_probability is None
        assert transcript.text  # it was taught to say the first words, then stop
    assert engine.detect_language(list(clips.values())) == [("en", None), ("zh", None), ("de", None)]


def test_a_forced_language_reaches_the_model(engine, clips):
    auto = engine.transcribe(clips["en"], GREEDY)
    forced = engine.transcribe(clips["en"], DecodeOptions(beam_size=1, language="de"))
    assert forced.language == "de" and forced.text != auto.text
    with pytest.raises(ValueError, match="not supported"):
        engine.transcribe(clips["en"], DecodeOptions(language="xx"))
    with pytest.raises(ValueError, match="cannot 'translate'"):
        engine.transcribe(clips["en"], DecodeOptions(task="translate"))


def test_prompt_and_temperature_reach_the_model(engine):
    # On noise the model's choices are close calls, so each option shows in what it says.
    noise = (0.1 * np.random.default_rng(0).standard_normal(4 * S)).astype(np.float32)
    plain = engine.transcribe(noise, DecodeOptions(beam_size=1, language="fr")).text
    assert engine.transcribe(noise, DecodeOptions(beam_size=1, language="fr", initial_prompt="Guten Tag")).text != plain
    sampled = {engine.transcribe(noise, DecodeOptions(beam_size=1, language="fr", temperature=1.0)).text
               for _ in range(4)}
    assert sampled - {plain}


def test_beam_size_reaches_generate(engine, clips, monkeypatch):
    # Even on noise this model's best path is also its greedy one, so the beams cannot show in its
    # words: watch the real generate() call instead (it still runs).
    seen = []
    generate = engine.model.generate

    def watched(*args, **kwargs):
        seen.append((kwargs["num_beams"], kwargs["do_sample"]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", watched)
    engine.transcribe(clips["de"], DecodeOptions(beam_size=3))
    engine.transcribe(clips["de"], DecodeOptions(beam_size=1, temperature=0.5))
    assert seen == [(3, False), (1, True)]


def test_a_batch_equals_one_by_one(engine, clips):
    audios = [clips["en"], clips["zh"][: 3 * S], long_recording(clips), clips["de"]]
    for beam_size in (1, 2):
        options = [DecodeOptions(beam_size=beam_size), DecodeOptions(beam_size=beam_size, language="zh"),
                   DecodeOptions(beam_size=beam_size, initial_prompt="Guten Tag"),
                   DecodeOptions(beam_size=beam_size, language="fr")]
        batched = engine.transcribe_batch(audios, options)
        alone = [engine.transcribe(a, o) for a, o in zip(audios, options)]
        assert [(t.text, t.language, t.segments) for t in batched] == [(t.text, t.language, t.segments) for t in alone]


def test_long_audio_is_cut_at_pauses_and_joined_on_one_timeline(engine, clips):
    audio = long_recording(clips)
    transcript = engine.transcribe(audio, GREEDY)
    duration = len(audio) / S
    assert transcript.duration == pytest.approx(duration)
    assert len(transcript.segments) >= 2, "a recording over 20 s must come back in several chunks"
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= duration for s in transcript.segments)
    assert transcript.segments[-1].end > 20, "the later chunks' times are absolute"


def test_word_timestamps_give_each_chunk_its_own_words_on_the_absolute_timeline(engine, clips):
    # The tests' aligner has random weights: where inside its chunk it puts a word means nothing, so
    # no word is checked against where it was spoken. What does not depend on the weights is checked:
    # asking for words changes no text, each segment's words are its text, and a chunk's words sit on
    # the recording's timeline between the speech of the chunks around it, not on the chunk's own.
    audio = long_recording(clips)
    plain = engine.transcribe(audio, DecodeOptions(beam_size=1, language="en"))
    timed = engine.transcribe(audio, DecodeOptions(beam_size=1, language="en", word_timestamps=True))
    assert len(plain.segments) >= 2 and [s.text for s in timed.segments] == [s.text for s in plain.segments]
    previous_ends = [0.0] + [s.end for s in plain.segments[:-1]]
    next_starts = [s.start for s in plain.segments[1:]] + [len(audio) / S]
    for segment, after, before in zip(timed.segments, previous_ends, next_starts):
        assert _letters(" ".join(w.word for w in segment.words)) == _letters(segment.text)
        assert all(w.probability is None for w in segment.words)  # the aligner gives none
        assert all(after <= w.start <= w.end <= before for w in segment.words), (after, before, segment.words)


def test_a_transcript_with_no_word_to_align_gets_no_words_instead_of_an_error(engine, clips):
    # What the aligner sees when the model writes only symbols (a music note, punctuation): the real
    # aligner and the engine's own pieces, next to a piece with words in the same aligner call.
    options = DecodeOptions(beam_size=1, language="en", word_timestamps=True)
    pieces = engine._pieces(0, clips["en"], options) + engine._pieces(1, clips["de"], options)
    texts = [("English", "♪ ... !"), ("English", "hello there")]
    words = engine._align(pieces, texts)
    assert 0 not in words and [w.word for w in words[1]] == [" hello", " there"]
    alone = engine._chunk_transcript(pieces[0], *texts[0], words.get(0))
    assert alone.text == "♪ ... !" and alone.segments and not alone.segments[0].words


def test_word_timestamps_without_an_aligner_are_refused(qwen_models, clips):
    plain = load_engine("qwen3-asr", str(qwen_models[0]), "cpu")
    assert not plain.word_timestamps
    with pytest.raises(ValueError, match="aligner_model"):
        plain.transcribe(clips["en"], DecodeOptions(word_timestamps=True))


def test_token_budget_is_the_same_alone_and_in_a_batch():
    assert token_budget(0.5) == token_budget(4.9) < token_budget(5.1)
    assert token_budget(30) >= 10 * 30


@pytest.mark.parametrize("kind", ["original layout", "missing weights", "another architecture", "no checkpoint"])
def test_checkpoints_that_would_serve_random_weights_are_refused(kind, qwen_models, tmp_path, model_cache):
    asr = qwen_models[0]
    path = {
        "original layout": lambda: original_layout(asr, tmp_path / "orig"),
        "missing weights": lambda: missing_weights(asr, tmp_path / "partial"),
        "another architecture": lambda: resolve_model("transformers", "embedded", model_cache),
        "no checkpoint": lambda: tmp_path,
    }[kind]()
    with pytest.raises(CheckpointError, match="Qwen3-ASR-1.7B-hf") as refused:
        load_engine("qwen3-asr", str(path), "cpu")
    assert str(path) in str(refused.value)


def test_asked_for_cuda_without_a_gpu_it_fails_loudly_instead_of_serving_from_the_cpu(qwen_models):
    with pytest.raises(Exception, match="(?i)cuda|nvidia"):
        load_engine("qwen3-asr", str(qwen_models[0]), "cuda")


def _letters(text: str) -> str:
    """The text without case, punctuation or spaces: the aligner splits Chinese into characters."""
    return "".join(normalize(text).split())
