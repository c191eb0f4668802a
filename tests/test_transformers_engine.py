"""The transformers engine on real Whisper weights: the embedded CTranslate2 tiny.en model,
converted to a Hugging Face checkpoint, transcribing the shared set A speech clips."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from support import JFK_REFERENCE, shared_audio, english_set_a, normalize, read_16k_mono, wer

from app.engines.base import SAMPLE_RATE, DecodeOptions
from app.engines.ct2_convert import convert_whisper_ct2_to_hf, read_ct2_model
from app.engines.models import EMBEDDED, embedded_ct2_dir, resolve_model
from app.engines.transformers_engine import TransformersEngine

GREEDY = DecodeOptions(beam_size=1)
# Measured 0.018 on set A, greedy and with 5 beams alike: two words of one proper name
# ("Claflin ... Abbie" heard as "Klafflin ... Abi"). A broken conversion lands far above.
MAX_SET_A_WER = 0.1


@pytest.fixture(scope="session")
def set_a() -> list[dict]:
    clips = english_set_a()
    for clip in clips:
        clip["audio"] = read_16k_mono(shared_audio(clip["file"]))
    return clips


@pytest.fixture(scope="session")
def jfk(set_a) -> np.ndarray:
    return next(clip["audio"] for clip in set_a if clip["file"].endswith("jfk.flac"))


@pytest.fixture(scope="session")
def ct2_dir() -> Path:
    return embedded_ct2_dir()


@pytest.fixture(scope="session")
def checkpoint(model_cache) -> Path:
    """The embedded model converted the way the service converts it, once per run."""
    return Path(resolve_model("transformers", EMBEDDED, model_cache))


@pytest.fixture(scope="session")
def engine(checkpoint) -> TransformersEngine:
    return TransformersEngine.load(str(checkpoint))


@pytest.fixture(scope="session")
def set_a_transcripts(engine, set_a):
    """Greedy and one by one: on CPU that is the cheapest way through nine clips."""
    return [engine.transcribe(clip["audio"], GREEDY) for clip in set_a]


@pytest.fixture(scope="session")
def jfk_transcript(engine, jfk):
    return engine.transcribe(jfk, DecodeOptions())


def test_checkpoint_is_complete_and_world_readable(checkpoint):
    names = {path.name for path in checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "normalizer.json",
    } <= names
    for path in checkpoint.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.*")), "staging directory left behind"


def test_conversion_keeps_an_existing_checkpoint(ct2_dir, checkpoint):
    before = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert convert_whisper_ct2_to_hf(ct2_dir, checkpoint) == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == before


def test_encoder_matches_ctranslate2(ct2_dir, engine, jfk):
    """The converted weights compute what CTranslate2 computes from the same tensors."""
    import ctranslate2

    runner = engine._runner
    features = runner.processor.feature_extractor(
        [jfk], sampling_rate=SAMPLE_RATE, return_tensors="np"
    ).input_features.astype(np.float32)
    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features)))
    with torch.inference_mode():
        actual = runner.model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert np.abs(actual - expected).max() < 1e-3


def test_reads_the_ct2_layout(ct2_dir):
    spec, variables, aliases = read_ct2_model(ct2_dir)
    assert spec == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)


def test_engine_describes_an_english_only_model(engine):
    assert (engine.name, engine.device, engine.compute_type) == ("transformers", "cpu", "float32")
    assert engine.multilingual is False
    assert engine.languages == frozenset({"en"})


def test_tokenizer_knows_the_timestamp_tokens_and_normalizes(engine):
    tokenizer = engine._runner.processor.tokenizer
    no_timestamps = engine._runner.model.generation_config.no_timestamps_token_id
    assert tokenizer.all_special_ids[-1] == no_timestamps  # where decode() starts timestamps
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == len(tokenizer) - 1
    tokens = [no_timestamps + 1, *tokenizer.encode(" Hello.", add_special_tokens=False), no_timestamps + 51]
    assert tokenizer.decode(tokens, output_offsets=True)["offsets"] == [{"text": " Hello.", "timestamp": (0.0, 1.0)}]
    assert tokenizer.normalize("Hello, World!") == "hello world"


def test_jfk(jfk_transcript):
    assert normalize(jfk_transcript.text) == normalize(JFK_REFERENCE)
    assert jfk_transcript.language == "en"
    assert jfk_transcript.duration == pytest.approx(11.0, abs=0.01)


def test_temperature_0_decodes_the_same_way_twice(engine, jfk, jfk_transcript):
    """Temperature 0 is the fallback ladder now; where no window fails, nothing is sampled."""
    assert engine.transcribe(jfk, DecodeOptions()) == jfk_transcript


def test_a_clip_batched_with_noise_keeps_its_words(engine, jfk, jfk_transcript):
    """generate()'s own batched fallback skipped the speech clip's window as silence here (its skip
    flags indexed by position in the retried batch) and read the noise's no-speech probability from
    the speech's row: the engine runs the fallback itself."""
    noise = np.random.default_rng(0).normal(0, 0.1, 5 * SAMPLE_RATE).astype(np.float32)
    options = DecodeOptions(beam_size=3)
    alone = engine.transcribe(jfk, options)
    for batch, at in (([jfk, noise], 0), ([noise, jfk], 1)):
        decoded = engine.transcribe_batch(batch, [options] * 2)
        assert decoded[at] == alone and normalize(alone.text) == normalize(JFK_REFERENCE)
        assert not decoded[1 - at].segments  # the noise: silence, skipped as faster-whisper does


def test_jfk_matches_faster_whisper(ct2_dir, jfk, jfk_transcript):
    from faster_whisper import WhisperModel

    options = DecodeOptions()
    reference = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    segments, _ = reference.transcribe(
        jfk,
        language="en",
        beam_size=options.beam_size,
        temperature=options.temperature,
        condition_on_previous_text=False,
    )
    expected = "".join(segment.text for segment in segments)
    assert normalize(jfk_transcript.text) == normalize(expected)


def test_set_a_word_error_rate_is_low(set_a, set_a_transcripts):
    references = [clip["reference"] for clip in set_a]
    assert wer(references, [transcript.text for transcript in set_a_transcripts]) <= MAX_SET_A_WER


def test_segments_are_ordered_within_the_clip(set_a_transcripts):
    for transcript in set_a_transcripts:
        assert transcript.segments
        previous_end = 0.0
        for segment in transcript.segments:
            assert previous_end <= segment.start <= segment.end <= transcript.duration
            assert segment.text
            previous_end = segment.end


def test_batch_matches_one_by_one(engine, set_a, set_a_transcripts):
    """Short clips only: on CPU every row of a batch runs as long as its longest clip."""
    shortest = sorted(range(len(set_a)), key=lambda i: set_a[i]["duration_s"])[:3]
    batched = engine.transcribe_batch([set_a[i]["audio"] for i in shortest], [GREEDY] * len(shortest))
    assert batched == [set_a_transcripts[i] for i in shortest]


def test_long_audio_is_transcribed_window_after_window(engine, set_a):
    clips = sorted(set_a, key=lambda clip: clip["duration_s"])[-2:]  # together over 30 s
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate([clips[0]["audio"], gap, clips[1]["audio"]])
    transcript = engine.transcribe(audio, GREEDY)
    assert transcript.duration > 30
    reference = clips[0]["reference"] + " " + clips[1]["reference"]
    assert wer([reference], [transcript.text]) <= MAX_SET_A_WER
    assert transcript.segments[-1].end > 30
    starts = [segment.start for segment in transcript.segments]
    assert starts == sorted(starts)


def test_english_only_model_refuses_other_languages_and_translation(engine, jfk):
    with pytest.raises(ValueError, match="language"):
        engine.transcribe(jfk, DecodeOptions(language="fr"))
    with pytest.raises(ValueError, match="translate"):
        engine.transcribe(jfk, DecodeOptions(task="translate"))


def test_multilingual_path_detects_and_steers_languages(checkpoint, set_a, tmp_path):
    """No multilingual weights exist offline, so tiny.en's real weights get a multilingual
    generation config: its language guesses mean nothing, but detection, per-clip
    languages in one batch and translation all run through generate() for real."""
    for path in checkpoint.iterdir():
        if path.name != "generation_config.json":
            (tmp_path / path.name).symlink_to(path)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    ids = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    generation.update(
        is_multilingual=True,
        lang_to_id={token: i for token, i in ids.items() if ids["<|en|>"] <= i < ids["<|translate|>"]},
        task_to_id={task: ids[f"<|{task}|>"] for task in ("transcribe", "translate")},
        max_length=40,  # guesses in a foreign language must not run on to 448 tokens
    )
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))

    engine = TransformersEngine.load(str(tmp_path))
    assert engine.multilingual and {"en", "de", "zh"} <= engine.languages
    audio = min(set_a, key=lambda clip: clip["duration_s"])["audio"]
    detected, german, french = engine.transcribe_batch(
        [audio] * 3,
        [GREEDY, DecodeOptions(beam_size=1, language="de"), DecodeOptions(beam_size=1, language="fr", task="translate")],
    )
    assert detected.language in engine.languages and 0 < detected.language_probability <= 1
    assert (german.language, german.language_probability) == ("de", 1.0)
    assert french.language == "fr"


def test_ctc_model_goes_through_the_pipeline(tmp_path):
    """A tiny wav2vec2 CTC model whose head always says "A": text-only, one segment."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, "A": 3, "B": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE).save_pretrained(tmp_path)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
    )
    model = Wav2Vec2ForCTC(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    model.save_pretrained(tmp_path)

    engine = TransformersEngine.load(str(tmp_path))
    assert (engine.multilingual, engine.languages) == (False, frozenset())
    audio = np.zeros(SAMPLE_RATE, dtype=np.float32)
    transcript = engine.transcribe(audio, DecodeOptions())
    assert transcript.text == "A"
    assert transcript.language == "und"
    assert [(s.start, s.end, s.text) for s in transcript.segments] == [(0.0, 1.0, "A")]
    with pytest.raises(ValueError, match="language"):
        engine.transcribe(audio, DecodeOptions(language="en"))
